"""Images rendered on demand, and class means in one streaming pass: napari at atlas scale.

napari displays dask arrays and asks only for the slice under the slider, so
the image stack of 10⁵–10⁶ cells never has to exist: :class:`LazyCells`
reads the rows asked for (a backed ``.h5ad`` or an in-memory AnnData),
preprocesses them with a fitted
:class:`~napari_omicsimage.preprocess.Preprocessor` (sparse CSR all the way)
and renders them with the layout's sparse renderer.  Memory is one block of
cells plus a small cache, whatever the number of cells.

The class-mean images come from per-class running sums of the preprocessed
expression over blocks of cells: the renderer is linear (``images = X @ A``,
empty pixels a constant), so the mean of a class's images is the image of its
mean expression, and no image has to be rendered for it.

:func:`imagify_cells` is the Imagify widget's core: preprocessing (streamed
for a backed file), the layout fitted on a bounded stratified subsample
(:func:`~napari_omicsimage.streaming.fit.fit_layout_on_subsample`), the lazy
stacks and the class means.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import Cancelled, OmicsInputError
from ..io import check_labels, reading_notes
from ..preprocess import PreprocessConfig, Preprocessor
from ..progress import Progress, ProgressEvent, wants_cancel
from .cells import BLOCK_ROWS, iter_row_blocks, read_rows, stratified_subsample
from .fit import DEFAULT_LAYOUT_CELLS, fit_layout_on_subsample, fit_preprocessor, prepare_block, transform_rows

#: cells per dask chunk of the lazy stacks: one read and one preprocessing call serve this many neighbours
#: on the slider (64 images of 3 × 32 × 32 float32 are 0.8 MB)
CHUNK_CELLS = 64
#: preprocessed chunks kept (hovering re-reads the expression of the sample under the slider)
CACHE_CHUNKS = 16
#: images rendered to choose the contrast limits of a lazy stack (a stratified sample of the cells)
PREVIEW_CELLS = 256

def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if wants_cancel(progress, ProgressEvent.count(stage, done, total)):
        raise Cancelled(f"cancelled while {stage}; nothing was kept.")


class LazyCells:
    """The preprocessed expression and the images of every cell of ``adata``, made when asked for.

    :meth:`images` and :meth:`expression` are dask arrays ``(N, C, H, W)`` and
    ``(N, G)``; indexing them reads, preprocesses and renders only the cells
    indexed.  Rows are read in chunks of ``chunk_cells`` (kept in a small
    cache), rendered row by row.
    """

    def __init__(self, adata: ad.AnnData, preprocessor: Preprocessor, layout, *, chunk_cells: int = CHUNK_CELLS,
                 cache_chunks: int = CACHE_CHUNKS):
        if not getattr(layout, "has_gene_map", False):
            raise OmicsInputError("only gene layouts (deepinsight, fotomics, rgb-layouts, grid, som) render cells "
                                  "on demand; the rgb-embedding method places every sample at fit time.")
        self.adata, self.preprocessor, self.layout = adata, preprocessor, layout
        self.chunk_cells = int(chunk_cells)
        self.cache_chunks = int(cache_chunks)
        self.n_cells = int(adata.n_obs)
        self.n_genes = len(preprocessor.genes_)
        self.n_channels = int(layout.n_channels)
        self.shape = tuple(layout.pixel_map_.shape)
        self._cache: OrderedDict[int, sp.csr_matrix] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------- rows
    def _chunk(self, k: int) -> sp.csr_matrix:
        """Preprocessed rows of chunk ``k`` (CSR float32 in [0, 1]), from the cache when there."""
        with self._lock:
            cached = self._cache.get(k)
            if cached is not None:
                self._cache.move_to_end(k)
                return cached
        start, stop = k * self.chunk_cells, min((k + 1) * self.chunk_cells, self.n_cells)
        rows = np.arange(start, stop)
        x = prepare_block(self.adata, rows, read_rows(self.adata, start, stop), self.preprocessor)
        with self._lock:
            self._cache[k] = x
            while len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        return x

    def rows(self, rows) -> sp.csr_matrix:
        """Preprocessed cells ``rows`` (any order, repeats allowed) as CSR ``(len(rows), G)``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        chunks = rows // self.chunk_cells
        pieces, order = [], []
        for k in np.unique(chunks):
            members = np.flatnonzero(chunks == k)
            pieces.append(self._chunk(int(k))[rows[members] - k * self.chunk_cells])
            order.append(members)
        stacked = sp.vstack(pieces, format="csr")
        return stacked[np.argsort(np.concatenate(order), kind="stable")]

    def render(self, x) -> np.ndarray:
        """Images ``(n, C, H, W)`` of preprocessed rows (the layout's renderer; sparse stays sparse)."""
        return np.asarray(self.layout.transform(x), dtype=np.float32)

    # ------------------------------------------------------------ arrays
    def images(self):
        """The image stack ``(N, C, H, W)`` float32 as a dask array, rendered chunk by chunk on demand."""
        source = _RowSource(self, (self.n_cells, self.n_channels, *self.shape),
                            lambda rows: self.render(self.rows(rows)))
        return _dask(source, self.chunk_cells)

    def expression(self):
        """The preprocessed matrix ``(N, G)`` float32 as a dask array (dense per chunk), made on demand."""
        source = _RowSource(self, (self.n_cells, self.n_genes), lambda rows: self.rows(rows).toarray())
        return _dask(source, self.chunk_cells)


class _RowSource:
    """An array-like whose rows are made by ``make(rows)``; dask hands it the index of each read.

    dask fuses slicing into the read (``stack[5]`` arrives here as the key
    ``5``), so only the cells indexed are made.
    """

    def __init__(self, cells: LazyCells, shape: tuple, make):
        self.cells, self.shape, self.make = cells, tuple(int(s) for s in shape), make
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first, rest = (key[0] if key else slice(None)), key[1:]
        if isinstance(first, (int, np.integer)):
            return self.make(np.array([int(first) % self.shape[0]]))[(0, *rest)]
        if isinstance(first, slice):
            rows = np.arange(self.shape[0])[first]
        else:
            rows = np.arange(self.shape[0])[np.asarray(first)]
        if rows.size == 0:
            return np.zeros((0, *self.shape[1:]), dtype=self.dtype)[(slice(None), *rest)]
        return self.make(rows)[(slice(None), *rest)]


def _dask(source: _RowSource, chunk_cells: int):
    import dask.array as da

    chunks = (min(chunk_cells, max(source.shape[0], 1)), *source.shape[1:])
    return da.from_array(source, chunks=chunks, name=False, asarray=False,
                         meta=np.empty((0,) * source.ndim, dtype=np.float32))


# ------------------------------------------------------------------ class means
@dataclass
class ClassMeans:
    """Per-class mean expression ``(K, G)`` and mean images ``(K, C, H, W)``, in ``classes`` order."""

    classes: list[str]
    counts: np.ndarray
    expression: np.ndarray
    images: np.ndarray


def class_means(cells: LazyCells, labels, *, rows: np.ndarray | None = None, block_rows: int = BLOCK_ROWS,
                progress: Progress | None = None) -> ClassMeans:
    """Class means of the cells ``rows`` (default all) in one pass over blocks of ``block_rows`` cells.

    Per-class running sums (float64) of the preprocessed expression; the mean
    images are the layout's rendering of the mean expression (the renderer is
    linear), so memory is one block plus ``K × G`` sums.
    """
    labels = np.asarray(labels, dtype=object).astype(str)
    classes = sorted(set(labels.tolist()))
    codes = pd.Categorical(labels, categories=classes).codes.astype(np.int64)
    rows = np.arange(cells.n_cells) if rows is None else np.asarray(rows, dtype=np.int64)
    sums = np.zeros((len(classes), cells.n_genes), dtype=np.float64)
    counts = np.zeros(len(classes), dtype=np.int64)
    done = 0
    _report(progress, "class means", 0, len(rows))
    for part, block in iter_row_blocks(cells.adata, rows, block_rows):
        x = prepare_block(cells.adata, part, block, cells.preprocessor)
        k = codes[part]
        indicator = sp.csr_matrix((np.ones(len(part)), (k, np.arange(len(part)))), shape=(len(classes), len(part)))
        sums += (indicator @ x.astype(np.float64)).toarray() if sp.issparse(x) else indicator @ np.asarray(x)
        counts += np.bincount(k, minlength=len(classes))
        done += len(part)
        _report(progress, "class means", done, len(rows))
    means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    return ClassMeans(classes, counts, means, cells.render(means))


# ---------------------------------------------------------------------- imagify
@dataclass
class LazyImagified:
    """What :func:`imagify_cells` makes: the fields of :class:`~napari_omicsimage.pipeline.Imagified`
    with lazy ``images`` and ``expression``, plus the class means and a preview for contrast."""

    images: object  # dask (N, C, H, W) float32
    samples: pd.Index
    labels: pd.Series | None
    layout: object
    preprocessor: Preprocessor
    expression: object  # dask (N, G) float32
    class_means: ClassMeans | None
    #: a stratified sample of rendered images ``(n, C, H, W)`` (contrast limits without rendering all)
    preview: np.ndarray
    notes: list[str]
    cells: LazyCells

    @property
    def genes(self) -> np.ndarray:
        return self.preprocessor.genes_


def imagify_cells(adata: ad.AnnData, method: str = "deepinsight", *, size: int | None = None,
                  label_column: str | None = None, preprocess: PreprocessConfig | None = None,
                  layout_params: dict | None = None, layout_cells: int = DEFAULT_LAYOUT_CELLS,
                  chunk_cells: int = CHUNK_CELLS, seed: int = 0,
                  progress: Progress | None = None) -> LazyImagified:
    """Preprocess, fit a gene layout and return lazily rendered images of every cell of ``adata``.

    A backed ``adata`` is preprocessed by a streaming pass
    (:func:`~napari_omicsimage.streaming.fit.fit_preprocessor`); an in-memory
    one as :func:`napari_omicsimage.pipeline.imagify` does (QC included).  The
    layout is fitted on at most ``layout_cells`` cells (stratified by label;
    all of them below that).  Nothing of size cells × genes or cells × pixels
    is held.  ``progress(ProgressEvent)`` returning True cancels.
    """
    cfg = preprocess or PreprocessConfig()
    labels = None
    if label_column is not None:
        check_labels(adata, label_column)
        labels = adata.obs[label_column].astype(str)
    spec = {"method": method, "size": size, **(layout_params or {})}
    if method == "rgb-embedding":
        raise OmicsInputError("the rgb-embedding method places every sample at fit time and cannot render "
                              "on demand; use a gene layout (deepinsight, fotomics, rgb-layouts, grid, som).")
    if adata.isbacked:
        preprocessor = fit_preprocessor(adata, None, cfg, progress=lambda event: _report(
            progress, event.stage, event.done, event.n_batches or 0))
    else:
        _report(progress, "preprocessing", 0, 0)
        preprocessor = Preprocessor(cfg).fit(adata)
    fit_rows = np.flatnonzero(preprocessor.qc_passed_)
    n_fit = min(len(fit_rows), int(layout_cells))
    _report(progress, f"fitting the {method} layout on {n_fit:,} cells", 0, 0)
    label_values = None if labels is None else labels.to_numpy()
    layout, subsample = fit_layout_on_subsample(adata, fit_rows, preprocessor, spec, labels=label_values,
                                                layout_cells=layout_cells, seed=seed)
    cells = LazyCells(adata, preprocessor, layout, chunk_cells=chunk_cells)
    means = None if labels is None else class_means(cells, label_values, progress=progress)
    _report(progress, "rendering a preview for the contrast", 0, 0)
    preview_rows = stratified_subsample(label_values, np.arange(adata.n_obs), PREVIEW_CELLS, seed)
    preview = cells.render(transform_rows(adata, preview_rows, preprocessor))

    notes = [*reading_notes(adata), *preprocessor.notes_,
             f"{adata.n_obs} samples × {len(preprocessor.genes_)} genes after preprocessing", layout.describe()]
    if len(subsample) < len(fit_rows):
        notes.append(f"layout fitted on a stratified subsample of {len(subsample):,} of {len(fit_rows):,} cells")
    notes.append("images are rendered when shown (lazy stack: memory does not grow with the cells)")
    info = getattr(layout, "info_", {})
    if "n_unplaced" in info:
        notes.append(f"{info['n_unplaced']} of {info['n_unplaced'] + info['n_placed']} genes are not in "
                     "the annotation and were placed after the chromosome-ordered genes")
    return LazyImagified(cells.images(), adata.obs_names.copy(), labels, layout, preprocessor, cells.expression(),
                         means, preview, notes, cells)


def is_lazy(array) -> bool:
    """Whether ``array`` is a lazy (dask) array rather than one in memory."""
    return not isinstance(array, np.ndarray) and hasattr(array, "compute") and hasattr(array, "chunks")


__all__ = ["CHUNK_CELLS", "ClassMeans", "LazyCells", "LazyImagified", "class_means", "imagify_cells", "is_lazy"]
