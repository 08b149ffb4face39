"""Fitting preprocessing and the gene layout without the full matrix.

:func:`fit_preprocessor` gives the same fitted
:class:`~napari_omicsimage.preprocess.Preprocessor` as ``Preprocessor.fit`` on
the same cells (genes, per-gene minimum and maximum, log-scale decision), from
one pass over blocks of rows: the per-sample steps (``normalize_total``,
``log1p``) are per cell, so a block at a time is exact, and everything the
fitted steps need is a per-gene sum: counts, sums and sums of squares (for
scanpy's ``seurat`` dispersions or, for log-scale data, the variance), minimum
and maximum.  Memory: a few arrays of length genes, plus one block.

:func:`fit_layout_on_subsample` fits the gene layout on the gene profiles of
a bounded, stratified subsample of the training cells (default
:data:`DEFAULT_LAYOUT_CELLS`): a layout places *genes*, and 20,000 cells
describe a gene's profile about as well as 10⁶ do
(docs/benchmarks.md#scale measures the trustworthiness change).
"""

from __future__ import annotations

import logging
import time

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import OmicsInputError
from ..preprocess import PreprocessConfig, Preprocessor, decide_scale, normalize_samples
from ..progress import ProgressEvent
from ..training import fit_layout
from .cells import BLOCK_ROWS, block_anndata, iter_row_blocks, stratified_subsample

log = logging.getLogger(__name__)

#: cells whose gene profiles the layout is fitted on (stratified by label); ``layout_cells`` changes it
DEFAULT_LAYOUT_CELLS = 20_000
#: cells the log-scale decision looks at (the first ones of the training set, as read)
_LOG_SCALE_PROBE_CELLS = 20_000


class GeneStatistics:
    """Per-gene running sums over blocks of cells (sparse CSR or dense), in float64."""

    def __init__(self, n_genes: int, *, counts_domain: bool):
        self.n = 0
        self.counts_domain = counts_domain
        z = lambda: np.zeros(n_genes, dtype=np.float64)  # noqa: E731
        self.sum, self.sumsq, self.positive, self.stored = z(), z(), z(), z()
        self.min = np.full(n_genes, np.inf)
        self.max = np.full(n_genes, -np.inf)
        if counts_domain:  # scanpy's seurat flavour measures dispersion on expm1 of the log values
            self.count_sum, self.count_sumsq = z(), z()

    def update(self, block: sp.csr_matrix) -> None:
        block = sp.csr_matrix(block)
        values, genes = block.data.astype(np.float64), block.indices
        if not np.isfinite(values).all():
            raise OmicsInputError(f"{int((~np.isfinite(values)).sum())} expression value(s) are NaN or "
                                  "infinite; impute or drop them before imagifying.")
        n_genes = len(self.sum)
        self.n += block.shape[0]
        self.sum += np.bincount(genes, values, n_genes)
        self.sumsq += np.bincount(genes, values * values, n_genes)
        self.positive += np.bincount(genes, values > 0, n_genes)
        self.stored += np.bincount(genes, minlength=n_genes)
        np.minimum.at(self.min, genes, values)
        np.maximum.at(self.max, genes, values)
        if self.counts_domain:
            counts = np.expm1(values)
            self.count_sum += np.bincount(genes, counts, n_genes)
            self.count_sumsq += np.bincount(genes, counts * counts, n_genes)

    def _with_zeros(self, extreme, pick):
        # genes not stored in every cell also take the value 0
        return np.where(self.stored < self.n, pick(extreme, 0.0), extreme)

    @property
    def minimum(self) -> np.ndarray:
        return self._with_zeros(self.min, np.minimum)

    @property
    def maximum(self) -> np.ndarray:
        return self._with_zeros(self.max, np.maximum)

    def mean_var(self, counts: bool = False, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
        total, squares = (self.count_sum, self.count_sumsq) if counts else (self.sum, self.sumsq)
        mean = total / self.n
        var = np.maximum(squares / self.n - mean * mean, 0.0)
        if ddof and self.n > ddof:
            var *= self.n / (self.n - ddof)
        return mean, var


def seurat_highly_variable(mean: np.ndarray, var: np.ndarray, n_top_genes: int) -> np.ndarray:
    """scanpy's ``flavor="seurat"`` selection from per-gene mean and (ddof=1) variance of normalised counts.

    ``sc.pp.highly_variable_genes`` needs the matrix; its dispersion steps are
    scanpy's own helpers, fed the streamed statistics, so the genes chosen are
    scanpy's (tests/test_streaming.py checks them against it).
    """
    from scanpy.preprocessing._highly_variable_genes import _get_disp_stats, _get_mean_bins, _nth_highest

    mean = mean.copy()
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    frame = pd.DataFrame({"means": np.log1p(mean), "dispersions": np.log(dispersion)})
    frame["mean_bin"] = _get_mean_bins(frame["means"], "seurat", 20)
    stats = _get_disp_stats(frame, "seurat")
    norm = ((frame["dispersions"] - stats["avg"]) / stats["dev"]).to_numpy()
    cut = _nth_highest(norm.copy(), min(n_top_genes, len(norm)))
    return np.nan_to_num(norm, nan=-np.inf) >= cut


def passes_qc(adata: ad.AnnData, rows: np.ndarray, block, config: PreprocessConfig) -> np.ndarray:
    """The in-memory QC rule (``Preprocessor._qc_mask``: scanpy's ``filter_cells(min_genes=...)``) on one
    block of raw rows; all True without ``min_genes``."""
    if not config.min_genes:
        return np.ones(len(rows), dtype=bool)
    return Preprocessor(config)._qc_mask(block_anndata(adata, rows, block))


def decide_scale_streaming(adata: ad.AnnData, rows: np.ndarray | None, config: PreprocessConfig):
    """:func:`~napari_omicsimage.preprocess.decide_scale` on the first training cells (``rows``; None: all),
    at most :data:`_LOG_SCALE_PROBE_CELLS` of them, those failing QC left out (as ``Preprocessor.fit``)."""
    rows = np.arange(min(adata.n_obs, _LOG_SCALE_PROBE_CELLS)) if rows is None else rows
    probe = rows[:_LOG_SCALE_PROBE_CELLS]
    blocks = [block[passes_qc(adata, part, block, config)] for part, block in iter_row_blocks(adata, probe)]
    sample = ad.AnnData(sp.vstack(blocks, format="csr"))
    sample.uns["omicsimage"] = dict(adata.uns.get("omicsimage", {}))
    decision = decide_scale(sample, config.log_scale)
    if config.log_scale is None and sample.uns["omicsimage"].get("log_scale") is None:
        decision.reason += f" (judged on the first {sample.n_obs:,} training cells)"
    return decision


def normalized_blocks(adata: ad.AnnData, rows: np.ndarray, *, log_scale: bool, target_sum, progress=None,
                      block_rows: int = BLOCK_ROWS):
    """``(rows, csr)`` of the per-sample-normalised cells (``normalize_samples`` block by block)."""
    for part, block, _ in qc_normalized_blocks(adata, rows, log_scale=log_scale, target_sum=target_sum,
                                               progress=progress, block_rows=block_rows):
        yield part, block


def qc_normalized_blocks(adata: ad.AnnData, rows: np.ndarray, *, log_scale: bool, target_sum, progress=None,
                         block_rows: int = BLOCK_ROWS, config: PreprocessConfig | None = None):
    """``(rows, csr, passed)`` per block: the per-sample-normalised cells that pass QC (``config.min_genes``;
    every cell without ``config``) and the QC mask of all the block's rows."""
    done = 0
    for part, block in iter_row_blocks(adata, rows, block_rows):
        passed = passes_qc(adata, part, block, config) if config is not None else np.ones(len(part), bool)
        kept, block = part[passed], block[passed] if not passed.all() else block
        done += len(part)
        if progress is not None:
            progress(ProgressEvent.count("preprocessing (one pass over the cells)", done, len(rows)))
        if not len(kept):
            yield kept, sp.csr_matrix((0, adata.n_vars), dtype=np.float32), passed
            continue
        norm = normalize_samples(block_anndata(adata, kept, block), log_scale=log_scale, target_sum=target_sum)
        yield kept, sp.csr_matrix(norm.X), passed


def fit_preprocessor(adata: ad.AnnData, rows: np.ndarray | None = None, config: PreprocessConfig | None = None,
                     *, progress=None) -> Preprocessor:
    """A :class:`Preprocessor` fitted on cells ``rows`` (sorted; default all) in one streaming pass.

    Same result as ``Preprocessor(config).fit(adata[rows])`` (up to float
    rounding of the sums), without holding more than one block of cells,
    QC included: cells with fewer than ``config.min_genes`` detected genes are
    left out of the statistics and marked False in ``qc_passed_`` (one entry
    per row of ``rows``), so callers train on :func:`training_rows` only.
    ``training_nonzeros_`` (not saved in checkpoints) counts the stored
    values of the chosen genes over the cells that passed: what holding them
    in memory costs (:func:`napari_omicsimage.streaming.loader.cache_cells`).
    ``progress(ProgressEvent)`` hears about every block.
    """
    cfg = config or PreprocessConfig()
    rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
    decision = decide_scale_streaming(adata, rows, cfg)  # counts with negatives: normalize_samples refuses
    log_scale = decision.log_scale
    stats = GeneStatistics(adata.n_vars, counts_domain=not log_scale)
    qc_passed = np.ones(len(rows), dtype=bool)
    done = 0
    for _, block, passed in qc_normalized_blocks(adata, rows, log_scale=log_scale, target_sum=cfg.target_sum,
                                                 progress=progress, config=cfg):
        qc_passed[done:done + len(passed)] = passed
        done += len(passed)
        if block.shape[0]:
            stats.update(block)
    notes = [decision.describe()]
    n_passed = int(qc_passed.sum())
    if n_passed < len(rows):  # the in-memory path's words (Preprocessor.fit)
        if n_passed < 2:
            raise OmicsInputError(f"QC (min_genes={cfg.min_genes}) leaves {n_passed} of {len(rows)} training "
                                  "samples; fitting needs at least two: lower min_genes.")
        notes.append(f"QC: {len(rows) - n_passed} of {len(rows)} training samples have fewer than "
                     f"{cfg.min_genes} detected genes and were left out of the fit")
    mean, var = stats.mean_var()
    keep = np.ones(adata.n_vars, dtype=bool)
    if cfg.min_sample_fraction > 0:
        keep &= stats.positive / stats.n >= cfg.min_sample_fraction
    keep &= var > 1e-12 * np.maximum(mean * mean, 1.0)  # constant genes (float64 sums leave ~1e-16 residue)
    if not keep.any():
        raise OmicsInputError("no gene varies across the training samples; check the input matrix.")
    candidates = np.flatnonzero(keep)
    if cfg.n_top_genes is not None and cfg.n_top_genes < candidates.size:
        if log_scale:
            top = np.argsort(-var[candidates], kind="stable")[: cfg.n_top_genes]
            chosen = candidates[np.sort(top)]
        else:
            count_mean, count_var = stats.mean_var(counts=True, ddof=1)
            chosen = candidates[seurat_highly_variable(count_mean[candidates], count_var[candidates],
                                                       cfg.n_top_genes)]
    else:
        chosen = candidates
    preprocessor = Preprocessor(cfg)
    preprocessor.qc_passed_ = qc_passed
    preprocessor.notes_ = notes
    preprocessor.log_scale_ = bool(log_scale)
    preprocessor.genes_ = np.asarray(adata.var_names[chosen], dtype=object)
    preprocessor.min_ = stats.minimum[chosen].astype(np.float32)
    preprocessor.max_ = stats.maximum[chosen].astype(np.float32)
    # the per-gene mean of the *scaled* training matrix, for genes missing at prediction time: on the
    # training cells every value lies in [min, max], so scaling is affine there and the mean follows
    span = np.where(preprocessor.max_ > preprocessor.min_, preprocessor.max_ - preprocessor.min_, 1.0)
    preprocessor.scaled_mean_ = ((mean[chosen] - preprocessor.min_) / span).astype(np.float32)
    preprocessor.training_nonzeros_ = int(stats.stored[chosen].sum())
    return preprocessor


def training_rows(preprocessor: Preprocessor, rows: np.ndarray) -> np.ndarray:
    """The cells of ``rows`` (those the preprocessor was fitted on) that passed QC: what layout and network
    learn from.  A preprocessor without ``qc_passed_`` (restored from a checkpoint) keeps them all."""
    passed = getattr(preprocessor, "qc_passed_", None)
    rows = np.asarray(rows, dtype=np.int64)
    if passed is None or passed.all():
        return rows
    if len(passed) != len(rows):
        raise ValueError(f"qc_passed_ covers {len(passed)} cells, not the {len(rows)} rows given")
    return rows[passed]


def prepare_block(adata: ad.AnnData, rows: np.ndarray, block, preprocessor: Preprocessor) -> sp.csr_matrix:
    """One block of raw rows → preprocessed CSR float32 in [0, 1] (dense only while scaling
    log-scale data with negative values, whose zeros do not scale to 0)."""
    return sp.csr_matrix(preprocessor.transform(block_anndata(adata, rows, block), sparse=True))


def transform_rows(adata: ad.AnnData, rows: np.ndarray, preprocessor: Preprocessor) -> sp.csr_matrix:
    """The preprocessed cells ``rows`` (sorted) as CSR float32 in [0, 1], block by block."""
    pieces = [prepare_block(adata, part, block, preprocessor) for part, block in iter_row_blocks(adata, rows)]
    return sp.vstack(pieces, format="csr") if pieces else sp.csr_matrix((0, len(preprocessor.genes_)))


def fit_layout_on_subsample(adata: ad.AnnData, rows: np.ndarray, preprocessor: Preprocessor, layout_spec: dict,
                            *, labels: np.ndarray | None = None, layout_cells: int = DEFAULT_LAYOUT_CELLS,
                            seed: int = 0):
    """Fit the layout on at most ``layout_cells`` training cells, stratified by ``labels``.

    Returns ``(layout, subsample_rows)``.  Only gene layouts can be fitted this
    way: the published RGB method places *samples* and needs every one.
    """
    if layout_spec.get("method") == "rgb-embedding":
        raise OmicsInputError("the rgb-embedding method places every sample on its own and cannot stream; "
                              "use a gene layout (deepinsight, fotomics, rgb-layouts, grid) at atlas scale.")
    started = time.perf_counter()
    subsample = stratified_subsample(labels, rows, int(layout_cells), seed)
    x = transform_rows(adata, subsample, preprocessor).toarray()
    layout, _ = fit_layout(layout_spec, x, preprocessor.genes_)
    log.info("layout fitted on %d of %d cells in %.1f s", len(subsample), len(rows), time.perf_counter() - started)
    return layout, subsample
