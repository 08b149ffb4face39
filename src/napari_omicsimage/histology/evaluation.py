"""Leave-one-section-out evaluation of slide → expression models.

Each fold holds one section out, picks the target genes (HVGs) on the other
sections, fits the model on their spots and scores the held-out spots: the
Pearson r between predicted and measured expression of each gene (HEST's
metric), with its mean and median over genes.  Beside the model, in the same
folds and on the same genes:

* the **training-mean predictor** (every held-out spot gets the training
  mean): its Pearson r is undefined (constant predictions), so it is compared
  by the mean squared error;
* the **same pipeline on features of a randomly initialised backbone**, so the
  value of pretrained (or hand-crafted) features is visible.

Patch features are computed once per section and feature set, then reused by
every fold.  With ``config.model == "finetune"`` each fold trains a fresh
network on the training sections' patches (read once per section) and
scores it the same way; a cancel during a fold's training leaves that fold out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ..errors import Cancelled, OmicsInputError
from ..progress import ProgressEvent
from .features import FeatureExtractor, PatchFeatures, describe_features
from .finetune import fit_finetuned, section_patches
from .fitting import fit
from .models import HistologyConfig, log_normalised, target_matrix
from .reading import Section
from .tiles import shannon_select


def pearson_per_gene(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Pearson r of each column; NaN where either side is constant (r is undefined there)."""
    p = predicted - predicted.mean(axis=0)
    m = measured - measured.mean(axis=0)
    denominator = np.sqrt((p ** 2).sum(axis=0) * (m ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * m).sum(axis=0) / denominator
    r[~(denominator > 1e-12)] = np.nan
    return r


@dataclass
class HistologyEvaluation:
    """Per-fold, per-gene results and the summaries printed by the CLI."""

    #: one row per (fold, method, gene): held_out, method, gene, pearson, mse
    per_gene: pd.DataFrame
    #: one row per (fold, method): held_out, method, n_spots, mean_r, median_r, mse
    folds: pd.DataFrame
    methods: dict[str, str]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Mean over folds of each method's mean and median r and MSE."""
        table = self.folds.groupby("method", sort=False)[["mean_r", "median_r", "mse"]].mean()
        return table.reindex([m for m in self.methods if m in table.index])

    def best_genes(self, method: str = "model", n: int = 10) -> pd.DataFrame:
        """Genes by mean r over the folds in which they were targets."""
        rows = self.per_gene[self.per_gene["method"] == method]
        table = rows.groupby("gene")["pearson"].agg(["mean", "count"]).sort_values("mean", ascending=False)
        return table.head(n).rename(columns={"mean": "mean_r", "count": "n_folds"})

    def per_gene_table(self, method: str = "model") -> pd.DataFrame:
        """Gene × held-out section Pearson r (NaN where the gene was not a target), with the mean, best first."""
        rows = self.per_gene[self.per_gene["method"] == method]
        table = rows.pivot(index="gene", columns="held_out", values="pearson")
        table.insert(0, "mean_r", table.mean(axis=1))
        return table.sort_values("mean_r", ascending=False)

    def format_table(self, n_best: int = 10, *, per_gene: bool = False) -> str:
        lines = ["leave-one-section-out: Pearson r per gene on the held-out section's spots", ""]
        for key, text in self.methods.items():
            lines.append(f"  {key}: {text}")
        lines.append("")
        folds = self.folds.pivot(index="held_out", columns="method", values="mean_r")
        folds = folds[[m for m in self.methods if m in folds.columns]]
        n_spots = self.folds.groupby("held_out")["n_spots"].first()
        header = f"{'held out':>10} {'spots':>6} " + " ".join(f"{m + ' r':>14}" for m in folds.columns)
        lines += ["mean r over genes, per fold:", header]
        for held_out, row in folds.iterrows():
            lines.append(f"{held_out:>10} {n_spots[held_out]:>6d} "
                         + " ".join(f"{_fmt(v):>14}" for v in row.to_numpy()))
        summary = self.summary()
        lines += ["", f"{'method':>16} {'mean r':>8} {'median r':>9} {'MSE':>8}"]
        for method, row in summary.iterrows():
            lines.append(f"{method:>16} {_fmt(row['mean_r']):>8} {_fmt(row['median_r']):>9} {row['mse']:>8.4f}")
        lines += ["", "best-predicted genes (model, mean r over the folds they were targets in):"]
        best = self.best_genes("model", n_best)
        lines += [f"  {gene:<12} r = {row['mean_r']:.3f} ({int(row['n_folds'])} folds)" for gene, row in best.iterrows()]
        if per_gene:
            table = self.per_gene_table("model")
            lines += ["", "Pearson r per gene (model; blank: not a target in that fold):",
                      f"{'gene':<12} {'mean':>6} " + " ".join(f"{c:>7}" for c in table.columns[1:])]
            for gene, row in table.iterrows():
                cells = " ".join(f"{v:>7.3f}" if np.isfinite(v) else " " * 7 for v in row.to_numpy()[1:])
                lines.append(f"{gene:<12} {row['mean_r']:>6.3f} {cells}")
        if self.notes:
            lines += [""] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(value) -> str:
    return "undefined" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _section_features(extractor: FeatureExtractor, sections, config, progress, cache, key) -> dict:
    out = {}
    for i, section in enumerate(sections):
        ident = (key, section.name)
        if ident not in cache:
            cache[ident] = extractor.section_features(section, patch_um=config.patch_um, progress=progress,
                                                      label=f" ({section.name})")
        out[section.name] = cache[ident]
    return out


def leave_one_section_out(sections: list[Section], config: HistologyConfig | None = None, *,
                          random_backbone: str | None = "resnet50", progress=None,
                          feature_cache: dict | None = None, score_keep_fraction: float | None = None
                          ) -> HistologyEvaluation:
    """Leave each section out once; see the module docstring for what is compared.

    ``random_backbone``: the backbone whose randomly initialised features run
    as the baseline in the same folds (``None`` to skip it).  When the model's
    own features are that backbone with random weights, the baseline is skipped.
    ``feature_cache``: a dict reused between calls (``(key, section) → PatchFeatures``).
    ``score_keep_fraction``: score only this fraction of each held-out
    section's spots with the highest patch entropy (Shannon selection at
    prediction time, ISG's use: predict where there is texture); by default
    every held-out spot is scored.  Training selection is the config's.
    """
    import time

    config = (config or HistologyConfig()).validate()
    if len(sections) < 2:
        raise OmicsInputError("leave-one-section-out needs at least two sections.")
    names = [s.name for s in sections]
    if len(set(names)) != len(names):
        raise OmicsInputError(f"section names repeat ({names}); give each section a distinct folder name.")
    cache = feature_cache if feature_cache is not None else {}
    seconds = {}
    methods = {"model": config.model_description, "training mean": "training-mean predictor"}
    finetune = config.model == "finetune"
    started = time.perf_counter()
    if finetune:
        patches = {}
        for i, section in enumerate(sections):
            ident = (("patches", config.patch_um, config.input_px), section.name)
            if ident not in cache:
                cache[ident] = section_patches(section, config, progress=progress, label=f" ({section.name})",
                                               position=(i, len(sections)))
            patches[section.name] = cache[ident]
        entropy = {name: p.entropy for name, p in patches.items()}
        seconds["patches"] = time.perf_counter() - started
    else:
        main_extractor = FeatureExtractor(config.features, config.weights, device=config.device,
                                          batch_size=config.batch_size, seed=config.seed)
        main = _section_features(main_extractor, sections, config, progress, cache,
                                 (config.features, config.weights))
        entropy = {name: f.entropy for name, f in main.items()}
        seconds["features"] = time.perf_counter() - started
    random_config = None
    random_features: dict[str, PatchFeatures] = {}
    if random_backbone and not (config.features == random_backbone and str(config.weights).lower() == "random"
                                and not finetune):
        random_config = replace(config, model="ridge", features=random_backbone, weights="random")
        started = time.perf_counter()
        extractor = FeatureExtractor(random_backbone, "random", device=config.device,
                                     batch_size=config.batch_size, seed=config.seed)
        random_features = _section_features(extractor, sections, config, progress, cache,
                                            (random_backbone, "random"))
        seconds["random features"] = time.perf_counter() - started
        methods["random " + random_backbone] = f"PCA + ridge on {describe_features(random_backbone, 'random')}"

    expression = {s.name: log_normalised(s) for s in sections}
    gene_rows, fold_rows, notes = [], [], []
    started = time.perf_counter()
    for k, held_out in enumerate(sections):
        train = [s for s in sections if s is not held_out]
        if finetune:
            try:
                model = fit_finetuned(train, config, patches=patches, progress=progress, fold=k,
                                      n_folds=len(sections))
            except Cancelled:
                model = None
            if model is None or model.cancelled:
                notes.append(f"cancelled while training fold {k + 1} of {len(sections)} (held out "
                             f"{held_out.name}); that fold is left out")
                break
        else:
            model = fit(train, config, features=main)
        genes = model.genes
        rows = np.ones(held_out.n_spots, dtype=bool)
        if score_keep_fraction is not None:
            rows = shannon_select(entropy[held_out.name], keep_fraction=score_keep_fraction).keep
        measured = target_matrix(expression[held_out.name], genes)[rows]
        scored = np.isfinite(measured).all(axis=0)
        if not scored.all():
            notes.append(f"{held_out.name}: {int((~scored).sum())} target gene(s) not measured; left out of its score")
        predicted = (model.predict_patches(patches[held_out.name].patches[rows]) if finetune
                     else model.predict_features(main[held_out.name].values[rows]))
        predictions = {"model": predicted, "training mean": np.broadcast_to(model.train_mean, measured.shape)}
        if random_config is not None:
            random_model = fit(train, replace(random_config, genes=genes), features=random_features)
            predictions["random " + random_backbone] = random_model.predict_features(
                random_features[held_out.name].values[rows])
        for method, predicted in predictions.items():
            r = pearson_per_gene(np.asarray(predicted, dtype=np.float64)[:, scored],
                                 measured[:, scored].astype(np.float64))
            mse = ((np.asarray(predicted)[:, scored] - measured[:, scored]) ** 2).mean(axis=0)
            for gene, value, error in zip(np.asarray(genes)[scored], r, mse):
                gene_rows.append({"held_out": held_out.name, "method": method, "gene": gene,
                                  "pearson": float(value), "mse": float(error)})
            fold_rows.append({"held_out": held_out.name, "method": method, "n_spots": int(rows.sum()),
                              "mean_r": float(np.nanmean(r)) if np.isfinite(r).any() else np.nan,
                              "median_r": float(np.nanmedian(r)) if np.isfinite(r).any() else np.nan,
                              "mse": float(mse.mean())})
        notes += [n for n in model.notes if n not in notes]
        event = ProgressEvent("fold", fold=k, n_folds=len(sections),
                              metrics={"mean_r": fold_rows[-len(predictions)]["mean_r"]})
        if progress is not None and progress(event) is True:
            notes.append(f"cancelled after {k + 1} of {len(sections)} folds")
            break
    seconds["folds"] = time.perf_counter() - started
    if not fold_rows:
        raise Cancelled("the evaluation was cancelled before its first fold finished; there is nothing "
                                "to report.")
    notes.append("the training-mean predictor is constant on the held-out spots, so its Pearson r is undefined; "
                 "compare it by MSE")
    return HistologyEvaluation(pd.DataFrame(gene_rows), pd.DataFrame(fold_rows), methods, notes, seconds)
