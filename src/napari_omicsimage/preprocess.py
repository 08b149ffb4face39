"""Preprocessing through scanpy, split so that cross-validation stays honest.

Two kinds of step:

* **per-sample** steps (QC filter on a sample's own counts, ``normalize_total``,
  ``log1p``) look at one sample at a time, so they can run on all data at once;
* **fitted** steps (highly variable gene selection, per-gene scaling to [0, 1])
  learn statistics from samples.  :class:`Preprocessor` fits them on training
  samples only and applies them to any samples (scikit-learn ``fit``/``transform``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from .errors import OmicsInputError
from .io import dense_matrix


#: Non-integer, non-negative values up to this are read as already log-scale (log2 RMA microarrays stay
#: below ~16, log1p-normalised counts below ~10); larger ones as unlogged expression (TPM, FPKM).
LOG_SCALE_MAX = 50


@dataclass
class ScaleDecision:
    """Whether values are taken as already log-scale, and why (always reported to the user)."""

    log_scale: bool
    reason: str

    def describe(self) -> str:
        how = ("already log-scale: not normalised or log-transformed again" if self.log_scale
               else "counts: normalize_total + log1p")
        return f"values read as {how} ({self.reason})"


def decide_scale(adata: ad.AnnData, log_scale: bool | None = None) -> ScaleDecision:
    """How :func:`normalize_samples` will read the values: the user's choice, what the data record,
    or a look at the values.

    Non-negative integers are counts whatever their maximum. Negative values mean transformed data
    (log-ratios, z-scores), also when the rest look like counts — that is said in the reason, since a
    negative entry in a count matrix is more likely an error. Other non-negative values are log-scale up
    to :data:`LOG_SCALE_MAX`, unlogged expression (normalised and logged here) above.
    """
    if log_scale is not None:
        return ScaleDecision(bool(log_scale), "set by the user")
    stored = adata.uns.get("omicsimage", {}).get("log_scale")
    if stored is not None:
        return ScaleDecision(bool(stored), "recorded with the data")
    x = adata.X
    values = np.asarray(x.data if sp.issparse(x) else x)
    if values.size == 0:
        return ScaleDecision(False, "no values")
    lowest, highest = float(values.min()), float(values.max())
    integers = bool(np.all(np.mod(values, 1) == 0))
    if lowest < 0:
        n_negative = int((values < 0).sum())
        if integers:
            return ScaleDecision(True, f"integers like counts, but {n_negative} value(s) are negative "
                                       f"(lowest {lowest:g}), so not counts; if they are counts, fix the "
                                       "negative entries and pass --counts")
        return ScaleDecision(True, f"{n_negative} negative value(s) (lowest {lowest:g}), as in log-ratios "
                                   "or z-scores")
    if integers:
        return ScaleDecision(False, f"non-negative integers up to {highest:g}")
    if highest <= LOG_SCALE_MAX:
        return ScaleDecision(True, f"non-integer values from {lowest:g} to {highest:g}, as in log2 "
                                   "microarray or log-normalised data; pass --counts if they are not")
    return ScaleDecision(False, f"non-integer values up to {highest:g}, as in TPM or FPKM; pass "
                                "--log-scale if they are already log-scale")


def looks_log_scale(adata: ad.AnnData) -> bool:
    """Whether the values look already log-scale (see :func:`decide_scale`, which also says why)."""
    return decide_scale(adata).log_scale


def normalize_samples(
    adata: ad.AnnData,
    *,
    log_scale: bool | None = None,
    target_sum: float | None = 1e4,
    min_genes: int = 0,
) -> ad.AnnData:
    """Per-sample steps: QC filter, ``normalize_total`` and ``log1p`` (returns a copy).

    ``log_scale=None`` detects data that are already log-scale (microarrays,
    pre-normalised matrices) and leaves their values alone; ``True`` forces that,
    ``False`` forces normalisation.  ``min_genes`` drops samples with fewer
    detected genes (scanpy's ``filter_cells``).
    """
    adata = adata.copy()
    decision = decide_scale(adata, log_scale)
    log_scale = decision.log_scale
    if min_genes > 0:
        before = adata.n_obs
        sc.pp.filter_cells(adata, min_genes=min_genes)
        if adata.n_obs == 0:
            raise OmicsInputError(
                f"QC removed all {before} samples (min_genes={min_genes}); lower min_genes."
            )
    if not log_scale:
        x = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
        if x.size and x.min() < 0:
            raise OmicsInputError(
                "the data hold negative values, so they cannot be count data to normalise and "
                "log-transform; mark them as already log-scale (log_scale=True / --log-scale)."
            )
        sc.pp.normalize_total(adata, target_sum=target_sum)
        sc.pp.log1p(adata)
    adata.uns.setdefault("omicsimage", {})["log_scale"] = True
    adata.uns["omicsimage"]["normalized"] = not log_scale
    adata.uns["omicsimage"]["scale"] = decision.describe()
    return adata


@dataclass
class PreprocessConfig:
    """Options of :class:`Preprocessor` (all plain values, so they go into checkpoints)."""

    log_scale: bool | None = None
    target_sum: float | None = 1e4
    #: QC at fit: training samples with fewer detected (non-zero) genes are left out of what is learned
    #: (gene selection, scaling, layout, network); transform keeps every sample, so predictions cover
    #: every input row
    min_genes: int = 0
    n_top_genes: int | None = 2000
    #: minimum fraction of training samples in which a gene must be non-zero
    min_sample_fraction: float = 0.0


def varies(x: np.ndarray) -> np.ndarray:
    """Per column: does it vary beyond float rounding?  (``std > 0`` lets the noise normalisation leaves in a
    constant matrix through, and then blank images train a chance model.)"""
    x = np.asarray(x, dtype=np.float64)
    scale = np.maximum(np.abs(x).max(axis=0, initial=0.0), 1.0)
    return x.std(axis=0) > 1e-5 * scale


def _nothing_varies(raw: np.ndarray, normalized: bool) -> str:
    """Why no gene is left: the input is constant, or per-sample normalisation made it so."""
    from .layouts import min_genes_text

    if not varies(raw).any():
        value = raw.flat[0] if raw.size else "none"
        return (f"every value of the training samples is the same ({value:g}); a constant matrix has nothing "
                "to image or learn: check the input matrix.")
    reason = ""
    if normalized:
        reason = (f" after per-sample normalisation: normalize_total gives every sample the same total, so with "
                  f"{raw.shape[1]} gene(s) {'it is' if raw.shape[1] == 1 else 'they are'} constant although the "
                  "input varies (pass --log-scale if the values are already normalised)")
    return (f"no gene varies across the training samples{reason}; keep more genes. Fewest genes per method: "
            f"{min_genes_text()}.")


class Preprocessor:
    """Fold-safe preprocessing: fit on training samples, transform any samples.

    ``fit`` normalises the training samples (per-sample steps), selects the
    ``n_top_genes`` highly variable genes (scanpy's ``seurat`` dispersion for
    normalised counts, variance for data that came in log-scale) and learns each gene's
    minimum and maximum.  ``transform`` applies the same per-sample steps, keeps
    the selected genes and scales each to [0, 1] with the training range
    (clipped), the input DeepInsight-style layouts expect.

    ``config.min_genes`` is quality control at fit: training samples with fewer
    detected genes are left out of the fit, and ``qc_passed_`` marks which
    samples of the fitting data passed, so callers train the layout and network
    on those only.  ``transform`` never drops a sample: a prediction or image is
    owed for every row given.  ``notes_`` says how the values were read and what
    QC removed.
    """

    def __init__(self, config: PreprocessConfig | None = None, **options):
        self.config = config or PreprocessConfig(**options)

    # scikit-learn style
    def fit(self, adata: ad.AnnData) -> "Preprocessor":
        cfg = self.config
        if adata.n_obs < 2:
            raise OmicsInputError(
                f"fitting needs at least two samples, got {adata.n_obs}; give data with more samples "
                "(predict one sample with a model trained on many)."
            )
        self.qc_passed_ = self._qc_mask(adata)
        passed = int(self.qc_passed_.sum())
        self.notes_ = []
        if passed < adata.n_obs:
            if passed < 2:
                raise OmicsInputError(
                    f"QC (min_genes={cfg.min_genes}) leaves {passed} of {adata.n_obs} training samples; "
                    "fitting needs at least two: lower min_genes."
                )
            self.notes_.append(f"QC: {adata.n_obs - passed} of {adata.n_obs} training samples have fewer than "
                               f"{cfg.min_genes} detected genes and were left out of the fit")
            adata = adata[self.qc_passed_]
        norm = normalize_samples(
            adata, log_scale=cfg.log_scale, target_sum=cfg.target_sum, min_genes=0
        )
        self.notes_.insert(0, norm.uns["omicsimage"]["scale"])
        self.log_scale_ = not norm.uns["omicsimage"]["normalized"]
        x = dense_matrix(norm)
        keep = np.ones(norm.n_vars, dtype=bool)
        if cfg.min_sample_fraction > 0:
            keep &= (x > 0).mean(axis=0) >= cfg.min_sample_fraction
        keep &= varies(x)  # constant genes carry nothing and break dispersion bins
        if not keep.any():
            raise OmicsInputError(_nothing_varies(dense_matrix(adata), norm.uns["omicsimage"]["normalized"]))
        candidates = norm[:, keep].copy()
        if cfg.n_top_genes is not None and cfg.n_top_genes < candidates.n_vars:
            if self.log_scale_:
                # Data that came in log-scale (microarrays, z-scores) are not log1p counts: scanpy's
                # dispersion flavours exponentiate them first and break on negative values. Rank by
                # variance, the usual choice for such data.
                variance = x[:, keep].var(axis=0)
                top = np.argsort(-variance, kind="stable")[: cfg.n_top_genes]
                chosen = candidates.var_names[np.sort(top)]
            else:
                sc.pp.highly_variable_genes(candidates, n_top_genes=cfg.n_top_genes, flavor="seurat")
                chosen = candidates.var_names[candidates.var["highly_variable"].to_numpy()]
        else:
            chosen = candidates.var_names
        # keep the input order of genes: layouts such as "input order" grids rely on it
        order = norm.var_names.get_indexer(chosen)
        self.genes_ = np.asarray(norm.var_names[np.sort(order)], dtype=object)
        xs = x[:, np.sort(order)]
        self.min_ = xs.min(axis=0).astype(np.float32)
        self.max_ = xs.max(axis=0).astype(np.float32)
        return self

    def transform(self, adata: ad.AnnData, *, sparse: bool = False) -> np.ndarray | sp.csr_matrix:
        """Samples × selected genes, float32 in [0, 1].

        ``sparse=True`` returns CSR when the input is sparse and every gene's
        training minimum is ≥ 0 (then a zero scales to 0, so the zeros stay
        implicit): the atlas-scale path (:mod:`napari_omicsimage.streaming`).
        """
        self._check_fitted()
        missing = [g for g in self.genes_ if g not in adata.var_names]
        if missing:
            raise OmicsInputError(
                f"{len(missing)} gene(s) the preprocessor was fitted on are missing, e.g. "
                f"{missing[:5]}; align the genes first (see models.align_genes)."
            )
        norm = normalize_samples(
            adata, log_scale=self.log_scale_, target_sum=self.config.target_sum, min_genes=0
        )
        selected = norm[:, list(self.genes_)]
        span = np.where(self.max_ > self.min_, self.max_ - self.min_, 1.0)
        if sparse and sp.issparse(selected.X) and bool((self.min_ >= 0).all()):
            x = sp.csr_matrix(selected.X, dtype=np.float32)
            x.data = np.clip((x.data - self.min_[x.indices]) / span[x.indices], 0.0, 1.0).astype(np.float32)
            return x
        x = dense_matrix(selected)
        return np.clip((x - self.min_) / span, 0.0, 1.0).astype(np.float32)

    def fit_transform(self, adata: ad.AnnData) -> np.ndarray:
        return self.fit(adata).transform(adata)

    def _qc_mask(self, adata: ad.AnnData) -> np.ndarray:
        """Samples with at least ``min_genes`` detected genes (scanpy's ``filter_cells`` rule)."""
        if self.config.min_genes <= 0:
            return np.ones(adata.n_obs, dtype=bool)
        keep, _ = sc.pp.filter_cells(adata, min_genes=self.config.min_genes, inplace=False)
        return np.asarray(keep, dtype=bool)

    # checkpoints hold plain values only
    def state(self) -> dict:
        self._check_fitted()
        return {
            "config": asdict(self.config),
            "log_scale": bool(self.log_scale_),
            "genes": [str(g) for g in self.genes_],
            "min": self.min_,
            "max": self.max_,
        }

    @classmethod
    def from_state(cls, state: dict) -> "Preprocessor":
        obj = cls(PreprocessConfig(**state["config"]))
        obj.log_scale_ = bool(state["log_scale"])
        obj.genes_ = np.asarray(state["genes"], dtype=object)
        obj.min_ = np.asarray(state["min"], dtype=np.float32)
        obj.max_ = np.asarray(state["max"], dtype=np.float32)
        return obj

    def _check_fitted(self):
        if not hasattr(self, "genes_"):
            raise RuntimeError("Preprocessor is not fitted yet: call fit() on training samples first.")
