"""The fine-tuned network head (ST-Net style): a CNN trained end to end from patches to expression.

ST-Net (He et al. 2020) puts a DenseNet-121 on the patch under each spot,
replaces its ImageNet classifier by a linear layer to the target genes and
trains the whole network with a mean-squared error, augmenting patches with
random flips and 90° rotations.  This module does the same with any backbone
of :data:`.features.BACKBONES` (DenseNet-121 by default for this model):

* targets are the log1p-normalised expression of the training genes,
  standardised per gene with the training spots' mean and standard deviation
  (so every gene weighs the same in the loss); predictions are scaled back
  to :data:`.models.EXPRESSION_SCALE`;
* patches of ``patch_um`` µm are resampled straight to the network input
  (``input_px``, default 224, the backbones' native size; smaller is faster);
* Adam, ``epochs`` passes, ``batch_size`` patches per step, learning rate
  ``lr``; the training loop is :func:`napari_omicsimage.training.train_loop`
  (progress, cancel keeping the last finished epoch, BatchNorm
  recalibration), on the GPU when there is one;
* weights: ``"imagenet"``, a local file, or ``"random"`` (only when asked for,
  and labelled so in every output), exactly as for the frozen feature sets.

A fitted :class:`FineTunedModel` saves as one checkpoint of the histology
format (state dict tensors, the configuration, gene names, target scaling).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import anndata as ad
import numpy as np

from ..errors import Cancelled, CheckpointError
from ..models import resolve_device
from ..progress import ProgressEvent
from ..training import TrainConfig, _autocast, train_loop
from .features import BACKBONES, build_backbone, normalise_patches
from .models import (
    EXPRESSION_SCALE,
    FittedModel,
    HistologyConfig,
    _tensor,
    _versions,
    predictions_anndata,
    training_rows,
)
from .reading import Section
from .tiles import iter_patches, patch_side_px, shannon_entropy


# ------------------------------------------------------------------ patches
@dataclass
class SectionPatches:
    """Every spot's patch of one section at the network's input size, and its Shannon entropy."""

    patches: np.ndarray  # (n_spots, input_px, input_px, 3) uint8
    entropy: np.ndarray  # (n_spots,)


def section_patches(section: Section, config: HistologyConfig, *, progress=None, label: str = "",
                    position: tuple[int, int] = (0, 1)) -> SectionPatches:
    """Read ``section``'s patches batch by batch (progress stage ``"patches"``; returning True cancels)."""
    side = patch_side_px(config.patch_um, section.um_per_px)
    px = int(config.input_px)
    patches = np.zeros((section.n_spots, px, px, 3), dtype=np.uint8)
    n_batches = max(1, -(-section.n_spots // int(config.batch_size)))
    for b, (rows, batch) in enumerate(iter_patches(section.slide, section.centres, side_px=side, out_px=px,
                                                   batch_size=int(config.batch_size))):
        patches[rows] = batch
        event = ProgressEvent("patches", batch=b, n_batches=n_batches,
                              metrics={"patches": float(rows.stop), "section": float(position[0]),
                                       "n_sections": float(position[1])})
        if progress is not None and progress(event) is True:
            raise Cancelled(f"reading patches cancelled{label}")
    return SectionPatches(patches, shannon_entropy(patches))


# ------------------------------------------------------------------ network
def build_regressor(backbone: str, n_genes: int, weights, *, seed: int = 0):
    """``backbone`` (pooled features) followed by a linear layer to ``n_genes`` outputs."""
    from torch import nn

    class PatchRegressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build_backbone(backbone, weights, seed=seed)
            self.head = nn.Linear(BACKBONES[backbone], int(n_genes))

        def forward(self, x):
            return self.head(self.backbone(x))

    return PatchRegressor()


def dihedral_augment(images, generator):
    """ST-Net's augmentation: each square image flipped or not and rotated by a random multiple of 90°."""
    import torch

    n = images.shape[0]
    turns = torch.randint(0, 4, (n,), generator=generator).to(images.device)
    flips = torch.randint(0, 2, (n,), generator=generator).to(images.device).bool()
    out = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
    for k in (1, 2, 3):
        chosen = turns == k
        if chosen.any():
            out[chosen] = torch.rot90(out[chosen], k, dims=(-2, -1))
    return out


class AugmentedPatches:
    """The epoch source :func:`napari_omicsimage.training.train_loop` trains the head on.

    Patches stay uint8 in host memory; each batch is normalised for the
    backbone and augmented on the device.  A seeded permutation per epoch, as
    :class:`napari_omicsimage.training.ShuffledBatches`.
    """

    def __init__(self, patches: np.ndarray, y: np.ndarray, backbone: str, batch_size: int, seed: int, device):
        import torch

        self.patches = torch.from_numpy(np.ascontiguousarray(patches))
        self.targets = torch.as_tensor(np.asarray(y, dtype=np.float32), device=device)
        self.backbone, self.device = backbone, device
        self.batch_size = int(batch_size)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.n_batches = max(1, -(-len(self.patches) // self.batch_size))

    def epoch(self, epoch: int):
        import torch

        order = torch.randperm(len(self.patches), generator=self.generator)
        for b in range(self.n_batches):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            if len(index) == 1:
                continue  # BatchNorm cannot train on one patch; it is in another batch next epoch
            images = normalise_patches(self.patches[index], self.backbone, self.device)
            yield b, dihedral_augment(images, self.generator), self.targets[index.to(self.device)]

    def calibration(self):
        n_chunks = max(1, -(-len(self.patches) // self.batch_size))
        for chunk in np.array_split(np.arange(len(self.patches)), n_chunks):
            yield normalise_patches(self.patches[chunk], self.backbone, self.device)


# -------------------------------------------------------------------- model
@dataclass(kw_only=True)
class FineTunedModel(FittedModel):
    """A fine-tuned slide → expression network and what it was trained on (the API of ``HistologyModel``)."""

    network: object
    #: per-gene mean and standard deviation of the training targets (the network predicts standardised values)
    target_mean: np.ndarray
    target_std: np.ndarray
    history: list[dict] = field(default_factory=list)
    cancelled: bool = False

    @property
    def device(self):
        return next(self.network.parameters()).device

    def predict_patches(self, patches: np.ndarray) -> np.ndarray:
        """Predicted expression ``(n, genes)`` of uint8 patches at the network's input size."""
        import torch

        self.network.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(patches), int(self.config.batch_size)):
                images = normalise_patches(patches[start:start + int(self.config.batch_size)],
                                           self.config.features, self.device)
                with _autocast(self.device, True):
                    out.append(self.network(images).float().cpu().numpy())
        standardised = np.concatenate(out) if out else np.zeros((0, len(self.genes)), np.float32)
        return (standardised * self.target_std + self.target_mean).astype(np.float32)

    def predict(self, section: Section, *, progress=None, device=None, patches: SectionPatches | None = None
                ) -> ad.AnnData:
        """Predicted expression of every spot of ``section`` (see :func:`.models.predictions_anndata`)."""
        if device is not None:
            self.network.to(resolve_device(device))
        if patches is None:
            patches = section_patches(section, self.config, progress=progress)
        return predictions_anndata(self, section, self.predict_patches(patches.patches), patches.entropy)


def fit_finetuned(sections: list[Section], config: HistologyConfig, *, progress=None,
                  patches: dict[str, SectionPatches] | None = None, fold: int | None = None,
                  n_folds: int | None = None) -> FineTunedModel:
    """Train the head on all spots of ``sections`` (after Shannon selection, when asked for).

    ``patches`` (section name → :class:`SectionPatches`) skips reading;
    evaluation passes them so each section is read once.  Cancelled during
    training: the weights of the last finished epoch, with ``cancelled`` set
    and a note; before the first epoch finished: :class:`Cancelled`.
    """
    import torch

    config = config.validate()
    patches = dict(patches or {})
    for i, section in enumerate(sections):
        if section.name not in patches:
            patches[section.name] = section_patches(section, config, progress=progress, label=f" ({section.name})",
                                                    position=(i, len(sections)))
    genes, x, y, notes = training_rows(sections, config, {n: (p.patches, p.entropy) for n, p in patches.items()})
    mean = y.mean(axis=0)
    std = y.std(axis=0)
    std[~(std > 1e-6)] = 1.0  # a gene constant on the training spots: predict its mean
    device = resolve_device(config.device)
    torch.manual_seed(int(config.seed))
    network = build_regressor(config.features, len(genes), config.weights, seed=config.seed).to(device)
    source = AugmentedPatches(x, (y - mean) / std, config.features, config.batch_size, config.seed, device)
    loop_config = TrainConfig(model=config.features, epochs=int(config.epochs), batch_size=int(config.batch_size),
                              lr=float(config.lr), seed=int(config.seed), device=str(device))
    history, cancelled = train_loop(network, source, loop_config, progress=progress, fold=fold, n_folds=n_folds,
                                    loss_fn=torch.nn.MSELoss())
    if cancelled and not history:
        raise Cancelled("fine-tuning was cancelled before its first epoch finished, so there is no model "
                                "to predict with or save; fit again and let at least one epoch finish.")
    if cancelled:
        notes.append(f"training cancelled after {len(history)} of {config.epochs} epochs: the weights are those "
                     "of the last finished epoch")
    if progress is not None:
        progress(ProgressEvent("done", epoch=len(history) - 1, n_epochs=int(config.epochs),
                               loss=history[-1]["loss"], metrics={"spots": float(len(x)), "genes": float(len(genes))}))
    return FineTunedModel(config=config, genes=genes, network=network, target_mean=mean.astype(np.float32),
                          target_std=std.astype(np.float32), train_sections=[s.name for s in sections],
                          n_train_spots=len(x), train_mean=mean.astype(np.float32), history=history,
                          cancelled=cancelled, notes=notes, versions=_versions())


# -------------------------------------------------------------- checkpoints
def finetuned_payload(model: FineTunedModel) -> dict:
    meta = {
        "config": asdict(model.config),
        "genes": list(model.genes),
        "train_sections": list(model.train_sections),
        "n_train_spots": int(model.n_train_spots),
        "scale": EXPRESSION_SCALE,
        "features": model.config.feature_description,
        "model": model.config.model_description,
        "history": [{k: v for k, v in h.items()} for h in model.history],
        "cancelled": bool(model.cancelled),
        "notes": list(model.notes),
        "versions": model.versions or _versions(),
    }
    return {
        "meta": json.dumps(meta),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.network.state_dict().items()},
        "target_mean": _tensor(model.target_mean), "target_std": _tensor(model.target_std),
        "train_mean": _tensor(model.train_mean),
    }


def finetuned_from_payload(payload: dict, meta: dict, config: HistologyConfig, path, *, device=None
                           ) -> FineTunedModel:
    """The :class:`FineTunedModel` of a checkpoint read by :func:`.fitting.load_model`."""
    try:
        genes = [str(g) for g in meta["genes"]]
        state = payload["state_dict"]
        arrays = {k: payload[k].numpy().astype(np.float32) for k in ("target_mean", "target_std", "train_mean")}
        # the stored weights replace any initialisation: build the architecture without loading weights
        network = build_regressor(config.features, len(genes), "random", seed=config.seed)
        network.load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a complete fine-tuned histology model "
                              f"({type(exc).__name__}: {exc}).") from exc
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the stored weights do not fit a {config.features} head for {len(genes)} "
                              f"genes ({str(exc).splitlines()[0]}); the file is damaged.") from exc
    if any(a.shape != (len(genes),) for a in arrays.values()):
        raise CheckpointError(f"{path}: stored arrays do not fit together; the file is damaged.")
    network.to(resolve_device(device if device is not None else "auto")).eval()
    return FineTunedModel(config=config, genes=genes, network=network, target_mean=arrays["target_mean"],
                          target_std=arrays["target_std"], train_sections=list(meta["train_sections"]),
                          n_train_spots=int(meta["n_train_spots"]), train_mean=arrays["train_mean"],
                          history=list(meta.get("history", [])), cancelled=bool(meta.get("cancelled")),
                          notes=list(meta.get("notes", [])), versions=dict(meta.get("versions", {})))
