"""Hand-drawn regions: masks, the genes inside them, and region files (Qt-free).

A region is a polygon, rectangle or ellipse drawn on the image (napari Shapes)
or the pixels painted with one label value (napari Labels).  A pixel belongs
to a region when its *centre* lies inside the shape **or on its boundary** —
napari draws pixel ``(r, c)`` as the square ``[r-½, r+½] × [c-½, c+½]``, so
the centre is the pixel the user sees covered, and a shape snapped to pixel
centres (a rectangle from ``(1, 1)`` to ``(3, 4)``) holds every pixel it
touches, on all four sides alike.  "On" means within :data:`EDGE_TOLERANCE`
pixels of an edge; ellipses are tested exactly (the ellipse inscribed in the
shape's four bounding corners), not through a polygon.  The genes of a region
are those whose pixel is inside it (:meth:`PixelMap.genes_in_mask`), ranked
by gene attribution (by pixel saliency when no attribution is given).

Region files are small JSON documents (no pickles) that the napari reader
contribution turns back into a Shapes or Labels layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.path import Path as PolygonPath

from .errors import OmicsInputError
from .render import PixelMap

REGIONS_FORMAT = "napari-omicsimage regions"
REGIONS_VERSION = 1
AREA_SHAPES = ("polygon", "rectangle", "ellipse")
#: shapes that enclose no area: they select no pixel
LINE_SHAPES = ("line", "path")

GENE_TABLE_COLUMNS = ["region", "rank", "gene", "attribution", "saliency", "expression", "channel", "row", "col"]
#: a pixel centre within this distance (in pixels) of a shape's edge is on the edge, so it is included;
#: it absorbs floating-point noise in the vertices napari reports, and nothing a user can draw
EDGE_TOLERANCE = 1e-6


# ------------------------------------------------------------------ masks
def shape_mask(shape_type: str, vertices, image_shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels whose centre lies inside one shape or on its boundary.

    ``vertices`` are ``(row, col)`` data coordinates (extra leading coordinates,
    e.g. a sample axis, are dropped).  Rectangles and polygons: inside the
    polygon, or within :data:`EDGE_TOLERANCE` of one of its edges.  Ellipses:
    the ellipse inscribed in napari's four bounding-box corners, boundary
    included.  Lines and paths select nothing.
    """
    h, w = image_shape
    vertices = np.asarray(vertices, dtype=float)
    if vertices.ndim != 2 or vertices.shape[1] < 2 or len(vertices) == 0:
        raise OmicsInputError(f"a region needs (row, col) vertices, got an array of shape {vertices.shape}.")
    vertices = vertices[:, -2:]
    if shape_type in LINE_SHAPES:
        return np.zeros((h, w), dtype=bool)
    if shape_type not in AREA_SHAPES:
        raise OmicsInputError(f"unknown region shape {shape_type!r}; use one of {AREA_SHAPES}.")
    rows, cols = np.mgrid[0:h, 0:w]
    centres = np.column_stack([rows.ravel(), cols.ravel()]).astype(float)
    if shape_type == "ellipse":
        inside = _in_ellipse(vertices, centres)
    else:
        inside = PolygonPath(vertices).contains_points(centres) | _on_edges(vertices, centres)
    return inside.reshape(h, w)


def _in_ellipse(corners: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points inside or on the ellipse inscribed in the parallelogram of 4 corners (napari's order)."""
    if len(corners) != 4:
        raise OmicsInputError(f"an ellipse region needs its 4 bounding-box corners, got {len(corners)} vertices.")
    centre = corners.mean(axis=0)
    axes = np.column_stack([(corners[1] - corners[0]) / 2.0, (corners[3] - corners[0]) / 2.0])  # half-axes
    if abs(np.linalg.det(axes)) < 1e-12:  # flat: the ellipse is a segment between two corners
        return _on_edges(corners, points)
    # each point in the ellipse's own coordinates, where the ellipse is the unit circle
    s, t = np.linalg.solve(axes, (points - centre).T)
    radius = np.hypot(s, t)
    # tolerance in pixels along the shorter half-axis, so "on the edge" means the same as for polygons
    scale = float(min(np.linalg.norm(axes, axis=0)))
    return radius <= 1.0 + EDGE_TOLERANCE / max(scale, EDGE_TOLERANCE)


def _on_edges(polygon: np.ndarray, points: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Points within :data:`EDGE_TOLERANCE` of a closed polygon's edges."""
    start = polygon
    direction = np.roll(polygon, -1, axis=0) - start
    length2 = (direction ** 2).sum(axis=1)
    length2 = np.where(length2 > 0, length2, 1.0)  # a repeated vertex: its "edge" is the vertex itself
    lo, hi = polygon.min(axis=0) - EDGE_TOLERANCE, polygon.max(axis=0) + EDGE_TOLERANCE
    near = np.flatnonzero(((points >= lo) & (points <= hi)).all(axis=1))  # only the bounding box can be on it
    out = np.zeros(len(points), dtype=bool)
    for first in range(0, len(near), chunk):
        index = near[first:first + chunk]
        offset = points[index, None, :] - start[None]  # (P, E, 2)
        along = np.clip((offset * direction[None]).sum(axis=-1) / length2[None], 0.0, 1.0)
        gap = offset - along[..., None] * direction[None]
        out[index] = ((gap ** 2).sum(axis=-1) <= EDGE_TOLERANCE ** 2).any(axis=1)
    return out


def labels_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """One mask per painted label value (0 is background): ``{"label 3": mask}``."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise OmicsInputError(
            f"the region labels must be a 2-D (rows × cols) image, got shape {labels.shape}; "
            "paint on a 2-D Labels layer the size of the images."
        )
    return {f"label {int(v)}": labels == v for v in np.unique(labels) if v != 0}


@dataclass
class Regions:
    """Regions drawn on one image grid: shapes, painted labels, or both."""

    image_shape: tuple[int, int]
    #: ``(name, shape_type, vertices (K, 2))``
    shapes: list[tuple[str, str, np.ndarray]] = field(default_factory=list)
    labels: np.ndarray | None = None

    def masks(self) -> dict[str, np.ndarray]:
        """Region name → boolean ``(H, W)`` mask; shapes first, then label values."""
        out: dict[str, np.ndarray] = {}
        for name, shape_type, vertices in self.shapes:
            out[name] = shape_mask(shape_type, vertices, self.image_shape)
        if self.labels is not None:
            if tuple(self.labels.shape) != tuple(self.image_shape):
                raise OmicsInputError(
                    f"the painted labels have shape {self.labels.shape}, the images are {self.image_shape}; "
                    "paint on a Labels layer of the image size."
                )
            out.update(labels_masks(self.labels))
        return out

    @classmethod
    def from_shapes(cls, data, shape_types, image_shape, names=None) -> Regions:
        names = list(names) if names is not None else [f"region {i + 1}" for i in range(len(data))]
        shapes = [(str(n), str(t), np.asarray(v, dtype=float)[:, -2:]) for n, t, v in zip(names, shape_types, data)]
        return cls(tuple(int(s) for s in image_shape), shapes)


def region_names(features: pd.DataFrame | None, n: int) -> list[str]:
    """Names of ``n`` shapes: a ``name`` feature where the user gave one, else ``region i``."""
    names = [f"region {i + 1}" for i in range(n)]
    if features is not None and "name" in features.columns:
        for i, value in enumerate(features["name"].tolist()[:n]):
            if isinstance(value, str) and value.strip():
                names[i] = value.strip()
    return names


# ------------------------------------------------------------ gene tables
def region_gene_table(
    pixel_map: PixelMap,
    masks: dict[str, np.ndarray],
    *,
    saliency: np.ndarray | None = None,
    expression: np.ndarray | None = None,
    attribution: np.ndarray | None = None,
    channel_names: list[str] | None = None,
) -> pd.DataFrame:
    """Genes inside each region, ranked by ``|attribution|`` (sign kept), else by saliency (then expression).

    ``attribution`` (signed gene attribution) and ``expression`` are one value
    per gene; ``saliency`` is a ``(C, H, W)`` pixel-saliency map (its value at
    a gene's pixel is the gene's pixel saliency).  A gene inside a region in
    several channels is listed once, with its most salient pixel.  Columns:
    ``region, rank, gene, attribution, saliency, expression, channel, row, col``.
    """
    names = channel_names or ([""] if pixel_map.n_channels == 1 else [str(c) for c in range(pixel_map.n_channels)])
    if saliency is not None and tuple(np.shape(saliency)) != (pixel_map.n_channels, *pixel_map.shape):
        raise OmicsInputError(
            f"saliency map of shape {np.shape(saliency)} does not match the images "
            f"({pixel_map.n_channels}, {pixel_map.shape[0]}, {pixel_map.shape[1]}); recompute the saliency."
        )
    frames = []
    for region, mask in masks.items():
        parts = []
        for c in range(pixel_map.n_channels):
            idx = pixel_map.genes_in_mask(mask, channel=c)
            if len(idx) == 0:
                continue
            rows, cols = pixel_map.gene_pixels[c, idx, 0], pixel_map.gene_pixels[c, idx, 1]
            parts.append(pd.DataFrame({
                "gene": pixel_map.genes[idx],
                "attribution": np.asarray(attribution, dtype=float)[idx] if attribution is not None else np.nan,
                "saliency": saliency[c, rows, cols] if saliency is not None else np.nan,
                "expression": np.asarray(expression, dtype=float)[idx] if expression is not None else np.nan,
                "channel": names[c], "row": rows, "col": cols,
            }))
        if not parts:
            continue
        genes = pd.concat(parts, ignore_index=True)
        genes = genes.sort_values(["saliency", "expression"], ascending=False, na_position="last", kind="stable")
        genes = genes.drop_duplicates("gene", keep="first")  # its most salient pixel
        if attribution is not None:
            genes = genes.iloc[np.argsort(-genes["attribution"].abs().to_numpy(), kind="stable")]
        genes = genes.reset_index(drop=True)
        genes.insert(0, "region", region)
        genes.insert(1, "rank", np.arange(1, len(genes) + 1))
        frames.append(genes)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in GENE_TABLE_COLUMNS})
    return pd.concat(frames, ignore_index=True)[GENE_TABLE_COLUMNS]


# ------------------------------------------------------------ region files
def save_regions(regions: Regions, path: str | Path) -> Path:
    """Write regions as JSON (read back with :func:`load_regions`)."""
    path = Path(path)
    document = {
        "format": REGIONS_FORMAT,
        "version": REGIONS_VERSION,
        "image_shape": [int(s) for s in regions.image_shape],
        "shapes": [{"name": n, "shape_type": t, "vertices": np.asarray(v, dtype=float).round(4).tolist()}
                   for n, t, v in regions.shapes],
        "labels": None if regions.labels is None else np.asarray(regions.labels, dtype=int).tolist(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)
    return path


def is_regions_file(path: str | Path) -> bool:
    """True for a JSON file written by :func:`save_regions` (cheap check on its start)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        head = handle.read(200)
    return REGIONS_FORMAT in head


def load_regions(path: str | Path) -> Regions:
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OmicsInputError(f"{path.name}: not a readable regions file ({exc}).") from exc
    if not isinstance(document, dict) or document.get("format") != REGIONS_FORMAT:
        raise OmicsInputError(f"{path.name} is not an omicsimage regions file (saved from the Annotate widget).")
    if document.get("version", 0) > REGIONS_VERSION:
        raise OmicsInputError(f"{path.name} was written by a newer napari-omicsimage; upgrade to read it.")
    try:
        shape = tuple(int(s) for s in document["image_shape"])
        shapes = [(str(s["name"]), str(s["shape_type"]), np.asarray(s["vertices"], dtype=float))
                  for s in document.get("shapes", [])]
        labels = document.get("labels")
        labels = None if labels is None else np.asarray(labels, dtype=np.int32)
    except (KeyError, TypeError, ValueError) as exc:
        raise OmicsInputError(f"{path.name}: damaged regions file ({exc}).") from exc
    for name, shape_type, vertices in shapes:
        if shape_type not in AREA_SHAPES + LINE_SHAPES or vertices.ndim != 2 or vertices.shape[1] != 2:
            raise OmicsInputError(f"{path.name}: region {name!r} is damaged (type {shape_type!r}).")
    return Regions(shape, shapes, labels)
