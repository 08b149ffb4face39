"""napari reader contribution: expression files open as images; region files as Shapes/Labels.

Dropping an ``.h5ad``/``.csv``/``.tsv`` file on napari reads it, picks the
label column (the one recorded in the file, else the first categorical
``obs`` column with 2–50 classes), imagifies it with a quick default layout
(:data:`QUICK_LAYOUT`) and returns the same layers the Imagify widget makes.
The images layer carries the data, so the omicsimage widgets take them over
(choose another layout or label column there).  A large ``.h5ad`` (the CLI's
``--backed auto`` rule) is opened backed and shown as a lazy stack
(:mod:`napari_omicsimage.streaming.lazy`).  Region files written by the
Annotate widget or the regions writer come back as the layer they were drawn on.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd

from ._regions import Regions, is_regions_file, load_regions

#: opens a file in a second: one gene per pixel, co-expressed genes side by side
#: (DeepInsight t-SNE layouts take longer to fit: choose them in the Imagify widget)
QUICK_LAYOUT = {"method": "grid", "size": None, "order": "cluster"}

EXPRESSION_SUFFIXES = (".h5ad", ".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
#: header columns of the tables this package writes; such CSVs are results, not expression data
_RESULT_COLUMNS = {"saliency", "region", "rank"}


def napari_get_reader(path):
    """Return a reader function for ``path``, or ``None`` when it is not ours to read."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    name = str(path).lower()
    if name.endswith(".json"):
        return read_regions if is_regions_file(path) else None
    if name.endswith(EXPRESSION_SUFFIXES) and not _is_result_table(path):
        return read_expression_layers
    return None


def _is_result_table(path) -> bool:
    """True for the gene tables we export (their header names saliency/region/rank)."""
    path = Path(path)
    if path.suffix.lower() == ".h5ad" or not path.is_file():
        return False
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
            header = handle.readline()
    except OSError:
        return False
    columns = {c.strip().strip('"').lower() for c in header.replace("\t", ",").split(",")}
    return len(columns & _RESULT_COLUMNS) >= 2


def guess_label_column(adata) -> str | None:
    """The obs column most likely to hold classes: the recorded one, else a categorical with 2–50 classes."""
    recorded = adata.uns.get("omicsimage", {}).get("label_column")
    if recorded in adata.obs.columns:
        return recorded
    for column in adata.obs.columns:
        values = adata.obs[column]
        categorical = isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object
        if categorical and 2 <= values.nunique() <= 50 and values.notna().all():
            return column
    return None


def expression_layers(adata, label_column: str | None, source: str, layout_spec: dict | None = None,
                      path: str | None = None) -> list:
    """Imagify ``adata`` with a quick layout and build its layers (reader and sample data share this)."""
    from ._hover import ImageSet
    from ._widgets._layers import image_layers
    from ._widgets._state import DataPayload, session_for_current_viewer
    from .pipeline import imagify

    spec = dict(layout_spec or QUICK_LAYOUT)
    params = {k: v for k, v in spec.items() if k not in ("method", "size")}
    if getattr(adata, "isbacked", False):  # a large .h5ad: streamed preprocessing, lazy stack
        from .streaming.lazy import imagify_cells

        result = imagify_cells(adata, spec["method"], size=spec["size"], label_column=label_column,
                               layout_params=params)
    else:
        result = imagify(adata, spec["method"], size=spec["size"], label_column=label_column,
                         layout_params=params)
    imageset = ImageSet.from_imagified(result, label_column)
    payload = DataPayload(adata=adata, label_column=label_column, source=source, imagified=result,
                          layout_spec=spec, path=path)
    # attach the session now, so hovering works even before any omicsimage widget is opened
    session_for_current_viewer()
    return image_layers(imageset, payload=payload)


def read_expression_layers(path) -> list:
    from .io import read_expression

    from .streaming import open_cells, wants_streaming

    path = path[0] if isinstance(path, (list, tuple)) else path
    # the CLI's --backed auto rule: a large .h5ad stays on disk and its images are rendered when shown
    adata = open_cells(path) if wants_streaming(path) else read_expression(path)
    return expression_layers(adata, guess_label_column(adata), Path(path).name, path=str(path))


def regions_layer_data(regions: Regions, name: str) -> list:
    """Layer data tuples for saved regions: a Shapes layer and/or a Labels layer."""
    from ._widgets._layers import regions_layer_kwargs

    layers = []
    if regions.shapes:
        names = [n for n, _, _ in regions.shapes]
        kwargs = regions_layer_kwargs(None, name)
        kwargs.update(shape_type=[t for _, t, _ in regions.shapes], features=pd.DataFrame({"name": names}),
                      text={"string": "{name}", "color": "yellow", "size": 10, "anchor": "upper_left"})
        layers.append(([v for _, _, v in regions.shapes], kwargs, "shapes"))
    if regions.labels is not None:
        layers.append((regions.labels, {"name": f"{name} (painted)", "opacity": 0.5}, "labels"))
    return layers


def read_regions(path) -> list:
    path = path[0] if isinstance(path, (list, tuple)) else path
    return regions_layer_data(load_regions(path), Path(path).stem)
