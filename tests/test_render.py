"""Gene↔pixel maps and rendering, on hand-made layouts whose answer is known."""

import numpy as np
import pytest
import torch

from napari_omicsimage.errors import OmicsInputError
from napari_omicsimage.render import PixelMap

GENES = ["A", "B", "C", "D", "E"]


@pytest.fixture
def pixel_map():
    # 3×4 grid, two channels. Channel 0: A and B share (0, 0); C at (1, 2); D at (2, 3); E not drawn.
    # Channel 1: every gene alone, E included.
    ch0 = [[0, 0], [0, 0], [1, 2], [2, 3], [-1, -1]]
    ch1 = [[2, 0], [2, 1], [2, 2], [0, 3], [1, 1]]
    return PixelMap(np.array([ch0, ch1]), (3, 4), GENES)


def test_render_averages_genes_sharing_a_pixel_and_fills_empty(pixel_map):
    x = np.array([[1.0, 3.0, 5.0, 7.0, 9.0], [0.0, 1.0, 0.5, 0.25, 2.0]], dtype=np.float32)
    images = pixel_map.render(x, fill_value=-1.0)
    assert images.shape == (2, 2, 3, 4) and images.dtype == np.float32
    assert images[0, 0, 0, 0] == pytest.approx(2.0)  # mean of A and B
    assert images[0, 0, 1, 2] == 5.0 and images[0, 0, 2, 3] == 7.0
    assert images[0, 1, 1, 1] == 9.0  # E only in channel 1
    assert images[1, 0, 0, 0] == pytest.approx(0.5)
    occupied0 = {(0, 0), (1, 2), (2, 3)}
    for r in range(3):
        for c in range(4):
            if (r, c) not in occupied0:
                assert images[0, 0, r, c] == -1.0


def test_density_and_lookups(pixel_map):
    density = pixel_map.density()
    assert density.shape == (2, 3, 4)
    assert density[0, 0, 0] == 2 and density[0, 1, 2] == 1 and density[0].sum() == 4
    assert density[1].sum() == 5
    assert sorted(pixel_map.gene_names_at(0, 0, 0)) == ["A", "B"]
    assert pixel_map.gene_names_at(1, 1, 1) == ["E"]
    assert pixel_map.gene_names_at(0, 1, 1) == []
    assert pixel_map.gene_names_at(0, 99, 0) == []  # outside: nothing, not an error
    table = pixel_map.lookup(np.array([1, 3, 5, 7, 9]), 0, 0, 0)
    assert list(table["gene"]) == ["B", "A"] and list(table["expression"]) == [3, 1]


def test_genes_in_mask_returns_exactly_the_genes_inside(pixel_map):
    mask = np.zeros((3, 4), dtype=bool)
    mask[0:2, 0:3] = True  # covers (0,0) and (1,2) in channel 0; (1,1) in channel 1
    assert sorted(pixel_map.genes[pixel_map.genes_in_mask(mask, channel=0)]) == ["A", "B", "C"]
    assert sorted(pixel_map.genes[pixel_map.genes_in_mask(mask, channel=1)]) == ["E"]
    assert sorted(pixel_map.genes[pixel_map.genes_in_mask(mask)]) == ["A", "B", "C", "E"]
    with pytest.raises(OmicsInputError, match="region mask has shape"):
        pixel_map.genes_in_mask(np.ones((2, 2), bool))


def test_pixel_table_lists_every_occupied_pixel(pixel_map):
    table = pixel_map.pixel_table()
    assert len(table) == 3 + 5
    first = table[(table.channel == 0) & (table.row == 0) & (table.col == 0)].iloc[0]
    assert first.n_genes == 2 and sorted(first.genes.split(";")) == ["A", "B"]


def test_torch_render_equals_numpy(pixel_map):
    x = np.random.default_rng(0).random((7, 5)).astype(np.float32)
    expected = pixel_map.render(x, fill_value=0.5)
    got = pixel_map.render(torch.from_numpy(x), fill_value=0.5, device="cpu")
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_batching_does_not_change_values(pixel_map):
    x = np.random.default_rng(1).random((10, 5)).astype(np.float32)
    np.testing.assert_array_equal(pixel_map.render(x, batch_size=3), pixel_map.render(x, batch_size=100))


def test_wrong_gene_count_is_refused(pixel_map):
    with pytest.raises(OmicsInputError, match="fitted on 5 genes"):
        pixel_map.render(np.zeros((2, 4), np.float32))


def test_coordinates_outside_grid_are_refused():
    with pytest.raises(ValueError, match="outside the grid"):
        PixelMap(np.array([[[5, 0]]]), (3, 3), ["A"])


def test_state_roundtrip(pixel_map):
    again = PixelMap.from_state(pixel_map.state())
    x = np.random.default_rng(2).random((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(again.render(x), pixel_map.render(x))


def test_render_equals_pydeepinsight_transform_for_the_same_layout():
    """Same coordinates → the same pixel values as pyDeepInsight's ImageTransformer.transform."""
    from sklearn.decomposition import PCA

    from napari_omicsimage.layouts import _image_transformer

    rng = np.random.default_rng(3)
    x = rng.random((30, 200)).astype(np.float32)
    transformer = _image_transformer(PCA(n_components=2), "bin", (12, 10))
    transformer.fit(x)
    reference = transformer.transform(x, img_format="scalar", empty_value=0)
    ours = PixelMap(transformer.coords()[None], (12, 10), [f"g{i}" for i in range(200)]).render(x)
    assert (transformer.feature_density_matrix() > 1).any()  # shared pixels are exercised
    np.testing.assert_allclose(ours[:, 0], reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(PixelMap(transformer.coords()[None], (12, 10), range(200)).density()[0],
                                  transformer.feature_density_matrix())
