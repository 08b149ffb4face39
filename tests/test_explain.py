"""Saliency methods and the saliency → gene mapping (explain.py)."""

import numpy as np
import pytest
import torch
from conftest import make_planted

from napari_omicsimage.errors import OmicsInputError
from napari_omicsimage.explain import (
    SALIENCY_METHODS,
    GENE_TABLE_COLUMNS,
    class_gene_tables,
    explain,
    gene_saliency,
    gene_table,
    saliency,
    saliency_map,
    signed_gradient,
)
from napari_omicsimage.layouts import GridLayout, RGBEmbedding
from napari_omicsimage.models import build_model
from napari_omicsimage.preprocess import PreprocessConfig
from napari_omicsimage.render import PixelMap
from napari_omicsimage.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def planted_model():
    """The planted-signal model: 80 training samples, DeepInsight (PCA) layout, small CNN."""
    torch.set_num_threads(1)
    adata, planted = make_planted(n_samples=120, n_genes=200, per_class=3, shift=3.0)
    order = np.random.default_rng(1).permutation(adata.n_obs)
    train_data, test_data = adata[order[:80]].copy(), adata[order[80:]].copy()
    config = TrainConfig(epochs=8, batch_size=16, lr=3e-3, device="cpu", preprocess=PreprocessConfig(n_top_genes=None))
    spec = {"method": "deepinsight", "feature_extractor": "pca", "size": 24}
    return train(train_data, "label", spec, config), test_data, planted


def test_class_tables_rank_genes_by_signed_attribution_with_pixel_saliency_beside(planted_model):
    """The ranking itself is tested over 8 seeds in test_attribution.py; here: what the tables hold."""
    trained, test_data, planted = planted_model
    frame = trained.predict(test_data)
    accuracy = (frame["predicted"].to_numpy() == test_data.obs["label"].astype(str).to_numpy()).mean()
    assert accuracy >= 0.85  # held-out samples; chance is 1/3
    result = explain(trained, test_data, label_column="label")
    assert result.method == "integrated-gradients" and result.pixel_method == "gradient"
    tables = class_gene_tables(trained, test_data, "label")
    assert set(tables) == set(planted)
    for name, table in tables.items():
        assert list(table.columns) == GENE_TABLE_COLUMNS
        assert table["attribution"].abs().is_monotonic_decreasing and table["rank"].tolist() == list(range(1, 201))
        attribution, contrastive = result.class_attribution(name)
        indexed = table.set_index("gene")
        assert np.allclose(indexed.loc[list(trained.genes), "attribution"], attribution)
        assert np.allclose(indexed.loc[list(trained.genes), "contrastive"], contrastive)
        # the pixel saliency column is the paper's: the class's mean saliency at the gene's pixel
        values, _ = gene_saliency(trained.layout, result.class_saliency(name))
        assert np.allclose(indexed.loc[list(trained.genes), "pixel_saliency"], values)
        assert set(table["gene"].head(3)) & set(planted[name])
    sample = result.sample_table(trained.layout, 0)
    assert np.allclose(sample.set_index("gene").loc[list(trained.genes), "attribution"],
                       result.attribution.values[0])
    with pytest.raises(OmicsInputError, match="unknown gene attribution method"):
        explain(trained, test_data, "gradcam")
    with pytest.raises(OmicsInputError, match="unknown pixel saliency method"):
        explain(trained, test_data, pixel_method="lime")


def test_gradient_is_the_papers_saliency(planted_model):
    trained, test_data, _ = planted_model
    _, images = trained.prepare(test_data[:6])
    model = trained.model.eval()
    inputs = torch.as_tensor(images).requires_grad_(True)
    logits = model(inputs)
    predicted = logits.argmax(1)
    logits.gather(1, predicted[:, None]).sum().backward()
    expected = inputs.grad.abs().numpy()
    sal = saliency(model, images, "gradient")  # target None: the predicted class
    assert np.allclose(sal, expected, atol=1e-6)
    assert np.allclose(saliency(model, images, "gradient", target=predicted.numpy()), expected, atol=1e-6)
    assert np.allclose(saliency_map(sal), expected.max(axis=1))
    assert np.allclose(signed_gradient(model, images), inputs.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("method", SALIENCY_METHODS)
def test_every_method_gives_non_negative_maps(method):
    torch.manual_seed(0)
    model = build_model("small", 3, 4).eval()
    images = np.random.default_rng(0).random((3, 3, 16, 16), dtype=np.float32)
    sal = saliency(model, images, method, target=2, n_samples=4, n_steps=8)
    assert sal.shape == images.shape and np.isfinite(sal).all() and (sal >= 0).all() and sal.max() > 0
    if method == "gradcam":
        assert np.allclose(sal[:, 0], sal[:, 1])  # Grad-CAM has no channel resolution
    if method == "smoothgrad":
        assert np.array_equal(sal, saliency(model, images, method, target=2, n_samples=4))  # seeded noise


def test_unknown_method_is_a_clear_error():
    model = build_model("small", 1, 2)
    with pytest.raises(OmicsInputError, match="unknown saliency method"):
        saliency(model, np.zeros((1, 1, 8, 8), np.float32), "lime")


def _hand_layout():
    """Two channels, four genes on a 2×3 grid; genes a and b share a pixel in channel 0."""
    pixels = np.array([
        [[0, 0], [0, 0], [1, 2], [-1, -1]],  # channel 0: a, b at (0,0); c at (1,2); d not drawn
        [[1, 1], [0, 2], [0, 1], [1, 0]],  # channel 1
    ])
    layout = GridLayout(size=(2, 3))
    layout.pixel_map_ = PixelMap(pixels, (2, 3), ["a", "b", "c", "d"])
    return layout


def test_gene_table_takes_each_channels_own_pixel_and_ranks_by_the_maximum():
    """Without an attribution, genes are ranked by pixel saliency (the paper's way)."""
    layout = _hand_layout()
    sal = np.zeros((2, 2, 3))
    sal[0, 0, 0] = 0.9  # a and b in channel 0
    sal[0, 1, 2] = 0.1  # c in channel 0
    sal[1, 1, 1] = 0.5  # a in channel 1
    sal[1, 0, 2] = 0.95  # b in channel 1
    sal[1, 0, 1] = 0.3  # c in channel 1
    sal[1, 1, 0] = 0.2  # d in channel 1
    x = np.array([0.1, 0.2, 0.3, 0.4])
    table = gene_table(layout, sal, x).set_index("gene")
    assert list(table.index) == ["b", "a", "c", "d"]
    assert table.loc["b", ["pixel_saliency", "channel", "row", "col"]].tolist() == [0.95, 1, 0, 2]
    assert table.loc["a", ["pixel_saliency", "channel", "row", "col", "pixel_genes"]].tolist() == [0.9, 0, 0, 0, 2]
    assert table.loc["c", ["pixel_saliency", "channel"]].tolist() == [0.3, 1]
    assert table.loc["d", "expression"] == 0.4 and table["rank"].tolist() == [1, 2, 3, 4]
    assert table["attribution"].isna().all()
    values, channel = gene_saliency(layout, np.stack([sal, sal]))
    assert values.shape == (2, 4) and channel[0].tolist() == [0, 1, 1, 1]


def test_gene_table_ranks_by_attribution_magnitude_and_keeps_the_sign():
    layout = _hand_layout()
    sal = np.full((2, 2, 3), 0.5)
    table = gene_table(layout, sal, attribution=[0.2, -0.9, 0.0, 0.5], contrastive=[1, 2, 3, 4])
    assert table["gene"].tolist() == ["b", "d", "a", "c"]
    assert table["attribution"].tolist() == [-0.9, 0.5, 0.2, 0.0]
    assert table["contrastive"].tolist() == [2, 4, 1, 3]
    no_map = gene_table(layout, attribution=[0.2, -0.9, 0.0, 0.5])
    assert no_map["pixel_saliency"].isna().all() and no_map["gene"].tolist() == ["b", "d", "a", "c"]
    assert no_map.set_index("gene").loc["d", "channel"] == 1  # d is drawn in channel 1 only
    with pytest.raises(OmicsInputError, match="attribution has 3 values"):
        gene_table(layout, sal, attribution=[1, 2, 3])


def test_the_published_rgb_method_has_no_gene_mapping():
    with pytest.raises(OmicsInputError, match="no gene mapping exists"):
        gene_table(RGBEmbedding(size=16), np.zeros((3, 16, 16)))


def test_class_maps_average_correct_predictions_and_skip_empty_classes(planted_model):
    trained, test_data, _ = planted_model
    result = explain(trained, test_data, "gradient", "label")
    assert result.attribution.method == "gradient"
    predicted, true = result.predicted, result.true
    for name, members in result.class_members.items():
        assert np.all((true[members] == name) & (predicted[members] == name))
        assert len(members) == int(((true == name) & (predicted == name)).sum())
        assert np.allclose(result.class_saliency(name), result.saliency[members].mean(axis=0))
    unlabeled = explain(trained, test_data, "gradient", None)
    assert "predicted" in unlabeled.grouping
    one_class = test_data[test_data.obs["label"] == "class0"].copy()
    with pytest.warns(UserWarning, match="no sample for class"):
        tables = class_gene_tables(trained, one_class, "label", "gradient")
    assert set(tables) <= {"class0"}
