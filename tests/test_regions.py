"""Region masks: a pixel belongs to a shape when its centre is inside it or on its boundary (_regions.py)."""

import numpy as np
import pytest

from napari_omicsimage._regions import EDGE_TOLERANCE, shape_mask


def _grid(shape):
    return np.mgrid[0:shape[0], 0:shape[1]]


def _orderings(vertices):
    """Every start vertex, both directions: the rule must not depend on how the shape was drawn."""
    vertices = np.asarray(vertices, dtype=float)
    for direction in (vertices, vertices[::-1]):
        for start in range(len(vertices)):
            yield np.roll(direction, -start, axis=0)


def test_rectangle_through_pixel_centres_includes_the_edge_pixels_on_all_four_sides():
    rows, cols = _grid((6, 7))
    expected = (rows >= 1) & (rows <= 3) & (cols >= 1) & (cols <= 4)  # 3 × 4 = 12 pixels
    for vertices in _orderings([[1, 1], [1, 4], [3, 4], [3, 1]]):
        for kind in ("rectangle", "polygon"):
            np.testing.assert_array_equal(shape_mask(kind, vertices, (6, 7)), expected)


def test_an_edge_just_past_a_centre_leaves_that_pixel_out():
    off = 100 * EDGE_TOLERANCE
    mask = shape_mask("rectangle", [[1 + off, 1], [1 + off, 4], [3 - off, 4], [3 - off, 1]], (6, 7))
    assert mask[2, 1:5].all() and not mask[1].any() and not mask[3].any()
    # within the tolerance (noise in napari's float vertices) the pixel is on the edge, so it is in
    noise = EDGE_TOLERANCE / 10
    mask = shape_mask("rectangle", [[1 + noise, 1 - noise], [1 + noise, 4 + noise], [3 - noise, 4], [3, 1]], (6, 7))
    assert mask.sum() == 12


def test_rectangles_between_centres_take_the_pixels_they_cover():
    square = [[-0.5, -0.5], [-0.5, 1.5], [1.5, 1.5], [1.5, -0.5]]
    mask = shape_mask("rectangle", square, (4, 4))
    assert mask.sum() == 4 and mask[:2, :2].all()
    rotated = [[2, 0], [0, 2], [2, 4], [4, 2]]  # a diamond: its edges pass through pixel centres too
    rows, cols = _grid((5, 5))
    np.testing.assert_array_equal(shape_mask("rectangle", rotated, (5, 5)), np.abs(rows - 2) + np.abs(cols - 2) <= 2)


def test_polygon_edges_through_centres_are_included_on_every_side():
    rows, cols = _grid((6, 6))
    # right triangle: two axis-parallel legs and a diagonal through (1, 3), (2, 2), (3, 1)
    for vertices in _orderings([[0, 0], [0, 4], [4, 0]]):
        np.testing.assert_array_equal(shape_mask("polygon", vertices, (6, 6)), rows + cols <= 4)
    # a concave L: the inner corner's edges pass through centres as well
    ell = [[1, 1], [1, 2], [3, 2], [3, 4], [4, 4], [4, 1]]
    expected = ((rows >= 1) & (rows <= 4) & (cols >= 1) & (cols <= 2)) | \
               ((rows >= 3) & (rows <= 4) & (cols >= 1) & (cols <= 4))
    for vertices in _orderings(ell):
        np.testing.assert_array_equal(shape_mask("polygon", vertices, (6, 6)), expected)


@pytest.mark.parametrize(("corners", "centre", "half_axes"), [
    ([[0, 0], [0, 4], [4, 4], [4, 0]], (2, 2), (2, 2)),  # a circle touching the centres (0,2) (2,0) (4,2) (2,4)
    ([[0, 0], [0, 6], [2, 6], [2, 0]], (1, 3), (1, 3)),  # wide: boundary through (1,0) (1,6) (0,3) (2,3)
    ([[1, 2], [1, 3], [5, 3], [5, 2]], (3, 2.5), (2, 0.5)),  # tall and thin
])
def test_ellipse_includes_centres_on_its_boundary(corners, centre, half_axes):
    shape = (7, 8)
    rows, cols = _grid(shape)
    inside = ((rows - centre[0]) / half_axes[0]) ** 2 + ((cols - centre[1]) / half_axes[1]) ** 2
    expected = inside <= 1 + 1e-12
    assert (np.isclose(inside, 1) & expected).sum() >= 2  # the case really has centres on the boundary
    for vertices in _orderings(corners):
        np.testing.assert_array_equal(shape_mask("ellipse", vertices, shape), expected)


def test_rotated_ellipse():
    # the ellipse in the diamond (2,0) (0,2) (2,4) (4,2): a circle of radius √2 about (2, 2)
    rows, cols = _grid((5, 5))
    expected = (rows - 2) ** 2 + (cols - 2) ** 2 <= 2 + 1e-12  # the corners (1,1) (1,3) (3,1) (3,3) are on it
    np.testing.assert_array_equal(shape_mask("ellipse", [[2, 0], [0, 2], [2, 4], [4, 2]], (5, 5)), expected)
    assert expected.sum() == 9


def test_shapes_without_area():
    assert not shape_mask("line", [[0, 0], [3, 3]], (4, 4)).any()
    assert not shape_mask("path", [[0, 0], [3, 3], [0, 3]], (4, 4)).any()
    # a rectangle squashed onto one row of centres keeps the pixels it lies on
    flat = shape_mask("rectangle", [[2, 1], [2, 3], [2, 3], [2, 1]], (4, 5))
    assert flat.sum() == 3 and flat[2, 1:4].all()
