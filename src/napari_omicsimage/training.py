"""Training a CNN on expression images rendered on the fly.

No image ever touches the disk: the preprocessed expression matrix sits on the
training device and each batch is rendered there by the fitted layout
(``layout.transform(x_batch, device=device)``, a sparse matrix product), then
fed to the network.  Layouts without a renderer (the published RGB
embedding) use their fitted training images instead.

A progress callback ``fn(event: ProgressEvent) -> bool | None`` hears about
every batch and epoch; returning ``True`` asks to cancel.  A cancelled run
stops at the next batch, keeps the weights of the last *finished* epoch and
says so in ``TrainedModel.cancelled``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .errors import Cancelled, OmicsInputError
from .io import check_labels
from .layouts import Layout, make_layout
from .models import MAX_MISSING_FRACTION, MODEL_NAMES, align_genes, build_model, resolve_device
from .preprocess import PreprocessConfig, Preprocessor
from .progress import Progress, ProgressEvent, wants_cancel

log = logging.getLogger(__name__)


#: Named training protocols (Adam and cross-entropy in both).  ``paper`` is the
#: seed paper's (5 epochs, batch 32, learning rate 1e-4); on data sets of tens
#: to hundreds of samples it is 10 (50 samples) to 90 (700 cells) optimiser
#: steps per fold, and the networks, trained from random initialisation, stay
#: near chance (balanced accuracy 0.34-0.47 on the 4-class medulloblastoma
#: subset, where a logistic regression scores 1.0; docs/benchmarks.md#accuracy).  ``recommended`` (20 epochs, batch
#: 16, learning rate 1e-3) is the default: it beat ``paper`` on all five data
#: sets for every method measured.
PROTOCOLS: dict[str, dict] = {
    "recommended": {"epochs": 20, "batch_size": 16, "lr": 1e-3},
    "paper": {"epochs": 5, "batch_size": 32, "lr": 1e-4},
}
DEFAULT_PROTOCOL = "recommended"


@dataclass
class TrainConfig:
    """Training options; the defaults are the ``recommended`` protocol (see :data:`PROTOCOLS`).

    ``TrainConfig.for_protocol("paper")`` gives the seed paper's protocol.
    """

    model: str = "small"
    epochs: int = PROTOCOLS[DEFAULT_PROTOCOL]["epochs"]
    batch_size: int = PROTOCOLS[DEFAULT_PROTOCOL]["batch_size"]
    lr: float = PROTOCOLS[DEFAULT_PROTOCOL]["lr"]
    seed: int = 0
    device: str = "auto"
    #: None (random initialisation), "imagenet" or the path of a local weights file
    weights: str | None = None
    #: automatic mixed precision (float16) — used on CUDA only, ignored elsewhere
    mixed_precision: bool = True
    #: re-estimate BatchNorm statistics on the training samples after training (see fit_network)
    recalibrate_batchnorm: bool = True
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def validate(self) -> TrainConfig:
        if self.model not in MODEL_NAMES:
            raise OmicsInputError(f"unknown model {self.model!r}; choose one of {MODEL_NAMES}.")
        if int(self.epochs) < 1:
            raise OmicsInputError(f"epochs must be at least 1, got {self.epochs}.")
        if int(self.batch_size) < 1:
            raise OmicsInputError(f"batch size must be at least 1, got {self.batch_size}.")
        if not float(self.lr) > 0:
            raise OmicsInputError(f"learning rate must be positive, got {self.lr}.")
        if isinstance(self.preprocess, dict):  # e.g. restored from a checkpoint
            self.preprocess = PreprocessConfig(**self.preprocess)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_protocol(cls, name: str, **options) -> TrainConfig:
        """The settings of protocol ``name`` (``recommended`` or ``paper``); ``options`` override them."""
        if name not in PROTOCOLS:
            raise OmicsInputError(f"unknown training protocol {name!r}; choose one of {sorted(PROTOCOLS)}.")
        return cls(**{**PROTOCOLS[name], **options})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        values["preprocess"] = PreprocessConfig(**values.get("preprocess", {}))
        return cls(**values)


# ================================================================ image feed
class ImageBatches:
    """Batches of images for a network, rendered on ``device`` when the layout can.

    Gene layouts render each batch from the preprocessed matrix kept on the
    device.  Layouts without a renderer (the published RGB embedding) take
    precomputed ``images`` instead.
    """

    def __init__(self, device, *, layout: Layout | None = None, x: np.ndarray | None = None,
                 images: np.ndarray | None = None):
        import torch

        self.device = device
        if images is not None:
            self.layout = None
            # images can be large (N·C·H·W): keep them in host memory and move one batch at a time
            self.data = torch.as_tensor(np.asarray(images, dtype=np.float32))
        else:
            if layout is None or x is None or not layout.has_gene_map:
                raise ValueError("ImageBatches needs a gene layout and a matrix, or images")
            self.layout = layout
            self.data = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def get(self, index):
        if self.layout is None:
            return self.data[index.cpu()].to(self.device, non_blocking=True)
        return self.layout.transform(self.data[index], device=self.device)


def _autocast(device, enabled: bool):
    import contextlib

    import torch

    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def predict_proba(model, batches: ImageBatches, *, batch_size: int = 64, mixed_precision: bool = True
                  ) -> np.ndarray:
    """Class probabilities ``(N, n_classes)`` of every image in ``batches``."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(batches), batch_size):
            index = torch.arange(start, min(start + batch_size, len(batches)), device=batches.device)
            images = batches.get(index)  # rendered in float32, outside autocast
            with _autocast(batches.device, mixed_precision):
                logits = model(images)
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float64)


class ShuffledBatches:
    """The in-memory epoch source: every epoch a seeded permutation of all samples, cut into batches.

    :func:`train_loop` takes any object with ``n_batches``, ``epoch(epoch)``
    (yielding ``(batch_number, images, targets)``) and ``calibration()``
    (yielding image batches for :func:`recalibrate_batchnorm`); the streaming
    loader of :mod:`napari_omicsimage.streaming` is the other one.
    """

    def __init__(self, batches: ImageBatches, y: np.ndarray, batch_size: int, seed: int):
        import torch

        self.batches = batches
        self.device = batches.device
        self.targets = torch.as_tensor(np.asarray(y, dtype=np.int64), device=batches.device)
        self.batch_size = int(batch_size)
        self.shuffler = torch.Generator().manual_seed(int(seed))
        self.n_batches = max(1, -(-len(batches) // self.batch_size))

    def epoch(self, epoch: int):
        import torch

        order = torch.randperm(len(self.batches), generator=self.shuffler).to(self.device)
        for b in range(self.n_batches):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            if len(index) == 1 and self.batch_size > 1:
                # a one-sample straggler can break BatchNorm (one value per channel on small feature
                # maps); the sample is in another batch next epoch, as shuffling changes the order
                continue
            yield b, self.batches.get(index), self.targets[index]  # rendered in float32

    def calibration(self):
        import torch

        # equal-sized chunks: never a one-sample batch, on which BatchNorm cannot compute a variance
        n_chunks = max(1, -(-len(self.batches) // max(self.batch_size, 1)))
        for chunk in np.array_split(np.arange(len(self.batches)), n_chunks):
            yield self.batches.get(torch.as_tensor(chunk, device=self.device))


def fit_network(batches: ImageBatches, y: np.ndarray, n_classes: int, n_channels: int,
                config: TrainConfig, *, progress: Progress | None = None, fold: int | None = None,
                n_folds: int | None = None):
    """Train a fresh network; returns ``(model, history, cancelled)``.

    ``history`` holds one dict per finished epoch (``epoch``, ``loss``,
    ``train_accuracy``, ``batch_losses``).  The seed fixes the initial
    weights, the shuffling and dropout, so equal inputs give equal runs.
    """
    import torch

    torch.manual_seed(config.seed)
    model = build_model(config.model, n_channels, n_classes, weights=config.weights).to(batches.device)
    source = ShuffledBatches(batches, y, int(config.batch_size), int(config.seed))
    history, cancelled = train_loop(model, source, config, progress=progress, fold=fold, n_folds=n_folds)
    return model, history, cancelled


def train_loop(model, source, config: TrainConfig, *, progress: Progress | None = None,
               fold: int | None = None, n_folds: int | None = None, max_steps: int | None = None,
               loss_fn=None):
    """Train ``model`` in place on the batches of ``source``; returns ``(history, cancelled)``.

    ``loss_fn``: ``None`` trains a classifier (cross-entropy on class codes;
    batches and epochs report the training accuracy); any other loss (e.g.
    ``torch.nn.MSELoss()`` for the histology regression head) is used as given
    and no accuracy is reported.

    ``model`` may be wrapped in ``DistributedDataParallel`` (the gradients are
    then averaged over the processes at every step).  ``max_steps`` stops after
    that many optimiser steps in all (the last epoch is then recorded as far as
    it went).  A cancelled run keeps the weights of the last finished epoch;
    BatchNorm statistics are recalibrated afterwards (see
    :func:`recalibrate_batchnorm`) when ``config.recalibrate_batchnorm``.
    """
    import torch

    device = source.device
    optimiser = torch.optim.Adam(model.parameters(), lr=float(config.lr))
    classifier = loss_fn is None
    loss_fn = torch.nn.CrossEntropyLoss() if classifier else loss_fn
    use_amp = bool(config.mixed_precision and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    n_batches = source.n_batches
    history: list[dict] = []
    finished_state = copy.deepcopy(model.state_dict())
    cancelled, steps = False, 0

    for epoch in range(int(config.epochs)):
        model.train()
        batch_losses, correct, seen = [], 0, 0
        for b, images, targets in source.epoch(epoch):
            optimiser.zero_grad(set_to_none=True)
            try:
                with _autocast(device, use_amp):
                    logits = model(images)
                    loss = loss_fn(logits.float(), targets)
            except ValueError as exc:
                if "more than 1 value per channel" not in str(exc):
                    raise
                raise OmicsInputError(
                    f"a batch of {len(targets)} image(s) of {tuple(images.shape[2:])} pixels leaves the "
                    f"{config.model} network's BatchNorm one value per channel; use --batch-size 2 or more, "
                    "or larger images (--size)."
                ) from exc
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
            else:
                loss.backward()
                optimiser.step()
            steps += 1
            batch_loss = float(loss.detach())
            batch_losses.append((batch_loss, len(targets)))
            metrics = {}
            if classifier:
                hits = logits.detach().argmax(1) == targets
                correct += int(hits.sum())
                metrics["accuracy"] = float(hits.float().mean())
            seen += len(targets)
            event = ProgressEvent("batch", fold, n_folds, epoch, int(config.epochs), b, n_batches,
                                  batch_loss, metrics)
            if wants_cancel(progress, event):
                cancelled = True
                break
            if max_steps is not None and steps >= max_steps:
                break
        if cancelled:
            break
        weights = np.array([w for _, w in batch_losses], dtype=float)
        epoch_loss = float(np.average([v for v, _ in batch_losses], weights=weights))
        record = {"epoch": epoch + 1, "loss": epoch_loss, "batch_losses": [v for v, _ in batch_losses]}
        if classifier:
            record["train_accuracy"] = correct / max(seen, 1)
        history.append(record)
        finished_state = copy.deepcopy(model.state_dict())
        event = ProgressEvent("epoch", fold, n_folds, epoch, int(config.epochs), None, None, epoch_loss,
                              {k: v for k, v in record.items() if k == "train_accuracy"})
        if wants_cancel(progress, event):
            cancelled = True
            break
        if max_steps is not None and steps >= max_steps:
            break
    if cancelled:
        # keep what was finished: the weights at the end of the last complete epoch
        model.load_state_dict(finished_state)
    if config.recalibrate_batchnorm and history:
        recalibrate_batchnorm(getattr(model, "module", model), source, mixed_precision=use_amp)
    model.eval()
    return history, cancelled


def recalibrate_batchnorm(model, source, *, mixed_precision: bool = False) -> None:
    """Set BatchNorm running statistics to their exact averages over the training images.

    BatchNorm layers predict with running averages updated with momentum 0.1
    at every step.  The paper's protocol on a small data set gives only a
    handful of steps (50 samples, batch 32, 5 epochs: 10 steps), after which
    the averages still hold a third of their initial values (0.9¹⁰ ≈ 0.35):
    predictions then collapse onto one class even when the network ranks
    samples well.  One extra forward pass over the training images, with
    weights untouched (as torch.optim.swa_utils.update_bn does), removes that
    artefact.  Only BatchNorm layers are put in training mode, so dropout and
    stochastic depth stay off.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches of the pass
        m.train()
    with torch.no_grad():
        for images in source.calibration():
            with _autocast(source.device, mixed_precision):
                model(images)
    for m in norms:
        m.momentum = momenta[m]
    model.eval()


# ============================================================== trained model
@dataclass
class TrainedModel:
    """A trained network with everything needed to use it on new samples."""

    model: Any
    preprocessor: Preprocessor
    layout: Layout
    classes: list[str]
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    cancelled: bool = False
    label_column: str | None = None
    layout_spec: dict = field(default_factory=dict)
    #: per-gene mean of the preprocessed training matrix, used for genes missing at prediction
    fill_values: np.ndarray | None = None
    #: package versions at training time (filled by checkpoints)
    versions: dict = field(default_factory=dict)

    @property
    def genes(self) -> np.ndarray:
        return self.preprocessor.genes_

    @property
    def device(self):
        import torch

        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover - every model here has parameters
            return torch.device("cpu")

    def prepare_matrix(self, adata: ad.AnnData, *, max_missing_fraction: float = MAX_MISSING_FRACTION
                       ) -> np.ndarray:
        """The preprocessed, gene-aligned matrix ``(N, genes)`` of new samples.

        Genes the model needs but ``adata`` lacks are filled with their mean
        preprocessed training value (a neutral value: the network sees the
        average sample there).  Which were missing: :meth:`missing_genes`; past
        ``max_missing_fraction`` this refuses.  The model is not changed.
        """
        aligned, missing = align_genes(adata, self.genes, max_missing_fraction=max_missing_fraction)
        if missing:
            log.warning("%d of %d model genes missing from the input; filled with training means",
                        len(missing), len(self.genes))
        x = self.preprocessor.transform(aligned)
        if missing:
            columns = pd.Index(self.genes).get_indexer(missing)
            fill = self.fill_values if self.fill_values is not None else np.zeros(len(self.genes), np.float32)
            x[:, columns] = fill[columns]
        return x

    def missing_genes(self, adata: ad.AnnData) -> list[str]:
        """The model's genes that ``adata`` lacks (filled with training means when predicting), in model order."""
        present = set(map(str, adata.var_names))
        return [str(g) for g in self.genes if str(g) not in present]

    def prepare(self, adata: ad.AnnData, *, max_missing_fraction: float = MAX_MISSING_FRACTION):
        """``(x, images)`` for new samples: genes aligned by name, preprocessed, rendered.

        ``x`` is the preprocessed matrix ``(N, genes)``; ``images`` is ``(N, C, H, W)``
        float32.  See :meth:`prepare_matrix` for how missing genes are handled.
        """
        x = self.prepare_matrix(adata, max_missing_fraction=max_missing_fraction)
        return x, np.asarray(self.layout.transform(x), dtype=np.float32)

    def predict_proba(self, adata: ad.AnnData, **options) -> np.ndarray:
        x = self.prepare_matrix(adata, **options)
        # gene layouts render batch by batch on the model's device; the RGB embedding projects first
        batches = (ImageBatches(self.device, layout=self.layout, x=x) if self.layout.has_gene_map
                   else ImageBatches(self.device, images=self.layout.transform(x)))
        return predict_proba(self.model, batches, batch_size=max(int(self.config.batch_size), 1),
                             mixed_precision=self.config.mixed_precision)

    def predict(self, adata: ad.AnnData, **options) -> pd.DataFrame:
        """One row per sample: ``sample``, ``predicted`` and ``prob_<class>`` per class.

        ``frame.attrs["missing_genes"]`` names the model genes the input lacked, ``frame.attrs["n_missing_genes"]``
        counts them.
        """
        proba = self.predict_proba(adata, **options)
        frame = pd.DataFrame({"sample": np.asarray(adata.obs_names, dtype=str),
                              "predicted": np.asarray(self.classes, dtype=object)[proba.argmax(1)]})
        for k, name in enumerate(self.classes):
            frame[f"prob_{name}"] = proba[:, k]
        missing = self.missing_genes(adata)
        frame.attrs["missing_genes"], frame.attrs["n_missing_genes"] = missing, len(missing)
        return frame


def class_indices(labels, classes: list[str]) -> np.ndarray:
    """Integer class codes of ``labels`` in the order of ``classes``."""
    labels = np.asarray(labels, dtype=str)
    codes = pd.Index(classes).get_indexer(labels)
    if (codes < 0).any():
        unknown = sorted(set(labels[codes < 0]))
        raise OmicsInputError(f"labels {unknown[:5]} are not among the model's classes {classes}.")
    return codes


def fit_layout(layout_spec: dict, x: np.ndarray, genes) -> tuple[Layout, np.ndarray | None]:
    """Fit a layout on training rows; returns it and, for layouts without a
    renderer, their training images (``None`` for gene layouts)."""
    spec = dict(layout_spec or {})
    if "method" not in spec:
        raise OmicsInputError("the layout specification needs a 'method', e.g. {'method': 'deepinsight'}.")
    method, size = spec.pop("method"), spec.pop("size", None)
    layout = make_layout(method, size=size, **spec)
    if layout.has_gene_map:
        layout.fit(x, genes)
        return layout, None
    return layout, np.asarray(layout.fit_transform(x, genes), dtype=np.float32)


def train(adata: ad.AnnData, label_column: str, layout_spec: dict, config: TrainConfig | None = None,
          progress: Progress | None = None) -> TrainedModel:
    """Preprocess, fit the layout and train a network on all samples of ``adata``.

    ``layout_spec`` is ``{"method": ..., "size": ..., **layout params}`` (what
    ``cli.layout_spec`` builds).  For an honest estimate of how well this
    generalises use :func:`napari_omicsimage.evaluation.cross_validate`.
    """
    config = (config or TrainConfig()).validate()
    check_labels(adata, label_column)
    device = resolve_device(config.device)
    labels = adata.obs[label_column].astype(str).to_numpy()
    classes = sorted(set(labels))
    y = class_indices(labels, classes)

    preprocessor = Preprocessor(config.preprocess).fit(adata)
    passed = preprocessor.qc_passed_  # QC (min_genes): failing samples are left out of training
    x = preprocessor.transform(adata[passed])
    y = y[passed]
    layout, train_images = fit_layout(layout_spec, x, preprocessor.genes_)
    batches = (ImageBatches(device, layout=layout, x=x) if train_images is None
               else ImageBatches(device, images=train_images))
    model, history, cancelled = fit_network(batches, y, len(classes), layout.n_channels, config,
                                            progress=progress)
    if cancelled and not history:
        # the network is still its random initialisation: returning it would let it predict and be saved
        raise Cancelled("training was cancelled before its first epoch finished, so there is no model "
                                "to predict with or save; train again and let at least one epoch finish.")
    trained = TrainedModel(model=model, preprocessor=preprocessor, layout=layout, classes=classes,
                           config=config, history=history, cancelled=cancelled, label_column=label_column,
                           layout_spec=dict(layout_spec), fill_values=x.mean(axis=0).astype(np.float32))
    if progress is not None:
        progress(ProgressEvent("done", epoch=len(history) - 1 if history else None,
                               n_epochs=int(config.epochs),
                               loss=history[-1]["loss"] if history else None,
                               metrics={"cancelled": float(cancelled)}))
    return trained
