"""Networks, weights, devices and gene alignment (models.py)."""

import urllib.error

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from napari_omicsimage.errors import OmicsInputError
from napari_omicsimage.models import (
    MODEL_NAMES,
    align_genes,
    build_model,
    gradcam_layer,
    resolve_device,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _first_conv(model):
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_input_layer_and_head_follow_channels_and_classes(name, channels):
    torch.manual_seed(0)
    model = build_model(name, channels, 4).eval()
    assert _first_conv(model).in_channels == channels
    with torch.no_grad():
        logits = model(torch.rand(2, channels, 32, 32))
    assert logits.shape == (2, 4)
    assert gradcam_layer(model) is not None


def test_small_cnn_takes_tiny_grid_images():
    model = build_model("small", 1, 3).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 4, 4)).shape == (2, 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "vgg", "in_channels": 3, "n_classes": 2}, "unknown model"),
    ({"name": "small", "in_channels": 0, "n_classes": 2}, "channel"),
    ({"name": "small", "in_channels": 3, "n_classes": 1}, "two classes"),
    ({"name": "small", "in_channels": 3, "n_classes": 2, "weights": "imagenet"}, "no pretrained"),
])
def test_bad_model_requests_are_clear_errors(kwargs, match):
    with pytest.raises(OmicsInputError, match=match):
        build_model(**kwargs)


def test_imagenet_weights_without_network_say_how_to_use_a_local_file(monkeypatch):
    from torchvision.models import ResNet18_Weights

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(OmicsInputError) as info:
        build_model("resnet18", 3, 4, weights="imagenet")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and "--weights" in message and "weights=None" in message


def test_local_weights_file_is_loaded_and_the_first_conv_adapted(tmp_path):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": reference.state_dict()}, path)  # wrapped, as training scripts do

    same = build_model("resnet18", 3, 4, weights=path)
    assert torch.equal(same.conv1.weight, reference.conv1.weight)
    assert torch.equal(same.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert same.fc.out_features == 4

    grey = build_model("resnet18", 1, 4, weights=str(path))
    assert torch.allclose(grey.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    five = build_model("resnet18", 5, 4, weights=path)
    expected = reference.conv1.weight[:, [0, 1, 2, 0, 1]] * (3 / 5)
    assert torch.allclose(five.conv1.weight, expected)


def test_unusable_weights_files_are_clear_errors(tmp_path):
    import torchvision

    with pytest.raises(OmicsInputError, match="does not exist"):
        build_model("resnet18", 3, 2, weights=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(OmicsInputError, match="damaged.*or not a PyTorch file"):
        build_model("resnet18", 3, 2, weights=garbage)
    other = tmp_path / "efficientnet.pth"
    torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), other)
    with pytest.raises(OmicsInputError, match="do not fit torchvision's resnet18"):
        build_model("resnet18", 3, 2, weights=other)


def test_device_resolution(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(OmicsInputError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(OmicsInputError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(OmicsInputError, match="device"):
        resolve_device("quantum")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")  # cuda comes first


def _adata(genes, sparse=False):
    x = np.arange(3 * len(genes), dtype=np.float32).reshape(3, len(genes)) + 1
    return ad.AnnData(X=sp.csr_matrix(x) if sparse else x,
                      obs=pd.DataFrame({"label": ["a", "b", "a"]}, index=["s1", "s2", "s3"]),
                      var=pd.DataFrame(index=genes))


@pytest.mark.parametrize("sparse", [False, True])
def test_align_genes_fills_missing_genes_and_keeps_the_others(sparse):
    adata = _adata([f"g{i}" for i in range(10)] + ["extra"], sparse=sparse)
    model_genes = [f"g{i}" for i in range(9)] + ["absent"]
    aligned, missing = align_genes(adata, model_genes)
    assert missing == ["absent"]
    assert "extra" in aligned.var_names  # kept: per-sample normalisation sums over all genes
    column = aligned[:, "absent"].X
    assert np.all((column.toarray() if sp.issparse(column) else column) == 0)
    assert list(aligned.obs["label"]) == ["a", "b", "a"]
    same, none_missing = align_genes(adata, [f"g{i}" for i in range(5)])
    assert none_missing == [] and same is adata


def test_align_genes_refuses_past_the_threshold():
    adata = _adata(["g0", "g1", "g2"])
    with pytest.raises(OmicsInputError, match="--max-missing"):
        align_genes(adata, ["g0", "x1", "x2", "x3"])
    _, missing = align_genes(adata, ["g0", "x1", "x2", "x3"], max_missing_fraction=0.8)
    assert len(missing) == 3
