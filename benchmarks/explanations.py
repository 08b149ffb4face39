"""Explanation benchmark: are the gene rankings faithful, stable and biological, against the pixel map and peers?

Same data sets, layout and folds as the accuracy benchmark (`accuracy.DATASETS`, `accuracy.layout_spec`,
`accuracy.n_folds`, `evaluation.stratified_folds`): per fold, a small CNN is trained on the training samples
(`training.train`, the recommended protocol) and explained on held-out samples.

* **Faithfulness** — deletion and insertion curves.  For each explained held-out sample and each ranking of
  its genes, the top-k genes are set to the baseline (the training mean profile, IG's default baseline) —
  deletion — or, starting from the baseline profile, only the top-k genes take the sample's values —
  insertion; the predicted class's probability is recorded at k on a grid over 0…100 and its area under the
  curve (k scaled to [0, 1]) reported: deletion lower is better, insertion higher.  Rankings, all on the same
  model: the paper's pixel saliency at each gene's pixel (ties broken at random), gene gradient,
  gradient × input, Integrated Gradients (by magnitude and by signed value), SmoothGrad, GradientSHAP
  (`attribution.gene_attributions`), pyDeepInsight's `CAMFeatureSelector` (genes ordered by their pixel's
  class Grad-CAM, ties at random; its 0.6 threshold gives the gene set) and random genes.  A one-sided paired
  Wilcoxon test over samples: gene IG (and the best gene method) against pixel saliency.
* **Stability** — each class's top-20 genes (mean signed attribution over the class's correctly predicted
  samples of a fixed reference set) from every fold's model, and from fold 1 trained with 3 seeds: mean
  pairwise Jaccard overlap.
* **Biology** — PBMC: overlap of each cell type's top-20 with scanpy `rank_genes_groups` (Wilcoxon, the fold's
  training cells) top-20; medulloblastoma: the rank of known subgroup markers in their subgroup's ranking.
* **Peer** — DeepMapper (`pydeepmapper`): its small CNN on its one-gene-per-pixel permuted image of the same
  preprocessed genes, trained on the same folds, explained with its Integrated Gradients
  (`pydeepmapper.attribution.feature_importances`).
* **Speed** (``--speed``) — seconds for gene IG (32 steps) against pixel IG on the same model.

    python benchmarks/explanations.py --quick      # smoke run: srbct, 2 folds, 4 samples per fold
    python benchmarks/explanations.py              # default: srbct, medulloblastoma, pbmc; 5 folds (ALL: --datasets)
    python benchmarks/explanations.py --speed      # the speed table only (1,000 PBMC samples)

Writes CSVs to ``--out-dir`` (per-sample AUCs, curves, stability, biology, accuracy), prints Markdown tables
and, with ``--plot``, draws the mean deletion and insertion curves.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (puts ../src on sys.path)

from napari_omicsimage.attribution import RenderedNetwork, gene_attributions  # noqa: E402
from napari_omicsimage.evaluation import stratified_folds  # noqa: E402
from napari_omicsimage.explain import gene_saliency, saliency  # noqa: E402
from napari_omicsimage.preprocess import PreprocessConfig  # noqa: E402
from napari_omicsimage.training import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: k at which the curves are sampled (a grid over 1…100 genes; 0 is the unchanged sample / the baseline)
K_GRID = np.array([0, 1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 70, 100])
TOP = 20
#: faithfulness rankings on our model; "ig-signed" ranks by the signed value (towards the class first)
RANKINGS = ("pixel-saliency", "gradient", "gradient-x-input", "integrated-gradients", "ig-signed", "smoothgrad",
            "gradient-shap", "cam-feature-selector", "random")
GENE_RANKINGS = ("gradient", "gradient-x-input", "integrated-gradients", "ig-signed", "smoothgrad", "gradient-shap")
#: rankings whose class top-20 are compared across folds and seeds (the others cost too much on 2 cores)
STABILITY_METHODS = ("pixel-saliency", "gradient", "gradient-x-input", "integrated-gradients")
MEDULLO_MARKERS = {"WNT": ("WIF1", "DKK1"), "SHH": ("ATOH1", "SFRP1"), "Group3": ("NPR3", "GABRA5"),
                   "Group4": ("EOMES", "KCNA1")}


@dataclass
class Settings:
    datasets: list
    layout: str = "deepinsight-tsne"
    size: int = 32
    folds: int = 5
    samples_per_fold: int = 12
    reference: int = 30
    seeds: int = 3
    epochs: int = 20
    n_top_genes: int = 2000
    noise_samples: int = 10
    peer: bool = True
    seed: int = 0
    k_grid: np.ndarray = field(default_factory=lambda: K_GRID.copy())


# ------------------------------------------------------------------ rankings
def _order(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Genes by descending score, ties broken at random: ``(N, G)`` → ``(N, G)`` gene indices."""
    scores = np.atleast_2d(scores)
    jitter = rng.random(scores.shape)
    return np.stack([np.lexsort((j, -s)) for s, j in zip(scores, jitter)])


def pixel_saliency(trained, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The paper's gene saliency: |∂ logit / ∂ pixel| at each gene's pixel (max over channels), ``(N, G)``."""
    import torch

    images = trained.layout.transform(torch.as_tensor(x), device="cpu")
    sal = saliency(trained.model, images, "gradient", target=target)
    return gene_saliency(trained.layout, sal)[0]


class _Coords:
    """The one thing CAMFeatureSelector reads from pyDeepInsight's ImageTransformer: gene (row, col)."""

    def __init__(self, layout):
        self._coords = layout.pixel_map_.gene_pixels[0]

    def coords(self):
        return self._coords


def cam_class_maps(trained, x_train: np.ndarray, y_train: np.ndarray, max_samples: int, rng) -> dict:
    """pyDeepInsight's CAMFeatureSelector: per class, the mean Grad-CAM over its training images, and the gene
    set whose pixels pass its 0.6 threshold."""
    import torch
    from pyDeepInsight import CAMFeatureSelector

    keep = np.sort(rng.choice(len(x_train), min(max_samples, len(x_train)), replace=False))
    images = trained.layout.transform(torch.as_tensor(x_train[keep]), device="cpu")
    selector = CAMFeatureSelector(trained.model, _Coords(trained.layout), target_layer=trained.model.features,
                                  cam_method="GradCAM")
    cams = selector.calculate_class_activations(images, torch.as_tensor(y_train[keep]), batch_size=64)
    sets = selector.select_class_features(cams, threshold=0.6)
    return {int(c): cam for c, cam in cams.items()}, {int(c): s for c, s in sets.items()}


def rankings_for(trained, x: np.ndarray, target: np.ndarray, cams: dict | None, rng, settings: Settings,
                 timings: dict) -> dict[str, np.ndarray]:
    """Every ranking of every sample's genes, ``name → (N, G)`` gene indices (most important first)."""
    out = {}
    start = time.perf_counter()
    out["pixel-saliency"] = _order(pixel_saliency(trained, x, target), rng)
    timings["pixel-saliency"] = timings.get("pixel-saliency", 0) + time.perf_counter() - start
    for method in ("gradient", "gradient-x-input", "integrated-gradients", "smoothgrad", "gradient-shap"):
        start = time.perf_counter()
        values = gene_attributions(trained, x, method, target, n_samples=settings.noise_samples).values
        timings[method] = timings.get(method, 0) + time.perf_counter() - start
        out[method] = _order(np.abs(values), rng)
        if method == "integrated-gradients":
            out["ig-signed"] = _order(values, rng)
    if cams is not None:
        pixels = trained.layout.pixel_map_.gene_pixels[0]
        out["cam-feature-selector"] = _order(np.stack([cams[t][pixels[:, 0], pixels[:, 1]] for t in target]), rng)
    out["random"] = np.stack([rng.permutation(x.shape[1]) for _ in range(len(x))])
    return out


# -------------------------------------------------------------- faithfulness
def curves(forward_proba, x: np.ndarray, target: np.ndarray, order: np.ndarray, baseline: np.ndarray,
           k_grid: np.ndarray, *, insertion: bool) -> np.ndarray:
    """Probability of each sample's target class as its top-k genes are deleted (set to the baseline) or
    inserted (into the baseline profile): ``(N, len(k_grid))``."""
    n, g = x.shape
    rows = np.empty((n, len(k_grid), g), dtype=np.float32)
    for i in range(n):
        start, source = (baseline, x[i]) if insertion else (x[i], baseline)
        for j, k in enumerate(k_grid):
            row = start.copy()
            genes = order[i, :k]
            row[genes] = source[genes]
            rows[i, j] = row
    proba = forward_proba(rows.reshape(n * len(k_grid), g)).reshape(n, len(k_grid), -1)
    return proba[np.arange(n), :, target]


def faithfulness(where: dict, sample_ids, ranking: str, forward_proba, x, target, order, baseline, k_grid,
                 sample_rows: list, curve_rows: list) -> None:
    """Deletion and insertion curves of one ranking: a row per sample (AUC, and the probability before any
    gene moved, ``p_start``) and a row of mean curves."""
    for kind in ("deletion", "insertion"):
        curve = curves(forward_proba, x, target, order, baseline, k_grid, insertion=kind == "insertion")
        for i, value in enumerate(auc(curve, k_grid)):
            sample_rows.append({**where, "sample": int(sample_ids[i]), "ranking": ranking, "curve": kind,
                                "auc": float(value), "p_start": float(curve[i, 0])})
        curve_rows.append({**where, "ranking": ranking, "curve": kind,
                           **{f"k{k}": float(v) for k, v in zip(k_grid, curve.mean(0))}})


def auc(curve: np.ndarray, k_grid: np.ndarray) -> np.ndarray:
    """Area under probability-vs-k, k scaled to [0, 1] (trapezoids over the grid)."""
    return np.trapezoid(curve, k_grid / k_grid[-1], axis=-1)


def ours_proba(trained):
    import torch

    network = RenderedNetwork(trained.layout, trained.model)

    def forward(rows: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(rows), 512):
                out.append(torch.softmax(network(torch.as_tensor(rows[start:start + 512])), 1).numpy())
        return np.concatenate(out)

    return forward


# --------------------------------------------------------------- class tops
def class_tops(scores: np.ndarray, predicted: np.ndarray, true: np.ndarray, genes) -> dict[int, set]:
    """Each class's top-20 gene *names* (each fold selects its own highly variable genes, so indices differ
    between folds): highest mean score over the class's correctly predicted samples."""
    genes = np.asarray([str(g) for g in genes], dtype=object)
    tops = {}
    for c in np.unique(true):
        members = (predicted == c) & (true == c)
        if members.any():
            mean = scores[members].mean(axis=0)
            tops[int(c)] = set(genes[np.argsort(-mean, kind="stable")[:TOP]])
    return tops


def reference_scores(trained, x: np.ndarray, target: np.ndarray, rng) -> dict[str, np.ndarray]:
    """Per-sample scores (higher = more for the class) of the stability methods on the reference set."""
    out = {"pixel-saliency": pixel_saliency(trained, x, target) + 1e-9 * rng.random(x.shape)}  # ties at random
    for method in STABILITY_METHODS[1:]:
        out[method] = gene_attributions(trained, x, method, target).values
    return out


def mean_jaccard(tops_per_model: list[dict[int, set]]) -> float:
    values = [len(a[c] & b[c]) / len(a[c] | b[c])
              for a, b in itertools.combinations(tops_per_model, 2) for c in a if c in b]
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------- DeepMapper
class DeepMapperModel:
    """DeepMapper's pieces on our folds: a seeded permutation lays one gene per pixel, its ``cnn_small`` learns,
    its IG explains.  Training: its Adam 1e-3 and 20 epochs, but our protocol's batch of 16 — its own batch of 64
    gives one optimiser step per epoch on these 40–60 training samples (20 steps in all, near chance) — and no
    early-stopping split."""

    def __init__(self, x_train, y_train, n_classes: int, seed: int, epochs: int = 20, batch_size: int = 16):
        import torch
        from pydeepmapper.backbones import build
        from pydeepmapper.config import BackboneSpec
        from pydeepmapper.transform import permutation

        self.n_genes = x_train.shape[1]
        self.perm = permutation(seed, self.n_genes)
        torch.manual_seed(seed)
        self.model = build(BackboneSpec(kind="cnn_small"), n_classes, self.n_genes)
        images = self.images(x_train)
        labels = torch.as_tensor(y_train, dtype=torch.int64)
        optimiser = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(seed)
        self.model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(images), generator=generator).split(batch_size):
                optimiser.zero_grad()
                loss_fn(self.model(images[batch]), labels[batch]).backward()
                optimiser.step()
        self.model.eval()

    def images(self, x):
        import torch
        from pydeepmapper.transform import to_images

        return torch.as_tensor(np.transpose(to_images(x, perm=self.perm), (0, 3, 1, 2)).copy())

    def proba(self, rows: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return np.concatenate([torch.softmax(self.model(self.images(rows[s:s + 512])), 1).numpy()
                                   for s in range(0, len(rows), 512)])

    def importances(self, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Its per-sample |IG| (zero baseline, 32 steps) projected back to genes, ``(N, G)``."""
        import torch
        from pydeepmapper.attribution import feature_importances

        images = self.images(x)
        targets = torch.as_tensor(target, dtype=torch.int64)
        return np.stack([feature_importances(self.model, images[i:i + 1], targets[i:i + 1], "integrated_gradients",
                                             self.perm, self.n_genes) for i in range(len(x))])


def deepmapper_available() -> str | None:
    """None when pydeepmapper imports, else why not."""
    try:
        import pydeepmapper.attribution  # noqa: F401
        import pydeepmapper.backbones  # noqa: F401
    except ImportError as exc:
        return f"pydeepmapper cannot be imported: {exc}"
    return None


# ------------------------------------------------------------------ one set
def _stratified_subset(labels: np.ndarray, n: int, rng) -> np.ndarray:
    """Up to ``n`` indices, classes in proportion (at least one each), sorted."""
    if len(labels) <= n:
        return np.arange(len(labels))
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = max(1, int(round(n * len(idx) / len(labels))))
        chosen.extend(rng.choice(idx, min(take, len(idx)), replace=False))
    return np.sort(np.asarray(chosen[:max(n, len(np.unique(labels)))]))


def pbmc_markers(x_train: np.ndarray, genes, labels_train: np.ndarray, classes: list) -> dict[int, set]:
    """scanpy rank_genes_groups (Wilcoxon) top-20 per cell type, on the fold's training cells."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(x_train.astype(np.float32), obs=pd.DataFrame({"type": pd.Categorical(labels_train)}))
    adata.var_names = [str(g) for g in genes]
    sc.tl.rank_genes_groups(adata, "type", method="wilcoxon", n_genes=TOP)
    names = pd.DataFrame(adata.uns["rank_genes_groups"]["names"])
    return {classes.index(c): {str(g) for g in names[c]} for c in names.columns}


def run_dataset(key: str, settings: Settings, log=print) -> dict[str, pd.DataFrame]:
    dataset = accuracy.DATASETS[key]
    adata = dataset.load()
    name = key
    labels = adata.obs[dataset.label_column].astype(str).to_numpy()
    k = accuracy.n_folds(adata, dataset, settings.folds)
    splits = stratified_folds(labels, k, settings.seed)
    spec, _ = accuracy.layout_spec(settings.layout, settings.size)
    rng = np.random.default_rng(settings.seed)
    reference = _stratified_subset(labels, settings.reference, rng)
    peer_problem = deepmapper_available() if settings.peer else "not run (--no-peer)"

    sample_rows, curve_rows, fold_rows, bio_rows = [], [], [], []
    tops = {m: [] for m in (*STABILITY_METHODS, "deepmapper")}
    seed_tops = {m: [] for m in STABILITY_METHODS}
    timings: dict = {}
    for f, (train_idx, test_idx) in enumerate(splits):
        started = time.perf_counter()
        trained = fit(adata, dataset, train_idx, spec, settings, seed=settings.seed)
        classes = list(trained.classes)
        y = np.asarray([classes.index(v) for v in labels])
        x_train = trained.prepare_matrix(adata[train_idx])
        x_test = trained.prepare_matrix(adata[test_idx])
        proba = ours_proba(trained)(x_test)
        fold_rows.append({"dataset": name, "fold": f + 1, "model": "ours", "n_test": len(test_idx),
                          "accuracy": float((proba.argmax(1) == y[test_idx]).mean())})
        explained = np.sort(rng.choice(len(test_idx), min(settings.samples_per_fold, len(test_idx)), replace=False))
        x = x_test[explained]
        target = proba[explained].argmax(1)
        cams, cam_sets = (cam_class_maps(trained, x_train, y[train_idx], 200, rng) if trained.layout.n_channels == 1
                          else (None, {}))
        orders = rankings_for(trained, x, target, cams, rng, settings, timings)
        baseline = np.asarray(trained.fill_values, dtype=np.float32)
        forward = ours_proba(trained)
        where = {"dataset": name, "fold": f + 1}
        for ranking, order in orders.items():
            faithfulness(where, test_idx[explained], ranking, forward, x, target, order, baseline, settings.k_grid,
                         sample_rows, curve_rows)
        if cam_sets:
            fold_rows[-1]["cam_set_sizes"] = " ".join(f"{classes[c]}:{len(s)}" for c, s in sorted(cam_sets.items()))
        # class tops on the reference set
        x_ref = trained.prepare_matrix(adata[reference])
        ref_pred = ours_proba(trained)(x_ref).argmax(1)
        ref_scores = reference_scores(trained, x_ref, ref_pred, rng)
        fold_tops = {m: class_tops(s, ref_pred, y[reference], trained.genes) for m, s in ref_scores.items()}
        for m, t in fold_tops.items():
            tops[m].append(t)
        if f == 0:
            for m, t in fold_tops.items():
                seed_tops[m].append(t)
        bio_rows.extend(biology(key, trained, fold_tops, ref_scores, ref_pred, y[reference], x_train,
                                labels[train_idx], f))
        if peer_problem is None:
            peer = DeepMapperModel(x_train, y[train_idx], len(classes), seed=settings.seed + f, epochs=settings.epochs)
            peer_proba = peer.proba(x_test)
            fold_rows.append({"dataset": name, "fold": f + 1, "model": "deepmapper", "n_test": len(test_idx),
                              "accuracy": float((peer_proba.argmax(1) == y[test_idx]).mean())})
            peer_target = peer_proba[explained].argmax(1)
            peer_order = _order(peer.importances(x, peer_target), rng)
            faithfulness(where, test_idx[explained], "deepmapper", peer.proba, x, peer_target, peer_order, baseline,
                         settings.k_grid, sample_rows, curve_rows)
            ref_peer_pred = peer.proba(x_ref).argmax(1)
            tops["deepmapper"].append(class_tops(peer.importances(x_ref, ref_peer_pred), ref_peer_pred,
                                                 y[reference], trained.genes))
        log(f"{name} fold {f + 1}/{k}: accuracy {fold_rows[-1 if peer_problem else -2]['accuracy']:.3f}, "
            f"{len(explained)} samples explained ({time.perf_counter() - started:.0f} s)")
    # fold 1 again with other training seeds (the layout is fitted with the same seed: only the network changes)
    train_idx = splits[0][0]
    for s in range(1, settings.seeds):
        trained = fit(adata, dataset, train_idx, spec, settings, seed=settings.seed + s)
        classes = list(trained.classes)
        y = np.asarray([classes.index(v) for v in labels])
        x_ref = trained.prepare_matrix(adata[reference])
        ref_pred = ours_proba(trained)(x_ref).argmax(1)
        for m, scores in reference_scores(trained, x_ref, ref_pred, rng).items():
            seed_tops[m].append(class_tops(scores, ref_pred, y[reference], trained.genes))
    stability = [{"dataset": name, "method": m, "across": "folds", "models": len(tops[m]),
                  "jaccard_top20": mean_jaccard(tops[m])} for m in tops if tops[m]]
    stability += [{"dataset": name, "method": m, "across": "seeds", "models": len(seed_tops[m]),
                   "jaccard_top20": mean_jaccard(seed_tops[m])} for m in seed_tops if len(seed_tops[m]) > 1]
    frames = {"samples": pd.DataFrame(sample_rows), "curves": pd.DataFrame(curve_rows),
              "folds": pd.DataFrame(fold_rows), "stability": pd.DataFrame(stability),
              "biology": pd.DataFrame(bio_rows),
              "timings": pd.DataFrame([{"dataset": name, "method": m, "seconds": s} for m, s in timings.items()])}
    if peer_problem is not None:
        frames["peer_problem"] = pd.DataFrame([{"dataset": name, "problem": peer_problem}])
    return frames


def fit(adata, dataset, train_idx, spec, settings: Settings, *, seed: int):
    config = TrainConfig(model="small", epochs=settings.epochs, seed=seed, device="cpu",
                         preprocess=PreprocessConfig(n_top_genes=settings.n_top_genes))
    spec = dict(spec)
    if "random_state" not in spec and spec["method"] in ("deepinsight", "rgb-layouts", "som"):
        spec["random_state"] = settings.seed
    return train(adata[train_idx].copy(), dataset.label_column, spec, config)


def biology(key, trained, fold_tops, ref_scores, ref_pred, ref_true, x_train, labels_train, fold) -> list[dict]:
    classes = list(trained.classes)
    rows = []
    if key == "pbmc":
        markers = pbmc_markers(x_train, trained.genes, labels_train, classes)
        for m, t in fold_tops.items():
            for c, top in t.items():
                rows.append({"dataset": key, "fold": fold + 1, "method": m, "class": classes[c],
                             "check": "overlap with rank_genes_groups top-20", "value": len(top & markers[c]) / TOP})
    elif key == "medulloblastoma":
        from napari_omicsimage.annotation import gene_symbols

        symbols = np.asarray(gene_symbols(list(trained.genes)))
        for m, scores in ref_scores.items():
            for group, genes in MEDULLO_MARKERS.items():
                if group not in classes:
                    continue
                c = classes.index(group)
                members = (ref_pred == c) & (ref_true == c)
                if not members.any():
                    continue
                order = np.argsort(-scores[members].mean(axis=0), kind="stable")
                rank = np.empty(len(order), dtype=int)
                rank[order] = np.arange(1, len(order) + 1)
                for gene in genes:
                    where = np.flatnonzero(symbols == gene)
                    rows.append({"dataset": key, "fold": fold + 1, "method": m, "class": group,
                                 "check": f"rank of {gene} (of {len(order)})",
                                 "value": float(rank[where].min()) if len(where) else float("nan")})
    return rows


# ------------------------------------------------------------------ reports
def paired_test(samples: pd.DataFrame, a: str, b: str = "pixel-saliency") -> tuple[float, float, int]:
    """One-sided Wilcoxon signed-rank over samples: is ``a``'s deletion AUC lower than ``b``'s?"""
    from scipy.stats import wilcoxon

    deletion = samples[samples.curve == "deletion"].pivot_table(index=["fold", "sample"], columns="ranking",
                                                                values="auc")
    pair = deletion[[a, b]].dropna()
    diff = pair[a] - pair[b]
    if len(pair) < 2 or np.allclose(diff, 0):
        return float(diff.median()) if len(pair) else float("nan"), float("nan"), len(pair)
    return float(diff.median()), float(wilcoxon(pair[a], pair[b], alternative="less").pvalue), len(pair)


def report(frames: dict[str, pd.DataFrame]) -> str:
    samples, stability, folds = frames["samples"], frames["stability"], frames["folds"]
    lines = ["### Faithfulness (mean AUC over explained held-out samples; deletion lower is better, insertion "
             "higher)", ""]
    means = samples.groupby(["dataset", "ranking", "curve"]).auc.mean().unstack("curve")
    datasets = list(dict.fromkeys(samples.dataset))
    rankings = [r for r in (*RANKINGS, "deepmapper") if r in set(samples.ranking)]
    lines.append("| ranking | " + " | ".join(f"{d} deletion | {d} insertion" for d in datasets) + " |")
    lines.append("|---|" + "---:|---:|" * len(datasets))
    for r in rankings:
        cells = []
        for d in datasets:
            # bold: the best of our rankings (DeepMapper's model differs: compare it in the relative table)
            best_del = means.loc[d].deletion.drop(["random", "deepmapper"], errors="ignore").min()
            value = means.loc[(d, r)] if (d, r) in means.index else None
            if value is None:
                cells += ["", ""]
                continue
            mark = "**" if np.isclose(value.deletion, best_del) else ""
            cells += [f"{mark}{value.deletion:.3f}{mark}", f"{value.insertion:.3f}"]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "### Gene attribution against pixel saliency (deletion AUC, one-sided paired Wilcoxon over "
              "samples)", "", "| data set | method | median difference | p | samples |", "|---|---|---:|---:|---:|"]
    for d in datasets:
        sub = samples[samples.dataset == d]
        deletion = sub[(sub.curve == "deletion") & sub.ranking.isin(GENE_RANKINGS)].groupby("ranking").auc.mean()
        best = deletion.idxmin()
        for method in dict.fromkeys(("integrated-gradients", best)):
            median, p, n = paired_test(sub, method)
            label = method + (" (best gene method)" if method == best else "")
            lines.append(f"| {d} | {label} | {median:+.3f} | {p:.2g} | {n} |")
    lines += ["", "### Deletion relative to the model's own confidence (mean deletion AUC / probability before "
              "deletion; comparable across models)", "",
              "| ranking | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    deletion = samples[samples.curve == "deletion"]
    relative = (deletion.auc / deletion.p_start).groupby([deletion.dataset, deletion.ranking]).mean()
    for r in rankings:
        lines.append(f"| {r} | " + " | ".join(f"{relative.get((d, r), np.nan):.3f}" for d in datasets) + " |")
    lines += ["", "### Stability of each class's top-20 genes (mean pairwise Jaccard)", ""]
    if len(stability):
        table = stability.pivot_table(index="method", columns=["dataset", "across"], values="jaccard_top20")
        lines.append("| method | " + " | ".join(f"{d} ({a})" for d, a in table.columns) + " |")
        lines.append("|---|" + "---:|" * len(table.columns))
        for method, row in table.iterrows():
            lines.append(f"| {method} | " + " | ".join("" if np.isnan(v) else f"{v:.2f}" for v in row) + " |")
    lines += ["", "### Accuracy of the explained models (held-out, mean over folds)", "",
              "| data set | model | accuracy | folds |", "|---|---|---:|---:|"]
    for (d, model), grp in folds.groupby(["dataset", "model"], sort=False):
        lines.append(f"| {d} | {model} | {grp.accuracy.mean():.3f} | {len(grp)} |")
    biology = frames.get("biology")
    if biology is not None and len(biology):
        lines += ["", "### Biology", "", "| data set | method | check | value (mean over folds and classes) |",
                  "|---|---|---|---:|"]
        pbmc = biology[biology.dataset == "pbmc"]
        for method, grp in pbmc.groupby("method", sort=False):
            lines.append(f"| pbmc | {method} | top-20 ∩ rank_genes_groups top-20 / 20 | {grp.value.mean():.2f} |")
        medullo = biology[biology.dataset == "medulloblastoma"]
        for (method, cls, check), grp in medullo.groupby(["method", "class", "check"], sort=False):
            lines.append(f"| medulloblastoma {cls} | {method} | {check} | median {grp.value.median():.0f} |")
    problems = frames.get("peer_problem")
    if problems is not None and len(problems):
        lines += ["", "DeepMapper: " + "; ".join(sorted(set(problems.problem)))]
    return "\n".join(lines)


def plot(curves_frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(curves_frame.dataset))
    ks = [c for c in curves_frame.columns if c.startswith("k")]
    grid = np.array([int(c[1:]) for c in ks])
    fig, axes = plt.subplots(2, len(datasets), figsize=(max(4.2 * len(datasets), 9), 7.5), squeeze=False)
    styles = {"pixel-saliency": ("#c44e52", "-"), "integrated-gradients": ("#4c72b0", "-"),
              "ig-signed": ("#4c72b0", "--"), "gradient": ("#55a868", ":"), "gradient-x-input": ("#55a868", "-"),
              "smoothgrad": ("#8172b2", ":"), "gradient-shap": ("#8172b2", "-"),
              "cam-feature-selector": ("#ccb974", "-"), "random": ("#777777", "--"), "deepmapper": ("#000000", "-.")}
    for col, d in enumerate(datasets):
        for row, kind in enumerate(("deletion", "insertion")):
            ax = axes[row, col]
            sub = curves_frame[(curves_frame.dataset == d) & (curves_frame.curve == kind)]
            for ranking, grp in sub.groupby("ranking", sort=False):
                colour, style = styles.get(ranking, ("#999999", "-"))
                ax.plot(grid, grp[ks].mean().to_numpy(), style, color=colour, label=ranking, lw=1.6)
            ax.set_title(f"{d}: {kind}", fontsize=10)
            ax.set_xlabel(f"genes {'set to the baseline' if kind == 'deletion' else 'taken from the sample'}",
                          fontsize=8)
            ax.set_ylabel("probability of the predicted class", fontsize=8)
            ax.set_ylim(0, 1.02)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------- speed
def speed(n_samples: int, settings: Settings) -> pd.DataFrame:
    """Seconds for gene IG against pixel IG (both 32 steps) on ``n_samples`` PBMC cells, same model."""
    import torch

    dataset = accuracy.DATASETS["pbmc"]
    adata = dataset.load()
    spec, _ = accuracy.layout_spec(settings.layout, settings.size)
    trained = fit(adata, dataset, np.arange(adata.n_obs), spec, settings, seed=settings.seed)
    x = trained.prepare_matrix(adata)
    x = x[np.resize(np.arange(len(x)), n_samples)]  # the 700 cells, repeated up to n_samples
    target = ours_proba(trained)(x).argmax(1)
    start = time.perf_counter()
    gene_attributions(trained, x, "integrated-gradients", target, n_steps=32, batch_size=32)
    gene_s = time.perf_counter() - start
    images = trained.layout.transform(torch.as_tensor(x), device="cpu")
    start = time.perf_counter()
    saliency(trained.model, images, "integrated-gradients", target=target, n_steps=32, batch_size=32)
    pixel_s = time.perf_counter() - start
    return pd.DataFrame([{"samples": n_samples, "layout": settings.layout, "threads": torch.get_num_threads(),
                          "gene_ig_s": gene_s, "pixel_ig_s": pixel_s, "ratio": gene_s / pixel_s}])


# --------------------------------------------------------------------- main
def _read(path: Path) -> pd.DataFrame | None:
    """A results CSV, or None when it is missing or empty (a table no data set produced, e.g. biology)."""
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["srbct", "medulloblastoma", "pbmc"],
                        choices=list(accuracy.DATASETS))
    parser.add_argument("--layout", default="deepinsight-tsne", choices=list(accuracy.METHODS),
                        help="accuracy-benchmark layout name (default: today's default layout)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--samples-per-fold", type=int, default=12, help="held-out samples explained per fold")
    parser.add_argument("--reference", type=int, default=30, help="samples whose class tops are compared")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds compared on fold 1")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--n-top-genes", type=int, default=2000)
    parser.add_argument("--noise-samples", type=int, default=10, help="SmoothGrad / GradientSHAP samples")
    parser.add_argument("--no-peer", action="store_true", help="skip DeepMapper")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "explanations")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: srbct, 2 folds, 4 samples, 2 seeds")
    parser.add_argument("--speed", type=int, nargs="?", const=1000, default=None, metavar="N",
                        help="only time gene IG against pixel IG on N PBMC samples (default 1000)")
    parser.add_argument("--summarise", action="store_true", help="print the tables from --out-dir; run nothing")
    args = parser.parse_args(argv)
    settings = Settings(datasets=args.datasets, layout=args.layout, size=args.size, folds=args.folds,
                        samples_per_fold=args.samples_per_fold, reference=args.reference, seeds=args.seeds,
                        epochs=args.epochs, n_top_genes=args.n_top_genes, noise_samples=args.noise_samples,
                        peer=not args.no_peer)
    if args.quick:
        settings = Settings(datasets=["srbct"], layout=args.layout, size=16, folds=2, samples_per_fold=4,
                            reference=8, seeds=2, epochs=3, n_top_genes=300, noise_samples=4,
                            peer=not args.no_peer, k_grid=np.array([0, 1, 5, 20, 50, 100]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.speed is not None:
        table = speed(args.speed, settings)
        table.to_csv(args.out_dir / "speed.csv", index=False)
        row = table.iloc[0]
        print("| samples | layout | threads | gene IG (s) | pixel IG (s) | gene / pixel |\n|---:|---|---:|---:|---:|---:|\n"
              f"| {row.samples} | {row.layout} | {row.threads} | {row.gene_ig_s:.1f} | {row.pixel_ig_s:.1f} | "
              f"{row.ratio:.2f} |")
        return 0
    names = ("samples", "curves", "folds", "stability", "biology", "timings", "peer_problem")
    if args.summarise:
        frames = {n: _read(args.out_dir / f"{n}.csv") for n in names}
        frames = {n: frame for n, frame in frames.items() if frame is not None}
    else:
        parts: dict[str, list] = {n: [] for n in names}
        started = time.perf_counter()
        for key in settings.datasets:
            for n, frame in run_dataset(key, settings, log=lambda s: print(s, flush=True)).items():
                parts[n].append(frame)
            frames = {n: pd.concat(p, ignore_index=True) for n, p in parts.items() if p}
            for n, frame in frames.items():  # keep partial results
                frame.to_csv(args.out_dir / f"{n}.csv", index=False)
        print(f"\nfinished in {time.perf_counter() - started:.0f} s "
              f"({os.environ.get('OMP_NUM_THREADS', 'unpinned')} thread(s))\n")
    print(report(frames))
    if args.plot:
        plot(frames["curves"], args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
