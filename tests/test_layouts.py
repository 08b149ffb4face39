"""Layouts: fit on training samples, transform any samples, gene maps that are right."""

import numpy as np
import pytest

from napari_omicsimage import layouts as L
from napari_omicsimage.errors import OmicsInputError
from napari_omicsimage.io import load_sample_data, read_expression
from napari_omicsimage.pipeline import imagify
from napari_omicsimage.preprocess import PreprocessConfig


@pytest.fixture(scope="module")
def pbmc_small():
    adata = load_sample_data()
    return adata[::7].copy()  # 100 cells, all 10 classes


@pytest.mark.parametrize(
    "method, params, channels",
    [
        ("deepinsight", {"feature_extractor": "pca"}, 1),
        ("deepinsight", {"feature_extractor": "tsne", "discretization": "qtb"}, 1),
        ("fotomics", {}, 1),
        ("rgb-layouts", {"extractors": ("pca", "kpca", "pca")}, 3),
        ("grid", {"order": "chromosome"}, 1),
        ("rgb-embedding", {}, 3),
    ],
)
def test_every_layout_renders_pbmc(pbmc_small, method, params, channels):
    size = 16 if method != "rgb-embedding" else 32
    result = imagify(pbmc_small, method, size=size, label_column="bulk_labels",
                     preprocess=PreprocessConfig(n_top_genes=300), layout_params=params)
    n, c, h, w = result.images.shape
    assert (n, c) == (100, channels)
    assert result.images.dtype == np.float32 and np.isfinite(result.images).all()
    assert result.images.max() > 0
    if result.layout.has_gene_map:
        density = result.layout.pixel_map_.density()
        assert density.sum() == channels * 300  # every gene placed once per channel
    else:
        assert any("not genes" in note for note in result.notes)


@pytest.mark.parametrize("method", ["deepinsight", "fotomics", "rgb-layouts", "grid", "rgb-embedding"])
def test_every_method_renders_medulloblastoma(medulloblastoma_paths, method):
    expression, labels = medulloblastoma_paths
    adata = read_expression(expression, labels=labels, label_column="subgroup")
    params = {"extractors": ("pca", "pca", "kpca")} if method == "rgb-layouts" else {}
    result = imagify(adata, method, size=24 if method != "grid" else None, label_column="subgroup",
                     preprocess=PreprocessConfig(n_top_genes=500), layout_params=params)
    assert result.images.shape[0] == 50
    assert np.isfinite(result.images).all()


def test_transform_new_samples_matches_training_render(pbmc_small):
    from napari_omicsimage.preprocess import Preprocessor

    prep = Preprocessor(n_top_genes=200).fit(pbmc_small[:60])
    layout = L.make_layout("deepinsight", size=12, feature_extractor="pca").fit(
        prep.transform(pbmc_small[:60]), prep.genes_)
    x_new = prep.transform(pbmc_small[60:])
    images = layout.transform(x_new)
    assert images.shape == (40, 1, 12, 12)
    # a pixel's value is the mean of its genes' values
    pm = layout.pixel_map_
    r, c = np.argwhere(pm.density()[0] > 0)[0]
    genes = pm.genes_at(0, r, c)
    np.testing.assert_allclose(images[:, 0, r, c], x_new[:, genes].mean(axis=1), rtol=1e-6)


def test_lsa_on_non_square_grid_gives_one_gene_per_pixel_at_the_nearest_free_spot():
    """pyDeepInsight 0.2.3's lsa mislays pixels on non-square grids; ours does not."""
    rng = np.random.default_rng(0)
    x = rng.random((20, 24)).astype(np.float32)
    layout = L.DeepInsightLayout(size=(4, 8), feature_extractor="pca", discretization="lsa").fit(x)
    pixels = layout.pixel_map_.gene_pixels[0]
    assert pixels[:, 0].max() < 4 and pixels[:, 1].max() < 8
    assert len({tuple(p) for p in pixels}) == 24  # 24 genes, 32 pixels: all distinct
    # pixels are a cost-minimising assignment: better than any swap of two genes
    from sklearn.decomposition import PCA

    from napari_omicsimage.layouts import _image_transformer

    t = _image_transformer(PCA(n_components=2), "lsa", (4, 8))
    t.fit(x)
    scaled = t.scale_coordinates(t._xrot, (4, 8))
    centres = pixels + 0.5
    cost = ((scaled - centres) ** 2).sum()
    for i, j in [(0, 1), (2, 5), (7, 20)]:
        swapped = centres.copy()
        swapped[[i, j]] = swapped[[j, i]]
        assert cost <= ((scaled - swapped) ** 2).sum() + 1e-9


def test_fotomics_coordinates_follow_the_published_definition():
    rng = np.random.default_rng(4)
    x = rng.random((6, 16))
    coords = L.FotomicsFFT().fit_transform(x.T)
    # loop over samples exactly as the definition reads
    expected = np.zeros((16, 2))
    for sample in x:
        spectrum = np.fft.fftshift(np.fft.fft(sample))
        for k, part in enumerate((spectrum.real, spectrum.imag)):
            p10, p90 = np.percentile(part, [10, 90])
            iqr = p90 - p10
            kept = np.where((part < p10 - 1.5 * iqr) | (part > p90 + 1.5 * iqr), 0.0, part)
            expected[:, k] += kept / len(x)
    np.testing.assert_allclose(coords, expected, atol=1e-12)


def test_grid_input_order_and_shared_pixels():
    x = np.random.default_rng(0).random((5, 10)).astype(np.float32)
    genes = [f"g{i}" for i in range(10)]
    grid = L.GridLayout(order="input").fit(x, genes)
    assert grid.size == (4, 4)  # smallest square holding 10 genes
    assert grid.pixel_map_.gene_names_at(0, 0, 0) == ["g0"]
    assert grid.pixel_map_.gene_names_at(0, 2, 1) == ["g9"]
    small = L.GridLayout(size=2, order="input").fit(x, genes)  # 4 pixels, 10 genes: 3 per pixel
    assert small.pixel_map_.gene_names_at(0, 0, 0) == ["g0", "g1", "g2"]
    np.testing.assert_allclose(small.transform(x)[:, 0, 0, 0], x[:, :3].mean(axis=1), rtol=1e-6)


def test_grid_chromosome_order_uses_annotation_and_counts_unknown_genes():
    # chr1 genes first (by start), then chr17, then chrX; unknown genes last
    genes = ["TP53", "ACE2", "NOT_A_GENE", "ENSG00000146648_at", "ENSG00000188389"]
    # TP53 chr17, ACE2 chrX, EGFR (ENSG00000146648) chr7, PDCD1 (ENSG00000188389) chr2
    x = np.random.default_rng(0).random((4, 5)).astype(np.float32)
    grid = L.GridLayout(order="chromosome").fit(x, genes)
    order = [grid.pixel_map_.gene_names_at(0, r, c)[0] for r in range(3) for c in range(3) if r * 3 + c < 5]
    assert order == ["ENSG00000188389", "ENSG00000146648_at", "TP53", "ACE2", "NOT_A_GENE"]
    assert grid.info_["n_unplaced"] == 1 and grid.info_["n_placed"] == 4


def test_grid_cluster_order_puts_correlated_genes_next_to_each_other():
    rng = np.random.default_rng(0)
    base = rng.random((30, 2))
    # genes 0, 2, 4 follow factor 0; genes 1, 3, 5 follow factor 1
    x = np.column_stack([base[:, i % 2] + 0.01 * rng.random(30) for i in range(6)]).astype(np.float32)
    grid = L.GridLayout(order="cluster").fit(x)
    slots = grid.pixel_map_.gene_pixels[0]
    flat = slots[:, 0] * grid.size[1] + slots[:, 1]
    first_group = sorted(flat[[0, 2, 4]])
    assert first_group[-1] - first_group[0] == 2  # three consecutive pixels


def test_grid_defaults_to_cluster_order_and_warns_before_clustering_many_genes(monkeypatch):
    assert L.GridLayout().order == L.DEFAULT_GRID_ORDER == "cluster"
    monkeypatch.setattr(L, "CLUSTER_WARN_GENES", 5)
    x = np.random.default_rng(0).random((4, 6)).astype(np.float32)
    with pytest.warns(UserWarning, match="clustering 6 genes.*--order input"):
        L.GridLayout().fit(x)


def test_layout_save_and_load_roundtrip(tmp_path, pbmc_small):
    from napari_omicsimage.preprocess import Preprocessor

    x = Preprocessor(n_top_genes=100).fit_transform(pbmc_small)
    for layout in (L.FotomicsLayout(size=10), L.GridLayout(order="input"),
                   L.MultiLayoutRGB(size=8, extractors=("pca", "pca", "pca"))):
        layout.fit(x)
        L.save_layout(layout, tmp_path / "layout.npz")
        again = L.load_layout(tmp_path / "layout.npz")
        np.testing.assert_array_equal(again.transform(x), layout.transform(x))
        assert list(again.genes_) == list(layout.genes_)


def test_load_layout_refuses_foreign_file(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a layout")
    with pytest.raises(OmicsInputError, match="not a saved omicsimage layout"):
        L.load_layout(tmp_path / "junk.npz")


def test_rgb_embedding_draws_one_disc_of_radius_3_and_projects_new_samples(pbmc_small):
    from napari_omicsimage.preprocess import Preprocessor

    prep = Preprocessor(n_top_genes=200).fit(pbmc_small[:70])
    layout = L.RGBEmbedding(size=128).fit(prep.transform(pbmc_small[:70]))
    train = layout.train_images_
    lit = train.max(axis=1) > 0  # (N, H, W)
    inside = [i for i in range(len(train)) if lit[i].any()
              and 3 <= np.argwhere(lit[i]).min() and np.argwhere(lit[i]).max() <= 124]
    assert len(inside) >= 35  # most samples lie away from the border
    for i in inside:  # a disc of radius 3 away from the border is exactly 29 pixels around its centre
        rows, cols = np.nonzero(lit[i])
        r, c = int(round(rows.mean())), int(round(cols.mean()))
        yy, xx = np.mgrid[0:128, 0:128]
        assert np.array_equal(lit[i], (yy - r) ** 2 + (xx - c) ** 2 <= 9)
    new = layout.transform(prep.transform(pbmc_small[70:]))
    assert new.shape == (30, 3, 128, 128) and (new.reshape(30, -1).max(axis=1) > 0).all()
    with pytest.raises(OmicsInputError, match="cannot be stored"):
        layout.state()


# ------------------------------------------------- one gene per pixel (lsa, ags, som)
def _structured(n_samples=40, n_genes=90, seed=0):
    """Genes in 3 co-expression groups, so a layout has neighbourhoods worth keeping."""
    rng = np.random.default_rng(seed)
    factors = rng.random((n_samples, 3))
    group = np.arange(n_genes) % 3
    x = factors[:, group] + 0.15 * rng.random((n_samples, n_genes))
    return (x / x.max()).astype(np.float32), group


def _pixels(layout):
    return [tuple(p) for p in layout.pixel_map_.gene_pixels[0]]


COLLISION_FREE = [
    ("deepinsight", {"feature_extractor": "pca", "discretization": "lsa"}),
    ("deepinsight", {"feature_extractor": "pca", "discretization": "ags"}),
    ("fotomics", {"discretization": "lsa"}),
    ("som", {}),
]


@pytest.mark.parametrize("method, params", COLLISION_FREE)
@pytest.mark.parametrize("n_genes", [90, 100, 101])
def test_collision_free_layouts_give_every_gene_its_own_pixel_on_the_smallest_square(method, params, n_genes):
    x, _ = _structured(n_genes=n_genes)
    layout = L.make_layout(method, **params).fit(x)
    side = int(np.ceil(np.sqrt(n_genes)))
    assert layout.size == (side, side)
    assert len(set(_pixels(layout))) == n_genes  # all distinct
    assert layout.collisions() == 0 and layout.info_["genes_per_pixel_max"] == 1
    assert "one gene per pixel" in layout.describe()
    # scikit-learn style: transform renders each gene's own value at its pixel
    images = layout.transform(x[:5])
    rows, cols = layout.pixel_map_.gene_pixels[0].T
    np.testing.assert_array_equal(images[:, 0, rows, cols], x[:5])


@pytest.mark.parametrize("method, params", COLLISION_FREE)
def test_collision_free_layouts_are_deterministic_for_a_seed(method, params):
    x, _ = _structured()
    first = L.make_layout(method, **params).fit(x)
    again = L.make_layout(method, **params).fit(x)
    np.testing.assert_array_equal(first.pixel_map_.gene_pixels, again.pixel_map_.gene_pixels)


def test_som_seed_changes_the_map_and_the_map_keeps_co_expressed_genes_together():
    for seed in range(3):
        x, group = _structured(seed=seed)
        som = L.SOMLayout(random_state=seed).fit(x)
        other = L.SOMLayout(random_state=seed + 10).fit(x)
        assert not np.array_equal(som.pixel_map_.gene_pixels, other.pixel_map_.gene_pixels)
        pixels = som.pixel_map_.gene_pixels[0].astype(float)
        distance = np.abs(pixels[:, None] - pixels[None]).sum(axis=2)
        same = group[:, None] == group[None]
        off_diagonal = ~np.eye(len(group), dtype=bool)
        # genes of one group sit much closer on the map than genes of different groups
        assert distance[same & off_diagonal].mean() < 0.6 * distance[~same].mean()


def test_som_on_a_grid_smaller_than_the_genes_reports_its_collisions():
    x, _ = _structured(n_genes=90)
    som = L.SOMLayout(size=6).fit(x)  # 36 pixels for 90 genes
    density = som.pixel_map_.density()
    assert density.sum() == 90
    assert som.collisions() == 90 - (density > 0).sum() >= 54
    assert som.info_["genes_per_pixel_max"] == density.max() >= 3
    assert f"{som.collisions()} gene collisions" in som.describe()


def test_binned_layouts_report_their_collisions():
    x, _ = _structured(n_genes=200)
    layout = L.DeepInsightLayout(size=8, feature_extractor="pca").fit(x)  # 64 pixels: collisions certain
    density = layout.pixel_map_.density()
    assert layout.collisions() == 200 - (density > 0).sum() >= 136
    assert layout.size == (8, 8) and L.DeepInsightLayout(feature_extractor="pca").fit(x).size == (32, 32)


@pytest.mark.parametrize("discretization", ["lsa", "ags"])
def test_assignment_on_too_small_a_grid_is_refused_with_the_pixels_needed(discretization):
    x, _ = _structured(n_genes=90)
    with pytest.raises(OmicsInputError, match=r"90 genes need at least 90 pixels, not 8×8; use size 10"):
        L.DeepInsightLayout(size=8, feature_extractor="pca", discretization=discretization).fit(x)


@pytest.mark.parametrize("method, params", COLLISION_FREE)
def test_collision_free_layouts_survive_save_load_and_checkpoints(tmp_path, method, params):
    from napari_omicsimage.checkpoint import layout_state, restore_layout

    x, _ = _structured()
    genes = [f"g{i}" for i in range(x.shape[1])]
    layout = L.make_layout(method, **params).fit(x, genes)
    L.save_layout(layout, tmp_path / "layout.npz")
    for again in (L.load_layout(tmp_path / "layout.npz"), restore_layout(*layout_state(layout))):
        assert type(again) is type(layout) and again.size == layout.size
        assert again.requested_size is None and list(again.genes_) == genes
        np.testing.assert_array_equal(again.transform(x), layout.transform(x))
        assert again.collisions() == 0 and again.describe() == layout.describe()


def test_bad_layout_options():
    with pytest.raises(OmicsInputError, match="unknown method"):
        L.make_layout("pixelart")
    with pytest.raises(OmicsInputError, match="unknown feature extractor"):
        L.DeepInsightLayout(feature_extractor="magic")
    with pytest.raises(OmicsInputError, match="at least 2"):
        L.DeepInsightLayout(size=1)
    with pytest.raises(OmicsInputError, match="unknown grid order"):
        L.GridLayout(order="alphabet")
    with pytest.raises(OmicsInputError, match="unknown discretisation"):
        L.FotomicsLayout(discretization="round")
    with pytest.raises(OmicsInputError, match="sigma must be positive"):
        L.SOMLayout(sigma=0)
    with pytest.raises(OmicsInputError, match="at least 2 training samples"):
        L.FotomicsLayout().fit(np.ones((1, 5)))
    with pytest.raises(RuntimeError, match="not fitted"):
        L.FotomicsLayout().transform(np.ones((2, 5)))
