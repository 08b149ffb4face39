"""Gene↔pixel maps and the vectorised renderer.

A :class:`PixelMap` records, for every channel, the pixel each gene sits in.
From it we derive everything that needs the mapping: images (genes sharing a
pixel are averaged), gene density, the genes under a pixel (hover tooltips,
hand annotation) and the pixel of a gene (saliency → gene tables).

Rendering is one sparse matrix product: ``images = X @ A`` where ``A`` (genes ×
channel·pixels) holds ``1 / n_genes_in_pixel`` for every (gene, pixel) pair.
That gives exactly pyDeepInsight's per-pixel mean, without its Python loop
over pixels, and runs on a torch device when one is given.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import OmicsInputError
from .progress import Progress, ProgressEvent

# Samples per sparse product and pixels per copied tile: a (pixels × 128)
# float32 intermediate is ~25 MB at 224², and 2048 × 128 tiles stay in cache.
_CHUNK_SAMPLES, _TILE_PIXELS = 128, 2048


def available_memory() -> int | None:
    """Bytes this process can still allocate: free memory (psutil, else sysconf), capped by an address-space
    limit (``ulimit -v`` / ``prlimit --as``) when one is set. ``None`` when it cannot be told."""
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of the GUI stack
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            free = min(free, int(soft))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not on every platform
        pass
    return free


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def check_image_memory(n_images: int, n_channels: int, shape: Sequence[int], *,
                       bytes_per_value: int = 4, what: str = "images") -> None:
    """Refuse to allocate ``n_images × n_channels × H × W`` float32 values that cannot fit in memory.

    Called before the allocation (and before the work that leads to it), so an absurd image size is a
    one-line error with the figure instead of a crash.
    """
    h, w = (int(v) for v in shape)
    need = int(n_images) * int(n_channels) * h * w * bytes_per_value
    free = available_memory()
    if free is None or need <= free:
        return
    per_side = int((free / max(1, int(n_images) * int(n_channels) * bytes_per_value)) ** 0.5)
    raise OmicsInputError(
        f"{n_images} {what} of {n_channels}×{h}×{w} pixels need {_gib(need)} "
        f"({n_images} × {n_channels} × {h}×{w} × {bytes_per_value} bytes) but {_gib(free)} of memory is "
        f"available; choose a smaller --size (at most about {max(per_side, 0)}) or fewer samples."
    )


def _render_chunk(block: np.ndarray, matrix, target: np.ndarray) -> None:
    """``target[...] = block @ matrix`` for a few samples.

    scipy computes dense @ sparse as a (pixels × samples) array and returns its
    transpose; copying that back tile by tile is several times faster than one
    transposing copy, which used to dominate rendering time
    (benchmarks/bench_core.py).
    """
    product_t = (block @ matrix).T
    for col in range(0, target.shape[1], _TILE_PIXELS):
        target[:, col : col + _TILE_PIXELS] = product_t[col : col + _TILE_PIXELS].T


class PixelMap:
    """Placement of genes on a ``(channels, height, width)`` grid.

    Parameters
    ----------
    gene_pixels
        Integer array ``(C, G, 2)`` with the (row, col) of gene ``g`` in channel
        ``c``; ``-1`` marks a gene that is not drawn in that channel.
    shape
        ``(height, width)``.
    genes
        The ``G`` gene names, in the column order of the matrices to render.
    """

    def __init__(self, gene_pixels: np.ndarray, shape: tuple[int, int], genes: Sequence[str]):
        gene_pixels = np.asarray(gene_pixels, dtype=np.int64)
        if gene_pixels.ndim == 2:
            gene_pixels = gene_pixels[None]
        if gene_pixels.ndim != 3 or gene_pixels.shape[2] != 2:
            raise ValueError(f"gene_pixels must be (channels, genes, 2), got {gene_pixels.shape}")
        self.gene_pixels = gene_pixels
        self.shape = (int(shape[0]), int(shape[1]))
        self.genes = np.asarray([str(g) for g in genes], dtype=object)
        if len(self.genes) != gene_pixels.shape[1]:
            raise ValueError(f"{len(self.genes)} gene names for {gene_pixels.shape[1]} placed genes")
        placed = gene_pixels[..., 0] >= 0
        h, w = self.shape
        rows, cols = gene_pixels[..., 0], gene_pixels[..., 1]
        if np.any(placed & ((rows >= h) | (cols >= w) | (cols < 0))):
            raise ValueError("gene_pixels hold coordinates outside the grid")
        channel = np.arange(self.n_channels)[:, None]
        #: flat index into C*H*W per (channel, gene), -1 where not placed
        self.flat = np.where(placed, channel * h * w + rows * w + cols, -1)
        self._matrix = None
        self._torch_cache: dict = {}
        # CSR-like index: genes of each flat pixel, for constant-time look-ups
        placed_flat = self.flat[placed]
        gene_idx = np.broadcast_to(np.arange(self.n_genes), self.flat.shape)[placed]
        order = np.argsort(placed_flat, kind="stable")
        self._pixel_genes = gene_idx[order]
        self._pixel_ptr = np.searchsorted(
            placed_flat[order], np.arange(self.n_channels * h * w + 1)
        )

    @property
    def n_channels(self) -> int:
        return self.gene_pixels.shape[0]

    @property
    def n_genes(self) -> int:
        return self.gene_pixels.shape[1]

    # ------------------------------------------------------------ look-ups
    def density(self) -> np.ndarray:
        """Genes per pixel, ``(C, H, W)`` int32."""
        return np.diff(self._pixel_ptr).reshape(self.n_channels, *self.shape).astype(np.int32)

    def genes_at(self, channel: int, row: int, col: int) -> np.ndarray:
        """Indices (into :attr:`genes`) of the genes in one pixel of one channel."""
        h, w = self.shape
        if not (0 <= channel < self.n_channels and 0 <= row < h and 0 <= col < w):
            return np.empty(0, dtype=np.int64)
        flat = channel * h * w + row * w + col
        return self._pixel_genes[self._pixel_ptr[flat] : self._pixel_ptr[flat + 1]]

    def gene_names_at(self, channel: int, row: int, col: int) -> list[str]:
        return [self.genes[i] for i in self.genes_at(channel, row, col)]

    def genes_in_mask(self, mask: np.ndarray, channel: int | None = None) -> np.ndarray:
        """Indices of genes whose pixel lies inside a boolean ``(H, W)`` mask.

        With ``channel=None`` a gene counts if it is inside in any channel.
        """
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape:
            raise OmicsInputError(f"region mask has shape {mask.shape}, the images are {self.shape}")
        channels = range(self.n_channels) if channel is None else [channel]
        hits = np.zeros(self.n_genes, dtype=bool)
        for c in channels:
            r, q = self.gene_pixels[c, :, 0], self.gene_pixels[c, :, 1]
            placed = r >= 0
            inside = np.zeros(self.n_genes, dtype=bool)
            inside[placed] = mask[r[placed], q[placed]]
            hits |= inside
        return np.flatnonzero(hits)

    def pixel_table(self) -> pd.DataFrame:
        """One row per occupied pixel: channel, row, col, n_genes, genes (``;``-joined)."""
        h, w = self.shape
        counts = np.diff(self._pixel_ptr)
        occupied = np.flatnonzero(counts)
        channel, rest = np.divmod(occupied, h * w)
        row, col = np.divmod(rest, w)
        names = [
            ";".join(self.genes[self._pixel_genes[self._pixel_ptr[f] : self._pixel_ptr[f + 1]]])
            for f in occupied
        ]
        return pd.DataFrame(
            {"channel": channel, "row": row, "col": col, "n_genes": counts[occupied], "genes": names}
        )

    def lookup(self, x_sample: np.ndarray, channel: int, row: int, col: int) -> pd.DataFrame:
        """Genes in a pixel with their expression in one sample (highest first)."""
        idx = self.genes_at(channel, row, col)
        frame = pd.DataFrame({"gene": self.genes[idx], "expression": np.asarray(x_sample)[idx]})
        return frame.sort_values("expression", ascending=False, ignore_index=True)

    # ------------------------------------------------------------- render
    def averaging_matrix(self) -> sp.csr_matrix:
        """Sparse ``(G, C·H·W)`` matrix: column p averages the genes in pixel p."""
        if self._matrix is None:
            placed = self.flat >= 0
            gene_idx = np.broadcast_to(np.arange(self.n_genes), self.flat.shape)[placed]
            pixel_idx = self.flat[placed]
            counts = np.diff(self._pixel_ptr)
            weights = (1.0 / counts[pixel_idx]).astype(np.float32)
            self._matrix = sp.csr_matrix(
                (weights, (gene_idx, pixel_idx)),
                shape=(self.n_genes, self.n_channels * self.shape[0] * self.shape[1]),
            )
        return self._matrix

    def render(
        self,
        x: np.ndarray,
        *,
        fill_value: float = 0.0,
        batch_size: int = 1024,
        device=None,
        progress: Progress | None = None,
    ):
        """Images ``(N, C, H, W)`` float32 from a samples × genes matrix.

        Genes sharing a pixel are averaged; pixels without genes take
        ``fill_value``.  With ``device`` (a torch device or its name) the product
        runs in torch and a tensor on that device is returned, so training can
        render batches where it trains.
        """
        if x.ndim != 2 or x.shape[1] != self.n_genes:
            raise OmicsInputError(
                f"expression matrix has shape {x.shape}; the layout was fitted on {self.n_genes} genes."
            )
        if device is not None:
            return self._render_torch(x, fill_value, device)
        if sp.issparse(x):
            return self._render_sparse(sp.csr_matrix(x, dtype=np.float32), fill_value, progress)
        n = x.shape[0]
        check_image_memory(n, self.n_channels, self.shape)
        out = np.empty((n, self.n_channels, *self.shape), dtype=np.float32)
        flat_out = out.reshape(n, -1)
        matrix = self.averaging_matrix()
        empty = np.diff(self._pixel_ptr) == 0
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            for chunk in range(start, stop, _CHUNK_SAMPLES):
                chunk_stop = min(chunk + _CHUNK_SAMPLES, stop)
                block = np.asarray(x[chunk:chunk_stop], dtype=np.float32)
                _render_chunk(block, matrix, flat_out[chunk:chunk_stop])
            if progress is not None:
                progress(ProgressEvent.count("render", stop, n))
        if fill_value != 0:
            flat_out[:, empty] = fill_value
        return out

    def _render_sparse(self, x: sp.csr_matrix, fill_value: float, progress: Progress | None):
        """Sparse CSR batch × sparse averaging matrix: work and memory follow the non-zeros.

        Atlas-scale batches (:mod:`napari_omicsimage.streaming`) stay sparse from
        the file to here; only the images of the batch are dense.
        """
        n = x.shape[0]
        check_image_memory(n, self.n_channels, self.shape)
        matrix = self.averaging_matrix()
        out = np.empty((n, self.n_channels, *self.shape), dtype=np.float32)
        flat_out = out.reshape(n, -1)
        step = 16 * _CHUNK_SAMPLES  # a sparse product has no transposing copy to keep in cache
        for start in range(0, n, step):
            stop = min(start + step, n)
            flat_out[start:stop] = (x[start:stop] @ matrix).toarray()
            if progress is not None:
                progress(ProgressEvent.count("render", stop, n))
        if fill_value != 0:
            flat_out[:, np.diff(self._pixel_ptr) == 0] = fill_value
        return out

    def _render_torch(self, x, fill_value: float, device):
        import torch

        device = torch.device(device)
        key = str(device)
        if key not in self._torch_cache:
            m = self.averaging_matrix().T.tocoo()
            indices = torch.from_numpy(np.vstack([m.row, m.col]).astype(np.int64))
            values = torch.from_numpy(m.data.astype(np.float32))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                sparse = torch.sparse_coo_tensor(indices, values, m.shape, check_invariants=False)
                sparse = sparse.coalesce().to_sparse_csr()
            empty = torch.from_numpy(np.diff(self._pixel_ptr) == 0)
            self._torch_cache = {key: (sparse.to(device), empty.to(device))}
        sparse, empty = self._torch_cache[key]
        xt = _dense_on_device(x, device)
        flat = (sparse @ xt.T).T
        if fill_value != 0:
            flat = flat.masked_fill(empty, fill_value)
        return flat.reshape(xt.shape[0], self.n_channels, *self.shape).contiguous()

    # --------------------------------------------------------- persistence
    def state(self) -> dict:
        return {"gene_pixels": self.gene_pixels, "shape": list(self.shape), "genes": list(self.genes)}

    @classmethod
    def from_state(cls, state: dict) -> "PixelMap":
        return cls(np.asarray(state["gene_pixels"]), tuple(state["shape"]), state["genes"])


def _dense_on_device(x, device):
    """A float32 tensor of a dense array, a torch tensor or a scipy sparse batch on ``device``.

    A sparse batch travels as its CSR arrays (the non-zeros only) and is made
    dense on the device, where a batch of a few thousand genes is small; the
    product with the (much larger) averaging matrix then runs as before.
    """
    import torch

    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            batch = torch.sparse_csr_tensor(
                torch.from_numpy(x.indptr.astype(np.int64)).to(device),
                torch.from_numpy(x.indices.astype(np.int64)).to(device),
                torch.from_numpy(x.data).to(device), size=x.shape, device=device)
            return batch.to_dense()
    return torch.as_tensor(x, dtype=torch.float32, device=device)


# ================================================================ display
#: the colour map of expression images, in napari and in the demo's figures alike
IMAGE_COLORMAP = "gray"


def image_contrast(images: np.ndarray) -> list[float]:
    """Contrast limits that show the expressed pixels well.

    Images are in [0, 1] but most pixels of a sample sit far below 1 (a pixel
    averages its genes, each scaled to its own range): the 99.5th percentile of
    the non-empty pixels keeps detail without saturating the bright ones.
    """
    values = np.asarray(images, dtype=np.float32)
    nonzero = values[values > 0]
    if nonzero.size == 0:
        return [0.0, 1.0]
    top = float(np.percentile(nonzero, 99.5))
    return [0.0, max(top, 1e-3)]
