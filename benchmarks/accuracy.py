"""Honest accuracy benchmark: every method × model beside a logistic-regression baseline, on real data.

Repeated stratified k-fold cross-validation (`evaluation.cross_validate`): per fold, preprocessing and the
layout are fitted on the training samples only (except the `rgb-embedding-transductive` row, which reproduces
the seed paper's set-up so its inflation can be measured). The baseline is fitted on the same preprocessed
features in the same folds.

    python benchmarks/accuracy.py --quick              # smoke run: one data set, two methods, 1 repeat
    python benchmarks/accuracy.py                      # default grid: 5 data sets × 8 methods × small CNN × 3 repeats

The default grid is about 1.5 core-hours of CPU work.
``--jobs`` (default 2 where there are two cores) splits the data sets over that many processes, balanced by
their measured cost (pbmc + medulloblastoma against the rest), shares the cores between them and merges their
CSVs: on a 2-core machine the default run took 44 minutes.  Runs made separately merge with

    python benchmarks/accuracy.py --summarise a.csv b.csv --plot accuracy.png

Larger settings (ResNet-18 and EfficientNet-B0 take 5-20× longer on a CPU) are meant for a GPU:

    python benchmarks/accuracy.py --models small resnet18 efficientnet_b0 --big-models-on all --size 64 \
        --repeats 5 --device cuda

Prints a Markdown table (mean ± sd over all folds of all repeats) and writes every fold's numbers to
``--out`` (CSV) so the table and plot can be regenerated (``--plot PNG``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "src"))

from napari_omicsimage.evaluation import cross_validate  # noqa: E402
from napari_omicsimage.io import load_sample_data, read_expression  # noqa: E402
from napari_omicsimage.preprocess import PreprocessConfig, Preprocessor  # noqa: E402
from napari_omicsimage.training import PROTOCOLS, TrainConfig, fit_layout  # noqa: E402

METRICS = ("balanced_accuracy", "f1_macro", "roc_auc_ovo_macro", "accuracy")


# ------------------------------------------------------------------ data sets
@dataclass
class Dataset:
    name: str
    label_column: str
    note: str

    def load(self):
        if self.name == "pbmc68k_reduced":
            return load_sample_data()
        if self.name == "medulloblastoma":
            folder = SHARED / "medulloblastoma_gse85217_subset"
            return read_expression(folder / "expression_genes_by_samples.csv.gz",
                                   labels=folder / "labels.csv", label_column="subgroup")
        if self.name == "srbct":
            folder = SHARED / "srbct_khan"
            return read_expression(folder / "expression.csv.gz", labels=folder / "labels.csv",
                                   label_column="label")
        folder = SHARED / "all_chiaretti"
        pheno = pd.read_csv(folder / "phenotype.csv", dtype=str).set_index("sample")
        pheno["BT_lineage"] = pheno["BT"].str[0]  # B1…B4 → B, T1…T4 → T
        adata = read_expression(folder / "expression_probes_by_samples.csv.gz", orientation="genes-in-rows",
                                labels=pheno[["BT_lineage", "mol.biol"]].fillna(""), label_column="BT_lineage")
        if self.label_column == "mol.biol":
            counts = adata.obs["mol.biol"].value_counts()
            keep = adata.obs["mol.biol"].isin(counts[counts >= 5].index)  # 5-fold CV needs ≥ 5 per class
            adata = adata[keep.to_numpy()].copy()
            adata.obs["mol.biol"] = adata.obs["mol.biol"].astype(str).astype("category")
        return adata


DATASETS = {
    "pbmc": Dataset("pbmc68k_reduced", "bulk_labels", "700 cells × 765 genes, 10 types"),
    "medulloblastoma": Dataset("medulloblastoma", "subgroup", "50 × 21,641, 4 subgroups"),
    "srbct": Dataset("srbct", "label", "63 × 2,308, 4 tumour types"),
    "all_bt": Dataset("all", "BT_lineage", "128 × 12,625, B vs T lineage"),
    "all_molbio": Dataset("all", "mol.biol", "126 × 12,625, 4 molecular classes (2 singletons dropped)"),
}

# name → (layout spec without size, transductive)
METHODS = {
    "deepinsight-tsne": ({"method": "deepinsight", "feature_extractor": "tsne"}, False),
    "deepinsight-umap": ({"method": "deepinsight", "feature_extractor": "umap"}, False),
    "fotomics": ({"method": "fotomics"}, False),
    "rgb-layouts": ({"method": "rgb-layouts"}, False),
    "grid-chromosome": ({"method": "grid", "order": "chromosome"}, False),
    "grid-cluster": ({"method": "grid", "order": "cluster"}, False),  # the grid default since this benchmark
    # one gene per pixel on the smallest square holding every gene (issue 11)
    "deepinsight-tsne-lsa": ({"method": "deepinsight", "feature_extractor": "tsne", "discretization": "lsa"}, False),
    "som": ({"method": "som"}, False),
    "rgb-embedding": ({"method": "rgb-embedding"}, False),
    "rgb-embedding-transductive": ({"method": "rgb-embedding"}, True),
}


def sized_by_genes(method: str) -> bool:
    """Layouts that take the smallest square holding every gene, whatever ``--size`` says."""
    spec = METHODS[method][0]
    return spec["method"] in ("grid", "som") or spec.get("discretization") in ("lsa", "ags")


def layout_spec(method: str, size: int) -> tuple[dict, bool]:
    spec, transductive = METHODS[method]
    spec = dict(spec)
    if not sized_by_genes(method):
        spec["size"] = size if spec["method"] != "rgb-embedding" else max(size, 32)
    return spec, transductive


# ------------------------------------------------------------------ running
def n_folds(adata, dataset: Dataset, folds: int) -> int:
    """``folds``, capped at the smallest class: the medulloblastoma subset has 4 WNT samples (reported as k)."""
    return min(int(folds), int(adata.obs[dataset.label_column].value_counts().min()))


def run_one(adata, dataset: Dataset, method: str, model: str, repeat: int, args) -> list[dict]:
    spec, transductive = layout_spec(method, args.size)
    config = TrainConfig(model=model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=repeat, device=args.device,
                         preprocess=PreprocessConfig(n_top_genes=args.n_top_genes))
    stamps = {"fold_start": {0: time.perf_counter()}, "first_batch": {}, "fold_end": {}}

    def progress(event):
        now = time.perf_counter()
        # the first batch of a fold ends its fit stage (preprocessing, layout fit, test images)
        if event.stage == "batch" and event.fold not in stamps["first_batch"]:
            stamps["first_batch"][event.fold] = now
        elif event.stage == "fold":
            stamps["fold_end"][event.fold] = now
            stamps["fold_start"][event.fold + 1] = now

    folds = n_folds(adata, dataset, args.folds)
    result = cross_validate(adata, dataset.label_column, spec, config, folds=folds,
                            transductive=transductive, progress=progress)
    rows = []
    for i, fold in enumerate(result.metrics["folds"]):
        first_batch, end = stamps["first_batch"][i], stamps["fold_end"][i]
        rows.append({"dataset": dataset.name + ":" + dataset.label_column, "method": method, "model": model,
                     "repeat": repeat, "fold": fold["fold"], "k": folds, "protocol": protocol_name(args), "size": args.size,
                     **{m: fold[m] for m in METRICS},
                     **{f"baseline_{m}": result.metrics["baseline_folds"][i][m] for m in METRICS},
                     "fit_s": round(first_batch - stamps["fold_start"][i], 3),
                     "train_s": round(end - first_batch, 3)})
    return rows


def protocol_name(args) -> str:
    """The training protocol's name, or its settings when they match none."""
    chosen = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
    for name, settings in PROTOCOLS.items():
        if settings == chosen:
            return name
    return f"{args.epochs} ep, batch {args.batch_size}, lr {args.lr:g}"


def render_seconds(adata, dataset: Dataset, method: str, args) -> float:
    """Time to render every sample once with a fitted layout (the render stage)."""
    spec, _ = layout_spec(method, args.size)
    pre = Preprocessor(PreprocessConfig(n_top_genes=args.n_top_genes)).fit(adata)
    x = pre.transform(adata)
    layout, images = fit_layout(spec, x, pre.genes_)
    start = time.perf_counter()
    layout.transform(x)
    return time.perf_counter() - start


def with_defaults(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill the columns that CSVs from earlier versions of this script lack."""
    if "protocol" not in frame:
        frame = frame.assign(protocol="")
    # runs before the size column existed used the default --size 32
    return frame.assign(size=frame["size"].fillna(32).astype(int) if "size" in frame else 32)


def summarise(frame: pd.DataFrame, render: dict) -> str:
    def pm(series):
        return f"{series.mean():.3f} ± {series.std(ddof=1):.3f}" if len(series) > 1 else f"{series.mean():.3f}"

    frame = with_defaults(frame)
    lines = ["| data set | folds × repeats | protocol | method | size | model | balanced acc. | macro F1 | macro AUC (OvO) | baseline bal. acc. | "
             "baseline F1 | fit s/fold | render s (all) | train s/fold |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (ds, protocol, method, size, model), grp in frame.groupby(["dataset", "protocol", "method", "size", "model"],
                                                                  sort=False):
        lines.append(
            f"| {ds} | {int(grp.k.iloc[0])} × {grp.repeat.nunique()} | {protocol} | {method} | {image_side(method, size)} | {model} | {pm(grp.balanced_accuracy)} | {pm(grp.f1_macro)} | "
            f"{pm(grp.roc_auc_ovo_macro)} | {pm(grp.baseline_balanced_accuracy)} | {pm(grp.baseline_f1_macro)} | "
            f"{grp.fit_s.mean():.2f} | {render.get((ds, method, size), float('nan')):.3f} | {grp.train_s.mean():.2f} |")
    return "\n".join(lines)


def glance(frame: pd.DataFrame) -> str:
    """Balanced accuracy as a method × data set matrix, the baseline last; each data set's best image row in bold."""
    frame = with_defaults(frame)
    short = {ds: ds.split(":")[0].replace("68k_reduced", "") + (":" + ds.split(":")[1] if ds.startswith("all") else "")
             for ds in frame.dataset.unique()}
    frame = frame.assign(row=[f"{m} {image_side(m, z)} / {mo}" + ("" if p == "recommended" else f" ({p})")
                              for p, m, z, mo in zip(frame.protocol, frame.method, frame["size"], frame.model)],
                         column=frame.dataset.map(short))
    table = frame.pivot_table(index="row", columns="column", values="balanced_accuracy", aggfunc="mean", sort=False)
    baseline = frame.groupby("column", sort=False).baseline_balanced_accuracy.mean()
    best = table.max()
    lines = ["| method / model | " + " | ".join(table.columns) + " |", "|---|" + "---:|" * len(table.columns)]
    for row, values in table.iterrows():
        cells = ["" if np.isnan(v) else (f"**{v:.3f}**" if v == best[c] else f"{v:.3f}") for c, v in values.items()]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("| *logistic regression (baseline)* | " + " | ".join(f"*{baseline[c]:.3f}*" for c in table.columns) + " |")
    return "\n".join(lines)


def image_side(method: str, size: int) -> str:
    """The image side a row was trained at (grids, SOMs and assignment layouts: the smallest square holding
    every gene)."""
    if method.startswith("grid"):
        return "grid"
    if method in METHODS and sized_by_genes(method):
        return "auto"  # the smallest square with a pixel per gene: 28² for PBMC's 765 genes, 45² for 2,000
    return str(max(size, 32) if method.startswith("rgb-embedding") else size)


def plot(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = with_defaults(frame)
    colours = {"small": "#4c72b0", "resnet18": "#55a868", "efficientnet_b0": "#8172b2"}
    datasets = list(dict.fromkeys(frame.dataset))
    n_rows = frame.groupby(["dataset", "protocol", "method", "size", "model"]).ngroups / len(datasets)
    n_cols = min(len(datasets), 3)
    n_fig_rows = -(-len(datasets) // n_cols)
    fig, axes = plt.subplots(n_fig_rows, n_cols, figsize=(5.6 * n_cols, n_fig_rows * (1.2 + 0.28 * max(n_rows, 7))),
                             squeeze=False)
    for ax in axes.flat[len(datasets):]:
        ax.set_visible(False)
    for ax, ds in zip(axes.flat, datasets):
        sub = frame[frame.dataset == ds]
        groups = [(key, grp) for key, grp in sub.groupby(["protocol", "method", "size", "model"], sort=False)]
        means = [grp.balanced_accuracy.mean() for _, grp in groups]
        sds = [grp.balanced_accuracy.std(ddof=1) if len(grp) > 1 else 0.0 for _, grp in groups]
        bars = ax.barh(range(len(groups)), means, xerr=sds, alpha=0.85,
                       color=[colours.get(key[3], "#937860") for key, _ in groups])
        for bar, (key, _) in zip(bars, groups):
            if key[0] != "recommended":  # other protocols hatched, so they stand apart from the defaults
                bar.set_hatch("//")
                bar.set_edgecolor("white")
        ax.axvline(sub.baseline_balanced_accuracy.mean(), color="#c44e52", ls="--", label="logistic regression")
        labels = [f"{method} {image_side(method, size)} / {model}" + ("" if protocol == "recommended" else f" ({protocol})")
                  for (protocol, method, size, model), _ in groups]
        ax.set_yticks(range(len(groups)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.02)
        ax.set_title(ds, fontsize=10)
        ax.set_xlabel("balanced accuracy (mean ± sd over folds)", fontsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(color=colour, label=model) for model, colour in colours.items() if model in set(frame.model)]
    others = sorted(set(frame.protocol) - {"recommended"})
    if others:
        handles.append(Patch(facecolor="#999999", hatch="//", edgecolor="white", label=", ".join(others) + " protocol"))
    handles.append(axes.flat[0].get_legend_handles_labels()[0][0])
    fig.legend(handles=handles, loc="lower right", fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_path(out: Path) -> Path:
    """Where the render timings of the fold CSV ``out`` go."""
    return out.with_name(out.stem + "_render.csv")


def write_results(rows: list[dict], render: dict, out: Path) -> None:
    """Fold rows to ``out``, render seconds per (data set, method, size) beside it."""
    pd.DataFrame(rows).to_csv(out, index=False)
    pd.DataFrame([{"dataset": d, "method": m, "size": z, "render_s": sec} for (d, m, z), sec in render.items()]
                 ).to_csv(render_path(out), index=False)


def report(paths: list[Path], plot_path: Path | None) -> None:
    """Print the full table and the at-a-glance matrix (and plot) from fold CSVs."""
    frame = pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)
    render = {}
    for path in paths:
        timing = render_path(path)
        if timing.exists():
            timing = with_defaults(pd.read_csv(timing))
            render.update({(r.dataset, r.method, r.size): r.render_s for r in timing.itertuples()})
    print(summarise(frame, render))
    print("\nBalanced accuracy at a glance:\n")
    print(glance(frame))
    if plot_path:
        plot(frame, plot_path)
        print(f"\nplot written to {plot_path}")


#: Measured seconds per repeat of the default methods with the small CNN (one thread), to balance --jobs.
COST = {"pbmc": 1040, "all_molbio": 560, "all_bt": 450, "srbct": 315, "medulloblastoma": 250}


def run_in_processes(args) -> int:
    """Split the data sets over ``args.jobs`` child processes (longest first, onto the least loaded), run them
    side by side with the cores shared out, then merge their CSVs into ``args.out``."""
    groups: list[list[str]] = [[] for _ in range(min(args.jobs, len(args.datasets)))]
    for key in sorted(args.datasets, key=lambda k: -COST.get(k, 500)):
        min(groups, key=lambda g: sum(COST.get(k, 500) for k in g)).append(key)
    threads = str(max(1, (os.cpu_count() or 1) // len(groups)))
    # NUMBA_NUM_THREADS too: UMAP's numba sets OpenMP's thread count, which torch shares, to numba's (all cores
    # by default), so without it every process trains with all cores after its first UMAP fit and they
    # oversubscribe the machine (pbmc folds ran 3-4× slower).
    env = {**os.environ, **{name: threads for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                        "NUMBA_NUM_THREADS")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    parts, children = [], []
    for i, group in enumerate(groups):
        part = args.out.with_name(f"{args.out.stem}.part{i}.csv")
        command = [sys.executable, __file__, "--jobs", "1", "--datasets", *group, "--methods", *args.methods,
                   "--models", *args.models, "--big-models-on", *args.big_models_on, "--repeats", str(args.repeats),
                   "--folds", str(args.folds), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                   "--lr", str(args.lr), "--size", str(args.size), "--n-top-genes", str(args.n_top_genes),
                   "--device", args.device, "--out", str(part)]
        log = part.with_suffix(".log")
        print(f"process {i}: {' '.join(group)} ({threads} thread(s)); progress in {log}", flush=True)
        children.append(subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT))
        parts.append(part)
    failed = [i for i, child in enumerate(children) if child.wait() != 0]
    if failed:
        print(f"process(es) {failed} failed: see their logs; finished parts are kept", file=sys.stderr)
        return 1
    pd.concat([pd.read_csv(p) for p in parts], ignore_index=True).to_csv(args.out, index=False)
    pd.concat([pd.read_csv(render_path(p)) for p in parts], ignore_index=True).to_csv(render_path(args.out),
                                                                                       index=False)
    for p in parts:
        p.unlink()
        render_path(p).unlink()
    print()
    report([args.out], args.plot)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--models", nargs="+", default=["small"],
                        help="small, resnet18, efficientnet_b0 (the big two take 5-20× longer on a CPU)")
    parser.add_argument("--big-models-on", nargs="+", default=["medulloblastoma", "srbct", "all_bt"],
                        help="data sets on which models other than 'small' run (CPU budget); 'all' for every one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=PROTOCOLS["recommended"]["epochs"])
    parser.add_argument("--batch-size", type=int, default=PROTOCOLS["recommended"]["batch_size"])
    parser.add_argument("--lr", type=float, default=PROTOCOLS["recommended"]["lr"])
    parser.add_argument("--size", type=int, default=32, help="image side for non-grid layouts")
    parser.add_argument("--n-top-genes", type=int, default=2000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy_folds.csv")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: srbct, 2 methods, small CNN, 1 repeat")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                        help="take --epochs, --batch-size and --lr from a named training protocol")
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="CSV", default=None,
                        help="print the table (and --plot) from fold CSVs written by earlier runs; runs nothing")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="run the data sets in this many processes side by side, the CPU cores shared "
                             "between them (default: 2 where there are 2 or more cores)")
    args = parser.parse_args(argv)
    if args.summarise:
        report(args.summarise, args.plot)
        return 0
    if args.protocol:
        vars(args).update(PROTOCOLS[args.protocol])
    if args.quick:
        args.datasets, args.methods, args.models = ["srbct"], ["grid-chromosome", "fotomics"], ["small"]
        args.repeats, args.epochs, args.size = 1, 2, 16
    if args.jobs > 1 and len(args.datasets) > 1:
        return run_in_processes(args)

    rows, render = [], {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for key in args.datasets:
        dataset = DATASETS[key]
        adata = dataset.load()
        for method in args.methods:
            ds_name = dataset.name + ":" + dataset.label_column
            render[(ds_name, method, args.size)] = render_seconds(adata, dataset, method, args)
            for model in args.models:
                if model != "small" and "all" not in args.big_models_on and key not in args.big_models_on:
                    continue
                for repeat in range(args.repeats):
                    t = time.perf_counter()
                    new = run_one(adata, dataset, method, model, repeat, args)
                    rows.extend(new)
                    bal = np.mean([r["balanced_accuracy"] for r in new])
                    print(f"{ds_name:28s} {method:27s} {model:16s} repeat {repeat}: balanced acc {bal:.3f} "
                          f"({time.perf_counter() - t:.1f} s)", flush=True)
                    write_results(rows, render, args.out)  # keep partial results
    write_results(rows, render, args.out)
    print()
    report([args.out], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
