"""napari-omicsimage: gene-expression data as images, CNNs on them, and the genes behind each prediction.

The core (``io``, ``preprocess``, ``layouts``, ``render``, ``pipeline``) is Qt-free and
usable from Python and the ``omicsimage`` CLI; the napari widgets are thin shells over it.
"""

__version__ = "0.1.0"

from .errors import CheckpointError, OmicsInputError  # noqa: E402

__all__ = ["__version__", "OmicsInputError", "CheckpointError"]
