"""napari layer data for slides and predictions: ``(data, kwargs, type)`` tuples, no Qt.

* the slide as a multiscale RGB image (its pyramid levels, lazy where the file is);
* spots as Points whose size is the spot diameter;
* predicted expression of one gene as spot discs coloured by the prediction,
  and the measured values beside it (the same slide shifted right);
* the Shannon-selection mask (kept / dropped patches) as Labels.

Each spot's ``features`` row holds ``top genes``: its highest predicted genes
with predicted and measured values, so napari's own status bar and tooltip
show them when the cursor is on a spot.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from .reading import Section

#: gap between the predicted and the measured copy of the slide, as a share of its width
SIDE_BY_SIDE_GAP = 0.04


def measured_offset(section: Section) -> float:
    """Columns the measured copy is shifted by (slide width plus a gap)."""
    return section.slide.shape[1] * (1 + SIDE_BY_SIDE_GAP)


def slide_layer(section: Section, *, name: str | None = None, translate: float = 0.0) -> tuple:
    levels = section.slide.levels
    return (levels if len(levels) > 1 else levels[0],
            {"name": name or f"slide {section.name}", "rgb": True, "multiscale": len(levels) > 1,
             "translate": (0.0, translate)}, "image")


#: feature column holding a spot's top genes (its header says which number is which)
TOP_GENES = "top genes (pred / meas)"


def top_genes_text(predicted: np.ndarray, genes, measured: np.ndarray | None = None, n: int = 3) -> list[str]:
    """Per spot: ``GENE 2.31 / 2.05, ...`` (predicted / measured) for its ``n`` highest predicted genes.

    Short, so napari's tooltip stays on screen.  Predictions below 0 (a linear model can undershoot)
    are shown as 0: expression on this scale is never negative.
    """
    genes = np.asarray(genes, dtype=object)
    predicted = np.maximum(np.asarray(predicted, dtype=float), 0.0)
    order = np.argsort(-predicted, axis=1)[:, :n]
    texts = []
    for i, top in enumerate(order):
        parts = []
        for j in top:
            part = f"{genes[j]} {predicted[i, j]:.2f}"
            if measured is not None and np.isfinite(measured[i, j]):
                part += f" / {measured[i, j]:.2f}"
            parts.append(part)
        texts.append(", ".join(parts))
    return texts


def gene_limits(values: np.ndarray) -> tuple[float, float]:
    """Colour limits of one gene map: its own 1st–99th percentile (a shared scale can leave one copy flat)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [1, 99]))
    return (low, high) if high > low else (low, low + 1e-6)


def copy_labels_layer(section: Section, gene: str, measured: bool) -> tuple:
    """Text on the canvas above each copy of the slide: which is predicted and which measured."""
    xy = section.centres
    pad = section.spot_diameter_px
    top = float(xy[:, 1].min() - pad)
    left = float(xy[:, 0].min())
    positions = [[top, left]]
    names = [f"predicted {gene}"]
    if measured:
        positions.append([top, left + measured_offset(section)])
        names.append(f"measured {gene}")
    return (np.array(positions), {
        "name": "copy labels", "size": 0.1, "face_color": "transparent", "border_width": 0,
        "features": pd.DataFrame({"label": names}),
        "text": {"string": "{label}", "anchor": "upper_left", "size": 14, "color": "white"},
        "metadata": {"omicsimage_histology": {"role": "labels"}}}, "points")


def spots_layer(section: Section, predictions: ad.AnnData | None = None, *, name: str | None = None) -> tuple:
    """Spot outlines (size = spot diameter); with predictions, their top genes on hover."""
    features = pd.DataFrame({"spot": section.spots.index.astype(str)})
    if predictions is not None:
        measured = predictions.layers.get("measured")
        features[TOP_GENES] = top_genes_text(np.asarray(predictions.X), predictions.var_names, measured)
    return (section.centres[:, ::-1].copy(),
            {"name": name or f"spots {section.name}", "size": section.spot_diameter_px, "face_color": "transparent",
             "border_color": "white", "border_width": 0.06, "features": features}, "points")


def expression_layer(section: Section, predictions: ad.AnnData, gene: str, *, measured: bool = False,
                     contrast: tuple[float, float] | None = None) -> tuple:
    """Spot discs coloured by the predicted (or measured) expression of ``gene``, on the training scale."""
    if gene not in predictions.var_names:
        raise KeyError(gene)
    column = predictions.var_names.get_loc(gene)
    values = np.asarray(predictions.layers["measured"] if measured else predictions.X)[:, column].astype(float)
    if not measured:
        values = np.maximum(values, 0.0)  # see top_genes_text: no negative expression on screen
    measured_all = predictions.layers.get("measured")
    what = "measured" if measured else "predicted"
    features = pd.DataFrame({
        "spot": predictions.obs_names.astype(str),
        f"{what} {gene}": values,
        TOP_GENES: top_genes_text(np.asarray(predictions.X), predictions.var_names, measured_all),
    })
    if contrast is None:
        contrast = gene_limits(values)
    return (np.asarray(predictions.obsm["spatial"], dtype=float)[:, ::-1].copy(),
            {"name": f"{what} {gene}", "size": section.spot_diameter_px, "features": features,
             "face_color": f"{what} {gene}", "face_colormap": "viridis", "face_contrast_limits": contrast,
             "border_width": 0, "opacity": 1.0,
             "translate": (0.0, measured_offset(section) if measured else 0.0),
             "metadata": {"omicsimage_histology": {"gene": gene, "what": what}}}, "points")


def shannon_mask_layer(section: Section, keep: np.ndarray, *, patch_um: float, max_side: int = 2048) -> tuple:
    """Labels on a reduced grid: 1 where a kept patch lies, 2 where a dropped one does."""
    h, w = section.slide.shape
    scale = min(1.0, max_side / max(h, w))
    mask = np.zeros((max(1, int(h * scale)), max(1, int(w * scale))), dtype=np.uint8)
    half = patch_um / section.um_per_px / 2 * scale
    for (x, y), kept in zip(section.centres * scale, np.asarray(keep, dtype=bool)):
        y0, y1 = max(int(y - half), 0), int(y + half) + 1
        x0, x1 = max(int(x - half), 0), int(x + half) + 1
        mask[y0:y1, x0:x1] = 1 if kept else 2
    keep = np.asarray(keep, dtype=bool)
    features = pd.DataFrame({"index": [0, 1, 2], "shannon": ["", "kept", "dropped"]})
    from napari.utils.colormaps import DirectLabelColormap

    colours = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: KEPT_COLOUR,
                                              2: DROPPED_COLOUR})
    # the name says what the summary says: how many patches were kept and dropped, and in which colour
    name = f"Shannon: {int(keep.sum())} kept (green), {int((~keep).sum())} dropped (red)"
    return (mask, {"name": name, "scale": (1 / scale, 1 / scale), "colormap": colours,
                   "opacity": 0.6, "features": features}, "labels")


KEPT_COLOUR = "#3ccf6e"
DROPPED_COLOUR = "#e8453c"
