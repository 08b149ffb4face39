"""Saliency maps and the genes behind them.

Attribution methods (:data:`SALIENCY_METHODS`, computed with captum):

``gradient``
    Vanilla gradient saliency exactly as the seed paper defines it (after
    Simonyan et al. 2013): ``|∂ logit of the predicted class / ∂ input|`` per
    channel; the paper's map ``M`` is the maximum over channels
    (:func:`saliency_map`).
``smoothgrad``
    The mean of ``|gradient|`` over noisy copies of the image (Gaussian noise,
    σ = ``noise_level`` × the input range; inputs are in [0, 1]).
``integrated-gradients``
    ``|integrated gradients|`` from an all-zero baseline (every gene at its
    training minimum) to the image.
``gradcam``
    Grad-CAM on the last convolutional block, upsampled to the image.  It has
    no channel resolution: every channel gets the same map.

Gene saliency (:func:`gene_table`) follows the paper: a gene's saliency is
the saliency at the gene's pixel.  In multi-channel gene layouts each channel
places the gene separately, so a gene takes each channel's value at its own
pixel in that channel and is ranked by the maximum over channels (the channel
is reported).  Because genes can share a pixel (their mean is drawn), the
column ``gene_gradient`` adds the exact gradient with respect to the gene's
own expression through the renderer, ``|A @ grad|`` with ``A`` the layout's
averaging matrix: a gene sharing its pixel with three others gets a quarter
of the pixel's gradient there, once per channel it appears in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import OmicsInputError

SALIENCY_METHODS = ("gradient", "smoothgrad", "integrated-gradients", "gradcam")

_NO_GENE_MAP = ("the published RGB method (rgb-embedding) draws each sample as a blob at its position in a "
                "sample embedding; its pixels are not genes, so no gene mapping exists and saliency cannot "
                "be traced to genes. Use a gene layout (deepinsight, fotomics, rgb-layouts, grid) to rank genes.")


# ================================================================ attribution
def _model_device(model):
    return next(model.parameters()).device


def _targets(model, inputs, target):
    import torch

    if target is None:
        with torch.no_grad():
            return model(inputs).argmax(dim=1)
    target = torch.as_tensor(np.array(target, dtype=np.int64), device=inputs.device)  # a writable copy
    if target.ndim == 0:
        target = target.expand(inputs.shape[0])
    return target


def saliency(model, images, method: str = "gradient", target=None, *, batch_size: int = 32,
             n_samples: int = 20, noise_level: float = 0.15, n_steps: int = 32, seed: int = 0) -> np.ndarray:
    """Non-negative attribution ``(N, C, H, W)`` of each image's target logit.

    ``target``: ``None`` (each image's predicted class, as in the paper), one
    class index for all images, or one per image.  ``n_samples`` and
    ``noise_level`` are SmoothGrad's, ``n_steps`` Integrated Gradients'.
    """
    import torch
    from captum.attr import (
        IntegratedGradients,
        LayerAttribution,
        LayerGradCam,
        NoiseTunnel,
        Saliency,
    )

    from .models import gradcam_layer

    if method not in SALIENCY_METHODS:
        raise OmicsInputError(f"unknown saliency method {method!r}; choose one of {SALIENCY_METHODS}.")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise OmicsInputError(f"expected images (N, C, H, W), got an array of shape {images.shape}.")
    model.eval()
    device = _model_device(model)
    targets_all = None if target is None else np.broadcast_to(np.asarray(target), (len(images),))
    out = np.empty_like(images)
    cuda_ids = [] if device.type != "cuda" else [device.index if device.index is not None
                                                  else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_ids):  # seeding here leaves the caller's RNG state alone
        torch.manual_seed(seed)  # SmoothGrad's noise: same call, same map
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            inputs = torch.as_tensor(images[start:stop], device=device).requires_grad_(True)
            targets = _targets(model, inputs, None if targets_all is None else targets_all[start:stop])
            if method == "gradient":
                attr = Saliency(model).attribute(inputs, target=targets, abs=True)
            elif method == "smoothgrad":
                attr = NoiseTunnel(Saliency(model)).attribute(
                    inputs, nt_type="smoothgrad", nt_samples=int(n_samples), stdevs=float(noise_level),
                    nt_samples_batch_size=min(int(n_samples), 5), target=targets, abs=True)
            elif method == "integrated-gradients":
                attr = IntegratedGradients(model).attribute(
                    inputs, baselines=torch.zeros_like(inputs), target=targets, n_steps=int(n_steps),
                    internal_batch_size=max(int(batch_size), 1)).abs()
            else:
                cam = LayerGradCam(model, gradcam_layer(model)).attribute(inputs, target=targets,
                                                                          relu_attributions=True)
                cam = LayerAttribution.interpolate(cam, tuple(inputs.shape[2:]), interpolate_mode="bilinear")
                attr = cam.clamp_min(0).expand_as(inputs)
            out[start:stop] = attr.detach().float().cpu().numpy()
    return out


def signed_gradient(model, images, target=None, *, batch_size: int = 32) -> np.ndarray:
    """``∂ logit[target] / ∂ input`` with its sign, ``(N, C, H, W)`` (target ``None``: predicted class)."""
    import torch
    from captum.attr import Saliency

    images = np.asarray(images, dtype=np.float32)
    model.eval()
    device = _model_device(model)
    targets_all = None if target is None else np.broadcast_to(np.asarray(target), (len(images),))
    out = np.empty_like(images)
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        inputs = torch.as_tensor(images[start:stop], device=device).requires_grad_(True)
        targets = _targets(model, inputs, None if targets_all is None else targets_all[start:stop])
        out[start:stop] = Saliency(model).attribute(inputs, target=targets, abs=False).detach().cpu().numpy()
    return out


def saliency_map(sal: np.ndarray) -> np.ndarray:
    """The paper's map ``M``: maximum over channels, ``(N, H, W)`` (or ``(H, W)`` for one image)."""
    sal = np.asarray(sal)
    return sal.max(axis=-3)


# ============================================================= gene mapping
def _pixel_map(layout):
    if not getattr(layout, "has_gene_map", False):
        raise OmicsInputError(_NO_GENE_MAP)
    return layout.pixel_map_


def gene_saliency(layout, sal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per gene, the saliency at its pixel, maximised over channels.

    ``sal`` is ``(N, C, H, W)`` or ``(C, H, W)``.  Returns ``(values, channel)``,
    each ``(N, G)`` (or ``(G,)``); genes placed in no channel get NaN and -1.
    """
    pixel_map = _pixel_map(layout)
    sal = np.asarray(sal, dtype=np.float64)
    single = sal.ndim == 3
    if single:
        sal = sal[None]
    expected = (pixel_map.n_channels, *pixel_map.shape)
    if sal.shape[1:] != expected:
        raise OmicsInputError(f"saliency of shape {sal.shape[1:]} does not match the layout's images {expected}.")
    flat = pixel_map.flat  # (C, G) index into C·H·W, -1 where a gene is not drawn
    per_channel = sal.reshape(len(sal), -1)[:, np.maximum(flat, 0)]  # (N, C, G)
    per_channel = np.where(flat[None] >= 0, per_channel, -np.inf)
    channel = per_channel.argmax(axis=1)
    values = per_channel.max(axis=1)
    unplaced = ~np.isfinite(values)
    values[unplaced] = np.nan
    channel[unplaced] = -1
    return (values[0], channel[0]) if single else (values, channel)


def gene_gradient(layout, gradient: np.ndarray) -> np.ndarray:
    """``|A @ grad|``: exact gradient magnitude w.r.t. each gene's expression through the renderer.

    ``gradient`` is the signed input gradient ``(N, C, H, W)`` or ``(C, H, W)``;
    returns ``(N, G)`` or ``(G,)``.
    """
    pixel_map = _pixel_map(layout)
    gradient = np.asarray(gradient, dtype=np.float64)
    single = gradient.ndim == 3
    flat = gradient.reshape(1 if single else len(gradient), -1)
    values = np.abs(np.asarray(pixel_map.averaging_matrix() @ flat.T)).T  # (N, G)
    return values[0] if single else values


def gene_table(layout, sal_chw: np.ndarray, x_sample=None, *, gradient_chw=None,
               gene_gradients=None) -> pd.DataFrame:
    """Genes ranked by saliency for one image (or one class's mean saliency).

    Columns: ``rank``, ``gene``, ``saliency`` (the saliency at the gene's
    pixel, maximum over channels), ``channel``, ``row``, ``col`` (that
    channel's pixel), ``pixel_genes`` (genes sharing the pixel),
    ``expression`` (``x_sample``: the preprocessed value, NaN if not given) and
    ``gene_gradient`` (from ``gradient_chw``, the signed input gradient, or
    precomputed ``gene_gradients``; NaN if neither is given).
    """
    pixel_map = _pixel_map(layout)
    values, channel = gene_saliency(layout, sal_chw)
    genes = pixel_map.genes
    safe_channel = np.maximum(channel, 0)
    rows = pixel_map.gene_pixels[safe_channel, np.arange(len(genes)), 0]
    cols = pixel_map.gene_pixels[safe_channel, np.arange(len(genes)), 1]
    density = pixel_map.density()
    sharing = np.where(channel >= 0, density[safe_channel, np.maximum(rows, 0), np.maximum(cols, 0)], 0)
    if gene_gradients is None:
        gene_gradients = (gene_gradient(layout, gradient_chw) if gradient_chw is not None
                          else np.full(len(genes), np.nan))
    expression = (np.full(len(genes), np.nan) if x_sample is None
                  else np.asarray(x_sample, dtype=np.float64).reshape(-1))
    if expression.shape[0] != len(genes):
        raise OmicsInputError(f"x_sample has {expression.shape[0]} values; the layout has {len(genes)} genes.")
    frame = pd.DataFrame({"gene": genes, "saliency": values, "channel": channel,
                          "row": np.where(channel >= 0, rows, -1), "col": np.where(channel >= 0, cols, -1),
                          "pixel_genes": sharing, "expression": expression,
                          "gene_gradient": np.asarray(gene_gradients, dtype=np.float64)})
    frame = frame.sort_values(["saliency", "gene_gradient"], ascending=False, na_position="last",
                              kind="stable", ignore_index=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame


# ================================================================ explain a set
@dataclass
class Explanation:
    """Saliency of a set of samples under a trained model, per sample and per class."""

    method: str
    samples: np.ndarray
    classes: list[str]
    x: np.ndarray  # (N, G) preprocessed, gene-aligned
    images: np.ndarray  # (N, C, H, W)
    proba: np.ndarray  # (N, K)
    saliency: np.ndarray  # (N, C, H, W), target = predicted class
    gene_gradients: np.ndarray | None  # (N, G) |A @ grad|, None for layouts without genes
    true: np.ndarray | None = None
    #: class → indices of the samples averaged for it
    class_members: dict[str, np.ndarray] = field(default_factory=dict)
    #: how class members were chosen
    grouping: str = ""

    @property
    def predicted(self) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.proba.argmax(1)]

    def class_saliency(self, name: str) -> np.ndarray:
        """Mean saliency ``(C, H, W)`` over the class's members."""
        return self.saliency[self.class_members[name]].mean(axis=0)

    def sample_table(self, layout, index: int) -> pd.DataFrame:
        return gene_table(layout, self.saliency[index], self.x[index],
                          gene_gradients=None if self.gene_gradients is None else self.gene_gradients[index])

    def class_table(self, layout, name: str) -> pd.DataFrame:
        members = self.class_members[name]
        return gene_table(layout, self.class_saliency(name), self.x[members].mean(axis=0),
                          gene_gradients=None if self.gene_gradients is None
                          else self.gene_gradients[members].mean(axis=0))


def explain(trained, adata, method: str = "gradient", label_column: str | None = None, *,
            max_missing_fraction: float | None = None, **options) -> Explanation:
    """Saliency of every sample in ``adata`` for its predicted class, grouped by class.

    With ``label_column`` a class's members are its *correctly predicted*
    samples (the paper's class-level maps); without labels, the samples
    predicted as that class.  Classes with no member are left out (a warning
    says which).  ``options`` go to :func:`saliency`; ``max_missing_fraction``
    to gene alignment (see ``TrainedModel.prepare``).
    """
    from .training import ImageBatches, class_indices, predict_proba

    prepare_options = {} if max_missing_fraction is None else {"max_missing_fraction": max_missing_fraction}
    x, images = trained.prepare(adata, **prepare_options)
    batches = ImageBatches(trained.device, images=images)
    proba = predict_proba(trained.model, batches, mixed_precision=False)
    predicted = proba.argmax(1)
    sal = saliency(trained.model, images, method, target=predicted, **options)
    gene_grads = None
    if trained.layout.has_gene_map:
        gene_grads = gene_gradient(trained.layout, signed_gradient(trained.model, images, target=predicted))
    true = None
    if label_column is not None:
        if label_column not in adata.obs:
            raise OmicsInputError(f"no label column {label_column!r} in the data; available: "
                                  f"{list(adata.obs.columns)}.")
        true = class_indices(adata.obs[label_column].astype(str).to_numpy(), trained.classes)
        grouping = "mean over the class's correctly predicted samples"
        members = {c: np.flatnonzero((true == k) & (predicted == k)) for k, c in enumerate(trained.classes)}
    else:
        grouping = "mean over the samples predicted as the class (no labels given)"
        members = {c: np.flatnonzero(predicted == k) for k, c in enumerate(trained.classes)}
    empty = [c for c, m in members.items() if len(m) == 0]
    if empty:
        warnings.warn(f"no sample for class(es) {empty} ({grouping}); they get no class-level map or table",
                      stacklevel=2)
    members = {c: m for c, m in members.items() if len(m)}
    return Explanation(method=method, samples=np.asarray(adata.obs_names, dtype=str), classes=list(trained.classes),
                       x=x, images=images, proba=proba, saliency=sal, gene_gradients=gene_grads,
                       true=None if true is None else np.asarray(trained.classes, dtype=object)[true],
                       class_members=members, grouping=grouping)


def class_gene_tables(trained, adata, label_column: str | None, method: str = "gradient",
                      **options) -> dict[str, pd.DataFrame]:
    """Ranked gene table per class: saliency averaged over the class's correctly predicted samples."""
    _pixel_map(trained.layout)  # fail before any computation for layouts without genes
    result = explain(trained, adata, method, label_column, **options)
    return {name: result.class_table(trained.layout, name) for name in result.class_members}
