"""Histology core: reading, patches, Shannon selection, features, models, evaluation, predictions."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path
from histology_fixtures import STEP_PX, make_pyramidal_tif, make_st_section

from napari_omicsimage.errors import CheckpointError, OmicsInputError
from napari_omicsimage.histology import (
    EXPRESSION_SCALE,
    HistologyConfig,
    Scale,
    fit,
    leave_one_section_out,
    load_model,
    open_slide,
    read_section,
    save_model,
)
from napari_omicsimage.histology.evaluation import pearson_per_gene
from napari_omicsimage.histology.features import (
    FeatureExtractor,
    build_backbone,
    parse_features,
)
from napari_omicsimage.histology.tiles import (
    iter_patches,
    shannon_entropy,
    shannon_select,
    tile_grid,
)

WEIGHT_FREE = HistologyConfig(features="handcrafted+fourier", weights=None, device="cpu")


@pytest.fixture
def st_sections(tmp_path):
    return [read_section(make_st_section(tmp_path / f"S{i}", seed=i)) for i in range(3)]


# ---------------------------------------------------------------- reading
def test_legacy_st_folder_reads_spots_counts_and_derives_scale_from_pitch(tmp_path):
    section = read_section(make_st_section(tmp_path / "S0", seed=0))
    assert section.n_spots == 64 and section.counts.n_vars == 33
    assert list(section.counts.obs_names) == list(section.spots.index)
    assert section.spots.loc["3x5", "x"] == 3 * STEP_PX and section.spots.loc["3x5", "y"] == 5 * STEP_PX
    assert section.um_per_px == pytest.approx(200 / STEP_PX)  # one array step is 200 µm
    assert any("derived from the spot pitch" in note for note in section.notes)


def test_her2st_section_scale_matches_the_documented_0_69_um_per_px():
    section = read_section(shared_path("her2st_patient_c", "C3"))
    assert 0.67 < section.um_per_px < 0.71
    assert section.n_spots == 180


def test_visium_h5ad_with_image_uses_the_spot_diameter():
    folder = shared_path("visium_mouse_brain_crop")
    section = read_section(folder / "spots.h5ad", image=folder / "he_crop.jpg")
    assert section.n_spots == 49
    assert section.spot_diameter_px == pytest.approx(89.44, abs=0.01)
    assert section.um_per_px == pytest.approx(55 / 89.44, rel=1e-3)
    assert section.counts_scale == "log1p"  # the crop's X is log-normalised, and it is said
    assert any("already log1p" in note for note in section.notes)


def test_spaceranger_folder_without_full_image_uses_hires_at_its_scale_factor():
    folder = shared_path("visium_mouse_brain_crop", "spaceranger_mini")
    section = read_section(folder)
    assert section.n_spots == 100
    factor = 0.150015
    assert section.spot_diameter_px == pytest.approx(89.4275 * factor, rel=1e-4)
    assert section.um_per_px == pytest.approx(55 / (89.4275 * factor), rel=1e-4)
    assert any("tissue_hires_image.png" in note for note in section.notes)


def test_spaceranger_folder_with_full_resolution_image_given_beside(tmp_path):
    """Positions are full-resolution pixels; a lazily read tiled TIFF of that size stands in for the slide."""
    import tifffile

    folder = shared_path("visium_mouse_brain_crop", "spaceranger_mini")
    side, tile = 13_336, 512  # the hires image (2,000 px) at 1 / tissue_hires_scalef
    n_tiles = -(-side // tile)
    pink = np.full((tile, tile, 3), (230, 170, 210), np.uint8)
    tifffile.imwrite(tmp_path / "full.tif", (pink for _ in range(n_tiles * n_tiles)), shape=(side, side, 3),
                     dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression="zlib")
    section = read_section(folder, image=tmp_path / "full.tif")
    assert section.spot_diameter_px == pytest.approx(89.4275, rel=1e-4)
    assert section.um_per_px == pytest.approx(55 / 89.4275, rel=1e-4)
    assert not any("hires" in note for note in section.notes)
    (_, patches), = iter_patches(section.slide, section.centres[:4], side_px=182, out_px=224, batch_size=4)
    assert (patches == (230, 170, 210)).all()


def test_missing_scale_is_one_clear_error(tmp_path):
    import anndata as ad
    from PIL import Image

    Image.fromarray(np.full((100, 100, 3), 200, np.uint8)).save(tmp_path / "img.png")
    adata = ad.AnnData(X=np.ones((1, 3), np.float32))
    adata.obsm["spatial"] = np.array([[50.0, 50.0]])
    adata.write_h5ad(tmp_path / "one.h5ad")
    with pytest.raises(OmicsInputError, match="missing scale"):
        read_section(tmp_path / "one.h5ad", image=tmp_path / "img.png")
    section = read_section(tmp_path / "one.h5ad", image=tmp_path / "img.png", scale=Scale(um_per_px=0.5))
    assert section.um_per_px == 0.5


def test_spots_outside_the_image_are_refused(tmp_path):
    folder = shared_path("visium_mouse_brain_crop")
    import anndata as ad

    adata = ad.read_h5ad(folder / "spots.h5ad")
    adata.obsm["spatial"] = adata.obsm["spatial"] * 3  # positions of a larger image
    adata.write_h5ad(tmp_path / "shifted.h5ad")
    with pytest.raises(OmicsInputError, match="outside the 950×1717 px image"):
        read_section(tmp_path / "shifted.h5ad", image=folder / "he_crop.jpg")


def test_spot_ids_not_matching_positions_are_refused(tmp_path):
    import gzip

    import pandas as pd

    folder = make_st_section(tmp_path / "S0", seed=0)
    counts = pd.read_csv(folder / "counts_spots_by_genes.tsv.gz", sep="\t", index_col=0)
    counts.index = [f"{i}x99" for i in range(len(counts))]
    with gzip.open(folder / "counts_spots_by_genes.tsv.gz", "wt") as stream:
        counts.to_csv(stream, sep="\t")
    with pytest.raises(OmicsInputError, match="have no position"):
        read_section(folder)


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_truncated_or_unreadable_images_are_one_clear_error(tmp_path, suffix):
    from PIL import Image

    good = tmp_path / f"good{suffix}"
    if suffix == ".tif":
        make_pyramidal_tif(good)
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(OmicsInputError, match="truncated or damaged"):
        open_slide(bad)
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(b"not an image at all" * 10)
    with pytest.raises(OmicsInputError):
        open_slide(junk)


def test_pyramidal_tif_opens_lazily_with_levels_and_scale(tmp_path):
    data = make_pyramidal_tif(tmp_path / "slide.tif", um_per_px=0.25)
    slide = open_slide(tmp_path / "slide.tif")
    assert "lazy" in slide.backend and not isinstance(slide.levels[0], np.ndarray)
    assert [lvl.shape[0] for lvl in slide.levels] == [512, 256, 128]
    assert slide.um_per_px == pytest.approx(0.25)
    np.testing.assert_array_equal(slide.read_region(100, 50, 64, 32), data[50:82, 100:164])
    edge = slide.read_region(-10, -10, 20, 20)  # outside the slide is white glass
    assert (edge[:10, :10] == 255).all() and np.array_equal(edge[10:, 10:], data[:10, :10])


def test_large_jpeg_opens_with_the_size_guard_lifted_only_for_that_call(tmp_path):
    from PIL import Image

    path = tmp_path / "big.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 100  # this file is a "bomb" by this limit
    try:
        slide = open_slide(path)
        assert slide.shape == (64, 64)
        assert Image.MAX_IMAGE_PIXELS == 100
    finally:
        Image.MAX_IMAGE_PIXELS = previous


# -------------------------------------------------------- patches, selection
def test_patches_have_the_physical_size_whatever_the_resolution(tmp_path):
    """The same 112 µm of tissue from a slide and its 2× downsampled copy give (almost) the same patch."""
    from PIL import Image

    from napari_omicsimage.histology.slide import Slide

    rng = np.random.default_rng(0)
    big = np.kron(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), np.ones((32, 32, 1), np.uint8))
    small = np.asarray(Image.fromarray(big).reduce(2))
    full, half = Slide("a", [big], backend="test"), Slide("b", [small], backend="test")
    (_, a), = iter_patches(full, np.array([[256.0, 256.0]]), side_px=224, out_px=112)
    (_, b), = iter_patches(half, np.array([[128.0, 128.0]]), side_px=112, out_px=112)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 6


def test_shannon_selection_keeps_textured_patches():
    rng = np.random.default_rng(0)
    flat = np.full((5, 32, 32, 3), 240, np.uint8)
    textured = rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    entropy = shannon_entropy(np.concatenate([flat, textured]))
    assert entropy[:5].max() == 0 and entropy[5:].min() > 6
    top = shannon_select(entropy, keep_fraction=0.5)
    assert top.keep.tolist() == [False] * 5 + [True] * 5
    assert "kept 5 of 10" in top.describe()
    assert shannon_select(entropy, min_entropy=1.0).keep.sum() == 5
    with pytest.raises(OmicsInputError):
        shannon_select(entropy, keep_fraction=0)


def test_tile_grid_covers_the_tissue_only(tmp_path):
    from napari_omicsimage.histology.slide import Slide

    image = np.full((400, 400, 3), 245, np.uint8)
    image[100:300, 50:250] = (150, 60, 160)  # saturated purple tissue in a 200 × 200 px square
    tiles, note = tile_grid(Slide("s", [image], backend="test"), um_per_px=1.0, tile_um=50)
    assert len(tiles) == 16 and "16 tiles" in note
    assert tiles["x"].between(50, 250).all() and tiles["y"].between(100, 300).all()


# ---------------------------------------------------------------- features
def test_feature_sets_parse_and_refuse_unknown_names():
    assert parse_features("resnet50+fourier") == ["resnet50", "fourier"]
    with pytest.raises(OmicsInputError, match="unknown feature set"):
        parse_features("vit")


def test_weight_free_features_are_finite_and_see_nuclei(tmp_path):
    section = read_section(make_st_section(tmp_path / "S0", seed=0))
    features = FeatureExtractor("handcrafted+fourier", None, device="cpu").section_features(section, patch_um=112)
    assert features.values.shape == (64, 44 + 32) and np.isfinite(features.values).all()
    nuc = np.asarray(section.counts[:, "NUC"].X.todense()).ravel()
    h_mean = features.values[:, features.names.index("haematoxylin_mean")]
    assert np.corrcoef(h_mean, nuc)[0, 1] > 0.5


def test_random_backbone_is_labelled_and_a_local_weights_file_loads(tmp_path):
    import torch

    extractor = FeatureExtractor("resnet18", "random", device="cpu")
    assert "RANDOM" in extractor.description
    patches = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    import torchvision.models as tvm

    torch.manual_seed(3)
    torch.save(tvm.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")  # a torchvision weights file
    reference = build_backbone("resnet18", "random", seed=3)  # the same initialisation
    loaded = FeatureExtractor("resnet18", str(tmp_path / "resnet18.pth"), device="cpu")
    assert "weights file resnet18.pth" in loaded.description
    from napari_omicsimage.histology.features import backbone_features

    np.testing.assert_allclose(backbone_features(loaded.backbones["resnet18"], patches, loaded.device),
                               backbone_features(reference, patches, loaded.device), rtol=1e-4, atol=1e-5)
    with pytest.raises(OmicsInputError, match="do not fit"):
        FeatureExtractor("resnet50", str(tmp_path / "resnet18.pth"), device="cpu")


def test_imagenet_weights_offline_say_how_to_give_a_file(monkeypatch):
    import torchvision.models as tvm

    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tvm.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(OmicsInputError, match=r"--weights /path/to/file.pth.*handcrafted\+fourier"):
        FeatureExtractor("resnet50", "imagenet", device="cpu")


# ------------------------------------------------------- models, evaluation
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_model_predicts_image_driven_genes_on_a_held_out_section(tmp_path, seed):
    train = [read_section(make_st_section(tmp_path / f"T{i}", seed=10 * seed + i)) for i in range(2)]
    test = read_section(make_st_section(tmp_path / "H", seed=10 * seed + 9))
    # patches of one array step (200 µm) see all of a spot's nuclei
    model = fit(train, HistologyConfig(**{**WEIGHT_FREE.__dict__, "genes": ["NUC", "EOS", "NOISE0"], "patch_um": 190}))
    predicted = model.predict(test)
    measured = predicted.layers["measured"]
    r = pearson_per_gene(predicted.X.astype(float), measured.astype(float))
    assert r[0] > 0.6 and r[1] > 0.6  # NUC, EOS follow the image
    assert abs(r[2]) < 0.45  # noise does not


def test_leave_one_section_out_reports_every_fold_and_baseline(st_sections):
    # the two image-driven genes and two noise genes, so "beats the mean" has an answer known in advance
    config = HistologyConfig(**{**WEIGHT_FREE.__dict__, "genes": ["NUC", "EOS", "NOISE3", "NOISE4"]})
    result = leave_one_section_out(st_sections, config, random_backbone="resnet18")
    assert set(result.folds["held_out"]) == {"S0", "S1", "S2"}
    assert set(result.folds["method"]) == {"model", "training mean", "random resnet18"}
    summary = result.summary()
    assert np.isnan(summary.loc["training mean", "mean_r"])  # constant predictions: r undefined
    assert summary.loc["model", "mean_r"] > 0.3
    image_genes = result.per_gene[result.per_gene["gene"].isin(["NUC", "EOS"])]
    mse = image_genes.groupby("method")["mse"].mean()
    assert mse["model"] < mse["training mean"]
    r = image_genes.groupby("method")["pearson"].mean()
    assert r["model"] > 0.6 and r["model"] > r["random resnet18"]
    table = result.format_table()
    assert "RANDOM initialisation" in table and "best-predicted genes" in table and "NUC" in table


def test_variance_gene_selection_picks_the_variable_genes(st_sections):
    from napari_omicsimage.histology.models import choose_genes, log_normalised

    genes = choose_genes([log_normalised(s) for s in st_sections], n_genes=2)
    assert set(genes) == {"NUC", "EOS"}
    with pytest.raises(OmicsInputError, match="not measured"):
        choose_genes([log_normalised(s) for s in st_sections], genes=["NOPE"])


def test_checkpoint_round_trip_gives_identical_predictions_and_refuses_damage(tmp_path, st_sections):
    model = fit(st_sections[:2], HistologyConfig(**{**WEIGHT_FREE.__dict__, "n_genes": 4}))
    path = save_model(model, tmp_path / "model.pt")
    again = load_model(path)
    assert again.genes == model.genes and again.config.features == "handcrafted+fourier"
    a, b = model.predict(st_sections[2]), again.predict(st_sections[2])
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)
    with pytest.raises(OmicsInputError, match="exists"):
        save_model(model, path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "cut.pt")


def test_predictions_anndata_layout(st_sections):
    model = fit(st_sections[:2], HistologyConfig(**{**WEIGHT_FREE.__dict__, "n_genes": 4}))
    predicted = model.predict(st_sections[2])
    assert list(predicted.obs_names) == list(st_sections[2].spots.index)
    assert predicted.var_names.tolist() == model.genes
    np.testing.assert_allclose(predicted.obsm["spatial"], st_sections[2].centres)
    info = predicted.uns["omicsimage_histology"]
    assert info["scale"] == EXPRESSION_SCALE and "no weights needed" in info["features"]
    assert predicted.layers["measured"].shape == predicted.shape


def test_predicted_expression_goes_through_imagify_and_train(st_sections):
    """Classify spots from predicted expression (the dual-modality idea) with the existing pipeline."""
    from napari_omicsimage.pipeline import imagify
    from napari_omicsimage.preprocess import PreprocessConfig
    from napari_omicsimage.training import TrainConfig, train

    model = fit(st_sections[:2], HistologyConfig(**{**WEIGHT_FREE.__dict__, "n_genes": 16}))
    predicted = model.predict(st_sections[2])
    nuc = predicted.layers["measured"][:, model.genes.index("NUC")]
    predicted.obs["nuclei_rich"] = np.where(nuc > np.median(nuc), "rich", "poor")
    config = PreprocessConfig(log_scale=True, n_top_genes=None)
    images = imagify(predicted, "grid", label_column="nuclei_rich", preprocess=config)
    assert images.images.shape[0] == predicted.n_obs
    trained = train(predicted, "nuclei_rich", {"method": "grid"},
                    TrainConfig(model="small", epochs=2, batch_size=16, device="cpu", preprocess=config))
    assert len(trained.predict(predicted)) == predicted.n_obs


def test_fit_cancels_when_the_progress_callback_says_so(st_sections):
    from napari_omicsimage.errors import Cancelled

    with pytest.raises(Cancelled):
        fit(st_sections, WEIGHT_FREE, progress=lambda event: True)


def test_jpeg_compressed_pyramidal_tif_reads_lazily(tmp_path):
    """Whole-slide TIFFs (and Aperio .svs) store JPEG tiles: decoded tile by tile through imagecodecs."""
    import tifffile

    data = np.kron(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8),
                   np.ones((32, 32, 1), np.uint8))
    with tifffile.TiffWriter(tmp_path / "jpeg.tif") as tif:
        tif.write(data, tile=(128, 128), photometric="rgb", compression="jpeg", subifds=1)
        tif.write(data[::2, ::2], tile=(128, 128), photometric="rgb", compression="jpeg", subfiletype=1)
    slide = open_slide(tmp_path / "jpeg.tif")
    assert len(slide.levels) == 2 and "lazy" in slide.backend
    assert np.abs(slide.read_region(64, 64, 128, 128).astype(int) - data[64:192, 64:192]).mean() < 6


def test_openslide_backend_reads_the_same_pixels(tmp_path):
    from napari_omicsimage.histology.slide import _open_openslide

    data = make_pyramidal_tif(tmp_path / "slide.tif", um_per_px=0.25)
    slide = _open_openslide(tmp_path / "slide.tif")
    assert "openslide" in slide.backend and slide.shape == (512, 512)
    np.testing.assert_array_equal(slide.read_region(10, 20, 40, 30), data[20:50, 10:50])
    slide.close()


def test_shannon_selection_at_prediction_scores_only_the_kept_held_out_spots(st_sections):
    config = HistologyConfig(**{**WEIGHT_FREE.__dict__, "genes": ["NUC", "EOS"]})
    every = leave_one_section_out(st_sections, config, random_backbone=None)
    kept = leave_one_section_out(st_sections, config, random_backbone=None, score_keep_fraction=0.5)
    assert set(every.folds["n_spots"]) == {64} and set(kept.folds["n_spots"]) == {32}
    assert not np.allclose(every.folds["mean_r"], kept.folds["mean_r"])
