"""napari writer contributions: regions (JSON) and gene tables (CSV).

* Shapes or Labels layer → ``.json``: the regions, reloadable by the reader.
* Shapes or Labels layer → ``.csv``: the genes inside each region, ranked by
  the saliency currently shown (needs the layer to be drawn over omicsimage
  images, whose data travel in the layer's metadata).
* Saliency (or expression-images) layer → ``.csv``: every gene of the image
  ranked by saliency for the sample or class shown.

napari calls single-layer writers as ``writer(path, data, meta)`` where
``meta`` is the layer's state (name, metadata, shape types, ...); they return
the paths written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ._regions import Regions, region_names, save_regions
from .errors import OmicsInputError

META_KEY = "omicsimage"


def _imageset(meta: dict):
    entry = (meta.get("metadata") or {}).get(META_KEY)
    return entry.get("imageset") if isinstance(entry, dict) else None


def _with_suffix(path, suffix: str) -> Path:
    path = Path(path)
    return path if path.suffix.lower() == suffix else path.with_name(path.name + suffix)


def _image_shape(meta: dict, fallback) -> tuple[int, int]:
    imageset = _imageset(meta)
    if imageset is not None:
        return imageset.shape
    return fallback()


def shapes_regions(data, meta: dict) -> Regions:
    def from_vertices():
        top = np.max([np.asarray(v)[:, -2:].max(axis=0) for v in data], axis=0) if len(data) else [0, 0]
        return tuple(int(np.ceil(t)) + 1 for t in top)

    features = meta.get("features")
    names = region_names(features if isinstance(features, pd.DataFrame) else None, len(data))
    return Regions.from_shapes(data, meta.get("shape_type", ["polygon"] * len(data)),
                               _image_shape(meta, from_vertices), names)


def labels_regions(data, meta: dict) -> Regions:
    labels = np.asarray(data)
    if labels.ndim != 2:
        raise OmicsInputError(f"painted regions must be a 2-D labels image, got shape {labels.shape}.")
    return Regions(tuple(labels.shape), [], labels)


def write_shapes_regions(path: str, data, meta: dict) -> list[str]:
    return [str(save_regions(shapes_regions(data, meta), _with_suffix(path, ".json")))]


def write_labels_regions(path: str, data, meta: dict) -> list[str]:
    return [str(save_regions(labels_regions(data, meta), _with_suffix(path, ".json")))]


def _region_genes(regions: Regions, meta: dict) -> pd.DataFrame:
    imageset = _imageset(meta)
    if imageset is None or imageset.pixel_map is None:
        raise OmicsInputError(
            "this layer is not drawn over omicsimage images with a gene map, so its regions hold no genes; "
            "draw regions with the Annotate widget over imagified data.")
    return imageset.region_table(regions.masks())


def write_shapes_genes(path: str, data, meta: dict) -> list[str]:
    table = _region_genes(shapes_regions(data, meta), meta)
    path = _with_suffix(path, ".csv")
    table.to_csv(path, index=False)
    return [str(path)]


def write_labels_genes(path: str, data, meta: dict) -> list[str]:
    table = _region_genes(labels_regions(data, meta), meta)
    path = _with_suffix(path, ".csv")
    table.to_csv(path, index=False)
    return [str(path)]


def image_gene_table(imageset) -> pd.DataFrame:
    """Every gene of the images ranked by the gene attribution shown (sample or class), with pixel saliency
    and expression beside it."""
    return imageset.gene_table()


def write_image_genes(path: str, data, meta: dict) -> list[str]:
    imageset = _imageset(meta)
    if imageset is None:
        raise OmicsInputError("only omicsimage layers (expression images, saliency) can be written as gene tables.")
    path = _with_suffix(path, ".csv")
    image_gene_table(imageset).to_csv(path, index=False)
    return [str(path)]
