"""Gene attribution through the renderer (attribution.py), and the genes it ranks (explain.py)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_planted

from napari_omicsimage import training
from napari_omicsimage.attribution import (
    GENE_METHODS,
    RenderedNetwork,
    contrast_logits,
    gene_attributions,
)
from napari_omicsimage.errors import Cancelled, OmicsInputError
from napari_omicsimage.explain import explain
from napari_omicsimage.layouts import GridLayout, RGBEmbedding
from napari_omicsimage.models import build_model
from napari_omicsimage.preprocess import PreprocessConfig
from napari_omicsimage.render import PixelMap

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SEEDS = range(8)
ABSENT = "class2"  # the class with no genes of its own


def _share_pixels_with_null_genes(planted_genes, rng):
    """A ``fit_layout`` that moves one null gene into the pixel of every planted gene (pixel-mates)."""
    fit_layout = training.fit_layout

    def fit(spec, x, genes):
        layout, images = fit_layout(spec, x, genes)
        pixels = layout.pixel_map_.gene_pixels.copy()
        names = list(layout.pixel_map_.genes)
        nulls = [i for i, g in enumerate(names) if g not in planted_genes]
        mates = {}
        for gene in sorted(planted_genes):
            mate = nulls.pop(int(rng.integers(len(nulls))))
            pixels[:, mate] = pixels[:, names.index(gene)]
            mates[gene] = names[mate]
        layout.pixel_map_ = PixelMap(pixels, layout.size, names)
        layout.mates_ = mates
        return layout, images

    return fit


@pytest.fixture(scope="module")
def planted_runs():
    """One model per data seed: 3 classes, two with 3 planted genes each, one recognised by their absence.

    DeepInsight (PCA) layout at 12×12, each planted gene sharing its pixel with a null gene
    (which halves the planted pixels' contrast, so the CNN needs 140 training samples to generalise;
    70 held out); explained with the defaults (Integrated Gradients from the
    training mean, pixel gradient saliency beside it), starting from 16 steps to keep the test short
    (samples that miss completeness are redone with more).
    """
    torch.set_num_threads(1)
    runs = []
    for seed in SEEDS:
        adata, planted = make_planted(n_samples=210, n_genes=200, n_classes=3, per_class=3, shift=4.0, seed=seed,
                                      absent_classes=1)
        all_planted = {g for genes in planted.values() for g in genes}
        order = np.random.default_rng(seed + 100).permutation(adata.n_obs)
        train_data, test_data = adata[order[:140]].copy(), adata[order[140:]].copy()
        config = training.TrainConfig(epochs=15, batch_size=16, lr=3e-3, seed=seed, device="cpu",
                                      preprocess=PreprocessConfig(n_top_genes=None))
        spec = {"method": "deepinsight", "feature_extractor": "pca", "size": 12}
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(training, "fit_layout", _share_pixels_with_null_genes(all_planted,
                                                                                np.random.default_rng(seed)))
            trained = training.train(train_data, "label", spec, config)
        result = explain(trained, test_data, label_column="label", n_steps=16)
        runs.append(SimpleNamespace(seed=seed, trained=trained, test=test_data, planted=planted,
                                    all_planted=all_planted, result=result, mates=trained.layout.mates_))
    return runs


def test_planted_genes_top_each_class_for_every_seed(planted_runs):
    for run in planted_runs:
        result = run.result
        accuracy = (result.predicted == result.true).mean()
        assert accuracy >= 0.8, f"seed {run.seed}: held-out accuracy {accuracy}"
        assert set(result.class_members) == set(run.planted)
        for name, own in run.planted.items():
            table = result.class_table(run.trained.layout, name)
            assert table["attribution"].abs().is_monotonic_decreasing
            top = table.head(3)
            if own:
                # the class's own genes, and nothing else, at the top, each speaking for the class
                assert set(top["gene"]) == set(own), f"seed {run.seed} {name}: top {list(top['gene'])}, own {own}"
            else:
                # recognised by absence: the other classes' genes at the top, their low values counting *for* it
                assert set(top["gene"]) <= run.all_planted, f"seed {run.seed} {name}: top {list(top['gene'])}"
            assert (top["attribution"] > 0).all() and (top["contrastive"] > 0).all(), (run.seed, name, top)


def test_pixel_mates_with_different_roles_are_told_apart(planted_runs):
    for run in planted_runs:
        layout = run.trained.layout
        for name, own in run.planted.items():
            if not own:
                continue
            table = run.result.class_table(layout, name).set_index("gene")
            for gene in own:
                mate = run.mates[gene]
                assert table.loc[gene, "pixel_genes"] >= 2
                # the paper's pixel saliency cannot tell them apart; the gene attribution can
                assert table.loc[gene, "pixel_saliency"] == table.loc[mate, "pixel_saliency"]
                assert abs(table.loc[gene, "attribution"]) > 2 * abs(table.loc[mate, "attribution"]), \
                    f"seed {run.seed}: {gene} vs its pixel-mate {mate}"
                assert table.loc[mate, "rank"] > len(own), f"seed {run.seed}: null gene {mate} ranked {table.loc[mate, 'rank']}"


def test_integrated_gradients_are_complete(planted_runs):
    """Each sample's attributions sum to logit(x) − logit(baseline) within 1 %, checked independently."""
    for run in planted_runs:
        trained, attribution = run.trained, run.result.attribution
        assert attribution.baseline == "mean"
        assert np.allclose(attribution.baseline_values, trained.fill_values)
        model = trained.model.eval()
        with torch.no_grad():
            images = torch.as_tensor(trained.layout.transform(run.result.x))
            reference = torch.as_tensor(trained.layout.transform(trained.fill_values[None]))
            logits, base_logits = model(images).double().numpy(), model(reference).double().numpy()[0]
        rows = np.arange(len(logits))
        target = attribution.target
        for values, out, base in ((attribution.values, logits, base_logits),
                                  (attribution.contrastive, contrast_logits(torch.as_tensor(logits)).numpy(),
                                   contrast_logits(torch.as_tensor(base_logits[None])).numpy()[0])):
            change = out[rows, target] - base[target]
            total = values.astype(np.float64).sum(axis=1)
            # within 1 % of the logit change (0.01 logit for changes under one logit)
            relative = np.abs(total - change) / np.maximum(np.abs(change), 1.0)
            assert relative.max() <= 0.01, f"seed {run.seed}: worst {relative.max():.4f}"
        assert attribution.completeness_error().max() <= 0.01
        assert run.result.attribution.describe()["completeness_max_relative_error"] <= 0.01


# ------------------------------------------------------------ hand-made layout
def _hand_layout(fill_value=0.0):
    """Two channels, four genes on a 2×3 grid; a and b share a pixel in channel 0, d is drawn in channel 1 only."""
    pixels = np.array([
        [[0, 0], [0, 0], [1, 2], [-1, -1]],
        [[1, 1], [0, 2], [0, 1], [1, 0]],
    ])
    layout = GridLayout(size=(2, 3), fill_value=fill_value)
    layout.pixel_map_ = PixelMap(pixels, (2, 3), ["a", "b", "c", "d"])
    return layout


def _hand_model(layout, n_classes=3, seed=0):
    torch.manual_seed(seed)
    model = build_model("small", layout.n_channels, n_classes)
    for module in model.modules():  # non-trivial BatchNorm statistics: eval mode must use them
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return SimpleNamespace(model=model, layout=layout, fill_values=np.full(4, 0.4, np.float32))


def _dense_logits(trained, x):
    """The same network on images rendered by a dense matrix product (no sparse code involved)."""
    pixel_map = trained.layout.pixel_map_
    matrix = torch.as_tensor(pixel_map.averaging_matrix().toarray())
    empty = torch.as_tensor(pixel_map.density().reshape(-1) == 0)
    images = (x @ matrix).masked_fill(empty, trained.layout.fill_value)
    return trained.model(images.reshape(len(x), pixel_map.n_channels, *pixel_map.shape))


def test_gradient_through_the_renderer_equals_autograd_of_the_dense_computation():
    trained = _hand_model(_hand_layout(fill_value=0.3))
    trained.model.eval()
    x = torch.rand(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float32, requires_grad=True)
    _dense_logits(trained, x)[:, 2].sum().backward()
    expected = x.grad.numpy()
    gradient = gene_attributions(trained, x.detach().numpy(), "gradient", target=2)
    assert np.allclose(gradient.values, expected, atol=1e-6)
    assert gradient.values[:, 3].any()  # d, drawn in one channel only, still gets its gradient
    times_input = gene_attributions(trained, x.detach().numpy(), "gradient-x-input", target=2)
    assert np.allclose(times_input.values, expected * x.detach().numpy(), atol=1e-6)
    with torch.no_grad():
        module_logits = RenderedNetwork(trained.layout, trained.model)(x.detach())
        assert torch.allclose(module_logits, _dense_logits(trained, x.detach()), atol=1e-6)


def test_a_gene_in_several_channels_gets_one_attribution_summed_over_them():
    """Chain rule: gene a sits in channel 0 (shared with b) and channel 1 (alone)."""
    layout = _hand_layout()
    weights = torch.randn(2 * 2 * 3, generator=torch.Generator().manual_seed(2))
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2, bias=False))
    with torch.no_grad():
        linear[1].weight.copy_(torch.stack([weights, -weights]))
    trained = SimpleNamespace(model=linear, layout=layout, fill_values=np.zeros(4, np.float32))
    x = np.random.default_rng(3).random((3, 4), dtype=np.float32)
    w = weights.numpy().reshape(2, 2, 3)
    expected_a = w[0, 0, 0] / 2 + w[1, 1, 1]  # half of the shared pixel, all of its own pixel
    gradient = gene_attributions(trained, x, "gradient", target=0)
    assert np.allclose(gradient.values[:, 0], expected_a, atol=1e-6)
    # on a linear network Integrated Gradients is exactly (x − baseline) × gradient, for any steps
    ig = gene_attributions(trained, x, "integrated-gradients", target=0, baseline="zeros", n_steps=4)
    assert np.allclose(ig.values, x * gradient.values, atol=1e-5)


def test_contrastive_attribution_is_the_class_against_the_mean_of_the_others():
    trained = _hand_model(_hand_layout(), n_classes=3)
    x = np.random.default_rng(4).random((4, 4), dtype=np.float32)
    per_class = [gene_attributions(trained, x, "integrated-gradients", target=k).values for k in range(3)]
    result = gene_attributions(trained, x, "integrated-gradients", target=0, contrastive=True)
    # IG is linear in the function attributed: contrast(0) = l0 − (l1 + l2) / 2
    assert np.allclose(result.contrastive, per_class[0] - (per_class[1] + per_class[2]) / 2, atol=2e-3)
    assert np.allclose(result.values, per_class[0], atol=1e-6)


@pytest.mark.parametrize("method", GENE_METHODS)
def test_every_method_gives_signed_reproducible_gene_values(method):
    trained = _hand_model(_hand_layout())
    trained.model.train()
    x = np.random.default_rng(5).random((6, 4), dtype=np.float32)
    result = gene_attributions(trained, x, method, n_samples=4, n_steps=8, batch_size=4)
    assert trained.model.training  # the caller's mode is restored
    assert result.values.shape == (6, 4) and np.isfinite(result.values).all()
    with torch.no_grad():
        predicted = RenderedNetwork(trained.layout, trained.model)(torch.as_tensor(x)).argmax(1).numpy()
    assert np.array_equal(result.target, predicted)  # default target: the predicted class
    state = np.random.get_state()
    again = gene_attributions(trained, x, method, n_samples=4, n_steps=8, batch_size=4)
    assert np.array_equal(result.values, again.values)  # seeded noise and references
    assert np.array_equal(np.random.get_state()[1], state[1])  # ... without touching the caller's generator
    assert result.describe()["method"] == method
    assert ("baseline" in result.describe()) == (method in ("integrated-gradients", "gradient-shap"))


def test_gradient_shap_takes_a_set_of_reference_profiles():
    trained = _hand_model(_hand_layout())
    x = np.random.default_rng(6).random((3, 4), dtype=np.float32)
    references = np.random.default_rng(7).random((10, 4), dtype=np.float32)
    result = gene_attributions(trained, x, "gradient-shap", baseline=references, n_samples=8)
    assert result.baseline == "profiles" and np.allclose(result.baseline_values, references.mean(axis=0))
    with pytest.raises(OmicsInputError, match="reference set"):
        gene_attributions(trained, x, "integrated-gradients", baseline=references)


def test_bad_requests_are_clear_errors():
    trained = _hand_model(_hand_layout())
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(OmicsInputError, match="unknown gene attribution method"):
        gene_attributions(trained, x, "lime")
    with pytest.raises(OmicsInputError, match="one value per gene"):
        gene_attributions(trained, x, baseline=np.zeros(3))
    with pytest.raises(OmicsInputError, match="unknown baseline"):
        gene_attributions(trained, x, baseline="median")
    with pytest.raises(OmicsInputError, match="layout has 4 genes"):
        gene_attributions(trained, np.zeros((2, 5), np.float32))
    rgb = SimpleNamespace(model=trained.model, layout=RGBEmbedding(size=16), fill_values=None)
    with pytest.raises(OmicsInputError, match="no gene mapping exists"):
        gene_attributions(rgb, x)
    with pytest.raises(OmicsInputError, match="no gene mapping exists"):
        RenderedNetwork(RGBEmbedding(size=16), trained.model)
    with pytest.raises(Cancelled):
        gene_attributions(trained, x, progress=lambda event: True)


def _kinked_network(seed=0, hidden=64):
    """Linear → ReLU → linear on the hand layout: piecewise linear, with a kink wherever a hidden unit switches."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 2))
    with torch.no_grad():
        net[1].weight.mul_(20.0)  # sharp switches: a few quadrature points straddle them
    return SimpleNamespace(model=net.eval(), layout=_hand_layout(), fill_values=np.full(4, 0.5, np.float32))


@pytest.mark.parametrize("seed", range(4))
def test_integrated_gradients_is_complete_for_every_sample_after_path_refinement(seed):
    """From 2 quadrature points, far too few for a network with dozens of kinks on the path, every
    sample's attributions still sum to its logit change within the tolerance (checked against the
    network's own logits, not the code's bookkeeping)."""
    from napari_omicsimage import attribution as attribution_module

    trained = _kinked_network(seed)
    x = np.random.default_rng(seed).random((24, 4), dtype=np.float32)
    result = gene_attributions(trained, x, "integrated-gradients", target=0, n_steps=2)
    with torch.no_grad():
        images = torch.as_tensor(trained.layout.transform(x))
        base = torch.as_tensor(trained.layout.transform(trained.fill_values[None]))
        change = (trained.model(images)[:, 0] - trained.model(base)[0, 0]).double().numpy()
    gap = np.abs(result.values.astype(np.float64).sum(axis=1) - change) / np.maximum(np.abs(change), 1.0)
    assert gap.max() <= attribution_module.COMPLETENESS_TOLERANCE, f"worst {gap.max():.4f}"
    assert len(result.incomplete_samples()) == 0 and result.describe()["completeness_failures"] == []
    assert result.options["max_steps_used"] > 2  # the path was refined


def test_samples_still_incomplete_when_the_budget_is_spent_are_named(monkeypatch):
    from napari_omicsimage import attribution as attribution_module

    monkeypatch.setattr(attribution_module, "MAX_REFINED_POINTS", 1)  # no refinement allowed
    trained = _kinked_network(0)
    x = np.random.default_rng(0).random((24, 4), dtype=np.float32)
    result = gene_attributions(trained, x, "integrated-gradients", target=0, n_steps=2)
    errors = result.completeness_error()
    failures = result.describe()["completeness_failures"]
    assert failures, "2 points on a sharply kinked path must miss completeness for some sample"
    assert failures == [int(i) for i in np.flatnonzero(errors > attribution_module.COMPLETENESS_TOLERANCE)]
