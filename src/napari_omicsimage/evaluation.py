"""Stratified k-fold cross-validation of image classifiers, with a linear baseline.

5 stratified folds, Adam, cross-entropy; the training settings come from
``TrainConfig`` (the ``recommended`` protocol by default: 20 epochs, batch 16,
learning rate 1e-3; ``TrainConfig.for_protocol("paper")`` is the seed paper's
5 epochs, batch 32, learning rate 1e-4, Alyatimi et al. 2025).  Unlike
the paper, preprocessing statistics (gene selection, scaling) and the layout
are fitted **on each training fold only**, so no test sample shapes the images
it is tested on.  ``transductive=True`` reproduces the paper's set-up instead
(preprocessing and layout fitted on all samples, only the network
cross-validated), so the optimism of that set-up can be measured.

Every fold also fits a logistic regression on the same preprocessed features
(the fold's own preprocessing), reported beside the CNN: an image model should
beat it to be worth its cost.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from . import reports
from .errors import Cancelled, OmicsInputError
from .io import check_labels
from .models import resolve_device
from .outputs import write_output_dir
from .preprocess import Preprocessor
from .progress import Progress, ProgressEvent
from .training import (
    ImageBatches,
    TrainConfig,
    class_indices,
    fit_layout,
    fit_network,
    predict_proba,
)

#: per-fold metrics, all macro-averaged over classes where that applies
METRIC_NAMES = ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro",
                "roc_auc_ovo_macro")


# ==================================================================== metrics
def classification_metrics(y_true: np.ndarray, proba: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro precision/recall/F1 and macro one-vs-one ROC-AUC."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_true = np.asarray(y_true)
    predicted = proba.argmax(axis=1)
    labels = np.arange(n_classes)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, predicted, labels=labels, average="macro", zero_division=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" is expected on small folds
        balanced = balanced_accuracy_score(y_true, predicted)
    try:
        if n_classes == 2:
            auc = roc_auc_score(y_true, proba[:, 1])
        else:
            auc = roc_auc_score(y_true, proba, multi_class="ovo", average="macro", labels=labels)
    except ValueError:  # a test fold without some class: AUC is undefined there
        auc = float("nan")
    return {"accuracy": float(accuracy_score(y_true, predicted)), "balanced_accuracy": float(balanced),
            "precision_macro": float(precision), "recall_macro": float(recall), "f1_macro": float(f1),
            "roc_auc_ovo_macro": float(auc)}


def _summary(rows: list[dict]) -> tuple[dict, dict]:
    """Mean and sample standard deviation (ddof=1) of each metric over folds."""
    mean, sd = {}, {}
    for name in METRIC_NAMES:
        values = np.array([r[name] for r in rows], dtype=float)
        finite = values[np.isfinite(values)]
        mean[name] = float(finite.mean()) if finite.size else float("nan")
        sd[name] = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    return mean, sd


def wilcoxon_test(scores_a, scores_b, *, name_a: str = "a", name_b: str = "b", metric: str = "accuracy"
                  ) -> dict:
    """Two-sided Wilcoxon signed-rank test between paired fold scores.

    With 5 folds the smallest possible two-sided p-value is 2/2⁵ = 0.0625, so
    5-fold CV alone can never reach p < 0.05; the result says so.
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise OmicsInputError(f"the Wilcoxon test needs paired fold scores of equal length (≥2), got "
                              f"{a.size} and {b.size}; run both models with the same folds.")
    differences = a - b
    result = {"test": "wilcoxon signed-rank (two-sided)", "metric": metric, "model_a": name_a,
              "model_b": name_b, "scores_a": a.tolist(), "scores_b": b.tolist(),
              "mean_difference": float(differences.mean()), "n_pairs": int(a.size),
              "min_attainable_p": float(2.0 / 2 ** a.size)}
    if np.allclose(differences, 0):
        result.update(statistic=0.0, p_value=1.0, note="all fold scores are equal; no difference to test")
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about ties/zeros with few pairs
        test = wilcoxon(a, b, alternative="two-sided", zero_method="wilcox")
    result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
    if a.size < 6:
        result["note"] = (f"with {a.size} folds the smallest two-sided p-value is {2.0 / 2 ** a.size:.4f}; "
                          "a non-significant result says little")
    return result


# ===================================================================== result
@dataclass
class CVResult:
    """Cross-validation outcome; :attr:`metrics` is what ``metrics.json`` holds."""

    metrics: dict
    classes: list[str]
    confusion_matrices: list[np.ndarray]
    baseline_confusion_matrices: list[np.ndarray]
    #: mean training loss per epoch, one list per fold
    loss_curves: list[list[float]]
    #: training loss per batch, one list per fold
    batch_loss_curves: list[list[float]]
    #: out-of-fold predictions: sample, fold, true, predicted, prob_<class>, baseline_predicted
    predictions: pd.DataFrame
    #: the test fold (0-based) of every sample, -1 where its fold did not finish
    fold_of_sample: np.ndarray
    config: TrainConfig
    layout_spec: dict
    transductive: bool = False
    cancelled: bool = False
    notes: list[str] = field(default_factory=list)
    #: out-of-fold class probabilities of the baseline, aligned with ``predictions``
    baseline_proba: np.ndarray | None = None

    @property
    def n_folds_finished(self) -> int:
        return len(self.metrics["folds"])

    @property
    def mean_confusion(self) -> np.ndarray:
        """Confusion matrix averaged over the finished folds (rows: true, columns: predicted)."""
        return np.mean(self.confusion_matrices, axis=0)

    def fold_scores(self, metric: str = "accuracy") -> list[float]:
        return [row[metric] for row in self.metrics["folds"]]

    def compare(self, other: CVResult, metric: str = "accuracy") -> dict:
        """Wilcoxon signed-rank test of this result's fold scores against ``other``'s.

        Both must come from the same folds (same samples, seed and k), else the
        pairing means nothing.  The test is stored in ``metrics["comparison"]``.
        """
        if not np.array_equal(self.fold_of_sample, other.fold_of_sample) or \
                not self.predictions["sample"].equals(other.predictions["sample"]):
            raise OmicsInputError("the two results used different folds; run both with the same data, "
                                  "seed and number of folds before comparing them.")
        test = wilcoxon_test(self.fold_scores(metric), other.fold_scores(metric),
                             name_a=self.config.model, name_b=other.config.model, metric=metric)
        self.metrics["comparison"] = test
        self.metrics["compare_model"] = {k: other.metrics[k] for k in ("folds", "mean", "sd")}
        self.metrics["compare_model"]["model"] = other.config.model
        return test


def _check_folds(labels: np.ndarray, folds: int) -> None:
    if int(folds) < 2:
        raise OmicsInputError(f"cross-validation needs at least 2 folds, got {folds}.")
    counts = pd.Series(labels).value_counts()
    small = counts[counts < folds]
    if len(small):
        smallest = int(counts.min())
        advice = (f"use {smallest} folds or fewer (--folds {smallest})" if smallest >= 2 else
                  "drop that class or add samples: a class needs at least 2 samples to be cross-validated")
        raise OmicsInputError(
            f"class(es) {', '.join(f'{k!r} ({v} samples)' for k, v in small.items())} have fewer samples "
            f"than the {folds} folds, so some test folds would not contain them; {advice}."
        )


def stratified_folds(labels, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_idx, test_idx)`` per fold: shuffled stratified k-fold, fixed by the labels and ``seed``.

    The one place folds are made, so benchmarks that train their own models per fold (explanations) use the
    very folds :func:`cross_validate` scores.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels).astype(str)
    _check_folds(labels, int(folds))
    return list(StratifiedKFold(n_splits=int(folds), shuffle=True, random_state=int(seed))
                .split(np.zeros(len(labels)), labels))


# ====================================================================== CV
def cross_validate(adata: ad.AnnData, label_column: str, layout_spec: dict, config: TrainConfig | None = None,
                   folds: int = 5, transductive: bool = False, progress: Progress | None = None,
                   baseline: bool = True) -> CVResult:
    """Stratified k-fold cross-validation of a CNN on images of ``adata``.

    Per fold: fit the :class:`Preprocessor` and the layout on the training
    samples, train a fresh network (:func:`training.fit_network`), predict the
    test samples, and fit a logistic regression on the same preprocessed
    features.  ``transductive=True`` fits preprocessing and layout once on all
    samples (the seed paper's set-up; optimistic).  The folds depend only on
    the labels and ``config.seed``, so two models run with the same seed are
    paired fold by fold (see :meth:`CVResult.compare`).

    The progress callback hears batch/epoch events (with ``fold`` set) and one
    ``"fold"`` event per finished fold; returning ``True`` cancels, keeping the
    folds that finished.
    """
    config = (config or TrainConfig()).validate()
    check_labels(adata, label_column)
    _check_folds(adata.obs[label_column].astype(str).to_numpy(), int(folds))  # before any fitting
    device = resolve_device(config.device)
    notes = []
    if transductive:
        notes.append("transductive: preprocessing and layout were fitted on ALL samples (the seed paper's "
                     "set-up); test samples shaped their own images, so these scores are optimistic")
    fitter = _InMemoryFolds(adata, layout_spec, config, device, transductive)
    return run_folds(adata, label_column, layout_spec, config, folds, fitter, progress=progress,
                     baseline=baseline, notes=notes, transductive=transductive)


@dataclass
class FoldOutcome:
    """What one fold's fitter returns to :func:`run_folds`."""

    proba: np.ndarray | None  # test-cell class probabilities; None when the fold was cancelled
    history: list[dict]
    baseline_proba: np.ndarray | None = None
    #: the training samples actually used (QC may leave some out); None: all of the fold's
    train_idx: np.ndarray | None = None


class _InMemoryFolds:
    """Per fold: preprocessing and layout fitted on the training samples, all in memory."""

    def __init__(self, adata, layout_spec, config, device, transductive: bool):
        self.adata, self.layout_spec, self.config, self.device = adata, layout_spec, config, device
        self.transductive = transductive
        if transductive:
            self.shared_pre = shared_pre = Preprocessor(config.preprocess).fit(adata)
            self.shared_x = shared_pre.transform(adata)
            self.shared_layout, self.shared_images = fit_layout(layout_spec, self.shared_x, shared_pre.genes_)

    def __call__(self, fold, n_folds, train_idx, test_idx, y, n_classes, progress, baseline) -> FoldOutcome:
        config, device, adata = self.config, self.device, self.adata
        if self.transductive:
            train_idx = train_idx[self.shared_pre.qc_passed_[train_idx]]  # QC (min_genes): left out of training
            x_train, x_test = self.shared_x[train_idx], self.shared_x[test_idx]
            layout = self.shared_layout
            train_images = None if self.shared_images is None else self.shared_images[train_idx]
            test_images = None if self.shared_images is None else self.shared_images[test_idx]
        else:
            preprocessor = Preprocessor(config.preprocess).fit(adata[train_idx])
            train_idx = train_idx[preprocessor.qc_passed_]  # QC (min_genes): failing samples teach nothing
            x_train = preprocessor.transform(adata[train_idx])
            x_test = preprocessor.transform(adata[test_idx])
            layout, train_images = fit_layout(self.layout_spec, x_train, preprocessor.genes_)
            test_images = None if train_images is None else np.asarray(layout.transform(x_test), np.float32)
        train_batches = (ImageBatches(device, layout=layout, x=x_train) if train_images is None
                         else ImageBatches(device, images=train_images))
        test_batches = (ImageBatches(device, layout=layout, x=x_test) if test_images is None
                        else ImageBatches(device, images=test_images))
        model, history, cancelled = fit_network(train_batches, y[train_idx], n_classes, layout.n_channels,
                                                config, progress=progress, fold=fold, n_folds=n_folds)
        if cancelled:
            return FoldOutcome(None, history, train_idx=train_idx)
        proba = predict_proba(model, test_batches, batch_size=max(int(config.batch_size), 1),
                              mixed_precision=config.mixed_precision)
        base = _baseline_proba(x_train, y[train_idx], x_test, n_classes, config.seed) if baseline else None
        return FoldOutcome(proba, history, base, train_idx)


def run_folds(adata: ad.AnnData, label_column: str, layout_spec: dict, config: TrainConfig, folds: int, fitter,
              *, progress: Progress | None = None, baseline: bool = True, notes: list[str] | None = None,
              transductive: bool = False, baseline_model: str = "logistic regression (L2, C=1) on the fold's "
                                                               "preprocessed features") -> CVResult:
    """The stratified folds, their metrics and the result, around a per-fold ``fitter``.

    ``fitter(fold, n_folds, train_idx, test_idx, y, n_classes, progress, baseline)``
    returns a :class:`FoldOutcome`; in memory that is :class:`_InMemoryFolds`,
    at atlas scale :mod:`napari_omicsimage.streaming.cv`.
    """
    from sklearn.metrics import confusion_matrix

    device = resolve_device(config.device)
    labels = adata.obs[label_column].astype(str).to_numpy()
    classes = sorted(set(labels))
    y = class_indices(labels, classes)
    folds = int(folds)
    splits = stratified_folds(labels, folds, config.seed)
    notes = list(notes or [])
    fold_rows, baseline_rows = [], []
    confusions, baseline_confusions, loss_curves, batch_curves = [], [], [], []
    fold_of_sample = np.full(len(y), -1, dtype=int)
    n_classes = len(classes)
    proba_oof = np.full((len(y), n_classes), np.nan)
    baseline_oof = np.full((len(y), n_classes), np.nan)
    cancelled = False

    for f, (train_idx, test_idx) in enumerate(splits):
        started = time.perf_counter()
        outcome = fitter(f, folds, train_idx, test_idx, y, n_classes, progress, baseline)
        train_idx = outcome.train_idx if outcome.train_idx is not None else train_idx  # QC may drop some
        if outcome.proba is None:
            cancelled = True  # an unfinished fold is dropped; the finished ones stand
            break
        proba, history = outcome.proba, outcome.history
        row = {"fold": f + 1, "n_train": len(train_idx), "n_test": len(test_idx),
               **classification_metrics(y[test_idx], proba, n_classes),
               "final_train_loss": history[-1]["loss"], "seconds": round(time.perf_counter() - started, 2)}
        fold_rows.append(row)
        confusions.append(confusion_matrix(y[test_idx], proba.argmax(1), labels=np.arange(n_classes)))
        loss_curves.append([h["loss"] for h in history])
        batch_curves.append([v for h in history for v in h["batch_losses"]])
        fold_of_sample[test_idx] = f
        proba_oof[test_idx] = proba
        if baseline:
            base_proba = outcome.baseline_proba
            baseline_rows.append({"fold": f + 1, **classification_metrics(y[test_idx], base_proba, n_classes)})
            baseline_confusions.append(confusion_matrix(y[test_idx], base_proba.argmax(1),
                                                        labels=np.arange(n_classes)))
            baseline_oof[test_idx] = base_proba
        event_metrics = {k: row[k] for k in METRIC_NAMES}
        if baseline:
            event_metrics["baseline_accuracy"] = baseline_rows[-1]["accuracy"]
        if progress is not None and progress(ProgressEvent("fold", f, folds, loss=row["final_train_loss"],
                                                           metrics=event_metrics)) is True:
            cancelled = f + 1 < folds
            break

    if not fold_rows:
        raise Cancelled("cross-validation was cancelled before any fold finished; nothing to report.")
    mean, sd = _summary(fold_rows)
    metrics = {"folds": fold_rows, "mean": mean, "sd": sd, "classes": classes, "n_samples": len(y),
               "class_counts": {c: int((labels == c).sum()) for c in classes},
               "protocol": {"model": config.model, "folds": folds, "epochs": int(config.epochs),
                            "batch_size": int(config.batch_size), "optimizer": "Adam", "lr": float(config.lr),
                            "loss": "cross-entropy", "seed": int(config.seed), "weights": config.weights,
                            "transductive": bool(transductive), "layout": _plain(layout_spec),
                            "preprocess": _plain(config.to_dict()["preprocess"]), "device": str(device)},
               "cancelled": cancelled, "notes": notes}
    if baseline:
        base_mean, base_sd = _summary(baseline_rows)
        metrics.update(baseline=base_mean, baseline_sd=base_sd, baseline_folds=baseline_rows,
                       baseline_model=baseline_model)
        if len(fold_rows) >= 2:
            metrics["wilcoxon_vs_baseline"] = wilcoxon_test(
                [r["accuracy"] for r in fold_rows], [r["accuracy"] for r in baseline_rows],
                name_a=config.model, name_b="logistic regression")
    done = fold_of_sample >= 0
    predictions = pd.DataFrame({"sample": np.asarray(adata.obs_names, dtype=str)[done],
                                "fold": fold_of_sample[done] + 1, "true": labels[done],
                                "predicted": np.asarray(classes, dtype=object)[proba_oof[done].argmax(1)]})
    for k, name in enumerate(classes):
        predictions[f"prob_{name}"] = proba_oof[done, k]
    if baseline:
        predictions["baseline_predicted"] = np.asarray(classes, dtype=object)[baseline_oof[done].argmax(1)]
    result = CVResult(metrics=metrics, classes=classes, confusion_matrices=confusions,
                      baseline_confusion_matrices=baseline_confusions, loss_curves=loss_curves,
                      batch_loss_curves=batch_curves, predictions=predictions, fold_of_sample=fold_of_sample,
                      config=config, layout_spec=dict(layout_spec), transductive=bool(transductive),
                      cancelled=cancelled, notes=notes,
                      baseline_proba=baseline_oof[done] if baseline else None)
    if progress is not None:
        progress(ProgressEvent("done", n_folds=folds, metrics=dict(mean)))
    return result


def _baseline_proba(x_train, y_train, x_test, n_classes: int, seed: int) -> np.ndarray:
    """Logistic regression probabilities, with columns for classes absent from training."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, random_state=int(seed))
    clf.fit(x_train, y_train)
    proba = np.zeros((len(x_test), n_classes))
    proba[:, clf.classes_] = clf.predict_proba(x_test)
    return proba


def _plain(value):
    """JSON-safe copy: numpy scalars to Python, tuples to lists, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


# ==================================================================== report
def write_report(result: CVResult, out_dir, *, overwrite: bool = False, inputs=()) -> Path:
    """Write ``metrics.json``, ``metrics.csv``, ``predictions.csv`` and the PNG plots.

    Plots: ``loss_curves.png`` (training loss per fold), ``confusion_matrix.png``
    (mean over folds, CNN and baseline) and ``roc_curves.png`` (one-vs-rest,
    out-of-fold).  Written through :func:`napari_omicsimage.outputs.write_output_dir`
    (atomic; ``overwrite=True`` replaces only what an earlier run wrote).
    """
    def fill(tmp: Path) -> None:
        payload = _plain({**result.metrics,
                          "confusion_matrices": [c.tolist() for c in result.confusion_matrices],
                          "mean_confusion_matrix": result.mean_confusion.tolist(),
                          "loss_curves": result.loss_curves})
        (tmp / "metrics.json").write_text(json.dumps(payload, indent=2))
        reports.metrics_frame(result).to_csv(tmp / "metrics.csv", index=False)
        result.predictions.to_csv(tmp / "predictions.csv", index=False)
        reports.plot_loss_curves(result, tmp / "loss_curves.png")
        reports.plot_confusion_matrix(result, tmp / "confusion_matrix.png")
        reports.plot_roc_curves(result, tmp / "roc_curves.png")

    return write_output_dir(out_dir, fill, overwrite=overwrite, inputs=inputs)
