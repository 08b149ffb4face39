"""Atlas scale: 10⁵–10⁶ cells in bounded memory, and training on several devices.

Nothing here holds the full cells × genes matrix.  An ``.h5ad`` is opened
*backed* (``anndata.read_h5ad(path, backed="r")``); every pass reads
contiguous blocks of rows of its CSR matrix:

* :mod:`.cells` — opening a file backed, reading blocks of rows, choosing the
  streaming path for large inputs, stratified subsamples;
* :mod:`.fit` — the :class:`~napari_omicsimage.preprocess.Preprocessor` fitted
  in one streaming pass (per-gene statistics of the training cells), the
  layout fitted on a bounded stratified subsample of cells;
* :mod:`.loader` — a torch ``IterableDataset`` of block-shuffled batches,
  split across processes like a ``DistributedSampler``;
* :mod:`.run` — streaming ``train``, ``predict`` (written as it goes) and
  cross-validation;
* :mod:`.ddp` — ``DistributedDataParallel`` training on N processes (gloo on
  CPUs, nccl on GPUs), started by ``--devices N`` or by ``torchrun``.

The module is Qt-free; the CLI takes this path by itself for large inputs.
"""

from .cells import STREAM_ABOVE_BYTES, STREAM_ABOVE_CELLS, open_cells, wants_streaming
from .fit import DEFAULT_LAYOUT_CELLS, fit_preprocessor, fit_layout_on_subsample
from .cv import cross_validate_streaming
from .run import predict_streaming, train_streaming

__all__ = ["DEFAULT_LAYOUT_CELLS", "STREAM_ABOVE_BYTES", "STREAM_ABOVE_CELLS", "cross_validate_streaming",
           "fit_layout_on_subsample", "fit_preprocessor", "open_cells", "predict_streaming", "train_streaming",
           "wants_streaming"]
