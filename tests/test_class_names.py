"""Class names over the class-mean mosaic fit their tiles (_widgets/_layers.py, Qt-free)."""

import numpy as np
import pytest

from napari_omicsimage._widgets._layers import (
    VISPY_TEXT_WIDTH,
    _label_font,
    class_name_labels,
    text_extent_em,
)

#: the demo's 10 PBMC cell types (bulk_labels of scanpy's pbmc68k_reduced)
PBMC = ["CD14+ Monocyte", "CD19+ B", "CD34+", "CD4+/CD25 T Reg", "CD4+/CD45RA+/CD25- Naive T",
        "CD4+/CD45RO+ Memory", "CD56+ NK", "CD8+ Cytotoxic T", "CD8+/CD45RA+ Naive Cytotoxic", "Dendritic"]


def _unwrapped(text: str) -> str:
    first, _, second = text.partition("\n")
    return first + ("" if not second or first.endswith("/") else " ") + second


@pytest.mark.parametrize("dpi", [72, 96, 100, 144])
@pytest.mark.parametrize(("tile_width", "band_height"), [(16.0, 7.0), (4.0, 1.0), (40.0, 4.0)])
def test_every_name_fits_its_tile_and_band(dpi, tile_width, band_height):
    texts, size = class_name_labels(PBMC, tile_width, band_height, dpi=dpi)
    pixel = size * dpi / 72  # the nominal font pixel size in world units (napari text with scaling)
    for name, text in zip(PBMC, texts):
        assert _unwrapped(text) == name  # wrapped, never cut
        assert text.count("\n") <= 1
        width, height = text_extent_em(text)
        assert width * pixel <= tile_width * 0.96 + 1e-9 and height * pixel <= band_height + 1e-9


def test_names_are_whole_and_as_large_as_the_tightest_one_allows():
    texts, size = class_name_labels(PBMC, 16.0, 7.0, dpi=100)
    assert "…" not in "".join(texts)
    assert texts[PBMC.index("CD4+/CD45RA+/CD25- Naive T")] == "CD4+/CD45RA+/\nCD25- Naive T"
    assert texts[PBMC.index("CD19+ B")] == "CD19+ B"  # short names stay on one line
    # a little larger and the tightest name would no longer fit anywhere
    bigger = size * 1.02 * 100 / 72
    width, height = min((text_extent_em(t) for t in ["CD4+/CD45RA+/\nCD25- Naive T", "CD4+/\nCD45RA+/CD25- Naive T",
                                                       "CD4+/CD45RA+/CD25-\nNaive T"]), key=lambda e: e[0])
    assert width * bigger > 16.0 * 0.96 or height * bigger > 7.0 * (1 - 2 * 0.08)


def test_label_boxes_do_not_overlap_in_the_demo_mosaic():
    """Text boxes (as vispy draws them, with the measured margin) of neighbouring tiles are disjoint."""
    from napari_omicsimage._hover import Mosaic
    from napari_omicsimage._widgets._layers import CLASS_NAME_PAD, TILE_SCALE

    mosaic = Mosaic.for_classes(len(PBMC), (32, 32))
    (_, w), (gap_r, _) = mosaic.tile, mosaic.gap
    texts, size = class_name_labels(PBMC, w * TILE_SCALE, gap_r * TILE_SCALE, dpi=100)
    pixel = size * 100 / 72
    boxes = []
    for k, text in enumerate(texts):
        top, left = (np.array(mosaic.origin(k)) - [gap_r + 0.5 - CLASS_NAME_PAD * gap_r, 0.5]) * TILE_SCALE
        width, height = text_extent_em(text)
        boxes.append((top, top + height * pixel, left, left + width * pixel))
        tile_top = (mosaic.origin(k)[0] - 0.5) * TILE_SCALE
        assert top + height * pixel <= tile_top  # above its own tile, not on it
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2], (a, b)


def test_measurement_uses_the_font_napari_draws_with():
    assert _label_font() is not None  # vispy's OpenSans, read by Pillow
    narrow, wide = text_extent_em("iiii")[0], text_extent_em("MMMM")[0]
    assert wide > 2.5 * narrow  # real glyph widths, not a per-character guess
    assert text_extent_em("CD14+ Monocyte")[0] == pytest.approx(VISPY_TEXT_WIDTH * 7.95, rel=0.02)
