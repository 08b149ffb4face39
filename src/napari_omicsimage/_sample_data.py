"""napari sample-data contribution: scanpy's pbmc68k_reduced, imagified and ready to hover.

File > Open Sample > napari-omicsimage > PBMC 68k reduced loads 700 blood cells
× 765 genes (10 cell types in ``bulk_labels``; bundled with scanpy, so it works
offline) and shows them with the reader's quick layout.
"""

from __future__ import annotations

from ._reader import expression_layers
from .io import SAMPLE_DATASETS, load_sample_data


def pbmc68k_reduced() -> list:
    name = "pbmc68k_reduced"
    return expression_layers(load_sample_data(name), SAMPLE_DATASETS[name], name)
