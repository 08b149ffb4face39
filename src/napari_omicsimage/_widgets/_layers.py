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

import functools

import numpy as np
import pandas as pd

from .._hover import ImageSet, channels_last, relative
from ..render import IMAGE_COLORMAP, image_contrast

META_KEY = "omicsimage"

#: single-channel expression images: black = not expressed (also the empty pixels), white = highest;
#: neutral, so the saliency heat map added on top reads as the only colour
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
    contrast = image_contrast(imageset.contrast_images)
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


def class_names_layer(imageset: ImageSet, dpi: float | None = None) -> tuple:
    """Points (invisible markers) carrying the class names in the band above each mosaic tile.

    Each name is wrapped (at ``/`` or a space) and all share one text size at
    which every name fits inside its own tile's width and band
    (:func:`class_name_labels`).  The text scales with the zoom
    (``scaling=True``), so what fits at one zoom fits at every zoom.
    """
    mosaic = imageset.mosaic
    scale, translate = mosaic_transform(imageset)
    (_, tile_w), (gap_r, _) = mosaic.tile, mosaic.gap
    texts, size = class_name_labels(imageset.classes, tile_w * scale[1], gap_r * scale[0], dpi=dpi)
    origins = np.array([mosaic.origin(k) for k in range(len(imageset.classes))], dtype=float)
    # the top left corner of the band above the tile (pixel edges are at ±½), lines running down from there:
    # napari's "lower_left" anchor puts the text below its point on the (rows-down) canvas
    positions = origins + np.array([-gap_r - 0.5 + CLASS_NAME_PAD * gap_r, -0.5])
    return (positions, {
        "name": "class names", "scale": scale, "translate": translate, "size": 0.1,
        "face_color": "transparent", "border_color": "transparent", "border_width": 0,
        "features": pd.DataFrame({"name": texts, "class": list(imageset.classes)}),
        "text": {"string": "{name}", "anchor": "lower_left", "size": size, "scaling": True,
                 "color": "#dddddd"},
        "metadata": _meta("class-names", imageset)}, "points")


#: share of the band above a tile kept free above and below its name
CLASS_NAME_PAD = 0.08
#: share of the tile width a name may use (a little room before the next tile's name)
CLASS_NAME_WIDTH = 0.96
#: vispy draws OpenSans wider and taller than its font metrics say: measured on screen (vispy 0.17, one
#: line) 1.30-1.46 × the advance width and 1.36-1.64 × the nominal pixel size in height, with a line
#: pitch of 1.6 × the pixel size; these bounds keep a little room on top of that
VISPY_TEXT_WIDTH = 1.5
VISPY_LINE_HEIGHT = 1.7


def class_name_labels(names, tile_width: float, band_height: float, *, dpi: float | None = None
                      ) -> tuple[list[str], float]:
    """Wrapped class names and one napari text size at which each fits its tile.

    ``tile_width`` and ``band_height`` are world units (data pixels × layer
    scale).  A name stays on one line if it fits, else it is split in two at
    the ``/`` or space that makes the wider line narrowest.  The size is for
    napari text with ``scaling=True``: vispy draws it at ``size × zoom``
    points, a nominal pixel size of ``size × dpi / 72`` world units
    (:func:`text_extent_em` says how much room the text takes in those).
    """
    dpi = float(dpi or display_dpi())
    width_budget = tile_width * CLASS_NAME_WIDTH
    height_budget = band_height * (1 - 2 * CLASS_NAME_PAD)
    options = [_wrappings(str(name)) for name in names]

    def fits(em: float, text: str) -> bool:
        width, height = text_extent_em(text)
        return width * em <= width_budget and height * em <= height_budget

    def largest_em(text: str) -> float:
        width, height = text_extent_em(text)
        return min(width_budget / max(width, 1e-9), height_budget / max(height, 1e-9))

    # one size for all names: the largest at which every name has a wrapping that fits
    em = min((max(largest_em(t) for t in texts) for texts in options), default=1.0)
    chosen = [next(t for t in texts if fits(em * (1 - 1e-9), t)) for texts in options]
    return chosen, em * 72.0 / dpi


def _wrappings(name: str) -> list[str]:
    """``name`` on one line, then every two-line split at a '/' (kept on the first line) or a space."""
    splits = []
    for i, char in enumerate(name):
        if char == "/" and 0 < i < len(name) - 1:
            splits.append(name[: i + 1] + "\n" + name[i + 1:])
        elif char == " " and 0 < i < len(name) - 1:
            splits.append(name[:i] + "\n" + name[i + 1:])
    splits.sort(key=lambda text: text_extent_em(text)[0])
    return [name, *splits]


def text_extent_em(text: str) -> tuple[float, float]:
    """Width of the widest line and height of all lines as drawn, in units of the font's nominal pixel size."""
    lines = text.split("\n")
    font = _label_font()
    if font is None:  # no font file: a conservative average glyph width
        advance = max(len(line) for line in lines) * 0.65
    else:
        advance = max(font.getlength(line) for line in lines) / float(font.size)
    return VISPY_TEXT_WIDTH * advance, VISPY_LINE_HEIGHT * len(lines)


@functools.lru_cache(maxsize=1)
def _label_font():
    """vispy's OpenSans (the face napari's text visuals use), loaded by Pillow to measure text."""
    try:
        from pathlib import Path

        import vispy
        from PIL import ImageFont

        return ImageFont.truetype(str(Path(vispy.__file__).parent / "util" / "fonts" / "data" /
                                      "OpenSans-Regular.ttf"), 200)
    except (ImportError, OSError):
        return None


@functools.lru_cache(maxsize=1)
def display_dpi() -> float:
    """The screen resolution vispy converts font points with (96 where it cannot tell)."""
    try:
        from vispy.util.dpi import get_dpi

        return float(get_dpi(raise_error=False) or 96.0)
    except Exception:  # noqa: BLE001 - no display tools at all: the common default
        return 96.0


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


def class_tile_transform(imageset: ImageSet, name: str) -> dict:
    """``scale`` and ``translate`` putting an ``(H, W)`` map on class ``name``'s tile of the class-mean mosaic.

    A class's mean map belongs over the class's mean image, not over whichever sample the slider shows.
    Without a mosaic (no labels) the map stays over the sample image.
    """
    if imageset.mosaic is None or imageset.class_images is None or name not in imageset.classes:
        return {}
    scale, translate = mosaic_transform(imageset)
    top, left = imageset.mosaic.origin(imageset.classes.index(name))
    return {"scale": scale, "translate": (translate[0] + top * scale[0], translate[1] + left * scale[1])}


def saliency_layer(imageset: ImageSet) -> tuple:
    """The saliency map over the sample image (per sample, follows the slider) or over a class's mean tile."""
    view = imageset.saliency
    placement = {}
    if view.target_class is None:
        # the paper's M: maximum over channels, here of each sample's map relative to its maximum
        data = np.stack([relative(s).max(axis=0) for s in view.per_sample])
        name = f"saliency ({view.method})"
    else:
        data = relative(view.per_class[view.target_class]).max(axis=0)
        name = f"saliency, class {view.target_class}"
        placement = class_tile_transform(imageset, view.target_class)
    return (data.astype(np.float32), {
        "name": name, "colormap": SALIENCY_COLORMAP, "blending": "additive", "opacity": 0.9,
        "contrast_limits": [SALIENCY_FLOOR, 1.0], "metadata": _meta("saliency", imageset), **placement}, "image")


def attribution_colormap():
    """Diverging, centred on 0 and transparent there, so the expression image shows through neutral pixels.

    Both ends are bright and nearly opaque from a third of the range on: a dim blue on a dark image
    could not be seen.
    """
    from napari.utils.colormaps import Colormap

    colours = np.array([[0.25, 0.62, 1.0, 1.0], [0.35, 0.70, 1.0, 0.9], [0.0, 0.0, 0.0, 0.0],
                        [1.0, 0.45, 0.30, 0.9], [1.0, 0.15, 0.10, 1.0]])
    return Colormap(colours, controls=[0.0, 0.35, 0.5, 0.65, 1.0], name=ATTRIBUTION_COLORMAP_NAME)


#: attribution contrast: ± this percentile of |attribution| over the pixels holding genes, so that the
#: many small values of both signs show instead of only the few largest (the maximum would set the scale)
ATTRIBUTION_PERCENTILE = 95.0


def attribution_limit(data: np.ndarray) -> float:
    """Symmetric contrast limit of attribution maps scaled to [-1, 1]: a high percentile of the magnitudes."""
    magnitude = np.abs(np.asarray(data, dtype=np.float32))
    nonzero = magnitude[magnitude > 0]
    if nonzero.size == 0:
        return 1.0
    return float(np.clip(np.percentile(nonzero, ATTRIBUTION_PERCENTILE), 1e-3, 1.0))


def attribution_layer(imageset: ImageSet) -> tuple:
    """Each pixel's summed signed gene attribution: per sample (follows the slider) or over a class's mean tile.

    Each map is divided by its largest magnitude; the contrast limits are symmetric about 0
    (:func:`attribution_limit`), so 0 sits at the transparent centre of the diverging colormap.
    """
    view = imageset.saliency
    placement = {}
    if view.target_class is None:
        values = view.attribution.values
        data = np.stack([_symmetric(imageset.attribution_image(v)) for v in values])
        name = f"attribution ({view.gene_method})"
    else:
        data = _symmetric(imageset.attribution_image(view.per_class_attribution[view.target_class]))
        name = f"attribution, class {view.target_class}"
        placement = class_tile_transform(imageset, view.target_class)
    limit = attribution_limit(data)
    return (data.astype(np.float32), {
        "name": name, "colormap": attribution_colormap(), "blending": "translucent", "opacity": 1.0,
        "contrast_limits": [-limit, limit], "metadata": _meta("attribution", imageset), **placement}, "image")


def _symmetric(image: np.ndarray) -> np.ndarray:
    top = float(np.abs(image).max()) if image.size else 0.0
    return image / top if top > 0 else np.zeros_like(image)


def attribution_legend(imageset: ImageSet) -> str:
    """What the attribution colours mean, for the canvas (the colour bar has no title)."""
    view = imageset.saliency
    if view is None or view.attribution is None:
        return ""
    towards = view.target_class if view.target_class is not None else "its predicted class"
    return f"red: pushes towards {towards}, blue: against"


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
