"""Networks that classify expression images, the device they run on, and gene alignment.

Three architectures (:data:`MODEL_NAMES`):

``resnet18``
    torchvision ResNet-18.  The first convolution takes the layout's channel
    count, the last layer outputs one logit per class.
``efficientnet_b0``
    torchvision EfficientNet-B0, adapted the same way.
``small``
    a three-block CNN with global average pooling that trains in seconds on a
    CPU; the default for interactive use and tests.

ImageNet weights (``weights="imagenet"``) come through torchvision's weights
API, which downloads them once into torch's hub cache.  Without network
access that fails, and :func:`build_model` says how to supply the file
instead (``weights="/path/to/file.pth"``).  When the image does not have three
channels, the pretrained first convolution is adapted the usual way (summed
over RGB for one channel, RGB repeated and rescaled for more).
"""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .errors import OmicsInputError
from .payload import load_plain_data

MODEL_NAMES = ("resnet18", "efficientnet_b0", "small")

#: the torchvision weights enum member used for ``weights="imagenet"``
_IMAGENET_WEIGHTS = {
    "resnet18": ("ResNet18_Weights", "IMAGENET1K_V1"),
    "efficientnet_b0": ("EfficientNet_B0_Weights", "IMAGENET1K_V1"),
    # patch-feature backbones of the histology subpackage (HEST, ST-Net)
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V2"),
    "densenet121": ("DenseNet121_Weights", "IMAGENET1K_V1"),
}


# ================================================================== networks
#: side of the position grid the small CNN pools its features to
POOLED_GRID = 4


def _small_cnn(in_channels: int, n_classes: int):
    from torch import nn

    class SmallCNN(nn.Module):
        """Three conv–BN–ReLU blocks, pooled to a coarse 4×4 grid, and a linear head.

        In expression images *where* a pixel is says *which* genes it holds, so
        the head keeps a coarse position grid instead of global average pooling
        (which would make the network blind to position).  ``ceil_mode``
        pooling keeps at least one pixel, so tiny images (e.g. 4×4 grids) go through.
        """

        def __init__(self):
            super().__init__()
            widths = (32, 64, 128)
            layers, previous = [], in_channels
            for i, width in enumerate(widths):
                layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                if i < len(widths) - 1:
                    layers.append(nn.MaxPool2d(2, ceil_mode=True))
                previous = width
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(POOLED_GRID)
            self.dropout = nn.Dropout(0.2)
            self.classifier = nn.Linear(previous * POOLED_GRID * POOLED_GRID, n_classes)

        def forward(self, x):
            x = self.pool(self.features(x)).flatten(1)
            return self.classifier(self.dropout(x))

    return SmallCNN()


def _adapt_first_conv(conv, in_channels: int):
    """A copy of ``conv`` taking ``in_channels`` inputs, keeping pretrained weights usefully.

    One channel: the RGB kernels summed (a grey image gives the same response
    as before).  More channels: RGB kernels repeated cyclically and scaled by
    ``3 / in_channels`` so activations keep their magnitude (timm's convention).
    """
    import torch
    from torch import nn

    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        weight = conv.weight
        if in_channels == 1:
            new.weight.copy_(weight.sum(dim=1, keepdim=True))
        else:
            repeats = math.ceil(in_channels / weight.shape[1])
            new.weight.copy_(weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (3.0 / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _imagenet_state_dict(name: str) -> dict:
    import torch
    import torchvision.models as tvm

    enum_name, member = _IMAGENET_WEIGHTS[name]
    weights = getattr(getattr(tvm, enum_name), member)
    try:
        return weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a broken download a RuntimeError
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise OmicsInputError(
            f"could not get the ImageNet weights for {name} ({exc}). Without network access, download "
            f"{weights.url} on a machine that has it and either pass the file (weights='/path/"
            f"{Path(weights.url).name}', CLI: --weights /path/{Path(weights.url).name}) or copy it "
            f"into {hub}/ where torchvision looks first; or train from random initialisation (weights=None)."
        ) from exc


def _local_state_dict(path: Path, name: str) -> dict:
    import torch

    if not path.exists():
        raise OmicsInputError(f"weights file {path} does not exist; give the path of a .pth file.")
    obj = load_plain_data(path, what="weights file", fix=f"give the torchvision ImageNet state dict of {name}",
                          only=f"Use the .pth file torchvision publishes for {name}.")
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):  # common wrappers of training scripts
            if isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OmicsInputError(f"{path} holds no state dict of tensors; give the torchvision weights of {name}.")
    return obj


def build_model(name: str, in_channels: int, n_classes: int, weights=None):
    """An ``nn.Module`` mapping ``(N, in_channels, H, W)`` images to ``n_classes`` logits.

    ``weights``: ``None`` (random initialisation), ``"imagenet"`` (torchvision's
    ImageNet weights, downloaded or from torch's hub cache) or the path of a
    local torchvision weights file.  Pretrained weights are loaded into the
    original architecture first, then its first convolution and head are adapted.
    """
    import torchvision.models as tvm
    from torch import nn

    if name not in MODEL_NAMES:
        raise OmicsInputError(f"unknown model {name!r}; choose one of {MODEL_NAMES}.")
    in_channels, n_classes = int(in_channels), int(n_classes)
    if in_channels < 1:
        raise OmicsInputError(f"images need at least one channel, got {in_channels}.")
    if n_classes < 2:
        raise OmicsInputError(f"a classifier needs at least two classes, got {n_classes}.")
    if name == "small":
        if weights is not None:
            raise OmicsInputError("the small CNN has no pretrained weights; use weights=None "
                                  "or choose resnet18 / efficientnet_b0.")
        return _small_cnn(in_channels, n_classes)

    model = tvm.resnet18(weights=None) if name == "resnet18" else tvm.efficientnet_b0(weights=None)
    if weights is not None:
        if isinstance(weights, str) and weights.lower() == "imagenet":
            state = _imagenet_state_dict(name)
        else:
            state = _local_state_dict(Path(weights), name)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise OmicsInputError(
                f"the weights do not fit torchvision's {name} (they are for another architecture): "
                f"{str(exc).splitlines()[0]}"
            ) from exc

    if name == "resnet18":
        if in_channels != 3:
            model.conv1 = _adapt_first_conv(model.conv1, in_channels)
        model.fc = nn.Linear(model.fc.in_features, n_classes)
    else:
        stem = model.features[0]
        if in_channels != 3:
            stem[0] = _adapt_first_conv(stem[0], in_channels)
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, n_classes)
    return model


def gradcam_layer(model):
    """The last convolutional block, where Grad-CAM reads activations."""
    from torch import nn

    if hasattr(model, "layer4"):  # ResNet
        return model.layer4
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):  # EfficientNet and the small CNN
        return features[-1]
    raise OmicsInputError(f"no Grad-CAM layer known for {type(model).__name__}; use another saliency method.")


# ==================================================================== device
def resolve_device(device="auto"):
    """``torch.device`` for ``"auto"`` (cuda, then mps, then cpu) or a named device.

    A named device that this machine lacks is an error rather than a silent
    fall-back, so a user who asked for the GPU knows they did not get it.
    """
    import torch

    if isinstance(device, torch.device):
        chosen = device
    else:
        text = str(device or "auto").strip().lower()
        if text == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            mps = getattr(torch.backends, "mps", None)
            if mps is not None and mps.is_available():
                return torch.device("mps")
            return torch.device("cpu")
        try:
            chosen = torch.device(text)
        except RuntimeError as exc:
            raise OmicsInputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps.") from exc
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise OmicsInputError(f"device {device!r} was asked for, but CUDA is not available here; "
                                  "use --device auto or cpu.")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise OmicsInputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) exist.")
    elif chosen.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise OmicsInputError(f"device {device!r} was asked for, but MPS is not available here; "
                                  "use --device auto or cpu.")
    elif chosen.type != "cpu":
        raise OmicsInputError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps.")
    return chosen


# ============================================================ gene alignment
#: default refusal threshold of :func:`align_genes`: more than this share of the
#: model's genes missing and predictions are not trustworthy
MAX_MISSING_FRACTION = 0.2


def align_genes(adata: ad.AnnData, genes, *, max_missing_fraction: float = MAX_MISSING_FRACTION
                ) -> tuple[ad.AnnData, list[str]]:
    """Give ``adata`` every gene in ``genes``, adding absent ones as zero columns.

    All input genes are kept (per-sample normalisation sums over them); only
    the genes a model needs are added.  Returns the aligned copy and the names
    of the genes that were missing; callers replace those genes' values after
    preprocessing (see ``TrainedModel.prepare``).  Refuses when more than
    ``max_missing_fraction`` of ``genes`` are absent.
    """
    genes = [str(g) for g in genes]
    present = set(map(str, adata.var_names))
    missing = [g for g in genes if g not in present]
    if len(missing) > max_missing_fraction * len(genes):
        raise OmicsInputError(
            f"{len(missing)} of the model's {len(genes)} genes ({len(missing) / len(genes):.0%}) are missing "
            f"from the input, e.g. {missing[:5]}; more than {max_missing_fraction:.0%} missing makes the "
            "predictions unreliable. Check that the gene identifiers match the training data (same "
            "id type, e.g. Ensembl vs symbols), or raise the threshold (--max-missing) knowingly."
        )
    if not missing:
        return adata, []
    import scipy.sparse as sp

    extra = ad.AnnData(
        X=sp.csr_matrix((adata.n_obs, len(missing)), dtype=np.float32) if sp.issparse(adata.X)
        else np.zeros((adata.n_obs, len(missing)), dtype=np.float32),
        obs=pd.DataFrame(index=adata.obs_names.copy()),
        var=pd.DataFrame(index=pd.Index(missing)),
    )
    aligned = ad.concat([adata, extra], axis=1, merge="first")
    aligned.obs = adata.obs.copy()
    aligned.uns = dict(adata.uns)
    return aligned, missing
