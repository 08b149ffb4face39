"""Cross-validation at atlas scale: every fold fitted on its training cells only, streamed.

Each fold's training cells that pass QC are held in memory when they fit
``options.cache_gb`` (:func:`.loader.cache_cells`), one fold at a time.

The folds, metrics and report are those of
:func:`napari_omicsimage.evaluation.run_folds`; per fold this fits the
preprocessing statistics on the fold's training cells (one streaming pass),
the layout on a stratified subsample of them, trains on block-shuffled
batches of them and predicts the test cells block by block.  The logistic
regression baseline is fitted on the same subsample of training cells (sparse
features), so its memory is bounded too.
"""

from __future__ import annotations

import numpy as np

from ..evaluation import CVResult, FoldOutcome, run_folds
from ..io import check_labels
from ..models import resolve_device
from ..training import TrainConfig, TrainedModel
from .cells import iter_row_blocks
from .fit import prepare_block, training_rows, transform_rows
from .run import StreamingOptions, fit_inputs, fit_network_streaming, predict_proba_rows


class _StreamingFolds:
    def __init__(self, adata, label_column, layout_spec, config, options):
        self.adata, self.layout_spec, self.config, self.options = adata, layout_spec, config, options
        self.classes = sorted(set(adata.obs[label_column].astype(str)))
        self.device = resolve_device(config.device)

    def __call__(self, fold, n_folds, train_idx, test_idx, y, n_classes, progress, baseline) -> FoldOutcome:
        adata, config = self.adata, self.config
        train_rows, test_order = np.sort(train_idx), np.argsort(test_idx, kind="stable")
        test_rows = np.asarray(test_idx)[test_order]
        preprocessor, layout, subsample = fit_inputs(adata, train_rows, y, self.layout_spec, config, self.options)
        model, history, cancelled = fit_network_streaming(
            adata, train_rows, y, n_classes, preprocessor, layout, subsample, config, self.options,
            device=self.device, progress=progress, fold=fold, n_folds=n_folds)
        trained_on = training_rows(preprocessor, train_rows)  # QC (min_genes): failing cells teach nothing
        if cancelled:
            return FoldOutcome(None, history, train_idx=trained_on)
        trained = TrainedModel(model=model, preprocessor=preprocessor, layout=layout, classes=self.classes,
                               config=config, fill_values=preprocessor.scaled_mean_)
        proba = np.empty((len(test_rows), n_classes))
        proba[test_order] = predict_proba_rows(trained, adata, test_rows)
        base = None
        if baseline:
            base = np.empty_like(proba)
            base[test_order] = self._baseline(preprocessor, subsample, y, test_rows, n_classes)
        return FoldOutcome(proba, history, base, train_idx=trained_on)

    def _baseline(self, preprocessor, subsample, y, test_rows, n_classes):
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=2000, random_state=int(self.config.seed))
        clf.fit(transform_rows(self.adata, subsample, preprocessor), y[subsample])
        parts = []
        for part, block in iter_row_blocks(self.adata, test_rows):
            proba = np.zeros((len(part), n_classes))
            proba[:, clf.classes_] = clf.predict_proba(prepare_block(self.adata, part, block, preprocessor))
            parts.append(proba)
        return np.concatenate(parts)


def cross_validate_streaming(adata, label_column: str, layout_spec: dict, config: TrainConfig | None = None,
                             options: StreamingOptions | None = None, *, folds: int = 5, progress=None,
                             baseline: bool = True) -> CVResult:
    """Stratified k-fold CV of a backed (or any) AnnData, in bounded memory; see the module notes."""
    config = (config or TrainConfig()).validate()
    options = options or StreamingOptions()
    check_labels(adata, label_column)
    notes = [f"streaming: each fold's layout and baseline were fitted on a stratified subsample of at most "
             f"{options.layout_cells:,} of its training cells; preprocessing statistics on all of them"]
    fitter = _StreamingFolds(adata, label_column, layout_spec, config, options)
    return run_folds(adata, label_column, layout_spec, config, folds, fitter, progress=progress,
                     baseline=baseline, notes=notes,
                     baseline_model=f"logistic regression (L2, C=1) on the fold's preprocessed features of at "
                                    f"most {options.layout_cells:,} training cells")
