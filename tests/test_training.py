"""Training: on-device rendering, progress and cancellation, seeds, prediction (training.py)."""

import numpy as np
import pytest
import torch
from conftest import make_planted

from napari_omicsimage.errors import OmicsInputError
from napari_omicsimage.layouts import GeneLayout
from napari_omicsimage.preprocess import PreprocessConfig
from napari_omicsimage.progress import ProgressEvent
from napari_omicsimage.training import TrainConfig, TrainedModel, train

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GRID = {"method": "grid"}


def _config(**overrides):
    values = {"model": "small", "epochs": 2, "batch_size": 16, "lr": 3e-3, "device": "cpu",
              "preprocess": PreprocessConfig(n_top_genes=None)}
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture
def small_planted():
    return make_planted(n_samples=60, n_genes=64)


def _weights(trained):
    return {k: v.clone() for k, v in trained.model.state_dict().items()}


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_learns_the_planted_signal_and_predicts(planted_adata):
    adata, _ = planted_adata
    trained = train(adata[:90].copy(), "label", GRID, _config(epochs=6))
    assert isinstance(trained, TrainedModel) and not trained.cancelled
    assert trained.classes == ["class0", "class1", "class2"]
    assert [h["epoch"] for h in trained.history] == list(range(1, 7))
    assert trained.history[-1]["loss"] < trained.history[0]["loss"]

    held_out = adata[90:].copy()
    frame = trained.predict(held_out)
    assert list(frame.columns) == ["sample", "predicted", "prob_class0", "prob_class1", "prob_class2"]
    assert list(frame["sample"]) == list(held_out.obs_names)
    assert np.allclose(frame.filter(like="prob_").sum(axis=1), 1, atol=1e-5)
    accuracy = (frame["predicted"].to_numpy() == held_out.obs["label"].astype(str).to_numpy()).mean()
    assert accuracy >= 0.7  # chance is 1/3; logistic regression gets ~1.0 on this signal
    assert frame.attrs["n_missing_genes"] == 0


def test_batches_are_rendered_on_the_training_device(monkeypatch, small_planted):
    adata, _ = small_planted
    calls = []
    original = GeneLayout.transform

    def recording(self, x, **kwargs):
        calls.append((type(x), kwargs.get("device"), len(x)))
        return original(self, x, **kwargs)

    monkeypatch.setattr(GeneLayout, "transform", recording)
    train(adata, "label", GRID, _config(epochs=1, batch_size=16))
    assert calls, "training never rendered a batch"
    # every render is one batch of a torch tensor on the device: no image set is precomputed
    assert all(kind is torch.Tensor and str(device) == "cpu" and n <= 16 for kind, device, n in calls)


def test_same_seed_same_run_other_seed_other_run(small_planted):
    adata, _ = small_planted
    a = train(adata, "label", GRID, _config(seed=3))
    b = train(adata, "label", GRID, _config(seed=3))
    c = train(adata, "label", GRID, _config(seed=4))
    assert [h["batch_losses"] for h in a.history] == [h["batch_losses"] for h in b.history]
    assert _same_weights(_weights(a), _weights(b))
    assert not _same_weights(_weights(a), _weights(c))


def test_progress_reports_every_batch_and_epoch(small_planted):
    adata, _ = small_planted
    events = []
    train(adata, "label", GRID, _config(epochs=2, batch_size=16), progress=events.append)
    stages = [e.stage for e in events]
    n_batches = 4  # 60 samples / 16
    assert stages == (["batch"] * n_batches + ["epoch"]) * 2 + ["done"]
    batch = events[0]
    assert isinstance(batch, ProgressEvent) and batch.n_batches == n_batches and batch.n_epochs == 2
    assert np.isfinite(batch.loss) and "accuracy" in batch.metrics
    epoch = events[n_batches]
    assert epoch.epoch == 0 and "train_accuracy" in epoch.metrics and np.isfinite(epoch.loss)
    assert "epoch 1/2" in epoch.describe()


@pytest.mark.parametrize("where", ["after first epoch", "inside second epoch"])
def test_cancel_keeps_the_finished_epochs(small_planted, where):
    adata, _ = small_planted
    one_epoch = train(adata, "label", GRID, _config(epochs=1))

    def cancel(event):
        if where == "after first epoch":
            return event.stage == "epoch" and event.epoch == 0
        return event.stage == "batch" and event.epoch == 1 and event.batch == 1

    cancelled = train(adata, "label", GRID, _config(epochs=5), progress=cancel)
    assert cancelled.cancelled
    assert len(cancelled.history) == 1
    # the kept weights are exactly those at the end of the finished epoch
    assert _same_weights(_weights(cancelled), _weights(one_epoch))
    assert len(cancelled.predict(adata)) == adata.n_obs  # still a usable model


def test_prediction_fills_missing_genes_and_refuses_too_many(small_planted):
    adata, _ = small_planted
    trained = train(adata, "label", GRID, _config(epochs=1))
    genes = list(adata.var_names)
    fewer = adata[:, genes[5:]].copy()
    frame = trained.predict(fewer)
    assert frame.attrs["n_missing_genes"] == 5
    assert frame.attrs["missing_genes"] == list(genes[:5])
    assert not hasattr(trained, "missing_genes_")  # predict leaves the model as it was
    x, _ = trained.prepare(fewer)
    assert np.allclose(x[:, :5], trained.fill_values[:5])  # neutral training means, not zeros
    with pytest.raises(OmicsInputError, match="missing"):
        trained.predict(adata[:, genes[30:]].copy())
    assert len(trained.predict(adata[:, genes[30:]].copy(), max_missing_fraction=0.9)) == adata.n_obs


@pytest.mark.parametrize("overrides, match", [
    ({"model": "alexnet"}, "unknown model"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch size"),
    ({"lr": 0}, "learning rate"),
])
def test_bad_training_options_are_clear_errors(small_planted, overrides, match):
    adata, _ = small_planted
    with pytest.raises(OmicsInputError, match=match):
        train(adata, "label", GRID, _config(**overrides))


def test_missing_method_and_bad_labels_are_clear_errors(small_planted):
    adata, _ = small_planted
    with pytest.raises(OmicsInputError, match="method"):
        train(adata, "label", {"size": 8}, _config())
    with pytest.raises(OmicsInputError, match="no label column"):
        train(adata, "subtype", GRID, _config())


@pytest.mark.slow
def test_published_rgb_method_trains_on_its_fitted_images():
    adata, _ = make_planted(n_samples=45, n_genes=40)
    trained = train(adata[:36].copy(), "label", {"method": "rgb-embedding", "size": 24},
                    _config(epochs=2, preprocess=PreprocessConfig(n_top_genes=None)))
    assert trained.layout.n_channels == 3 and len(trained.history) == 2
    frame = trained.predict(adata[36:].copy())  # new samples: each reducer's out-of-sample transform
    assert len(frame) == 9 and np.allclose(frame.filter(like="prob_").sum(axis=1), 1, atol=1e-5)


def test_one_sample_stragglers_are_skipped_but_batch_size_one_trains():
    adata, _ = make_planted(n_samples=33, n_genes=16)
    trained = train(adata, "label", GRID, _config(epochs=2, batch_size=16))  # batches of 16, 16 and 1
    assert all(len(h["batch_losses"]) == 2 for h in trained.history)
    with pytest.raises(OmicsInputError, match="--batch-size 2"):
        train(adata[:6].copy(), "label", GRID, _config(epochs=1, batch_size=1))  # 4×4 images
    single = train(adata[:6].copy(), "label", {"method": "grid", "size": 8}, _config(epochs=1, batch_size=1))
    assert len(single.history[0]["batch_losses"]) == 6
