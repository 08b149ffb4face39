"""Explanations: which genes drove each prediction, and the paper's pixel saliency beside them.

Genes are ranked by **gene attribution** (:mod:`napari_omicsimage.attribution`):
attribution through the renderer onto each gene's own expression, signed
(positive = towards the class), ranked by magnitude.  Integrated Gradients from
the training samples' mean profile is the default (:data:`~napari_omicsimage.attribution.GENE_METHODS`).
Genes sharing a pixel get their own values.

The seed paper's **pixel saliency** stays available as maps and as a column
(``pixel_saliency``) beside the attribution.  Its methods (:data:`SALIENCY_METHODS`,
computed with captum on the images):

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

A gene's pixel saliency follows the paper: the saliency at the gene's pixel.
In multi-channel gene layouts each channel places the gene separately, so a
gene takes each channel's value at its own pixel in that channel and the
maximum over channels (the channel is reported).  All genes of a pixel share
its value: pixel saliency cannot tell pixel-mates apart, gene attribution can.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .attribution import DEFAULT_GENE_METHOD, GENE_METHODS, gene_attributions
from .errors import OmicsInputError
from .layouts import NO_GENE_MAP
from .models import gradcam_layer
from .outputs import NpyRows
from .training import ImageBatches, class_indices, predict_proba

SALIENCY_METHODS = ("gradient", "smoothgrad", "integrated-gradients", "gradcam")

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
        for start in range(0, len(images), batch_size):
            # SmoothGrad's noise, seeded per batch (as gene attribution's): the same call gives the same map,
            # and explaining in blocks (seed + the block's first batch) gives the noise of one call
            torch.manual_seed(seed + start // batch_size)
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
        raise OmicsInputError(NO_GENE_MAP)
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


#: columns of every ranked gene table (explain, widgets, CLI); ``rank`` 1 = most important
GENE_TABLE_COLUMNS = ["rank", "gene", "attribution", "contrastive", "pixel_saliency", "channel", "row", "col",
                      "pixel_genes", "expression"]


def gene_table(layout, sal_chw=None, x_sample=None, *, attribution=None, contrastive=None) -> pd.DataFrame:
    """Genes ranked by ``|attribution|`` (sign kept) for one sample or one class.

    ``attribution`` (``(G,)``, signed; :func:`~napari_omicsimage.attribution.gene_attributions`
    or a class mean of it) ranks the genes; without it they are ranked by pixel
    saliency, the paper's way.  Columns (:data:`GENE_TABLE_COLUMNS`): ``rank``,
    ``gene``, ``attribution``, ``contrastive`` (the class's logit against the
    mean of the others; NaN if not given), ``pixel_saliency`` (``sal_chw`` at
    the gene's pixel, maximum over channels; NaN without a map), ``channel``,
    ``row``, ``col`` (that channel's pixel; the first channel drawing the gene
    without a map), ``pixel_genes`` (genes sharing the pixel) and
    ``expression`` (``x_sample``: the preprocessed value).
    """
    columns = _ranked_genes(layout, None if sal_chw is None else np.asarray(sal_chw)[None],
                            *(None if a is None else np.asarray(a).reshape(1, -1)
                              for a in (attribution, contrastive, x_sample)))
    return pd.DataFrame({name: values[0] for name, values in columns.items()})[GENE_TABLE_COLUMNS]


def _ranked_genes(layout, sal, attribution, contrastive, expression, top: int | None = None
                  ) -> dict[str, np.ndarray]:
    """:func:`gene_table`'s columns for ``n`` samples at once, each ``(n, genes or top)``, ranked per sample.

    ``sal`` is ``(n, C, H, W)`` or None; the others ``(n, G)`` or None.
    """
    pixel_map = _pixel_map(layout)
    genes = np.asarray(pixel_map.genes, dtype=object)
    n = next((len(a) for a in (sal, attribution, contrastive, expression) if a is not None), 1)
    shape = (pixel_map.n_channels, *pixel_map.shape)
    values, channel = gene_saliency(layout, np.zeros((n, *shape)) if sal is None else sal)
    if sal is None:
        values = np.where(channel >= 0, np.nan, values)
    safe_channel = np.maximum(channel, 0)
    rows = pixel_map.gene_pixels[safe_channel, np.arange(len(genes))[None], 0]
    cols = pixel_map.gene_pixels[safe_channel, np.arange(len(genes))[None], 1]
    density = pixel_map.density()
    sharing = np.where(channel >= 0, density[safe_channel, np.maximum(rows, 0), np.maximum(cols, 0)], 0)
    columns = {}
    for name, given in (("attribution", attribution), ("contrastive", contrastive), ("expression", expression)):
        column = np.full((n, len(genes)), np.nan) if given is None else np.asarray(given, dtype=np.float64)
        if column.shape[1] != len(genes):
            raise OmicsInputError(f"{name} has {column.shape[1]} values; the layout has {len(genes)} genes.")
        columns[name] = column
    key = np.abs(columns["attribution"]) if attribution is not None else values
    order = np.lexsort((-np.where(np.isnan(values), -np.inf, values), -np.where(np.isnan(key), -np.inf, key)),
                       axis=-1)
    if top is not None:
        order = order[:, :top]
    ranked = {"rank": np.broadcast_to(np.arange(1, order.shape[1] + 1), order.shape), "gene": genes[order]}
    for name, column in (("attribution", columns["attribution"]), ("contrastive", columns["contrastive"]),
                         ("pixel_saliency", values), ("channel", channel),
                         ("row", np.where(channel >= 0, rows, -1)), ("col", np.where(channel >= 0, cols, -1)),
                         ("pixel_genes", sharing), ("expression", columns["expression"])):
        ranked[name] = np.take_along_axis(column, order, axis=1)
    return ranked


def sample_top_genes(result, layout, top: int = 50, *, chunk: int = 128) -> pd.DataFrame:
    """Each sample's ``top`` genes as ranked by :meth:`Explanation.sample_table`, all samples in one table
    (``sample``, ``predicted``, then :data:`GENE_TABLE_COLUMNS`), computed ``chunk`` samples at a time."""
    if result.attribution is None:
        raise OmicsInputError(NO_GENE_MAP)
    contrastive = result.attribution.contrastive
    parts = []
    for start in range(0, len(result.samples), chunk):
        part = slice(start, start + chunk)
        ranked = _ranked_genes(layout, result.saliency[part], result.attribution.values[part],
                               None if contrastive is None else contrastive[part], result.x[part], top=top)
        k = ranked["rank"].shape[1]
        frame = pd.DataFrame({"sample": np.repeat(np.asarray(result.samples[part]), k),
                              "predicted": np.repeat(result.predicted[part], k),
                              **{name: ranked[name].ravel() for name in GENE_TABLE_COLUMNS}})
        parts.append(frame)
    columns = ["sample", "predicted", *GENE_TABLE_COLUMNS]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


# ================================================================ explain a set
@dataclass
class Explanation:
    """Gene attribution and pixel saliency of a set of samples, per sample and per class."""

    #: gene attribution method (napari_omicsimage.attribution.GENE_METHODS)
    method: str
    #: pixel saliency method (SALIENCY_METHODS)
    pixel_method: str
    samples: np.ndarray
    classes: list[str]
    x: np.ndarray  # (N, G) preprocessed, gene-aligned
    images: np.ndarray  # (N, C, H, W)
    proba: np.ndarray  # (N, K)
    saliency: np.ndarray  # (N, C, H, W) pixel saliency, target = predicted class
    #: signed gene attribution (target = predicted class, with contrastive scores); None without a gene map
    attribution: Any = None
    true: np.ndarray | None = None
    #: class → indices of the samples averaged for it
    class_members: dict[str, np.ndarray] = field(default_factory=dict)
    #: how class members were chosen
    grouping: str = ""

    @property
    def predicted(self) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.proba.argmax(1)]

    def class_saliency(self, name: str) -> np.ndarray:
        """Mean pixel saliency ``(C, H, W)`` over the class's members."""
        return self.saliency[self.class_members[name]].mean(axis=0)

    def class_attribution(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean signed gene attribution and contrastive score ``(G,)`` over the class's members."""
        if self.attribution is None:
            raise OmicsInputError(NO_GENE_MAP)
        return self.attribution.class_mean(self.class_members[name])

    def sample_table(self, layout, index: int) -> pd.DataFrame:
        """Genes ranked for one sample (explained for its predicted class)."""
        if self.attribution is None:
            raise OmicsInputError(NO_GENE_MAP)
        contrastive = self.attribution.contrastive
        return gene_table(layout, self.saliency[index], self.x[index], attribution=self.attribution.values[index],
                          contrastive=None if contrastive is None else contrastive[index])

    def class_table(self, layout, name: str) -> pd.DataFrame:
        """Genes ranked by the class's mean signed attribution over its members."""
        attribution, contrastive = self.class_attribution(name)
        members = self.class_members[name]
        return gene_table(layout, self.class_saliency(name), self.x[members].mean(axis=0),
                          attribution=attribution, contrastive=contrastive)


def explain(trained, adata, method: str | None = None, label_column: str | None = None, *,
            pixel_method: str = "gradient", baseline="mean", contrastive: bool = True,
            max_missing_fraction: float | None = None, progress=None, **options) -> Explanation:
    """Gene attribution and pixel saliency of every sample in ``adata`` for its predicted class.

    ``method`` is the gene attribution method (default
    :data:`~napari_omicsimage.attribution.DEFAULT_GENE_METHOD`), ``baseline`` its
    baseline (see :func:`~napari_omicsimage.attribution.gene_attributions`);
    contrastive scores are computed too unless ``contrastive=False`` (half the cost).  ``pixel_method`` is the paper's
    pixel saliency (:data:`SALIENCY_METHODS`).  Layouts without genes (the
    published RGB method) get pixel saliency only.

    With ``label_column`` a class's members are its *correctly predicted*
    samples (the paper's class-level maps); without labels, the samples
    predicted as that class.  Classes with no member are left out (a warning
    says which).  ``options`` (``n_steps``, ``n_samples``, ``noise_level``,
    ``batch_size``, ``seed``) go to both computations; ``max_missing_fraction``
    to gene alignment (see ``TrainedModel.prepare``); ``progress`` hears the
    gene attribution's batches.
    """
    method = DEFAULT_GENE_METHOD if method is None else method
    if method not in GENE_METHODS:
        raise OmicsInputError(f"unknown gene attribution method {method!r}; choose one of {GENE_METHODS} "
                              f"(pixel saliency methods {SALIENCY_METHODS} go to pixel_method).")
    if pixel_method not in SALIENCY_METHODS:
        raise OmicsInputError(f"unknown pixel saliency method {pixel_method!r}; choose one of {SALIENCY_METHODS}.")
    if label_column is not None and label_column not in adata.obs:
        raise OmicsInputError(f"no label column {label_column!r} in the data; available: "
                              f"{list(adata.obs.columns)}.")
    prepare_options = {} if max_missing_fraction is None else {"max_missing_fraction": max_missing_fraction}
    x, images = trained.prepare(adata, **prepare_options)
    batches = ImageBatches(trained.device, images=images)
    proba = predict_proba(trained.model, batches, mixed_precision=False)
    predicted = proba.argmax(1)
    sal = saliency(trained.model, images, pixel_method, target=predicted, **options)
    attribution = None
    if trained.layout.has_gene_map:
        attribution = gene_attributions(trained, x, method, target=predicted, baseline=baseline, contrastive=contrastive,
                                        progress=progress, **options)
    true = None
    if label_column is not None:
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
    return Explanation(method=method, pixel_method=pixel_method, samples=np.asarray(adata.obs_names, dtype=str),
                       classes=list(trained.classes), x=x, images=images, proba=proba, saliency=sal,
                       attribution=attribution,
                       true=None if true is None else np.asarray(trained.classes, dtype=object)[true],
                       class_members=members, grouping=grouping)


def class_gene_tables(trained, adata, label_column: str | None, method: str | None = None,
                      **options) -> dict[str, pd.DataFrame]:
    """Ranked gene table per class: mean signed gene attribution over the class's correctly predicted samples."""
    _pixel_map(trained.layout)  # fail before any computation for layouts without genes
    result = explain(trained, adata, method, label_column, **options)
    return {name: result.class_table(trained.layout, name) for name in result.class_members}


def _file_stem(name: str, taken: set) -> str:
    """A file-name-safe, unique version of a class name."""
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "class"
    candidate, n = stem, 2
    while candidate in taken:
        candidate, n = f"{stem}_{n}", n + 1
    taken.add(candidate)
    return candidate


def write_explanation(result: Explanation, layout, folder, *, top_genes: int = 50,
                      n_missing_genes: int = 0, selection: dict | None = None) -> dict:
    """Write an explanation's files into ``folder`` (an empty folder the caller owns); returns the summary.

    Files: ``genes_<class>.csv`` (every gene ranked by the class's mean signed
    attribution, :data:`GENE_TABLE_COLUMNS`), ``sample_top_genes.csv``,
    ``samples.csv``, ``gene_attribution.npy`` / ``gene_contrastive.npy`` (N, G),
    ``baseline.npy`` (the attribution baseline, G), the pixel saliency maps
    ``saliency.npy`` / ``saliency_max.npy`` / ``class_saliency.npy`` and
    ``explain.json`` describing them all.  ``selection`` (which samples were
    explained, when not all) goes into ``explain.json``.  The files are those
    of :class:`ExplanationWriter` given the whole explanation as one block.
    """
    writer = ExplanationWriter(folder, layout, n_samples=len(result.samples), top_genes=top_genes)
    writer.add(result)
    return writer.finish(n_missing_genes=n_missing_genes, selection=selection)


class ExplanationWriter:
    """The files of :func:`write_explanation`, written from blocks of samples as they are explained.

    Per-sample files (``saliency.npy``, ``gene_attribution.npy``, ``samples.csv``,
    ``sample_top_genes.csv`` ...) get each block's rows appended; the class
    tables and maps come from running per-class sums (float64) of the
    members' attribution, contrastive score, saliency and expression, so the
    memory is one block, however many samples are explained.  ``n_samples``
    (the total over all blocks) sizes the ``.npy`` files up front.
    """

    def __init__(self, folder, layout, *, n_samples: int, top_genes: int = 50):
        from pathlib import Path

        _pixel_map(layout)
        self.folder, self.layout, self.n_samples, self.top_genes = Path(folder), layout, int(n_samples), top_genes
        self.arrays: dict[str, NpyRows] = {}
        self.sums: dict[str, dict[str, np.ndarray]] = {}
        self.counts: dict[str, int] = {}
        self.first: Explanation | None = None
        self.gaps: list[np.ndarray] = []
        self.max_steps_used = 0
        self.incomplete: list[str] = []
        self.files: dict[str, str] = {}

    def _open(self, result: Explanation) -> None:
        attribution = result.attribution
        n, (c, h, w) = self.n_samples, result.saliency.shape[1:]
        g = attribution.values.shape[1]
        self.arrays = {"saliency.npy": NpyRows(self.folder / "saliency.npy", (n, c, h, w)),
                       "saliency_max.npy": NpyRows(self.folder / "saliency_max.npy", (n, h, w)),
                       "gene_attribution.npy": NpyRows(self.folder / "gene_attribution.npy", (n, g))}
        self.files["gene_attribution.npy"] = (f"signed {attribution.method} attribution per sample and gene (N, G), "
                                              "target = predicted class; genes as in the gene tables' model order")
        if attribution.contrastive is not None:
            self.arrays["gene_contrastive.npy"] = NpyRows(self.folder / "gene_contrastive.npy", (n, g))
            self.files["gene_contrastive.npy"] = ("contrastive attribution (N, G): predicted class's logit minus "
                                                  "the others' mean")
        if attribution.baseline_values is not None:
            np.save(self.folder / "baseline.npy", attribution.baseline_values.astype(np.float32))
            self.files["baseline.npy"] = (f"attribution baseline (G,): "
                                          f"{attribution.describe().get('baseline_description')}")
        self.samples_csv = open(self.folder / "samples.csv", "w", newline="")
        self.top_csv = open(self.folder / "sample_top_genes.csv", "w", newline="")

    def add(self, result: Explanation) -> None:
        """Append a block of explained samples (in the order they should appear in the files)."""
        if result.attribution is None:
            raise OmicsInputError(NO_GENE_MAP)
        header = self.first is None
        if header:
            self.first = result
            self._open(result)
        attribution = result.attribution
        self.arrays["saliency.npy"].append(result.saliency)
        self.arrays["saliency_max.npy"].append(result.saliency.max(axis=1))
        self.arrays["gene_attribution.npy"].append(attribution.values)
        if "gene_contrastive.npy" in self.arrays:
            self.arrays["gene_contrastive.npy"].append(attribution.contrastive)
        samples = pd.DataFrame({"sample": result.samples})
        if result.true is not None:
            samples["true"] = result.true
        samples["predicted"] = result.predicted
        for k, name in enumerate(result.classes):
            samples[f"prob_{name}"] = result.proba[:, k]
        samples.to_csv(self.samples_csv, index=False, header=header)
        sample_top_genes(result, self.layout, self.top_genes).to_csv(self.top_csv, index=False, header=header)
        for name, members in result.class_members.items():
            sums = self.sums.setdefault(name, {})
            parts = {"attribution": attribution.values, "contrastive": attribution.contrastive,
                     "saliency": result.saliency, "expression": result.x}
            for key, values in parts.items():
                if values is not None:
                    total = np.asarray(values[members], dtype=np.float64).sum(axis=0)
                    sums[key] = sums[key] + total if key in sums else total
            self.counts[name] = self.counts.get(name, 0) + len(members)
        gaps = attribution.completeness_error()
        if gaps is not None:
            self.gaps.append(gaps)
            self.incomplete.extend(str(result.samples[i]) for i in attribution.incomplete_samples())
        self.max_steps_used = max(self.max_steps_used, int(attribution.options.get("max_steps_used", 0)))

    def class_table(self, name: str) -> pd.DataFrame:
        """Genes ranked by the class's mean signed attribution over its members so far."""
        sums, n = self.sums[name], self.counts[name]
        contrastive = sums.get("contrastive")
        return gene_table(self.layout, sums["saliency"] / n, sums["expression"] / n,
                          attribution=sums["attribution"] / n,
                          contrastive=None if contrastive is None else contrastive / n)

    def _attribution_summary(self) -> dict:
        summary = self.first.attribution.describe()
        if self.gaps:
            gaps = np.concatenate(self.gaps)
            summary["completeness_max_relative_error"] = float(np.max(gaps))
            summary["completeness_median_relative_error"] = float(np.median(gaps))
            # by sample name: the samples whose attributions miss completeness even after refinement
            summary["completeness_failures"] = list(self.incomplete)
        if "max_steps_used" in summary:
            summary["max_steps_used"] = self.max_steps_used
        return summary

    def finish(self, *, n_missing_genes: int = 0, selection: dict | None = None) -> dict:
        """Close the per-sample files, write the class tables, maps and ``explain.json``; returns the summary."""
        import json

        if self.first is None:
            raise OmicsInputError("no sample was explained; nothing to write.")
        for array in self.arrays.values():
            array.close()
        self.samples_csv.close()
        self.top_csv.close()
        result, layout = self.first, self.layout
        self.tables, stems, taken, class_maps = {}, {}, set(), []
        members = [name for name in result.classes if self.counts.get(name, 0)]
        for name in members:
            stems[name] = f"genes_{_file_stem(name, taken)}.csv"
            self.tables[name] = self.class_table(name)
            self.tables[name].to_csv(self.folder / stems[name], index=False)
            class_maps.append(self.sums[name]["saliency"] / self.counts[name])
        if class_maps:
            np.save(self.folder / "class_saliency.npy", np.stack(class_maps).astype(np.float32))
        summary = {"method": result.method, "pixel_method": result.pixel_method,
                   "attribution": self._attribution_summary(), "grouping": result.grouping,
                   "ranking": "genes ranked by |mean signed attribution| over the class's members (rank 1 = most "
                              "important); pixel_saliency is the paper's saliency at the gene's pixel",
                   "classes": [{"class": name, "n_samples": self.counts[name], "gene_table": stems[name],
                                "class_saliency_index": i} for i, name in enumerate(members)],
                   "classes_without_samples": [c for c in result.classes if c not in members],
                   "n_samples": self.n_samples, "n_missing_genes": int(n_missing_genes),
                   "saliency_shape": list(self.arrays["saliency.npy"].shape), "layout": layout.describe(),
                   "files": {**self.files,
                             "saliency.npy": f"per-sample {result.pixel_method} pixel saliency (N, C, H, W), "
                                             "target = predicted class",
                             "saliency_max.npy": "the paper's map M: maximum over channels (N, H, W)",
                             "class_saliency.npy": "per-class mean pixel saliency (classes as listed, C, H, W)",
                             "samples.csv": "predictions per sample",
                             "sample_top_genes.csv": f"top {self.top_genes} genes per sample",
                             "genes_<class>.csv": "all genes ranked per class"}}
        if selection is not None:
            summary["selection"] = selection
        (self.folder / "explain.json").write_text(json.dumps(summary, indent=2))
        self.summary = summary
        return summary
