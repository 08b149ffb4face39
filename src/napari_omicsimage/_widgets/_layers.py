"""napari layer data for an :class:`~napari_omicsimage._hover.ImageSet` (no Qt).

Every layer made here carries ``metadata["omicsimage"] = {"role": ..., "imageset": ...}``
so that the session can find it again, give it gene-aware hover text and
replace it when the images change.  The reader and sample-data contributions
return these same tuples, so dropped files look exactly like imagified ones.

Canvas arrangement (data pixels = world units):

* the sample image stack at the origin, one slider over samples (the current
  sample's id, label and prediction go in the canvas text overlay, top right);
* the class-mean mosaic below it, tiles at half the sample image's size, with
  class names above each tile;
* hidden gene-density layers (one per channel) over the sample image;
* a ``gene pixels`` Labels layer whose ``features`` list the genes of each pixel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._hover import ImageSet, channels_last, relative

META_KEY = "omicsimage"

#: single-channel expression images: black = not expressed (also the empty pixels), white = highest;
#: neutral, so the saliency heat map added on top reads as the only colour
IMAGE_COLORMAP = "gray"
SALIENCY_COLORMAP = "inferno"
#: saliency below this share of the image's maximum adds nothing: the diffuse low gradient of
#: every pixel would otherwise tint the whole image
SALIENCY_FLOOR = 0.15
#: gene attribution: blue (against the class) – transparent (0) – red (for it), contrast symmetric about 0
ATTRIBUTION_COLORMAP_NAME = "omicsimage attribution"
#: size of a class-mean tile relative to the sample image
TILE_SCALE = 0.5


def role_of(layer) -> str | None:
    meta = getattr(layer, "metadata", None) or {}
    entry = meta.get(META_KEY)
    return entry.get("role") if isinstance(entry, dict) else None


def imageset_of(layer) -> ImageSet | None:
    entry = (getattr(layer, "metadata", None) or {}).get(META_KEY)
    return entry.get("imageset") if isinstance(entry, dict) else None


def _meta(role: str, imageset: ImageSet, **extra) -> dict:
    return {META_KEY: {"role": role, "imageset": imageset, **extra}}


def image_contrast(images: np.ndarray) -> list[float]:
    """Contrast limits that show the expressed pixels well.

    Images are in [0, 1] but most pixels of a sample sit far below 1 (a pixel
    averages its genes, each scaled to its own range): the 99.5th percentile of
    the non-empty pixels keeps detail without saturating the bright ones.
    """
    values = np.asarray(images, dtype=np.float32)
    nonzero = values[values > 0]
    if nonzero.size == 0:
        return [0.0, 1.0]
    top = float(np.percentile(nonzero, 99.5))
    return [0.0, max(top, 1e-3)]


def mosaic_transform(imageset: ImageSet) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(scale, translate)`` placing the class mosaic under the sample image, centred on it.

    Below rather than beside: with the widgets docked napari's canvas is about
    square or taller, and a wide gallery beside the sample would shrink everything.
    """
    h, _ = imageset.shape
    return (TILE_SCALE, TILE_SCALE), (1.05 * h, 0.0)


def density_colormap(max_genes: int):
    """turbo for 1…``max_genes`` genes per pixel, black for empty pixels (turbo's own low end is violet)."""
    from matplotlib import colormaps
    from napari.utils.colormaps import Colormap

    top = max(int(max_genes), 1)
    steps = np.linspace(0.0, 1.0, 32)
    colours = np.vstack([[0.0, 0.0, 0.0, 1.0], colormaps["turbo"](steps)])
    # one gene sits at 1/top of the contrast range; anything below half a gene is empty
    controls = np.concatenate([[0.0], 0.5 / top + steps * (1.0 - 0.5 / top)])
    return Colormap(colours, controls=controls, name=f"omicsimage density 0-{top}")


def image_layers(imageset: ImageSet, *, payload: dict | None = None) -> list[tuple]:
    """Layer data tuples ``(data, kwargs, type)`` for the images of ``imageset``, bottom first.

    ``payload`` (reader, sample data) rides on the first layer: the session
    adopts the data when that layer is inserted.
    """
    layers: list[tuple] = []
    rgb = imageset.n_channels == 3
    contrast = image_contrast(imageset.images)
    colour = {} if rgb else {"colormap": IMAGE_COLORMAP, "contrast_limits": contrast}

    if imageset.class_images is not None:
        tiles = channels_last(imageset.class_images)
        mosaic = imageset.mosaic.compose(tiles, fill=0.0)
        scale, translate = mosaic_transform(imageset)
        # means are smoother and dimmer than single samples: their own contrast keeps them readable
        mosaic_colour = {} if rgb else {"colormap": IMAGE_COLORMAP,
                                        "contrast_limits": image_contrast(imageset.class_images)}
        layers.append((mosaic, {"name": "class means", "rgb": rgb, "scale": scale, "translate": translate,
                                "metadata": _meta("class-means", imageset), **mosaic_colour}, "image"))
        layers.append(class_names_layer(imageset))

    layers.append((imageset.display_images(), {
        "name": "expression images", "rgb": rgb, "metadata": _meta("images", imageset), **colour}, "image"))

    # above the images (hidden): switching a density layer on shows it
    if imageset.pixel_map is not None:
        density = imageset.pixel_map.density()
        names = imageset.channel_names
        for c in range(density.shape[0]):
            suffix = f" {names[c]}" if names[c] else ""
            layers.append((density[c].astype(np.float32), {
                "name": f"gene density{suffix}", "colormap": density_colormap(int(density.max())),
                "visible": False, "contrast_limits": [0.0, float(max(1, density.max()))], "opacity": 0.85,
                "metadata": _meta("density", imageset, channel=c)}, "image"))

    if imageset.pixel_map is not None:
        labels, features = pixel_labels(imageset)
        layers.append((labels, {"name": "gene pixels", "features": features, "opacity": 0.0,
                                "metadata": _meta("pixel-genes", imageset)}, "labels"))
    if payload is not None:
        # on the first layer, so the session takes the data over before the others arrive
        layers[0][1]["metadata"][META_KEY]["payload"] = payload
    return layers


def class_names_layer(imageset: ImageSet) -> tuple:
    """Points (invisible markers) carrying the class names above each mosaic tile."""
    mosaic = imageset.mosaic
    origins = np.array([mosaic.origin(k) for k in range(len(imageset.classes))], dtype=float)
    # just above the tile, left-aligned; in mosaic pixels, placed with the mosaic's transform
    positions = origins + np.array([-0.7, -0.5])
    scale, translate = mosaic_transform(imageset)
    names = [_short(c) for c in imageset.classes]
    return (positions, {
        "name": "class names", "scale": scale, "translate": translate, "size": 0.1,
        "face_color": "transparent", "border_width": 0, "features": pd.DataFrame({"name": names}),
        "text": {"string": "{name}", "anchor": "lower_left", "size": 8, "color": "#dddddd"},
        "metadata": _meta("class-names", imageset)}, "points")


def _short(name: str, limit: int = 16) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def pixel_labels(imageset: ImageSet, max_names: int = 12) -> tuple[np.ndarray, pd.DataFrame]:
    """A label per occupied pixel (``row * W + col + 1``) and a features row naming its genes.

    napari's own Labels status and tooltip show the ``features`` row of the
    hovered label (the ``index`` column maps label values to rows).
    """
    pixel_map = imageset.pixel_map
    h, w = imageset.shape
    density = pixel_map.density()
    occupied = density.sum(axis=0) > 0
    labels = np.where(occupied, np.arange(h * w).reshape(h, w) + 1, 0).astype(np.int32)
    rows, cols = np.nonzero(occupied)
    names = imageset.channel_names
    texts = []
    for r, c in zip(rows, cols):
        parts = []
        for ch in range(pixel_map.n_channels):
            genes = pixel_map.gene_names_at(ch, r, c)
            if not genes:
                continue
            shown = ", ".join(genes[:max_names]) + (f" +{len(genes) - max_names} more" if len(genes) > max_names else "")
            parts.append(f"{names[ch]}: {shown}" if names[ch] else shown)
        texts.append(" | ".join(parts))
    features = pd.DataFrame({
        "index": labels[rows, cols],
        "n_genes": density[:, rows, cols].sum(axis=0),
        "genes": texts,
    })
    return labels, features


def saliency_layer(imageset: ImageSet) -> tuple:
    """The saliency map over the sample image: per sample (follows the slider) or a class mean."""
    view = imageset.saliency
    if view.target_class is None:
        # the paper's M: maximum over channels, here of each sample's map relative to its maximum
        data = np.stack([relative(s).max(axis=0) for s in view.per_sample])
        name = f"saliency ({view.method})"
    else:
        data = relative(view.per_class[view.target_class]).max(axis=0)
        name = f"saliency ({view.method}, class {view.target_class})"
    return (data.astype(np.float32), {
        "name": name, "colormap": SALIENCY_COLORMAP, "blending": "additive", "opacity": 0.9,
        "contrast_limits": [SALIENCY_FLOOR, 1.0], "metadata": _meta("saliency", imageset)}, "image")


def attribution_colormap():
    """Diverging, centred on 0 and transparent there, so the expression image shows through neutral pixels."""
    from napari.utils.colormaps import Colormap

    colours = np.array([[0.13, 0.40, 0.95, 1.0], [0.55, 0.70, 1.0, 0.75], [0.0, 0.0, 0.0, 0.0],
                        [1.0, 0.62, 0.45, 0.75], [0.92, 0.16, 0.10, 1.0]])
    return Colormap(colours, controls=[0.0, 0.3, 0.5, 0.7, 1.0], name=ATTRIBUTION_COLORMAP_NAME)


def attribution_layer(imageset: ImageSet) -> tuple:
    """Each pixel's summed signed gene attribution: per sample (follows the slider) or a class mean.

    Each map is divided by its largest magnitude, so contrast limits [-1, 1]
    put 0 at the centre of the diverging colormap.
    """
    view = imageset.saliency
    if view.target_class is None:
        values = view.attribution.values
        data = np.stack([_symmetric(imageset.attribution_image(v)) for v in values])
        name = f"gene attribution ({view.gene_method})"
    else:
        data = _symmetric(imageset.attribution_image(view.per_class_attribution[view.target_class]))
        name = f"gene attribution ({view.gene_method}, class {view.target_class})"
    return (data.astype(np.float32), {
        "name": name, "colormap": attribution_colormap(), "blending": "translucent", "opacity": 1.0,
        "contrast_limits": [-1.0, 1.0], "metadata": _meta("attribution", imageset)}, "image")


def _symmetric(image: np.ndarray) -> np.ndarray:
    top = float(np.abs(image).max()) if image.size else 0.0
    return image / top if top > 0 else np.zeros_like(image)


def selected_gene_layer(imageset: ImageSet, gene: str) -> tuple:
    """Cyan squares on every pixel where ``gene`` is drawn (one per channel that draws it)."""
    index = list(imageset.pixel_map.genes).index(gene)
    pixels = imageset.pixel_map.gene_pixels[:, index]
    pixels = np.unique(pixels[pixels[:, 0] >= 0], axis=0).astype(float)
    return (pixels, {
        "name": "selected gene", "symbol": "square", "size": 1.6, "face_color": "transparent",
        "border_color": "cyan", "border_width": 0.18,
        "features": pd.DataFrame({"gene": [gene] * len(pixels)}),
        "text": {"string": "{gene}", "anchor": "upper_left", "size": 11, "color": "cyan",
                 "translation": [-0.9, 0.9]},
        "metadata": _meta("selected-gene", imageset)}, "points")


def regions_layer_kwargs(imageset: ImageSet | None, name: str = "regions") -> dict:
    """Keyword arguments of a 2-D Shapes layer for hand-drawn regions (shared by all samples)."""
    meta = {META_KEY: {"role": "regions", "imageset": imageset}} if imageset is not None else {}
    return {"name": name, "ndim": 2, "edge_color": "yellow", "face_color": "transparent",
            "edge_width": 0.35, "metadata": meta}
