"""Cross-validation protocol, metrics, baseline, Wilcoxon test and reports (evaluation.py, reports.py)."""

import json
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from conftest import make_planted

from napari_omicsimage import evaluation, training
from napari_omicsimage.errors import OmicsInputError
from napari_omicsimage.evaluation import (
    METRIC_NAMES,
    classification_metrics,
    cross_validate,
    wilcoxon_test,
    write_report,
)
from napari_omicsimage.layouts import GridLayout
from napari_omicsimage.preprocess import PreprocessConfig, Preprocessor
from napari_omicsimage.reports import metrics_table
from napari_omicsimage.training import TrainConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GRID = {"method": "grid"}


def _config(**overrides):
    values = {"model": "small", "epochs": 2, "batch_size": 16, "lr": 3e-3, "device": "cpu",
              "preprocess": PreprocessConfig(n_top_genes=None)}
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def planted_cv():
    adata, _ = make_planted(n_samples=60, n_genes=64, shift=4.0)
    return adata, cross_validate(adata, "label", GRID, _config(), folds=3)


def test_default_protocol_is_recommended_and_the_papers_is_one_call_away():
    config = TrainConfig()
    assert (config.epochs, config.batch_size, config.lr) == (20, 16, 1e-3)
    paper = TrainConfig.for_protocol("paper", model="resnet18")
    assert (paper.model, paper.epochs, paper.batch_size, paper.lr) == ("resnet18", 5, 32, 1e-4)
    assert TrainConfig.for_protocol("paper", epochs=7).epochs == 7
    with pytest.raises(OmicsInputError, match="unknown training protocol 'fast'"):
        TrainConfig.for_protocol("fast")
    import inspect

    assert inspect.signature(cross_validate).parameters["folds"].default == 5
    assert inspect.signature(cross_validate).parameters["transductive"].default is False


def test_cross_validation_reports_folds_mean_sd_and_baseline(planted_cv):
    adata, result = planted_cv
    metrics = result.metrics
    assert len(metrics["folds"]) == 3 and not result.cancelled
    for block in (metrics["mean"], metrics["sd"], metrics["baseline"], *metrics["folds"]):
        assert set(METRIC_NAMES) <= set(block)
    accuracies = [f["accuracy"] for f in metrics["folds"]]
    assert metrics["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert metrics["sd"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    # every sample is tested exactly once; confusion matrices count the test folds
    assert sorted(result.fold_of_sample.tolist()) == sorted([0] * 20 + [1] * 20 + [2] * 20)
    assert [int(c.sum()) for c in result.confusion_matrices] == [f["n_test"] for f in metrics["folds"]]
    assert result.mean_confusion.shape == (3, 3)
    assert len(result.loss_curves) == 3 and all(len(c) == 2 for c in result.loss_curves)
    assert list(result.predictions["sample"]) == list(adata.obs_names)
    # the planted signal is linear: the baseline must find it
    assert metrics["baseline"]["accuracy"] >= 0.9
    assert metrics["protocol"]["transductive"] is False
    assert "wilcoxon_vs_baseline" in metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_network_learns_the_planted_signal(seed):
    """Held-out accuracy far above chance (1/3) on every seed: a network that learns nothing fails here."""
    adata, _ = make_planted(n_samples=60, n_genes=64, shift=4.0, seed=seed)
    result = cross_validate(adata, "label", GRID, _config(epochs=8, seed=seed), folds=3, baseline=False)
    accuracies = [f["accuracy"] for f in result.metrics["folds"]]
    # measured: fold accuracies 0.85-1.0 on seeds 0-5 (chance 0.33; a constant predictor scores 0.33)
    assert result.metrics["mean"]["accuracy"] >= 0.8, accuracies
    assert min(accuracies) >= 0.6, accuracies
    held_out = result.predictions
    assert (held_out["predicted"] == held_out["true"]).mean() == pytest.approx(np.mean(accuracies))


class _RecordingPreprocessor(Preprocessor):
    log: ClassVar[list] = []

    def fit(self, adata):
        self.log.append(("fit", list(adata.obs_names), None))
        return super().fit(adata)

    def transform(self, adata):
        x = super().transform(adata)
        self.log.append(("transform", list(adata.obs_names), x.copy()))
        return x


class _RecordingGrid(GridLayout):
    fits: ClassVar[list] = []

    def fit(self, x, genes=None):
        self.fits.append(np.array(x, copy=True))
        return super().fit(x, genes)


def _samples_seen_by_layout_fits(monkeypatch, transductive):
    _RecordingPreprocessor.log, _RecordingGrid.fits = [], []
    monkeypatch.setattr(evaluation, "Preprocessor", _RecordingPreprocessor)
    monkeypatch.setattr(training, "make_layout", lambda method, size=None, **params: _RecordingGrid(size=size))
    adata, _ = make_planted(n_samples=30, n_genes=20)
    result = cross_validate(adata, "label", GRID, _config(epochs=1), folds=3, transductive=transductive,
                            baseline=False)
    seen = []
    for x in _RecordingGrid.fits:
        # identify the rows given to fit() by matching them to what the preprocessor produced
        names = None
        for kind, obs_names, out in _RecordingPreprocessor.log:
            if kind == "transform" and out.shape == x.shape and np.array_equal(out, x):
                names = obs_names
        assert names is not None, "layout fitted on rows that came from no preprocessing call"
        seen.append(set(names))
    fitted = [set(names) for kind, names, _ in _RecordingPreprocessor.log if kind == "fit"]
    test_folds = [set(adata.obs_names[result.fold_of_sample == f]) for f in range(3)]
    return adata, seen, fitted, test_folds


def test_layout_and_preprocessing_never_see_the_test_fold(monkeypatch):
    adata, seen, fitted, test_folds = _samples_seen_by_layout_fits(monkeypatch, transductive=False)
    assert len(seen) == len(fitted) == 3
    for layout_samples, preprocess_samples, test in zip(seen, fitted, test_folds):
        assert not layout_samples & test
        assert not preprocess_samples & test
        assert layout_samples == preprocess_samples == set(adata.obs_names) - test


def test_transductive_fits_once_on_all_samples(monkeypatch):
    adata, seen, fitted, _ = _samples_seen_by_layout_fits(monkeypatch, transductive=True)
    assert seen == [set(adata.obs_names)] and fitted == [set(adata.obs_names)]


def test_transductive_result_says_so():
    adata, _ = make_planted(n_samples=30, n_genes=20)
    result = cross_validate(adata, "label", GRID, _config(epochs=1), folds=3, transductive=True)
    assert result.metrics["protocol"]["transductive"] is True
    assert any("optimistic" in note for note in result.notes)
    assert "TRANSDUCTIVE" in metrics_table(result)


def test_a_class_smaller_than_k_asks_for_fewer_folds():
    adata, _ = make_planted(n_samples=30, n_genes=20)
    labels = adata.obs["label"].astype(str).to_numpy().copy()
    labels[np.flatnonzero(labels == "class2")[3:]] = "class1"  # class2 keeps 3 samples
    adata.obs["label"] = pd.Categorical(labels)
    with pytest.raises(OmicsInputError, match=r"'class2' \(3 samples\).*--folds 3"):
        cross_validate(adata, "label", GRID, _config(), folds=5)
    with pytest.raises(OmicsInputError, match="at least 2 folds"):
        cross_validate(adata, "label", GRID, _config(), folds=1)


def test_metrics_on_known_predictions():
    y = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[y] * 0.8 + 0.2 / 3
    assert all(v == pytest.approx(1.0) for v in classification_metrics(y, perfect, 3).values())
    wrong = np.eye(3)[[1, 1, 1, 1, 1, 1]] * 0.9 + 0.1 / 3
    m = classification_metrics(y, wrong, 3)
    assert m["accuracy"] == pytest.approx(2 / 6) and m["balanced_accuracy"] == pytest.approx(1 / 3)
    assert m["recall_macro"] == pytest.approx(1 / 3)
    binary = classification_metrics(np.array([0, 1, 1, 0]), np.array([[.9, .1], [.2, .8], [.6, .4], [.7, .3]]), 2)
    assert binary["accuracy"] == pytest.approx(0.75) and binary["roc_auc_ovo_macro"] == pytest.approx(1.0)


def test_wilcoxon_matches_scipy_and_handles_ties():
    from scipy.stats import wilcoxon

    a, b = [0.9, 0.8, 0.95, 0.85, 0.7], [0.8, 0.75, 0.9, 0.88, 0.6]
    test = wilcoxon_test(a, b, name_a="resnet18", name_b="efficientnet_b0")
    assert test["p_value"] == pytest.approx(wilcoxon(a, b).pvalue)
    assert test["min_attainable_p"] == pytest.approx(0.0625) and "smallest" in test["note"]
    assert wilcoxon_test(a, a)["p_value"] == 1.0
    with pytest.raises(OmicsInputError, match="same folds"):
        wilcoxon_test(a, b[:3])


def test_wilcoxon_p_is_small_for_clearly_different_scores_and_large_for_balanced_ones():
    from scipy.stats import wilcoxon

    base = np.linspace(0.5, 0.8, 10)
    better = base + np.linspace(0.05, 0.14, 10)  # every fold better, by distinct amounts
    clear = wilcoxon_test(better, base)
    # all 10 signed ranks positive: the exact two-sided p is 2 / 2**10
    assert clear["p_value"] == pytest.approx(2 / 2 ** 10) and clear["p_value"] == pytest.approx(
        wilcoxon(better, base).pvalue)
    balanced = base + np.array([0.05, -0.06, 0.07, -0.08, 0.09, -0.05, 0.06, -0.07, 0.08, -0.09])
    assert wilcoxon_test(balanced, base)["p_value"] > 0.5
    assert wilcoxon_test(base, base)["p_value"] == 1.0


def test_compare_pairs_two_models_on_the_same_folds(planted_cv):
    from scipy.stats import wilcoxon

    adata, result = planted_cv
    other = cross_validate(adata, "label", GRID, _config(lr=1e-3), folds=3, baseline=False)
    test = result.compare(other)
    assert test["scores_a"] == result.fold_scores() and test["scores_b"] == other.fold_scores()
    assert result.metrics["comparison"] is test
    a, b = result.fold_scores(), other.fold_scores()
    expected = 1.0 if np.allclose(a, b) else wilcoxon(a, b, zero_method="wilcox").pvalue
    assert test["p_value"] == pytest.approx(expected)
    assert test["mean_difference"] == pytest.approx(np.mean(a) - np.mean(b))
    shifted = cross_validate(adata, "label", GRID, _config(seed=7), folds=3, baseline=False)
    with pytest.raises(OmicsInputError, match="different folds"):
        result.compare(shifted)


def test_cancel_keeps_finished_folds():
    adata, _ = make_planted(n_samples=30, n_genes=20)
    result = cross_validate(adata, "label", GRID, _config(epochs=1), folds=3,
                            progress=lambda e: e.stage == "fold")
    assert result.cancelled and result.n_folds_finished == 1
    assert len(result.predictions) == 10 and (result.fold_of_sample >= 0).sum() == 10
    with pytest.raises(OmicsInputError, match="before any fold finished"):
        cross_validate(adata, "label", GRID, _config(epochs=1), folds=3, progress=lambda e: e.stage == "batch")


def test_report_files(planted_cv, tmp_path):
    _, result = planted_cv
    out = write_report(result, tmp_path / "report")
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "metrics.csv", "predictions.csv", "loss_curves.png", "confusion_matrix.png",
            "roc_curves.png"} <= names
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mean", "sd", "baseline"):
        assert {"accuracy", "balanced_accuracy", "f1_macro", "roc_auc_ovo_macro"} <= set(metrics[key])
    assert isinstance(metrics["folds"], list) and len(metrics["folds"]) == 3
    assert np.array(metrics["mean_confusion_matrix"]).shape == (3, 3)
    table = pd.read_csv(out / "metrics.csv")
    assert set(table["model"]) == {"small", "logistic_regression"}
    from PIL import Image

    for png in ("loss_curves.png", "confusion_matrix.png", "roc_curves.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 300
            assert np.asarray(image.convert("L")).std() > 5  # something is drawn
    with pytest.raises(OmicsInputError, match="already exists"):
        write_report(result, out)
    write_report(result, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary left
    assert not [p for p in out.iterdir() if p.name.startswith(".omicsimage-tmp")]


def test_table_lists_folds_mean_and_baseline(planted_cv):
    _, result = planted_cv
    table = metrics_table(result)
    assert "fold 3" in table and "mean ± sd" in table and "baseline (LR)" in table


@pytest.mark.slow
def test_published_rgb_method_is_cross_validated_both_ways():
    adata, _ = make_planted(n_samples=24, n_genes=30)
    spec = {"method": "rgb-embedding", "size": 16}
    inductive = cross_validate(adata, "label", spec, _config(epochs=1), folds=2, baseline=False)
    transductive = cross_validate(adata, "label", spec, _config(epochs=1), folds=2, transductive=True,
                                  baseline=False)
    assert inductive.n_folds_finished == transductive.n_folds_finished == 2
    assert transductive.metrics["protocol"]["transductive"] and not inductive.metrics["protocol"]["transductive"]
