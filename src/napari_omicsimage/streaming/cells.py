"""Reading cells block by block from a backed ``.h5ad`` (or any AnnData).

Every pass here reads *contiguous* row ranges: for an on-disk CSR matrix a
range is two slices (``indices`` and ``data``) of the file, where scattered
rows are one read each.  Callers that need arbitrary rows (a training fold, a
subsample) give them sorted; :func:`iter_row_blocks` turns them into runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import OmicsInputError
from ..io import _read_labels, attach_labels, check_labels

log = logging.getLogger(__name__)

#: The CLI streams (``--backed auto``) an .h5ad with more cells than this, or a larger file.
#: 20,000 cells × 20,000 genes in memory peaked at 5.3 GB (issue 13); above it the in-memory
#: path's dense copies outgrow a laptop.
STREAM_ABOVE_CELLS = 50_000
STREAM_ABOVE_BYTES = 1 << 30
#: rows per read: 4,096 cells at 2–5 % non-zero of 20,000 genes are 15–40 MB of CSR
BLOCK_ROWS = 4096


def h5ad_cells(path: str | Path) -> int:
    """Number of cells of an ``.h5ad`` without reading it (the shape attribute or obs index)."""
    import h5py

    with h5py.File(path, "r") as handle:
        x = handle["X"]
        if "shape" in x.attrs:
            return int(x.attrs["shape"][0])
        if isinstance(x, h5py.Dataset):
            return int(x.shape[0])
        return int(handle["X"]["indptr"].shape[0] - 1)


def wants_streaming(path, backed: str = "auto") -> bool:
    """Whether ``path`` goes through the streaming path: ``backed`` is ``"auto"``, ``"yes"`` or ``"no"``.

    ``auto`` streams ``.h5ad`` files with more than :data:`STREAM_ABOVE_CELLS`
    cells or larger than :data:`STREAM_ABOVE_BYTES`.  Only ``.h5ad`` can be
    read backed; ``yes`` with another format is an error.
    """
    if backed not in ("auto", "yes", "no"):
        raise OmicsInputError(f"--backed must be auto, yes or no, not {backed!r}.")
    path = Path(path)
    is_h5ad = path.suffix.lower() == ".h5ad" and path.is_file()
    if backed == "no":
        return False
    if backed == "yes":
        if not is_h5ad:
            raise OmicsInputError(f"{path.name}: only .h5ad files can be read backed (--backed yes); "
                                  "convert it first (anndata: adata.write_h5ad) or use --backed no.")
        return True
    if not is_h5ad:
        return False
    try:
        return path.stat().st_size > STREAM_ABOVE_BYTES or h5ad_cells(path) > STREAM_ABOVE_CELLS
    except (OSError, KeyError):
        return False  # the in-memory reader gives the clear error for a broken file


def open_cells(path: str | Path, *, label_column: str | None = None, labels=None,
               sample_column: str | None = None) -> ad.AnnData:
    """Open an ``.h5ad`` backed (read-only): ``obs``/``var`` in memory, ``X`` on disk.

    The checks of :func:`napari_omicsimage.io.read_expression` that need no
    pass over ``X`` run here (names unique, labels complete); NaN/Inf values
    are caught block by block by the statistics pass (:mod:`.fit`).
    ``labels`` (a table path or frame) is joined on cell id as
    ``read_expression`` does; the label column used is then in
    ``uns["omicsimage"]["label_column"]``.
    """
    path = Path(path)
    if not path.is_file():
        raise OmicsInputError(f"{path}: no such file. Check the path and try again.")
    try:
        adata = ad.read_h5ad(path, backed="r")
    except (OSError, KeyError, ValueError) as exc:
        raise OmicsInputError(f"{path.name} could not be opened as an .h5ad file ({exc}).") from exc
    x = adata.X
    if x is None or adata.n_obs == 0 or adata.n_vars == 0:
        raise OmicsInputError(f"{path.name} holds no expression matrix (X); need cells × genes in X.")
    if not (isinstance(x, ad.abc.CSRDataset) or getattr(x, "ndim", 0) == 2):
        raise OmicsInputError(f"{path.name}: X is stored as {type(x).__name__}; streaming reads CSR or dense "
                              "X (CSC is read column by column: convert with adata.X = adata.X.tocsr()).")
    for axis, names in (("gene", adata.var_names), ("cell", adata.obs_names)):
        if names.has_duplicates:
            dup = list(names[names.duplicated()].unique()[:5])
            raise OmicsInputError(f"duplicate {axis} names, e.g. {dup}; make them unique first "
                                  f"(AnnData.{'var' if axis == 'gene' else 'obs'}_names_make_unique()).")
    adata.uns["omicsimage"] = {"source": str(path), "orientation": "h5ad files store samples in rows (backed)"}
    if labels is not None:
        notes = adata.uns["omicsimage"].setdefault("reading", [])
        frame, label_column = _read_labels(labels, sample_column, label_column, notes, adata.obs_names)
        attach_labels(adata, frame, label_column)
    elif label_column is not None:
        check_labels(adata, label_column)
    return adata


class _CSRRows:
    """Contiguous rows of an on-disk CSR matrix straight from its h5py datasets.

    anndata's backed ``X[start:stop]`` gives the same matrix but re-validates
    its arguments at every call (about 18 ms here, half of a streaming epoch's
    reading time); the row pointers (8 bytes per cell) are read once.
    """

    def __init__(self, group):
        self.data, self.indices = group["data"], group["indices"]
        self.indptr = group["indptr"][...]
        self.n_cols = int(group.attrs["shape"][1])

    def __call__(self, start: int, stop: int) -> sp.csr_matrix:
        first, last = int(self.indptr[start]), int(self.indptr[stop])
        return sp.csr_matrix((np.asarray(self.data[first:last], dtype=np.float32), self.indices[first:last],
                              self.indptr[start:stop + 1] - first), shape=(stop - start, self.n_cols))


_ROW_READERS: dict[int, tuple] = {}


def _row_reader(adata: ad.AnnData):
    """The :class:`_CSRRows` of a backed CSR ``adata`` (cached per object), else None."""
    import weakref

    if not adata.isbacked or not isinstance(adata.X, ad.abc.CSRDataset):
        return None
    cached = _ROW_READERS.get(id(adata))
    if cached is None or cached[0]() is not adata:
        cached = (weakref.ref(adata), _CSRRows(adata.file["X"]))
        _ROW_READERS[id(adata)] = cached
    return cached[1]


def read_rows(adata: ad.AnnData, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of ``X`` as float32 CSR (backed or in memory, sparse or dense)."""
    reader = _row_reader(adata)
    if reader is not None:
        return reader(start, stop)
    block = adata.X[start:stop]
    if sp.issparse(block):
        return sp.csr_matrix(block, dtype=np.float32)
    return sp.csr_matrix(np.asarray(block, dtype=np.float32))


def iter_row_blocks(adata: ad.AnnData, rows: np.ndarray, block_rows: int = BLOCK_ROWS
                    ) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
    """``(rows_of_block, csr)`` for the sorted ``rows``, reading contiguous runs of the file.

    Each read covers the span from a block's first to its last row and keeps
    the wanted ones, so a fold of 80 % of the cells costs one pass over the
    file, not one read per cell.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and np.any(np.diff(rows) <= 0):
        raise ValueError("rows must be sorted and unique")
    for start in range(0, rows.size, block_rows):
        part = rows[start:start + block_rows]
        first, last = int(part[0]), int(part[-1]) + 1
        if last - first > 4 * len(part):  # scattered rows: read them in runs, not the whole span
            block = sp.vstack([read_rows(adata, a, b) for a, b in _runs(part)], format="csr")
        else:
            block = read_rows(adata, first, last)[part - first]
        yield part, block


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers in sorted ``rows`` as ``(start, stop)`` pairs."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.r_[rows[0], rows[breaks]]
    stops = np.r_[rows[breaks - 1], rows[-1]] + 1
    return list(zip(starts.tolist(), stops.tolist()))


def block_anndata(adata: ad.AnnData, rows: np.ndarray, block: sp.csr_matrix) -> ad.AnnData:
    """An in-memory AnnData of a block of rows, with ``uns['omicsimage']`` carried over."""
    piece = ad.AnnData(X=block, obs=pd.DataFrame(index=adata.obs_names[rows]),
                       var=pd.DataFrame(index=adata.var_names))
    piece.uns["omicsimage"] = dict(adata.uns.get("omicsimage", {}))
    return piece


def stratified_subsample(labels: np.ndarray | None, rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` of ``rows`` (sorted), every class keeping its share (at least one cell each)."""
    rows = np.asarray(rows, dtype=np.int64)
    if n >= rows.size:
        return rows
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(rows, size=n, replace=False))
    classes = pd.Series(np.asarray(labels)[rows])
    picked = []
    for _, members in classes.groupby(classes.to_numpy(), sort=True).indices.items():
        take = max(1, int(round(n * len(members) / rows.size)))
        picked.append(rng.choice(rows[members], size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(picked))
