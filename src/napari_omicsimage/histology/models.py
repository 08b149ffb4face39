"""Expression targets and the patch-features → expression regressors.

Targets are log1p-normalised expression (scanpy ``normalize_total`` to 10⁴
counts per spot, then ``log1p``) of the top-N highly variable genes of the
*training* sections (default 50, as HEST), or genes the user names.

The default model is the HEST-Benchmark protocol as a scikit-learn
``Pipeline``: standardise the features, PCA to 256 components (fewer when
there are fewer features or spots), ridge regression.  ``reducer=
"incremental-pca"`` swaps in ``IncrementalPCA`` (the dual-modality paper's
choice, for feature matrices too big for memory).  A fitted model saves as
one checkpoint through the project's payload core (atomic, ``weights_only``,
digest-verified): every fitted array is stored as a tensor and the pipeline is
rebuilt from them on loading.

``model="finetune"`` is the other model (ST-Net style, :mod:`.finetune`): one
CNN backbone with a linear head to the target genes, trained end to end on the
patches.  :func:`fit`, :func:`save_model` and :func:`load_model` handle both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import metadata

import anndata as ad
import numpy as np
import pandas as pd

from ..checkpoint import package_versions
from ..errors import CheckpointError, OmicsInputError
from ..progress import ProgressEvent
from .features import BACKBONES, FeatureExtractor, PatchFeatures, describe_features, parse_features
from .reading import Section
from .tiles import DEFAULT_PATCH_UM, shannon_select

FORMAT = "napari-omicsimage-histology-model"
#: 2 added the fine-tuned network head (``config.model == "finetune"``); version-1 files are PCA + ridge
FORMAT_VERSION = 2
#: the scale predictions and targets are on (stated in every output)
EXPRESSION_SCALE = "log1p(normalize_total(counts, target_sum=1e4)): natural log of 1 + counts per 10,000"
TARGET_SUM = 1e4
REDUCERS = ("pca", "incremental-pca")
#: ``ridge``: PCA + ridge on frozen patch features (HEST, the default); ``finetune``: a CNN trained end to end
MODELS = ("ridge", "finetune")
#: the backbone each model uses when ``features`` is not given
DEFAULT_FEATURES = {"ridge": "resnet50", "finetune": "densenet121"}
GENE_SELECTIONS = ("variance", "seurat")
#: a target gene must be detected in at least this share of the training spots
MIN_DETECTED_FRACTION = 0.1


@dataclass
class HistologyConfig:
    """Everything that decides a fitted model (saved in the checkpoint).

    ``model`` picks the regressor (:data:`MODELS`); ``epochs``, ``lr`` and
    ``input_px`` are the fine-tuned head's (ignored by ridge).  ``features``
    ``None`` is the model's default (:data:`DEFAULT_FEATURES`: ResNet-50 for
    ridge, DenseNet-121 as ST-Net for the fine-tuned head).
    """

    features: str | None = None
    #: "imagenet", "random" or a local torchvision weights file (backbone feature sets only)
    weights: str | None = "imagenet"
    patch_um: float = DEFAULT_PATCH_UM
    n_genes: int = 50
    genes: list[str] | None = None
    #: how the n_genes targets are chosen when genes is None (see choose_genes)
    gene_selection: str = "variance"
    n_components: int = 256
    reducer: str = "pca"
    #: ridge penalty; None is HEST's rule, 100 / (n_features × n_genes)
    alpha: float | None = None
    #: Shannon selection of training spots (ISG): a threshold in bits, or a fraction to keep
    min_entropy: float | None = None
    keep_fraction: float | None = None
    device: str = "auto"
    batch_size: int = 32
    seed: int = 0
    model: str = "ridge"
    #: fine-tuned head: passes over the training patches, Adam learning rate, network input side in pixels
    epochs: int = 10
    lr: float = 1e-4
    input_px: int = 224

    def __post_init__(self):
        if self.features is None:
            self.features = DEFAULT_FEATURES.get(self.model, DEFAULT_FEATURES["ridge"])

    def validate(self) -> HistologyConfig:
        if self.model not in MODELS:
            raise OmicsInputError(f"unknown histology model {self.model!r}; choose one of {', '.join(MODELS)}.")
        parts = parse_features(self.features)
        if self.model == "finetune":
            if len(parts) != 1 or parts[0] not in BACKBONES:
                raise OmicsInputError(f"the fine-tuned head trains one CNN backbone end to end; give --features "
                                      f"one of {', '.join(BACKBONES)} (densenet121 as ST-Net), not {self.features!r}.")
            if int(self.epochs) < 1:
                raise OmicsInputError(f"--epochs must be at least 1, got {self.epochs}.")
            if not float(self.lr) > 0:
                raise OmicsInputError(f"the learning rate must be positive, got {self.lr}.")
            if int(self.input_px) < 32:
                raise OmicsInputError(f"--input-px must be at least 32 (the backbones downsample 32-fold), "
                                      f"got {self.input_px}.")
            if int(self.batch_size) < 2:
                raise OmicsInputError("fine-tuning needs a batch size of at least 2 (BatchNorm needs two "
                                      "patches per batch).")
        if self.reducer not in REDUCERS:
            raise OmicsInputError(f"unknown reducer {self.reducer!r}; choose one of {REDUCERS}.")
        if not self.patch_um > 0:
            raise OmicsInputError(f"the patch size must be positive, got {self.patch_um} µm.")
        if self.genes is None and int(self.n_genes) < 1:
            raise OmicsInputError("--n-genes must be at least 1.")
        if self.gene_selection not in GENE_SELECTIONS:
            raise OmicsInputError(f"unknown gene selection {self.gene_selection!r}; choose one of {GENE_SELECTIONS}.")
        if int(self.n_components) < 1:
            raise OmicsInputError("--n-components must be at least 1.")
        if self.alpha is not None and not self.alpha > 0:
            raise OmicsInputError(f"the ridge alpha must be positive, got {self.alpha}.")
        if self.min_entropy is not None and self.keep_fraction is not None:
            raise OmicsInputError("give --min-entropy or --keep-fraction, not both.")
        return self

    @property
    def feature_description(self) -> str:
        return describe_features(self.features, self.weights)

    @property
    def model_description(self) -> str:
        """What the model is, weights included (random initialisation said so), for every output."""
        if self.model == "finetune":
            return (f"{self.feature_description} fine-tuned end to end with a linear head (ST-Net style), "
                    f"{self.epochs} epochs, {self.input_px}-px patches, Adam lr {self.lr:g}")
        return f"PCA + ridge on {self.feature_description}"


# ---------------------------------------------------------------- targets
def log_normalised(section: Section) -> ad.AnnData:
    """The section's expression on :data:`EXPRESSION_SCALE` (dense float32, spots × genes)."""
    import scanpy as sc

    if section.counts is None:
        raise OmicsInputError(f"{section.name} has no measured expression.")
    adata = section.counts.copy()
    if section.counts_scale == "counts":
        sc.pp.normalize_total(adata, target_sum=TARGET_SUM)
        sc.pp.log1p(adata)
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    return ad.AnnData(X=x.astype(np.float32), obs=adata.obs[[]].copy(), var=adata.var[[]].copy())


def choose_genes(train_expression: list[ad.AnnData], *, n_genes: int = 50, genes=None,
                 method: str = "variance") -> list[str]:
    """Named ``genes`` (all must be measured in every training section), or the top ``n_genes`` of the training spots.

    ``method="variance"`` (default, HEST's criterion): genes detected in at
    least 10 % of the training spots, ranked by the variance of their
    log-normalised expression.  ``"seurat"``: scanpy's highly variable genes
    (Seurat's normalised dispersion), which on sparse spot data favours
    rarely detected genes.
    """
    import scanpy as sc

    if method not in GENE_SELECTIONS:
        raise OmicsInputError(f"unknown gene selection {method!r}; choose one of {GENE_SELECTIONS}.")
    common = set(train_expression[0].var_names)
    for adata in train_expression[1:]:
        common &= set(adata.var_names)
    if genes:
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in common]
        if missing:
            raise OmicsInputError(f"{len(missing)} named gene(s) are not measured in every training section, "
                                  f"e.g. {missing[:5]}; check the symbols.")
        return genes
    order = [g for g in train_expression[0].var_names if g in common]
    merged = ad.concat([a[:, order] for a in train_expression], axis=0, join="inner", index_unique="-")
    detected = np.asarray((merged.X > 0).mean(axis=0)).ravel()
    merged = merged[:, detected >= MIN_DETECTED_FRACTION].copy()
    n = min(int(n_genes), merged.n_vars)
    if n < 1:
        raise OmicsInputError(f"no gene is detected in {MIN_DETECTED_FRACTION:.0%} of the training spots; "
                              "name the genes to predict (--genes).")
    if method == "variance":
        variance = np.asarray(merged.X).var(axis=0)
        return [str(g) for g in merged.var_names[np.argsort(-variance, kind="stable")[:n]]]
    sc.pp.highly_variable_genes(merged, n_top_genes=n, flavor="seurat")
    table = merged.var[merged.var["highly_variable"]].sort_values("dispersions_norm", ascending=False)
    return [str(g) for g in table.index[:n]]


def target_matrix(expression: ad.AnnData, genes: list[str]) -> np.ndarray:
    present = pd.Index(expression.var_names).get_indexer(genes)
    y = np.full((expression.n_obs, len(genes)), np.nan, dtype=np.float32)
    ok = present >= 0
    y[:, ok] = np.asarray(expression.X)[:, present[ok]]
    return y


# ----------------------------------------------------------------- model
def make_pipeline(n_features: int, n_samples: int, n_genes: int, config: HistologyConfig):
    """StandardScaler → (Incremental)PCA → Ridge, sized to the data."""
    from sklearn.decomposition import PCA, IncrementalPCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    n_components = int(min(config.n_components, n_features, max(n_samples - 1, 1)))
    reducer = (PCA(n_components=n_components, random_state=config.seed) if config.reducer == "pca"
               else IncrementalPCA(n_components=n_components, batch_size=max(n_components, 256)))
    alpha = config.alpha if config.alpha is not None else 100.0 / (n_features * n_genes)
    return Pipeline([("scale", StandardScaler()), ("reduce", reducer), ("ridge", Ridge(alpha=alpha))])


def fit_regressor(x: np.ndarray, y: np.ndarray, config: HistologyConfig):
    pipeline = make_pipeline(x.shape[1], x.shape[0], y.shape[1], config)
    return pipeline.fit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))


@dataclass(kw_only=True)
class FittedModel:
    """What every fitted slide → expression model carries (PCA + ridge here, the fine-tuned head in .finetune)."""

    config: HistologyConfig
    genes: list[str]
    train_sections: list[str] = field(default_factory=list)
    n_train_spots: int = 0
    #: training mean of each gene (the baseline predictor, and what a measured value is compared with)
    train_mean: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)

    @property
    def scale(self) -> str:
        return EXPRESSION_SCALE


@dataclass(kw_only=True)
class HistologyModel(FittedModel):
    """A fitted PCA + ridge slide → expression model and what it was fitted on."""

    pipeline: object
    feature_names: list[str]

    @property
    def cancelled(self) -> bool:
        return False  # ridge is fitted in one step; only feature extraction can be cancelled (and then no model)

    def extractor(self, *, device=None) -> FeatureExtractor:
        c = self.config
        return FeatureExtractor(c.features, c.weights, device=device or c.device, batch_size=c.batch_size,
                                seed=c.seed)

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        if features.shape[1] != len(self.feature_names):
            raise OmicsInputError(f"features have {features.shape[1]} columns; the model needs "
                                  f"{len(self.feature_names)} ({self.config.features}).")
        return self.pipeline.predict(np.asarray(features, dtype=np.float64)).astype(np.float32)

    def predict(self, section: Section, *, progress=None, device=None, extractor: FeatureExtractor | None = None,
                features: PatchFeatures | None = None) -> ad.AnnData:
        """Predicted expression of every spot of ``section`` as an AnnData (see :func:`predictions_anndata`)."""
        if features is None:
            extractor = extractor or self.extractor(device=device)
            features = extractor.section_features(section, patch_um=self.config.patch_um, progress=progress)
        return predictions_anndata(self, section, self.predict_features(features.values), features.entropy)


def fit_ridge(sections: list[Section], config: HistologyConfig, *, progress=None,
              features: dict[str, PatchFeatures] | None = None, extractor: FeatureExtractor | None = None
              ) -> HistologyModel:
    """Fit the PCA + ridge model on all spots of ``sections`` (after Shannon selection, when asked for).

    ``features`` (section name → :class:`PatchFeatures`) skips extraction;
    evaluation passes them so each section's patches are featurised once.
    """
    features = dict(features or {})
    for i, section in enumerate(sections):
        if section.name not in features:
            extractor = extractor or FeatureExtractor(config.features, config.weights, device=config.device,
                                                      batch_size=config.batch_size, seed=config.seed)
            features[section.name] = extractor.section_features(
                section, patch_um=config.patch_um, progress=progress, label=f" ({section.name})",
                position=(i, len(sections)))
    genes, x, y, notes = training_rows(sections, config, {name: (f.values, f.entropy) for name, f in features.items()})
    pipeline = fit_regressor(x, y, config)
    if progress is not None:
        progress(ProgressEvent("done", metrics={"spots": float(len(x)), "genes": float(len(genes))}))
    return HistologyModel(config=config, genes=genes, pipeline=pipeline,
                          feature_names=list(features[sections[0].name].names),
                          train_sections=[s.name for s in sections], n_train_spots=len(x),
                          train_mean=y.mean(axis=0).astype(np.float32), notes=notes,
                          versions=_versions())


def training_rows(sections: list[Section], config: HistologyConfig, inputs: dict) -> tuple:
    """``(genes, x, y, notes)``: the target genes and the training rows kept by Shannon selection.

    ``inputs``: section name → ``(rows, entropy)``, where ``rows`` are the
    spots' patch features (ridge) or patches (the fine-tuned head).
    """
    expression = [log_normalised(s) for s in sections]
    genes = choose_genes(expression, n_genes=config.n_genes, genes=config.genes, method=config.gene_selection)
    xs, ys, notes = [], [], []
    for section, expr in zip(sections, expression):
        rows, entropy = inputs[section.name]
        selection = shannon_select(entropy, min_entropy=config.min_entropy, keep_fraction=config.keep_fraction)
        if config.min_entropy is not None or config.keep_fraction is not None:
            notes.append(f"{section.name}: {selection.describe()}")
        xs.append(rows[selection.keep])
        ys.append(target_matrix(expr, genes)[selection.keep])
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(x) < 3:
        raise OmicsInputError(f"only {len(x)} training spots are left; relax the Shannon selection.")
    return genes, x, y, notes


# ------------------------------------------------------------ predictions
def predictions_anndata(model, section: Section, predicted: np.ndarray, entropy: np.ndarray) -> ad.AnnData:
    """One row per spot (obs names = spot ids), one column per gene; values on the training scale.

    ``obsm['spatial']`` holds the spot centres in level-0 pixels of the slide;
    ``layers['measured']`` the measured values on the same scale where the
    section has expression (NaN for genes it lacks); ``uns['omicsimage_histology']``
    states the scale, the model, the features (random initialisation said so)
    and the physical scale.
    """
    obs = pd.DataFrame({"entropy": np.asarray(entropy, dtype=np.float32)}, index=section.spots.index.copy())
    adata = ad.AnnData(X=np.asarray(predicted, dtype=np.float32), obs=obs,
                       var=pd.DataFrame(index=pd.Index(model.genes, name="gene")))
    adata.obsm["spatial"] = section.centres.astype(np.float32)
    if section.counts is not None:
        adata.layers["measured"] = target_matrix(log_normalised(section), model.genes)
    adata.uns["omicsimage_histology"] = {
        "scale": EXPRESSION_SCALE,
        "values": "predicted expression (X); measured on the same scale in layers['measured']"
                  if section.counts is not None else "predicted expression (X); no measured expression",
        "features": model.config.feature_description,
        "model": model.config.model_description,
        "section": section.name,
        "slide": str(section.slide.path),
        "kind": section.kind,
        "um_per_px": float(section.um_per_px),
        "spot_diameter_px": float(section.spot_diameter_px),
        "patch_um": float(model.config.patch_um),
        "train_sections": list(model.train_sections),
        "notes": list(section.notes) + list(model.notes),
    }
    return adata


# ------------------------------------------------------------ checkpoints
def _versions() -> dict:
    versions = package_versions()
    try:
        versions["scikit-image"] = metadata.version("scikit-image")
    except metadata.PackageNotFoundError:  # pragma: no cover
        versions["scikit-image"] = "not installed"
    return versions


def _tensor(array):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(array, dtype=np.float64)))


def model_payload(model: HistologyModel) -> dict:
    scale, reduce, ridge = (model.pipeline.named_steps[k] for k in ("scale", "reduce", "ridge"))
    meta = {
        "config": asdict(model.config),
        "genes": list(model.genes),
        "feature_names": list(model.feature_names),
        "train_sections": list(model.train_sections),
        "n_train_spots": int(model.n_train_spots),
        "scale": EXPRESSION_SCALE,
        "features": model.config.feature_description,
        "model": model.config.model_description,
        "alpha": float(ridge.alpha),
        "notes": list(model.notes),
        "versions": model.versions or _versions(),
    }
    return {
        "meta": json.dumps(meta),
        "scaler_mean": _tensor(scale.mean_), "scaler_scale": _tensor(scale.scale_),
        "pca_mean": _tensor(reduce.mean_), "pca_components": _tensor(reduce.components_),
        "pca_explained_variance": _tensor(reduce.explained_variance_),
        "ridge_coef": _tensor(ridge.coef_), "ridge_intercept": _tensor(np.atleast_1d(ridge.intercept_)),
        "train_mean": _tensor(model.train_mean if model.train_mean is not None else np.zeros(len(model.genes))),
    }


def ridge_from_payload(payload: dict, meta: dict, config: HistologyConfig, path) -> HistologyModel:
    """The PCA + ridge model rebuilt from the arrays :func:`model_payload` stored."""
    import torch

    try:
        arrays = {k: v.numpy() for k, v in payload.items() if isinstance(v, torch.Tensor)}
        n_features = len(meta["feature_names"])
        pipeline = make_pipeline(n_features, arrays["pca_components"].shape[0] + 1, len(meta["genes"]), config)
        scale, reduce, ridge = (pipeline.named_steps[k] for k in ("scale", "reduce", "ridge"))
        scale.mean_, scale.scale_ = arrays["scaler_mean"], arrays["scaler_scale"]
        scale.var_ = scale.scale_ ** 2
        scale.n_features_in_ = n_features
        reduce.mean_, reduce.components_ = arrays["pca_mean"], arrays["pca_components"]
        reduce.explained_variance_ = arrays["pca_explained_variance"]
        reduce.n_components_ = reduce.components_.shape[0]
        reduce.n_features_in_ = n_features
        reduce.whiten = False
        ridge.coef_ = arrays["ridge_coef"]
        intercept = arrays["ridge_intercept"]
        ridge.intercept_ = intercept if intercept.size > 1 else float(intercept[0])
        ridge.n_features_in_ = reduce.n_components_
        ridge.alpha = meta["alpha"]
        if ridge.coef_.shape != (len(meta["genes"]), reduce.n_components_):
            raise CheckpointError(f"{path}: stored arrays do not fit together; the file is damaged.")
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a complete histology model ({type(exc).__name__}: {exc}).") from exc
    return HistologyModel(config=config, genes=meta["genes"], pipeline=pipeline,
                          feature_names=meta["feature_names"], train_sections=meta["train_sections"],
                          n_train_spots=meta["n_train_spots"], train_mean=arrays["train_mean"].astype(np.float32),
                          notes=meta["notes"], versions=meta["versions"])
