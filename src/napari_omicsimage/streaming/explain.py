"""Explaining cells block by block: ``omicsimage explain`` on a backed (atlas) ``.h5ad``.

The files are those of the in-memory path
(:func:`napari_omicsimage.explain.write_explanation`), made by the same
:class:`~napari_omicsimage.explain.ExplanationWriter`: each block of cells is
read, preprocessed and explained by :func:`napari_omicsimage.explain.explain`
(gene attribution and pixel saliency for its predicted class), its per-cell
rows are appended to the output files, and the class tables come from running
per-class sums.  Everything in those tables is a mean over the class's
members, so summing block by block is exact (float64 sums; the in-memory path
gives the same numbers to float32 rounding).  Memory: one block of cells and
a few arrays of length genes per class; per cell only the predicted class of
the selection pass (and a completeness error) is kept.

Which cells are explained (both paths, :func:`select_cells`): Integrated
Gradients costs tens of network passes per cell, so by default at most
:data:`DEFAULT_CELLS_PER_CLASS` cells *per predicted class* are explained, a
seeded random sample of the cells the model predicts as that class (one
prediction pass over all cells chooses them); ``cells_per_class=None``
explains every cell.  A class's table then averages the explained cells that
are its members (its correctly predicted cells when labels are given): a
uniform random sample of all its members.  ``explain.json`` states the cap,
the seed and how many cells of each class there were and were explained.

Seeded noise (SmoothGrad, GradientSHAP) is drawn per batch of
``batch_size`` cells with ``seed + batch number``; blocks start at a multiple
of the batch size, so the noise is that of one in-memory call.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np

from ..errors import Cancelled, OmicsInputError
from ..explain import ExplanationWriter, explain
from ..models import MAX_MISSING_FRACTION
from ..progress import ProgressEvent
from ..training import ImageBatches, class_indices, predict_proba
from .cells import BLOCK_ROWS, block_anndata, iter_row_blocks

#: default cap on the cells explained per predicted class (``--cells-per-class``; ``all`` for every cell)
DEFAULT_CELLS_PER_CLASS = 500
#: cells explained per block (a multiple of the attribution batch of 32): a few MB of arrays per block
EXPLAIN_BLOCK_ROWS = 512


def predicted_classes(trained, adata: ad.AnnData, *, max_missing_fraction: float = MAX_MISSING_FRACTION,
                      block_rows: int = BLOCK_ROWS, progress=None) -> np.ndarray:
    """Predicted class index of every cell, block by block, computed as :func:`~napari_omicsimage.explain.explain`
    computes it (float32 images, no mixed precision)."""
    out = np.empty(adata.n_obs, dtype=np.int32)
    done = 0
    for part, block in iter_row_blocks(adata, np.arange(adata.n_obs), block_rows):
        _, images = trained.prepare(block_anndata(adata, part, block), max_missing_fraction=max_missing_fraction)
        proba = predict_proba(trained.model, ImageBatches(trained.device, images=images), mixed_precision=False)
        out[done:done + len(part)] = proba.argmax(1)
        done += len(part)
        if progress is not None and progress(ProgressEvent("predict", batch=done - 1, n_batches=adata.n_obs)):
            raise Cancelled("explain was cancelled; nothing was written.")
    return out


def check_cells_per_class(value) -> int | None:
    """``--cells-per-class``: a positive number, or ``all`` / ``None`` for every cell."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise OmicsInputError(f"--cells-per-class must be a positive number of cells or 'all', not {value!r}.")
    return number


def select_cells(trained, adata: ad.AnnData, cells_per_class: int | None = DEFAULT_CELLS_PER_CLASS, *,
                 seed: int = 0, max_missing_fraction: float = MAX_MISSING_FRACTION, progress=None
                 ) -> tuple[np.ndarray, dict]:
    """``(rows, selection)``: the sorted rows to explain and what ``explain.json`` says about them.

    At most ``cells_per_class`` cells per predicted class, drawn with
    ``numpy.random.default_rng(seed)`` (class by class, in the model's class
    order); ``None`` keeps every cell without a prediction pass.
    """
    cells_per_class = check_cells_per_class(cells_per_class)
    if cells_per_class is None:
        return np.arange(adata.n_obs), {"cells_per_class": "all", "n_input_cells": int(adata.n_obs),
                                        "n_explained_cells": int(adata.n_obs)}
    predicted = predicted_classes(trained, adata, max_missing_fraction=max_missing_fraction, progress=progress)
    rng = np.random.default_rng(int(seed))
    picked, predicted_counts, explained_counts = [], {}, {}
    for k, name in enumerate(trained.classes):
        members = np.flatnonzero(predicted == k)
        predicted_counts[name] = int(len(members))
        if len(members) > cells_per_class:
            members = rng.choice(members, size=cells_per_class, replace=False)
        explained_counts[name] = int(len(members))
        picked.append(members)
    rows = np.sort(np.concatenate(picked)).astype(np.int64)
    selection = {"cells_per_class": int(cells_per_class), "seed": int(seed),
                 "stratified_by": "predicted class: at most cells_per_class cells predicted as each class, "
                                  "a seeded random sample; class tables average the explained members",
                 "n_input_cells": int(adata.n_obs), "n_explained_cells": int(len(rows)),
                 "predicted_cells": predicted_counts, "explained_cells": explained_counts}
    return rows, selection


def explain_streaming(trained, adata: ad.AnnData, folder, method: str | None = None,
                      label_column: str | None = None, *, pixel_method: str = "gradient", baseline="mean",
                      contrastive: bool = True, cells_per_class: int | None = DEFAULT_CELLS_PER_CLASS,
                      seed: int = 0, top_genes: int = 50, max_missing_fraction: float | None = None,
                      progress=None, block_rows: int = EXPLAIN_BLOCK_ROWS, **options) -> ExplanationWriter:
    """Explain the cells of ``adata`` (backed or in memory) block by block into ``folder``.

    ``folder`` is an empty folder the caller owns (``write_output_dir``'s);
    the arguments are :func:`~napari_omicsimage.explain.explain`'s plus
    ``cells_per_class`` and ``seed`` (see :func:`select_cells`) and
    ``top_genes`` (:func:`~napari_omicsimage.explain.write_explanation`'s).
    ``progress(ProgressEvent)`` hears stage ``"predict"`` (the selection pass)
    and ``"explain"`` after every block, ``batch`` = cells done − 1 and
    ``n_batches`` = cells in all; returning True cancels.  Returns the
    finished writer: ``.summary`` (explain.json) and ``.tables`` (class →
    ranked gene table).
    """
    missing = {} if max_missing_fraction is None else {"max_missing_fraction": max_missing_fraction}
    truth = None
    if label_column is not None:
        if label_column not in adata.obs:
            raise OmicsInputError(f"no label column {label_column!r} in the data; available: "
                                  f"{list(adata.obs.columns)}.")
        truth = adata.obs[label_column].astype(str).to_numpy()
        class_indices(truth, trained.classes)  # unknown labels: a clear error now, not after hours
    rows, selection = select_cells(trained, adata, cells_per_class, seed=seed, progress=progress, **missing)
    batch_size = int(options.get("batch_size", 32))
    block_rows = max(batch_size, int(block_rows) // batch_size * batch_size)
    writer = ExplanationWriter(folder, trained.layout, n_samples=len(rows), top_genes=top_genes)
    done = 0
    for part, block in iter_row_blocks(adata, rows, block_rows):
        piece = block_anndata(adata, part, block)
        if truth is not None:
            piece.obs[label_column] = truth[part]
        with warnings.catch_warnings():  # a class absent from one block is normal; the summary lists empty ones
            warnings.filterwarnings("ignore", message="no sample for class")
            result = explain(trained, piece, method, label_column, pixel_method=pixel_method, baseline=baseline,
                             contrastive=contrastive, seed=int(seed) + done // batch_size, **missing, **options)
        writer.add(result)
        done += len(part)
        if progress is not None and progress(ProgressEvent("explain", batch=done - 1, n_batches=len(rows))):
            raise Cancelled("explain was cancelled; nothing was written.")
    summary = writer.finish(n_missing_genes=len(trained.missing_genes(adata)), selection=selection)
    empty = summary["classes_without_samples"]
    if empty:
        warnings.warn(f"no sample for class(es) {empty} ({summary['grouping']}); they get no class-level map or "
                      "table", stacklevel=2)
    return writer
