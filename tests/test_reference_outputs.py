"""In-memory outputs compared with a reference stored before issue 18's refactor (tests/data/reference_outputs.npz).

A small copy of the accuracy benchmark's set-up (benchmarks/accuracy.py): pbmc68k_reduced (200 cells), the
preprocessing and DeepInsight/grid layouts fitted per fold, 2 folds, the small CNN, 1 epoch, seed 0, torch on one
thread.  Preprocessing and rendering must match exactly; trained outputs to a tight tolerance.

Regenerate (only when a change of numbers is intended, and say so in docs/benchmarks.md):
    PYTHONPATH=src python3 tests/test_reference_outputs.py --write
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).with_name("data") / "reference_outputs.npz"
LABEL = "bulk_labels"
LAYOUTS = {"deepinsight": {"method": "deepinsight", "feature_extractor": "tsne", "size": 16},
           "grid": {"method": "grid", "order": "cluster"}}


def compute() -> dict[str, np.ndarray]:
    import torch

    from napari_omicsimage.attribution import gene_attributions
    from napari_omicsimage.evaluation import cross_validate
    from napari_omicsimage.io import load_sample_data
    from napari_omicsimage.preprocess import PreprocessConfig, Preprocessor
    from napari_omicsimage.training import TrainConfig, fit_layout, train

    torch.set_num_threads(1)
    adata = load_sample_data()
    adata = adata[np.arange(0, adata.n_obs, 3)[:200]].copy()
    pre_config = PreprocessConfig(n_top_genes=200)
    out = {}
    pre = Preprocessor(pre_config).fit(adata)
    x = pre.transform(adata)
    out["preprocessed"] = x
    out["genes"] = np.asarray(pre.genes_, dtype=str)
    for name, spec in LAYOUTS.items():
        layout, images = fit_layout(spec, x, pre.genes_)
        out[f"images_{name}"] = np.asarray(layout.transform(x[:20]), np.float32)
    config = TrainConfig(model="small", epochs=1, batch_size=32, lr=1e-3, seed=0, device="cpu",
                         preprocess=pre_config)
    for name, spec in LAYOUTS.items():
        result = cross_validate(adata, LABEL, spec, config, folds=2)
        prob_columns = [c for c in result.predictions.columns if c.startswith("prob_")]
        out[f"cv_proba_{name}"] = result.predictions[prob_columns].to_numpy(np.float64)
        out[f"cv_fold_{name}"] = np.asarray(result.fold_of_sample)
        out[f"cv_baseline_proba_{name}"] = np.asarray(result.baseline_proba, np.float64)
    trained = train(adata, LABEL, LAYOUTS["deepinsight"], config)
    out["train_proba"] = trained.predict_proba(adata[:20]).astype(np.float64)
    xm = trained.prepare_matrix(adata[:8])
    out["attribution"] = np.asarray(gene_attributions(trained, xm, n_steps=8).values, np.float64)
    return out


EXACT = ("preprocessed", "genes", "images_deepinsight", "images_grid", "cv_fold_deepinsight", "cv_fold_grid")


def test_in_memory_outputs_match_reference():
    reference = np.load(REFERENCE)
    now = compute()
    assert sorted(now) == sorted(reference.files)
    for key in EXACT:
        np.testing.assert_array_equal(now[key], reference[key], err_msg=key)
    for key in set(now) - set(EXACT):
        np.testing.assert_allclose(now[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)


if __name__ == "__main__" and "--write" in sys.argv:
    values = compute()
    np.savez_compressed(REFERENCE, **values)
    print({k: v.shape for k, v in values.items()}, REFERENCE.stat().st_size, "bytes")
