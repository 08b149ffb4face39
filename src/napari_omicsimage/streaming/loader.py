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

We measured the two loaders the issue names before writing this one; see
docs/benchmarks.md#scale for why this one is used.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..preprocess import Preprocessor
from .cells import iter_row_blocks
from .fit import prepare_block

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
    """

    def __init__(self, adata, rows: np.ndarray, y: np.ndarray | None, preprocessor: Preprocessor,
                 batch_size: int, *, block_cells: int = 256, fetch_blocks: int = 16, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
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
            x = sp.vstack([prepare_block(self.adata, part, block, self.preprocessor)
                           for part, block in iter_row_blocks(self.adata, cells)], format="csr")
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
        from .fit import transform_rows

        x = transform_rows(self.dataset.adata, self.calibration_rows, self.dataset.preprocessor)
        n_chunks = max(1, -(-x.shape[0] // max(self.dataset.batch_size, 1)))
        for chunk in np.array_split(np.arange(x.shape[0]), n_chunks):
            yield self.layout.transform(x[chunk], device=self.device)
