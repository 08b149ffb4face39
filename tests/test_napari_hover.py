"""Genes under a pixel, genes inside a region, region files and the writers — without a window.

The data have known gene placement: a grid layout in input order puts gene
``Gk`` of 16 genes at pixel ``divmod(k, 4)`` of a 4×4 image, or four
consecutive genes per pixel of a 2×2 image.
"""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_omicsimage._hover import ImageSet, Mosaic, SaliencyView, pixel_genes
from napari_omicsimage._reader import (
    _is_result_table,
    guess_label_column,
    napari_get_reader,
)
from napari_omicsimage._regions import (
    Regions,
    is_regions_file,
    load_regions,
    region_gene_table,
    save_regions,
    shape_mask,
)
from napari_omicsimage._writer import (
    image_gene_table,
    write_labels_regions,
    write_shapes_genes,
    write_shapes_regions,
)
from napari_omicsimage.errors import OmicsInputError
from napari_omicsimage.pipeline import imagify

GENES = [f"G{k:02d}" for k in range(16)]


@pytest.fixture
def known_adata():
    rng = np.random.default_rng(1)
    x = rng.normal(5, 1, size=(24, 16)).astype(np.float32)
    labels = np.array(["A", "B", "C"] * 8)
    return ad.AnnData(X=x, obs=pd.DataFrame({"cell_type": pd.Categorical(labels)},
                                            index=[f"s{i}" for i in range(24)]),
                      var=pd.DataFrame(index=GENES))


def grid_imageset(adata, size=None):
    result = imagify(adata, "grid", size=size, label_column="cell_type", layout_params={"order": "input"})
    return ImageSet.from_imagified(result, "cell_type")


def test_hover_report_names_the_gene_of_a_known_pixel(known_adata):
    imageset = grid_imageset(known_adata)
    assert imageset.shape == (4, 4)
    for k, gene in enumerate(GENES):
        row, col = divmod(k, 4)
        report = imageset.report("images", row, col, sample=5)
        assert report.genes == [gene]
        assert report.table["expression"].iloc[0] == pytest.approx(imageset.expression[5, k])
        assert gene in report.status() and gene in report.tooltip()
        assert "sample s5 (C)" in report.status()
    assert imageset.report("images", 4, 0, sample=0) is None  # off the image


def test_crowded_pixel_lists_all_its_genes_sorted_by_expression(known_adata):
    imageset = grid_imageset(known_adata, size=2)
    report = imageset.report("images", 0, 1, sample=3)
    assert set(report.genes) == {"G04", "G05", "G06", "G07"}
    expression = report.table["expression"].to_numpy()
    assert np.all(np.diff(expression) <= 0)
    assert report.status(max_genes=2).count("G0") == 2 and "+2 more" in report.status(max_genes=2)


def test_saliency_enters_the_hover_text_relative_to_the_maximum(known_adata):
    imageset = grid_imageset(known_adata)
    maps = np.zeros((24, 1, 4, 4), dtype=np.float32)
    maps[:, 0, 2, 3] = 4.0  # G11 is the most salient pixel in every sample
    maps[:, 0, 0, 0] = 1.0
    imageset.saliency = SaliencyView.from_predictions("gradient", maps, imageset.labels, imageset.labels)
    report = imageset.report("images", 0, 0, sample=2)
    assert report.table["saliency"].iloc[0] == pytest.approx(0.25)
    assert "saliency 0.25" in report.status()
    table = imageset.gene_table()  # no gene attribution computed: ranked by pixel saliency
    assert table["gene"].iloc[0] == "G11" and table["pixel_saliency"].iloc[0] == pytest.approx(1.0)
    assert table["gene"].iloc[1] == "G00"


def _attribution(values, method="integrated-gradients"):
    from napari_omicsimage.attribution import GeneAttribution

    values = np.asarray(values, dtype=np.float32)
    return GeneAttribution(method=method, genes=np.array(GENES, dtype=object), values=values,
                           target=np.zeros(len(values), dtype=np.int64), baseline="mean",
                           baseline_values=np.zeros(values.shape[1], np.float32))


def test_hover_of_a_shared_pixel_lists_its_genes_in_attribution_order(known_adata):
    """Four genes share each pixel of a 2×2 grid; pixel saliency ties them, their own attributions do not."""
    imageset = grid_imageset(known_adata, size=2)
    values = np.zeros((24, 16), dtype=np.float32)
    values[3, [4, 5, 6, 7]] = [0.1, -0.8, 0.3, -0.05]  # pixel (0, 1) of sample 3
    values[:, 0] = 2.0
    maps = np.ones((24, 1, 2, 2), dtype=np.float32)
    imageset.saliency = SaliencyView.from_predictions("gradient", maps, imageset.labels, imageset.labels,
                                                      _attribution(values))
    report = imageset.report("images", 0, 1, sample=3)
    assert report.genes == ["G05", "G06", "G04", "G07"]  # by |attribution|, sign kept
    assert report.table["attribution"].tolist() == pytest.approx([-0.8, 0.3, 0.1, -0.05])
    assert report.table["saliency"].nunique() == 1  # the pixel's saliency is the same for all four
    tooltip = report.tooltip().splitlines()
    assert "G05" in tooltip[2] and "attribution -0.80" in tooltip[2] and "attribution +0.30" in tooltip[3]
    assert report.status().index("G05 -0.80") < report.status().index("G06 +0.30")
    imageset.current_sample = 3
    table = imageset.gene_table()
    assert table["gene"].head(3).tolist() == ["G00", "G05", "G06"]
    assert table["pixel_saliency"].nunique() == 1
    # the attribution layer: each pixel the summed attribution of its genes
    assert imageset.attribution_image(values[3])[0, 1] == pytest.approx(0.1 - 0.8 + 0.3 - 0.05)
    assert imageset.attribution_image(values[3])[0, 0] == pytest.approx(2.0)
    # region export ranks by attribution too
    regions = Regions((2, 2), [], np.array([[0, 1], [0, 0]]))
    exported = region_gene_table(imageset.pixel_map, regions.masks(), saliency=maps[3],
                                 expression=imageset.expression[3], attribution=values[3])
    assert exported["gene"].tolist() == ["G05", "G06", "G04", "G07"]
    # a class shown: its members' mean attribution
    imageset.saliency.target_class = "A"
    members = imageset.saliency.class_members["A"]
    assert np.allclose(imageset.attribution_context(), values[members].mean(axis=0))


def test_class_mosaic_pixels_map_back_to_class_and_pixel(known_adata):
    imageset = grid_imageset(known_adata)
    mosaic = imageset.mosaic
    for k, name in enumerate(imageset.classes):
        top, left = mosaic.origin(k)
        report = imageset.report("class-means", top + 1, left + 2)
        assert report.genes == ["G06"]
        assert report.context == f"mean of class {name}"
        assert report.table["expression"].iloc[0] == pytest.approx(imageset.class_expression[k, 6], rel=1e-5)
    # the gap above the first tile (room for the class name) holds no pixel
    assert imageset.report("class-means", 0, 0) is None


def test_mosaic_compose_places_every_tile():
    mosaic = Mosaic.for_classes(10, (6, 5))
    tiles = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((10, 6, 5), dtype=np.float32)
    image = mosaic.compose(tiles, fill=-1)
    for k in range(10):
        r, c = mosaic.origin(k)
        assert np.all(image[r:r + 6, c:c + 5] == k)
        assert mosaic.locate(r + 5, c + 4, 10) == (k, 5, 4)


def test_pixel_genes_of_a_multichannel_map_name_channels(known_adata):
    from napari_omicsimage.render import PixelMap

    pixels = np.full((3, 3, 2), -1)
    pixels[0, 0] = (0, 0)
    pixels[1, 1] = (0, 0)
    pixels[2, 2] = (1, 1)
    table = pixel_genes(PixelMap(pixels, (2, 2), ["a", "b", "c"]), 0, 0, expression=np.array([0.1, 0.9, 0.5]),
                        channel_names=["R", "G", "B"])
    assert list(table["gene"]) == ["b", "a"] and list(table["channel"]) == ["G", "R"]


# ----------------------------------------------------------------- regions
def test_shape_masks_use_pixel_centres():
    square = [[-0.5, -0.5], [-0.5, 1.5], [1.5, 1.5], [1.5, -0.5]]
    mask = shape_mask("rectangle", square, (4, 4))
    assert mask.sum() == 4 and mask[:2, :2].all()
    ellipse = shape_mask("ellipse", [[0.5, 0.5], [0.5, 3.5], [3.5, 3.5], [3.5, 0.5]], (5, 5))
    assert ellipse[2, 2] and not ellipse[0, 0] and not ellipse[4, 4]
    assert not shape_mask("line", [[0, 0], [3, 3]], (4, 4)).any()
    with pytest.raises(OmicsInputError, match="unknown region shape"):
        shape_mask("blob", square, (4, 4))


def test_region_table_holds_exactly_the_genes_inside(known_adata):
    imageset = grid_imageset(known_adata)
    triangle = [[-0.5, -0.5], [-0.5, 2.6], [2.6, -0.5]]  # pixel centres with row + col <= 2 (edge at 2.1)
    regions = Regions.from_shapes([triangle], ["polygon"], imageset.shape, ["tri"])
    saliency = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    table = region_gene_table(imageset.pixel_map, regions.masks(), saliency=saliency,
                              expression=imageset.expression[0])
    expected = {f"G{r * 4 + c:02d}" for r in range(4) for c in range(4) if r + c <= 2}
    assert set(table["gene"]) == expected and len(table) == len(expected)
    assert list(table["saliency"]) == sorted(table["saliency"], reverse=True)
    assert list(table["rank"]) == list(range(1, len(expected) + 1))
    painted = np.zeros((4, 4), dtype=int)
    painted[3, :] = 7
    by_label = region_gene_table(imageset.pixel_map, Regions((4, 4), [], painted).masks())
    assert set(by_label["gene"]) == {"G12", "G13", "G14", "G15"} and set(by_label["region"]) == {"label 7"}


def test_regions_round_trip_and_reject_foreign_json(tmp_path):
    regions = Regions((4, 4), [("left", "rectangle", np.array([[0, 0], [0, 1], [3, 1], [3, 0]], float))],
                      np.eye(4, dtype=int))
    path = save_regions(regions, tmp_path / "r.json")
    assert is_regions_file(path)
    back = load_regions(path)
    assert back.image_shape == (4, 4) and back.shapes[0][0] == "left"
    np.testing.assert_array_equal(back.labels, np.eye(4))
    for name, mask in regions.masks().items():
        np.testing.assert_array_equal(back.masks()[name], mask)
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"hello": 1}))
    assert not is_regions_file(foreign) and napari_get_reader(str(foreign)) is None
    with pytest.raises(OmicsInputError, match="not an omicsimage regions file"):
        load_regions(foreign)


# --------------------------------------------------------- reader / writer
def test_reader_claims_expression_and_region_files_only(tmp_path, known_adata):
    expression = tmp_path / "x.csv"
    known_adata.to_df().to_csv(expression)
    assert napari_get_reader(str(expression)) is not None
    genes = tmp_path / "genes.csv"
    pd.DataFrame({"region": ["r"], "rank": [1], "gene": ["G00"], "saliency": [0.5]}).to_csv(genes, index=False)
    assert _is_result_table(genes) and napari_get_reader(str(genes)) is None
    assert napari_get_reader(str(tmp_path / "image.png")) is None
    assert napari_get_reader([str(expression), str(genes)]) is None
    assert guess_label_column(known_adata) == "cell_type"


def test_reader_returns_layers_carrying_the_data(tmp_path, known_adata):
    from napari_omicsimage._widgets._layers import role_of

    path = tmp_path / "x.h5ad"
    known_adata.write_h5ad(path)
    layers = napari_get_reader(str(path))(str(path))
    roles = [data[1]["metadata"]["omicsimage"]["role"] for data in layers]
    assert roles == ["class-means", "class-names", "images", "density", "pixel-genes"]
    images = layers[roles.index("images")]
    assert images[0].shape == (24, 4, 4)  # one slider over samples, grid of 16 genes
    payload = layers[0][1]["metadata"]["omicsimage"]["payload"]  # on the first layer: adopted first
    assert payload.label_column == "cell_type" and payload.adata.n_obs == 24
    labels, kwargs, kind = layers[roles.index("pixel-genes")]
    assert kind == "labels" and labels[1, 2] == 1 * 4 + 2 + 1
    row = kwargs["features"].set_index("index").loc[labels[1, 2]]
    imageset = images[1]["metadata"]["omicsimage"]["imageset"]
    assert row["genes"] == imageset.pixel_map.gene_names_at(0, 1, 2)[0] and row["n_genes"] == 1
    assert role_of(None) is None


def test_writers_for_regions_and_gene_tables(tmp_path, known_adata):
    imageset = grid_imageset(known_adata)
    imageset.current_sample = 4
    meta = {"metadata": {"omicsimage": {"role": "regions", "imageset": imageset}},
            "shape_type": ["rectangle"], "features": pd.DataFrame()}
    square = [np.array([[-0.5, 1.5], [-0.5, 3.5], [0.5, 3.5], [0.5, 1.5]])]
    (json_path,) = write_shapes_regions(str(tmp_path / "regions"), square, meta)
    assert json_path.endswith(".json") and load_regions(json_path).shapes[0][1] == "rectangle"
    (csv_path,) = write_shapes_genes(str(tmp_path / "genes.csv"), square, meta)
    table = pd.read_csv(csv_path)
    assert list(table["gene"]) == sorted(["G02", "G03"], key=lambda g: -imageset.expression[4, GENES.index(g)])
    np.testing.assert_allclose(table["expression"], imageset.expression[4, [GENES.index(g) for g in table["gene"]]],
                               rtol=1e-6)
    (labels_path,) = write_labels_regions(str(tmp_path / "painted.json"), np.ones((4, 4), int), {})
    assert load_regions(labels_path).masks()["label 1"].all()
    with pytest.raises(OmicsInputError, match="not drawn over omicsimage images"):
        write_shapes_genes(str(tmp_path / "x.csv"), square, {"shape_type": ["rectangle"]})
    whole = image_gene_table(imageset)
    assert len(whole) == 16 and whole["shown"].iloc[0] == "sample s4 (B)"


def test_rgb_images_show_as_rgb_with_one_density_layer_per_channel(known_adata):
    from napari_omicsimage._widgets._layers import image_layers

    result = imagify(known_adata, "rgb-layouts", size=6, label_column="cell_type",
                     layout_params={"extractors": ("pca", "pca", "pca")})
    imageset = ImageSet.from_imagified(result, "cell_type")
    assert imageset.display_images().shape == (24, 6, 6, 3) and imageset.channel_names == ["R", "G", "B"]
    layers = {kwargs["name"]: (data, kwargs) for data, kwargs, _ in image_layers(imageset)}
    assert layers["expression images"][1]["rgb"] is True
    assert {"gene density R", "gene density G", "gene density B"} <= set(layers)
    row, col = imageset.pixel_map.gene_pixels[1, 0]
    report = imageset.report("images", row, col, sample=0)
    assert "G00" in report.genes and "G: " in report.status()


def test_images_without_a_gene_map_show_but_name_no_genes(known_adata):
    from napari_omicsimage._widgets._layers import image_layers

    images = np.random.default_rng(0).random((24, 3, 8, 8)).astype(np.float32)
    imageset = ImageSet(images=images, samples=list(known_adata.obs_names),
                        labels=known_adata.obs["cell_type"].to_numpy(), expression=known_adata.X,
                        pixel_map=None, description="published RGB embedding")
    names = [kwargs["name"] for _, kwargs, _ in image_layers(imageset)]
    assert names == ["class means", "class names", "expression images"]
    assert imageset.report("images", 2, 2, sample=0) is None
    with pytest.raises(OmicsInputError, match="no gene map"):
        imageset.gene_table()
