"""Block-shuffled batches of cells from a backed AnnData, split across processes.

Shuffling single cells of an on-disk matrix costs one read per cell.  As
scDataset does, we shuffle *blocks* instead: the training cells (sorted, so a
block is one contiguous read) are cut into blocks of ``block_cells``; every
epoch the blocks are permuted, ``fetch_blocks`` of them are read at a time and
their cells shuffled together, then cut into batches.  A batch then mixes
cells of 16 random places of the file (at the defaults), enough for SGD, at
the cost of a contiguous read per block.

With several processes (DDP) the permuted blocks are dealt out like
``torch.utils.data.DistributedSampler`` deals samples (padded by repeating the
first blocks so every rank gets as many), each rank reads only its own, and
every rank takes the same number of steps (a rank finishing early would hang
the others' gradient all-reduce).

When the preprocessed training cells fit a memory budget (``cache_gb``,
default :data:`DEFAULT_CACHE_GB`), :func:`cache_cells` reads them once into
an in-memory CSR matrix of the selected genes (:class:`CellCache`) and every
epoch slices it instead of reading and preprocessing the file again; the
batches are the same (tests/test_streaming.py).  At 2,000 genes and 3 %
non-zero that is about 0.5 GB per 10⁶ cells.

We measured the two loaders the issue names before writing this one; see
docs/benchmarks.md#scale for why this one is used.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from ..preprocess import Preprocessor
from .cells import iter_row_blocks
from .fit import prepare_block, transform_rows

log = logging.getLogger(__name__)

#: memory (GB) the preprocessed training cells may take in memory (``--cache-gb``); above it batches are read
#: and preprocessed from the file every epoch.  2 GB hold 10⁶ cells × 2,000 genes up to ~13 % non-zero, and
#: keep a 10⁶-cell training run under 6 GB (docs/benchmarks.md#scale).
DEFAULT_CACHE_GB = 2.0


class CellCache:
    """The preprocessed cells ``rows`` (sorted) as one in-memory CSR matrix: float32 values, int32 indices."""

    def __init__(self, rows: np.ndarray, x: sp.csr_matrix):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.x = x
        if x.shape[0] != self.rows.size:
            raise ValueError(f"{x.shape[0]} cached rows for {self.rows.size} cells")

    @property
    def nbytes(self) -> int:
        return int(self.x.data.nbytes + self.x.indices.nbytes + self.x.indptr.nbytes)

    def take(self, cells: np.ndarray) -> sp.csr_matrix:
        """The preprocessed rows of ``cells`` (each one of :attr:`rows`), in the order given."""
        positions = np.searchsorted(self.rows, cells)
        if positions.size and (positions.max() >= self.rows.size or np.any(self.rows[positions] != cells)):
            raise ValueError("cells outside the cache")
        return self.x[positions]


def cache_bytes(n_cells: int, nonzeros: int) -> int:
    """Bytes of a :class:`CellCache` of ``n_cells`` with ``nonzeros`` stored values."""
    index = 4 if nonzeros < 2**31 else 8
    return int(nonzeros) * (4 + index) + (int(n_cells) + 1) * index


def cache_cells(adata, rows: np.ndarray, preprocessor: Preprocessor, cache_gb: float = DEFAULT_CACHE_GB,
                *, nonzeros: int | None = None) -> CellCache | None:
    """The preprocessed cells ``rows`` in memory if they take at most ``cache_gb`` GB, else None.

    ``nonzeros`` (``preprocessor.training_nonzeros_`` by default, from the
    statistics pass) predicts the size, so a cache over budget costs no
    pass; without it the pass stops as soon as the budget is exceeded.
    Values and indices go straight into arrays of the predicted size (no
    second copy while building).
    """
    rows = np.asarray(rows, dtype=np.int64)
    budget = float(cache_gb) * 2**30
    if budget <= 0 or rows.size == 0:
        return None
    if nonzeros is None:
        nonzeros = getattr(preprocessor, "training_nonzeros_", None)
    n_genes = len(preprocessor.genes_)
    if nonzeros is not None and cache_bytes(rows.size, nonzeros) > budget:
        log.info("cells not held in memory: %.2f GB > --cache-gb %g; streaming from the file every epoch",
                 cache_bytes(rows.size, nonzeros) / 2**30, cache_gb)
        return None
    capacity = int(nonzeros) if nonzeros is not None else 0
    index_type = np.int32 if (nonzeros if nonzeros is not None else 0) < 2**31 else np.int64
    data = np.empty(capacity, dtype=np.float32)
    indices = np.empty(capacity, dtype=index_type)
    indptr = np.zeros(rows.size + 1, dtype=index_type)
    stored, done = 0, 0
    for part, block in iter_row_blocks(adata, rows):
        piece = prepare_block(adata, part, block, preprocessor)
        end = stored + piece.nnz
        if end > capacity:  # no prediction (or an explicit zero it did not count): grow, within the budget
            if cache_bytes(rows.size, end) > budget:
                log.info("cells not held in memory: more than --cache-gb %g; streaming from the file", cache_gb)
                return None
            capacity = max(end, 2 * capacity)
            data, indices = np.resize(data, capacity), np.resize(indices, capacity)
        data[stored:end] = piece.data
        indices[stored:end] = piece.indices
        indptr[done + 1:done + len(part) + 1] = stored + piece.indptr[1:]
        stored, done = end, done + len(part)
    if indptr.dtype == np.int32 and stored >= 2**31:  # pragma: no cover - over any sensible budget
        return None
    x = sp.csr_matrix((data[:stored], indices[:stored], indptr), shape=(rows.size, n_genes))
    cache = CellCache(rows, x)
    log.info("%d cells × %d genes held in memory: %.2f GB", rows.size, n_genes, cache.nbytes / 2**30)
    return cache

try:  # torch is a dependency; the import is deferred only to keep `import streaming` light
    from torch.utils.data import IterableDataset
except ImportError:  # pragma: no cover
    IterableDataset = object


class CellBatches(IterableDataset):
    """``(x, y)`` batches: ``x`` the preprocessed cells (CSR float32), ``y`` int64 class codes.

    Parameters
    ----------
    adata
        Backed or in-memory AnnData (only rows are read, in blocks).
    rows
        Sorted indices of the cells to draw from (a training fold).
    y
        Class code of *every* cell of ``adata`` (only ``y[rows]`` is used).
    batch_size
        Cells per batch on this process (the global batch over ``world_size``
        processes is ``batch_size × world_size``).
    rank, world_size
        This process's place among the DDP processes.
    shuffle
        ``False`` gives the cells in file order (prediction).
    cache
        A :class:`CellCache` holding (at least) ``rows``: batches are sliced
        from it instead of read and preprocessed from ``adata`` (the same
        batches).
    """

    def __init__(self, adata, rows: np.ndarray, y: np.ndarray | None, preprocessor: Preprocessor,
                 batch_size: int, *, block_cells: int = 256, fetch_blocks: int = 16, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, cache: CellCache | None = None):
        self.adata = adata
        self.rows = np.asarray(rows, dtype=np.int64)
        self.y = None if y is None else np.asarray(y, dtype=np.int64)
        self.preprocessor = preprocessor
        self.batch_size = int(batch_size)
        self.block_cells = int(block_cells)
        self.fetch_blocks = int(fetch_blocks)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle = bool(shuffle)
        self.cache = cache
        self.epoch = 0
        self._blocks = [self.rows[i:i + self.block_cells] for i in range(0, self.rows.size, self.block_cells)]

    def set_epoch(self, epoch: int) -> None:
        """As ``DistributedSampler.set_epoch``: a new block order every epoch, the same on every rank."""
        self.epoch = int(epoch)

    def _rank_blocks(self, epoch: int, rank: int) -> list[np.ndarray]:
        n = len(self._blocks)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        padded = -(-n // self.world_size) * self.world_size
        order = np.concatenate([order, order[: padded - n]]) if padded > n else order
        return [self._blocks[i] for i in order[rank::self.world_size]]

    def rank_cells(self, rank: int | None = None) -> int:
        return int(sum(len(b) for b in self._rank_blocks(0, self.rank if rank is None else rank)))

    @property
    def steps_per_epoch(self) -> int:
        """Batches every rank yields per epoch: the same number on all ranks."""
        if self.world_size == 1:
            return max(1, -(-self.rows.size // self.batch_size))
        # block sizes differ only in the last block, so ranks can differ by a few cells: all stop together
        fewest = min(self.rank_cells(r) for r in range(self.world_size))
        return max(1, fewest // self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        blocks = self._rank_blocks(self.epoch, self.rank)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        left_x, left_rows = [], []
        emitted = 0
        for start in range(0, len(blocks), self.fetch_blocks):
            cells = np.sort(np.concatenate(blocks[start:start + self.fetch_blocks]))  # one pass per fetch
            x = self._read(cells)
            if self.shuffle:
                mix = rng.permutation(len(cells))
                x, cells = x[mix], cells[mix]
            left_x.append(sp.csr_matrix(x))
            left_rows.append(cells)
            pool_x, pool_rows = sp.vstack(left_x, format="csr"), np.concatenate(left_rows)
            n_full = len(pool_rows) // self.batch_size
            for b in range(n_full):
                if emitted == self.steps_per_epoch:
                    return
                sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
                yield self._item(pool_x[sl], pool_rows[sl])
                emitted += 1
            rest = slice(n_full * self.batch_size, None)
            left_x, left_rows = [pool_x[rest]], [pool_rows[rest]]
        if left_rows and len(left_rows[0]) and emitted < self.steps_per_epoch:
            yield self._item(left_x[0], left_rows[0])

    def _read(self, cells: np.ndarray) -> sp.csr_matrix:
        """The preprocessed rows of the sorted ``cells``: from the cache, else from the file."""
        if self.cache is not None:
            return self.cache.take(cells)
        return sp.vstack([prepare_block(self.adata, part, block, self.preprocessor)
                          for part, block in iter_row_blocks(self.adata, cells)], format="csr")

    def _item(self, x: sp.csr_matrix, rows: np.ndarray):
        return x, (self.y[rows] if self.y is not None else rows)


def prefetched(iterable, depth: int = 2):
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead.

    Reading (h5py) and the sparse preprocessing release the GIL for much of
    their work, as does the network's step, so the next batches are prepared
    while the current one trains.  An exception in the thread is raised here.
    """
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill():
        try:
            for item in iterable:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=fill, name="omicsimage-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer stopped early (max_steps, cancel): let the thread end
        thread.join(timeout=5)


class StreamingBatches:
    """The epoch source :func:`napari_omicsimage.training.train_loop` trains on, fed by :class:`CellBatches`.

    Each batch is rendered on ``device`` from its sparse rows
    (``layout.transform(x_csr, device=...)``).  BatchNorm recalibration uses
    ``calibration_rows`` (a bounded subsample of the training cells).
    """

    def __init__(self, dataset: CellBatches, layout, device, calibration_rows: np.ndarray):
        self.dataset = dataset
        self.layout = layout
        self.device = device
        self.calibration_rows = np.asarray(calibration_rows, dtype=np.int64)

    @property
    def n_batches(self) -> int:
        return self.dataset.steps_per_epoch

    def epoch(self, epoch: int):
        import torch

        self.dataset.set_epoch(epoch)
        for b, (x, y) in enumerate(prefetched(self.dataset)):
            if x.shape[0] == 1 and self.dataset.batch_size > 1:
                continue  # as ShuffledBatches: a one-cell batch breaks BatchNorm
            yield (b, self.layout.transform(x, device=self.device),
                   torch.as_tensor(y, dtype=torch.int64, device=self.device))

    def calibration(self):
        x = (self.dataset.cache.take(self.calibration_rows) if self.dataset.cache is not None
             else transform_rows(self.dataset.adata, self.calibration_rows, self.dataset.preprocessor))
        n_chunks = max(1, -(-x.shape[0] // max(self.dataset.batch_size, 1)))
        for chunk in np.array_split(np.arange(x.shape[0]), n_chunks):
            yield self.layout.transform(x[chunk], device=self.device)
