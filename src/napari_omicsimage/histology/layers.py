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


def top_genes_text(predicted: np.ndarray, genes, measured: np.ndarray | None = None, n: int = 5) -> list[str]:
    """Per spot: ``GENE pred 2.31 / meas 2.05; ...`` for its ``n`` highest predicted genes."""
    genes = np.asarray(genes, dtype=object)
    order = np.argsort(-predicted, axis=1)[:, :n]
    texts = []
    for i, top in enumerate(order):
        parts = []
        for j in top:
            part = f"{genes[j]} pred {predicted[i, j]:.2f}"
            if measured is not None and np.isfinite(measured[i, j]):
                part += f" / meas {measured[i, j]:.2f}"
            parts.append(part)
        texts.append("; ".join(parts))
    return texts


def spots_layer(section: Section, predictions: ad.AnnData | None = None, *, name: str | None = None) -> tuple:
    """Spot outlines (size = spot diameter); with predictions, their top genes on hover."""
    features = pd.DataFrame({"spot": section.spots.index.astype(str)})
    if predictions is not None:
        measured = predictions.layers.get("measured")
        features["top genes"] = top_genes_text(np.asarray(predictions.X), predictions.var_names, measured)
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
    measured_all = predictions.layers.get("measured")
    features = pd.DataFrame({
        "spot": predictions.obs_names.astype(str),
        gene: values,
        "top genes": top_genes_text(np.asarray(predictions.X), predictions.var_names, measured_all),
    })
    if contrast is None:
        finite = values[np.isfinite(values)]
        contrast = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if contrast[1] <= contrast[0]:
            contrast = (contrast[0], contrast[0] + 1e-6)
    what = "measured" if measured else "predicted"
    return (np.asarray(predictions.obsm["spatial"], dtype=float)[:, ::-1].copy(),
            {"name": f"{what} {gene}", "size": section.spot_diameter_px, "features": features,
             "face_color": gene, "face_colormap": "viridis", "face_contrast_limits": contrast,
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
    features = pd.DataFrame({"index": [0, 1, 2], "shannon": ["", "kept", "dropped"]})
    return (mask, {"name": "Shannon selection (1 kept, 2 dropped)", "scale": (1 / scale, 1 / scale),
                   "opacity": 0.6, "features": features}, "labels")
