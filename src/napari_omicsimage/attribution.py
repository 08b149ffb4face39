"""Attribution on genes: through the renderer, back to each gene's expression.

The renderer is linear (``images = X @ A``, a torch sparse product), so the
network is a differentiable function of the preprocessed gene vector.
:class:`RenderedNetwork` is that function, ``expression (N, G) → render →
network → logits``; captum's attribution methods run on it directly and give
one signed value per gene.  Genes sharing a pixel get their own values (their
expression differs even though their gradient is the same), and a gene drawn in
several channels gets one value (the chain rule sums its channels).

Methods (:data:`GENE_METHODS`); every value is signed, positive = towards the
target class, negative = against it:

``integrated-gradients``
    Integrated Gradients (Sundararajan et al. 2017) along the straight path
    from a baseline profile to the sample (Gauss–Legendre quadrature,
    ``n_steps`` points).  *Completeness*: a sample's attributions sum to
    ``logit(x) − logit(baseline)``; samples that miss it by more than 1 %
    (:data:`COMPLETENESS_TOLERANCE`; a ReLU network's kinks along the path
    can fall between quadrature points) get their path split at the kinks
    until they meet it, or are named as failures (:func:`_complete`).  The baseline is a stated choice
    (:data:`BASELINES`): ``"mean"`` (default) is the training samples' mean
    preprocessed profile (``TrainedModel.fill_values``), so a gene scores by how
    its deviation from the average sample moves the logit; ``"zeros"`` is every
    gene at its training minimum (the network's "nothing expressed" image); an
    array is any profile of your own.
``gradient``
    ``∂ logit / ∂ expression`` (signed).  Pixel-mates in a one-channel layout
    get exactly the same gradient, so this cannot tell them apart.
``gradient-x-input``
    gradient × preprocessed expression (captum ``InputXGradient``).
``smoothgrad``
    mean signed gradient over ``n_samples`` noisy copies of the gene vector
    (Gaussian, σ = ``noise_level``; preprocessed values lie in [0, 1]).
``gradient-shap``
    GradientSHAP (captum ``GradientShap``): expected gradients × (x − reference)
    over ``n_samples`` references drawn from ``baseline`` (an array of training
    profiles ``(M, G)``, or one profile: ``"mean"`` / ``"zeros"`` / ``(G,)``)
    with Gaussian noise σ = ``noise_level`` on the inputs.

The *contrastive* score attributes the class's logit minus the mean of the
other classes' logits (a linear combination of the logits, so computed with the
same method on a wrapped forward, :func:`contrast_logits`): evidence for the
class *against the others* rather than for its raw logit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import Cancelled, OmicsInputError
from .layouts import NO_GENE_MAP
from .progress import ProgressEvent

#: Gene attribution methods; the first is the default everywhere genes are ranked.
GENE_METHODS = ("integrated-gradients", "gradient", "gradient-x-input", "smoothgrad", "gradient-shap")
DEFAULT_GENE_METHOD = GENE_METHODS[0]
#: Named baselines (Integrated Gradients' start point; GradientSHAP's reference)
BASELINES = ("mean", "zeros")
DEFAULT_BASELINE = "mean"
#: Integrated Gradients' quadrature points per sample to start with; samples whose attributions miss
#: completeness by more than COMPLETENESS_TOLERANCE (relative) get their path split where it misses (_complete)
DEFAULT_STEPS = 32
COMPLETENESS_TOLERANCE = 0.01
#: below a logit change of this size the tolerance is absolute (0.01 logit): a relative error of a
#: change near 0 measures float rounding, not the integral
COMPLETENESS_SCALE = 1.0
#: at most this many × n_steps network points per sample go into refining its path; a sample still
#: incomplete then is named (GeneAttribution.incomplete_samples, explain.json), never hidden
MAX_REFINED_POINTS = 64

#: rows (sample × step) per network call in Integrated Gradients: bounds memory for large images
_IG_ROWS = 512

_BASELINE_WORDS = {
    "mean": "the training samples' mean preprocessed profile",
    "zeros": "every gene at its training minimum (preprocessed value 0)",
    "custom": "a profile given by the caller",
    "profiles": "reference profiles given by the caller",
}


def contrast_logits(logits):
    """Each class's logit minus the mean of the other classes' logits, ``(N, K)``.

    ``c_k = l_k − (Σ_j l_j − l_k) / (K − 1) = (K·l_k − Σ_j l_j) / (K − 1)``.
    """
    k = logits.shape[1]
    return (k * logits - logits.sum(dim=1, keepdim=True)) / (k - 1)


def _torch_module_base():
    import torch

    return torch.nn.Module


class RenderedNetwork(_torch_module_base()):
    """``expression (N, G) → layout render → network → logits`` as one differentiable module.

    The render is the layout's own torch sparse product
    (:meth:`~napari_omicsimage.render.PixelMap.render` with ``device``), which
    autograd differentiates w.r.t. the expression; empty pixels take the
    layout's constant fill value.  ``contrast=True`` returns
    :func:`contrast_logits` instead of the logits.  The network is put in
    eval mode (BatchNorm uses its running statistics, dropout is off), which
    attribution needs: otherwise a sample's output would depend on its batch.
    """

    def __init__(self, layout, network, *, contrast: bool = False):
        if not getattr(layout, "has_gene_map", False):
            raise OmicsInputError(NO_GENE_MAP)
        super().__init__()
        self.network = network.eval()
        self.layout = layout
        self.contrast = bool(contrast)

    def render(self, x):
        return self.layout.transform(x, device=x.device)

    def forward(self, x):
        logits = self.network(self.render(x))
        return contrast_logits(logits) if self.contrast else logits


@dataclass
class GeneAttribution:
    """Signed per-gene attributions of a set of samples (see :func:`gene_attributions`)."""

    method: str
    genes: np.ndarray  # (G,)
    #: ``(N, G)`` signed attribution of each sample's target logit
    values: np.ndarray
    #: ``(N,)`` class index each sample was explained for
    target: np.ndarray
    #: ``"mean"``, ``"zeros"``, ``"custom"`` (one profile) or ``"profiles"`` (GradientSHAP references)
    baseline: str
    #: ``(G,)`` the baseline profile (for reference sets: their mean); None for gradient-only methods
    baseline_values: np.ndarray | None
    #: ``(N, G)`` signed attribution of the target's contrast (logit minus the others' mean), if computed
    contrastive: np.ndarray | None = None
    #: ``(N,)`` target logit at the sample and at the baseline (completeness: values.sum(1) ≈ their difference)
    target_output: np.ndarray | None = None
    baseline_output: np.ndarray | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_baseline(self) -> bool:
        return self.method in ("integrated-gradients", "gradient-shap")

    def completeness_error(self) -> np.ndarray | None:
        """Per sample ``|Σ attributions − Δ| / max(|Δ|, 1)`` with ``Δ = logit(x) − logit(baseline)``.

        Completeness says Integrated Gradients' attributions sum to ``Δ``; this
        is the relative gap (absolute, in logits, where ``|Δ| < 1``;
        :data:`COMPLETENESS_SCALE`).  ``None`` for the other methods.
        """
        if self.method != "integrated-gradients" or self.target_output is None:
            return None
        change = self.target_output - self.baseline_output
        return _completeness_gap(self.values, change)

    def incomplete_samples(self) -> np.ndarray:
        """Indices of the samples whose attributions still miss completeness by more than
        :data:`COMPLETENESS_TOLERANCE` after their path was refined (empty for the other methods)."""
        errors = self.completeness_error()
        return np.zeros(0, dtype=np.int64) if errors is None else np.flatnonzero(errors > COMPLETENESS_TOLERANCE)

    def class_mean(self, members) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean signed attribution (and contrastive score) over the samples ``members``, each ``(G,)``."""
        members = np.asarray(members, dtype=np.int64)
        mean = self.values[members].mean(axis=0)
        contrastive = None if self.contrastive is None else self.contrastive[members].mean(axis=0)
        return mean, contrastive

    def describe(self) -> dict:
        """What was computed, for explain.json and widget captions (JSON-safe)."""
        summary = {"method": self.method, "sign": "positive = towards the explained class, negative = against",
                   **{k: v for k, v in self.options.items()}}
        if self.uses_baseline:
            summary["baseline"] = self.baseline
            summary["baseline_description"] = _BASELINE_WORDS.get(self.baseline, self.baseline)
        errors = self.completeness_error()
        if errors is not None and len(errors):
            summary["completeness_max_relative_error"] = float(np.max(errors))
            summary["completeness_median_relative_error"] = float(np.median(errors))
            summary["completeness_error"] = ("|sum of a sample's attributions - (logit(x) - logit(baseline))| / "
                                             f"max(|logit(x) - logit(baseline)|, {COMPLETENESS_SCALE:g})")
            summary["completeness_tolerance"] = COMPLETENESS_TOLERANCE
            summary["completeness_failures"] = [int(i) for i in self.incomplete_samples()]
        summary["contrastive"] = ("attribution of the class's logit minus the mean of the other classes' logits"
                                  if self.contrastive is not None else None)
        return summary


def merge_attributions(parts: list[GeneAttribution]) -> GeneAttribution:
    """One :class:`GeneAttribution` from chunks of samples computed with the same settings (in order)."""
    if not parts:
        raise OmicsInputError("no attribution to merge.")
    first = parts[0]

    def stacked(name):
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    options = dict(first.options)
    if "max_steps_used" in options:
        options["max_steps_used"] = max(int(p.options.get("max_steps_used", 0)) for p in parts)
    return GeneAttribution(method=first.method, genes=first.genes, values=stacked("values"),
                           target=stacked("target"), baseline=first.baseline, baseline_values=first.baseline_values,
                           contrastive=stacked("contrastive"), target_output=stacked("target_output"),
                           baseline_output=stacked("baseline_output"), options=options)


def _resolve_baseline(trained, baseline, n_genes: int, method: str) -> tuple[str, np.ndarray]:
    """``(kind, array)``: ``(G,)`` for one profile, ``(M, G)`` for a GradientSHAP reference set."""
    if isinstance(baseline, str):
        if baseline == "mean":
            fill = getattr(trained, "fill_values", None)
            if fill is None:
                raise OmicsInputError("this model keeps no training mean profile (an old checkpoint); "
                                      "use baseline='zeros' or pass a profile.")
            values = np.asarray(fill, dtype=np.float32)
        elif baseline == "zeros":
            values = np.zeros(n_genes, dtype=np.float32)
        else:
            raise OmicsInputError(f"unknown baseline {baseline!r}; choose one of {BASELINES} or pass an array.")
        kind = baseline
    else:
        values = np.asarray(baseline, dtype=np.float32)
        kind = "custom" if values.ndim == 1 else "profiles"
    if values.ndim not in (1, 2) or values.shape[-1] != n_genes:
        raise OmicsInputError(f"the baseline has shape {values.shape}; it needs one value per gene ({n_genes}), "
                              "or (profiles, genes) for gradient-shap.")
    if values.ndim == 2 and method != "gradient-shap":
        if len(values) != 1:
            raise OmicsInputError(f"{method} takes one baseline profile (G,); a reference set "
                                  f"{values.shape} is for gradient-shap.")
        values = values[0]
    if not np.isfinite(values).all():
        raise OmicsInputError("the baseline holds NaN or infinite values.")
    return kind, values


def _targets(forward, inputs, target, start: int, stop: int):
    import torch

    if target is None:
        with torch.no_grad():
            return forward(inputs).argmax(dim=1)
    return torch.as_tensor(np.array(target[start:stop], dtype=np.int64), device=inputs.device)


def gene_attributions(trained, x, method: str = DEFAULT_GENE_METHOD, target=None, *,
                      baseline="mean", n_steps: int = DEFAULT_STEPS, n_samples: int = 20,
                      noise_level: float = 0.1, batch_size: int = 32, seed: int = 0,
                      contrastive: bool = False, progress=None) -> GeneAttribution:
    """Signed attribution of every gene of every sample, ``(N, G)``, through the renderer.

    ``trained`` is a :class:`~napari_omicsimage.training.TrainedModel` (or any
    object with ``model``, ``layout`` and ``fill_values``); ``x`` the
    preprocessed, gene-aligned matrix (``trained.prepare_matrix(adata)``).
    ``target``: ``None`` (each sample's predicted class), one class index, or
    one per sample.  ``baseline``: see the module docstring.  ``n_steps`` is
    Integrated Gradients'; ``n_samples`` and ``noise_level`` are SmoothGrad's and
    GradientSHAP's.  ``contrastive=True`` also attributes the target's contrast
    (its logit minus the mean of the other logits) into ``.contrastive``, at
    twice the cost.  ``progress(ProgressEvent)`` hears each batch; returning
    ``True`` stops with :class:`Cancelled`.
    """
    import torch

    if method not in GENE_METHODS:
        raise OmicsInputError(f"unknown gene attribution method {method!r}; choose one of {GENE_METHODS}.")
    layout = trained.layout
    if not getattr(layout, "has_gene_map", False):
        raise OmicsInputError(NO_GENE_MAP)
    x = np.asarray(x, dtype=np.float32)
    n_genes = layout.pixel_map_.n_genes
    if x.ndim != 2 or x.shape[1] != n_genes:
        raise OmicsInputError(f"expression matrix of shape {x.shape}; the model's layout has {n_genes} genes.")
    if int(n_steps) < 2 or int(n_samples) < 1 or int(batch_size) < 1 or not float(noise_level) >= 0:
        raise OmicsInputError("n_steps must be ≥ 2, n_samples and batch_size ≥ 1, noise_level ≥ 0.")
    uses_baseline = method in ("integrated-gradients", "gradient-shap")
    kind, base = _resolve_baseline(trained, baseline, n_genes, method) if uses_baseline else ("", None)
    if target is not None:
        target = np.broadcast_to(np.asarray(target, dtype=np.int64), (len(x),))
    model = trained.model
    was_training = model.training
    forwards = {"values": RenderedNetwork(layout, model)}
    if contrastive:
        forwards["contrastive"] = RenderedNetwork(layout, model, contrast=True)
    device = next(model.parameters()).device
    out = {name: np.empty_like(x) for name in forwards}
    targets = np.empty(len(x), dtype=np.int64)
    steps = {name: np.full(len(x), int(n_steps), dtype=np.int64) for name in forwards}
    target_output = np.empty(len(x), dtype=np.float64)
    baseline_output = np.empty(len(x), dtype=np.float64)
    n_batches = max(1, -(-len(x) // int(batch_size)))
    cuda_ids = [] if device.type != "cuda" else [device.index if device.index is not None
                                                  else torch.cuda.current_device()]
    base_t = None if base is None else torch.as_tensor(base, device=device)
    numpy_state = np.random.get_state()  # captum's GradientShap draws references and path points with numpy
    try:
        with torch.random.fork_rng(devices=cuda_ids):  # seeding here leaves the caller's RNG state alone
            torch.manual_seed(int(seed))
            for b, start in enumerate(range(0, len(x), int(batch_size))):
                stop = min(start + int(batch_size), len(x))
                inputs = torch.as_tensor(x[start:stop], device=device)
                batch_target = _targets(forwards["values"], inputs, target, start, stop)
                targets[start:stop] = batch_target.cpu().numpy()
                for name, forward in forwards.items():
                    # the same noise and references for the plain and the contrastive attribution
                    torch.manual_seed(int(seed) + b)
                    np.random.seed((int(seed) + b) % 2**32)
                    values = _attribute(method, forward, inputs, batch_target, base_t, n_steps=int(n_steps),
                                        n_samples=int(n_samples), noise_level=float(noise_level))
                    if method == "integrated-gradients":
                        values, used = _complete(forward, inputs, batch_target, base_t, values, int(n_steps))
                        steps[name][start:stop] = used
                    out[name][start:stop] = values
                with torch.no_grad():
                    target_output[start:stop] = _output(forwards["values"], inputs, batch_target)
                    if base_t is not None:
                        reference = base_t if base_t.ndim == 1 else base_t.mean(dim=0)
                        baseline_output[start:stop] = _output(forwards["values"], reference.expand_as(inputs),
                                                              batch_target)
                if progress is not None and progress(ProgressEvent("batch", batch=b, n_batches=n_batches)) is True:
                    raise Cancelled("gene attribution cancelled")
    finally:
        np.random.set_state(numpy_state)
        model.train(was_training)
    options = {"n_steps": int(n_steps)} if method == "integrated-gradients" else {}
    if method in ("smoothgrad", "gradient-shap"):
        options.update(n_samples=int(n_samples), noise_level=float(noise_level), seed=int(seed))
    if method == "integrated-gradients":
        options["integration"] = "gausslegendre"
        options["max_steps_used"] = int(max(int(v.max()) for v in steps.values())) if len(x) else int(n_steps)
    return GeneAttribution(
        method=method, genes=np.asarray(layout.pixel_map_.genes, dtype=object), values=out["values"],
        target=targets, baseline=kind if uses_baseline else "",
        baseline_values=None if base is None else (base if base.ndim == 1 else base.mean(axis=0)),
        contrastive=out.get("contrastive"), target_output=target_output,
        baseline_output=baseline_output if base is not None else None, options=options)


def _completeness_gap(values: np.ndarray, change: np.ndarray) -> np.ndarray:
    gap = np.abs(values.astype(np.float64).sum(axis=1) - change)
    return gap / np.maximum(np.abs(change), COMPLETENESS_SCALE)


def _output(forward, inputs, target) -> np.ndarray:
    return forward(inputs).gather(1, target[:, None])[:, 0].double().cpu().numpy()


def _complete(forward, inputs, target, baseline, values, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Make Integrated Gradients complete: refine the samples whose attributions miss completeness
    by more than half of :data:`COMPLETENESS_TOLERANCE` by splitting their path.

    A ReLU network is piecewise linear along the straight path, so its gradient is piecewise constant
    and a quadrature rule is exact on every piece without a kink.  Each sample's path is cut into
    segments; every segment carries its own completeness residual (its attributions' sum against the
    logit change across it, both known exactly), so the segments holding the kinks are found and
    halved, each half integrated again with ``n_steps`` points, until the whole path is complete or
    :data:`MAX_REFINED_POINTS` × ``n_steps`` points were spent on the sample.  Returns the values and
    the points used per sample; samples still above the tolerance are named by
    :meth:`GeneAttribution.incomplete_samples`.
    """
    import torch

    with torch.no_grad():
        change = _output(forward, inputs, target) - _output(forward, baseline.expand_as(inputs), target)
    used = np.full(len(inputs), n_steps, dtype=np.int64)
    redo = np.flatnonzero(_completeness_gap(values, change) > COMPLETENESS_TOLERANCE / 2)
    if len(redo) == 0:
        return values, used
    start = baseline.expand_as(inputs)[torch.as_tensor(redo, device=inputs.device)]
    direction = inputs[torch.as_tensor(redo, device=inputs.device)] - start
    # one row per segment: which sample (position in redo), its path interval, attributions, residual
    owner = np.arange(len(redo))
    t0, t1 = np.zeros(len(redo)), np.ones(len(redo))
    seg_values = values[redo].astype(np.float64)
    seg_residual = seg_values.sum(axis=1) - change[redo]
    open_ = np.ones(len(redo), dtype=bool)  # samples of redo still above half the tolerance
    budget = MAX_REFINED_POINTS * n_steps
    while open_.any():
        # halve, in every open sample, the segments carrying at least half of its largest residual
        worst = np.zeros(len(redo))
        np.maximum.at(worst, owner, np.abs(seg_residual))
        split = open_[owner] & (np.abs(seg_residual) >= 0.5 * worst[owner])
        cost = np.bincount(owner[split], minlength=len(redo)) * 2 * n_steps
        split &= (used[redo] + cost <= budget)[owner]
        if not split.any():
            break
        keep = ~split
        mid = (t0[split] + t1[split]) / 2
        new_owner = np.repeat(owner[split], 2)
        new_t0 = np.stack([t0[split], mid], axis=1).ravel()
        new_t1 = np.stack([mid, t1[split]], axis=1).ravel()
        rows = torch.as_tensor(new_owner, device=inputs.device)
        lo = torch.as_tensor(new_t0, dtype=inputs.dtype, device=inputs.device)[:, None]
        hi = torch.as_tensor(new_t1, dtype=inputs.dtype, device=inputs.device)[:, None]
        a, b = start[rows] + lo * direction[rows], start[rows] + hi * direction[rows]
        seg_target = target[torch.as_tensor(redo[new_owner], device=inputs.device)]
        new_values = _attribute("integrated-gradients", forward, b, seg_target, a, n_steps=n_steps,
                                n_samples=1, noise_level=0.0).astype(np.float64)
        with torch.no_grad():
            across = _output(forward, b, seg_target) - _output(forward, a, seg_target)
        used[redo] += np.bincount(new_owner, minlength=len(redo)) * n_steps
        owner = np.concatenate([owner[keep], new_owner])
        t0, t1 = np.concatenate([t0[keep], new_t0]), np.concatenate([t1[keep], new_t1])
        seg_values = np.concatenate([seg_values[keep], new_values])
        seg_residual = np.concatenate([seg_residual[keep], new_values.sum(axis=1) - across])
        total = np.zeros((len(redo), values.shape[1]))
        np.add.at(total, owner, seg_values)
        values[redo] = total.astype(values.dtype)
        open_ = _completeness_gap(values[redo], change[redo]) > COMPLETENESS_TOLERANCE / 2
    return values, used


def _attribute(method, forward, inputs, target, baseline, *, n_steps, n_samples, noise_level) -> np.ndarray:
    from captum.attr import GradientShap, InputXGradient, IntegratedGradients, NoiseTunnel, Saliency

    inputs = inputs.detach().clone().requires_grad_(True)
    if method == "integrated-gradients":
        attr = IntegratedGradients(forward).attribute(
            inputs, baselines=baseline.expand_as(inputs), target=target, n_steps=n_steps,
            method="gausslegendre", internal_batch_size=_IG_ROWS)
    elif method == "gradient":
        attr = Saliency(forward).attribute(inputs, target=target, abs=False)
    elif method == "gradient-x-input":
        attr = InputXGradient(forward).attribute(inputs, target=target)
    elif method == "smoothgrad":
        attr = NoiseTunnel(Saliency(forward)).attribute(
            inputs, nt_type="smoothgrad", nt_samples=n_samples, stdevs=noise_level,
            nt_samples_batch_size=min(n_samples, 8), target=target, abs=False)
    else:
        references = baseline[None] if baseline.ndim == 1 else baseline
        attr = GradientShap(forward).attribute(inputs, baselines=references, n_samples=n_samples,
                                               stdevs=noise_level, target=target)
    return attr.detach().float().cpu().numpy()
