"""Atlas scale: memory and time of the streaming path at 20,000 to 1,000,000 cells, beside CellTypist and pyDeepInsight.

Per size (cells × ``--genes``, synthetic counts, 10 cell types; see
``napari_omicsimage.streaming.synthetic``) the script writes the ``.h5ad`` in
chunks into ``--tmp`` (deleted afterwards; never build the matrix in memory),
plus one held-out file of ``--test-cells`` cells of the same cell types, then
runs each tool in its own child process:

* **ours**: ``omicsimage train`` exactly as a user types it (the file is above
  the streaming threshold or ``--backed yes``: block-by-block reading,
  preprocessing statistics in one pass, DeepInsight layout on a 20,000-cell
  subsample), ``--max-steps`` optimiser steps of batch ``--batch-size``;
  seconds per stage from its log (read, preprocess, layout, train, BatchNorm
  calibration); then, in the same child, the same network alone on synthetic
  batches already in memory (``bench_training.backbone_throughput``), so
  pipeline/network images/s are measured side by side; then ``omicsimage
  predict`` of every cell of the file (one child) and of the held-out file
  (accuracy);
* **CellTypist**: ``celltypist.train`` (log1p-normalised to 10⁴, as it
  requires; above 50,000 cells SGD with mini-batches and ``with_mean=False``,
  its own advice and option for large sparse data) on the file read in memory
  as sparse, then ``celltypist.annotate`` of the held-out file;
* **pyDeepInsight**: ``ImageTransformer`` (t-SNE, scikit-learn, cosine; 32²)
  ``fit`` + ``transform`` of the cells × 2,000 preprocessed genes, which it
  needs dense; skipped where its output alone (N × 32 × 32 × 3 float64) would
  exceed the memory cap.

Peak memory is the child's peak resident set (``ru_maxrss``); a watchdog also
polls it (psutil) and kills a child above ``--cap-gb`` so that no tool takes
the shared machine down (the table then says so).  Threads are pinned to
``--threads`` in every child.

    python benchmarks/bench_scale.py                               # 20,000 and 100,000 cells (~25 min here)
    python benchmarks/bench_scale.py --sizes 1000000 --tmp /tmp    # once, alone: ~4 GB file, ~30 min
    python benchmarks/bench_scale.py --quick                       # smoke: 3,000 cells × 2,000 genes
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

LABEL = "cell_type"


# ------------------------------------------------------------------ children
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _StageLog:
    """Collects ``stage NAME: S s`` log records of the streaming path."""

    def __init__(self):
        import logging

        self.seconds = {}
        handler = logging.Handler()
        handler.emit = self._emit
        logging.getLogger("napari_omicsimage").addHandler(handler)

    def _emit(self, record):
        text = record.getMessage()
        if text.startswith("stage "):
            name, value = text[6:].split(":")
            self.seconds[name] = float(value.strip().split()[0])


class _Interleaved:
    """Pipeline and network alone, measured in alternating segments of ``steps`` optimiser steps, in one run.

    Wraps :meth:`StreamingBatches.epoch`: the time from one batch's hand-over to the next (fetching it from
    the loader, which prefetches in a thread, rendering it, and the training step on it) adds to the pipeline;
    after every ``steps`` batches the same network alone (``build_model``, Adam, one fixed synthetic batch
    already in memory: ``bench_training.backbone_throughput``'s step) trains ``steps`` steps, timed apart.
    The load of a shared machine changes over minutes; alternating every few seconds puts both under the same
    load, which measuring one after the other did not (docs/benchmarks.md#scale).
    """

    def __init__(self, model_name: str, steps: int):
        self.model_name, self.steps = model_name, int(steps)
        self.pipeline_seconds = self.network_seconds = 0.0
        self.pipeline_images = self.network_images = 0
        self.network = None

    def install(self):
        from napari_omicsimage.streaming import loader

        original, meter = loader.StreamingBatches.epoch, self

        def epoch(source, number):
            last = time.perf_counter()
            for i, item in enumerate(original(source, number)):
                yield item  # the training step runs here
                now = time.perf_counter()
                meter.pipeline_seconds += now - last
                meter.pipeline_images += int(item[2].shape[0])
                if (i + 1) % meter.steps == 0:
                    meter.network_segment(source, tuple(item[1].shape))
                last = time.perf_counter()

        loader.StreamingBatches.epoch = epoch

    def network_segment(self, source, shape):
        import torch

        from napari_omicsimage.models import build_model

        if self.network is None:
            torch.manual_seed(0)
            n_classes = int(source.dataset.y.max()) + 1
            model = build_model(self.model_name, shape[1], n_classes).to(source.device).train()
            self.network = (model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.nn.CrossEntropyLoss(),
                            torch.rand(shape, device=source.device),
                            torch.arange(shape[0], device=source.device) % n_classes)
        model, optimiser, loss_fn, images, targets = self.network
        started = time.perf_counter()
        for _ in range(self.steps):
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(images), targets).backward()
            optimiser.step()
        float(loss_fn(model(images[:2]), targets[:2]).detach())  # CPU: done; on a GPU this waits for it
        self.network_seconds += time.perf_counter() - started
        self.network_images += self.steps * shape[0]


def child_ours_train(args) -> dict:
    import torch

    from napari_omicsimage.cli import main

    stages = _StageLog()
    seconds = stages.seconds
    meter = _Interleaved(args.model, args.segment_steps)
    meter.install()
    started = time.perf_counter()
    code = main(["-v", "train", args.file, "--label-column", LABEL, "--counts", "--backed", "yes",
                 "--method", "deepinsight", "--model", args.model, "--epochs", "1", "--max-steps", str(args.steps),
                 "--batch-size", str(args.batch_size), "--device", args.device, "--out", args.model_file,
                 *(["--cache-gb", str(args.cache_gb)] if args.cache_gb is not None else [])])
    total = time.perf_counter() - started
    pipeline = meter.pipeline_images / meter.pipeline_seconds
    network = meter.network_images / meter.network_seconds if meter.network_images else None
    # the train stage also ran the network-alone segments: the pipeline's own seconds are the training's
    seconds["train_with_network_segments"] = seconds.get("train")
    seconds["train"] = round(meter.pipeline_seconds, 3)
    return {"code": code, "seconds": total, "peak_mb": _peak_mb(), "stages": seconds,
            "pipeline_ips": pipeline, "network_ips": network, "threads": torch.get_num_threads(),
            "cache_gb": args.cache_gb}


def child_ours_predict(args) -> dict:
    from napari_omicsimage.cli import main

    started = time.perf_counter()
    code = main(["predict", args.model_file, args.file, "--label-column", LABEL, "--backed", "yes",
                 "--device", args.device, "--out", args.out_csv])
    seconds = time.perf_counter() - started
    accuracy = None
    if code == 0:
        import pandas as pd

        frame = pd.read_csv(args.out_csv, usecols=["true", "predicted"])
        accuracy = float((frame["true"] == frame["predicted"]).mean())
    return {"code": code, "seconds": seconds, "peak_mb": _peak_mb(), "accuracy": accuracy}


def _normalised_in_memory(path):
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(path)  # sparse in memory: CellTypist needs the matrix
    x = adata.X
    if x.indptr.dtype != x.indices.dtype and x.nnz < 2**31:
        # h5ad files often store int64 row pointers beside int32 indices; scikit-learn's sparse statistics
        # (CellTypist's StandardScaler) need one index type ("Buffer dtype mismatch ... 'long'"); the values
        # are the same
        x.indptr = x.indptr.astype(x.indices.dtype)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def child_celltypist(args) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    import celltypist
    from sklearn.linear_model import LogisticRegression

    # CellTypist 1.7.1 (the newest) passes multi_class="ovr", which scikit-learn 1.8 removed: drop the argument
    # (its logistic regression is then multinomial instead of one-vs-rest; SGD, used above 50,000 cells, is not
    # affected)
    def logistic_regression(multi_class=None, **options):
        return LogisticRegression(**options)

    sys.modules["celltypist.train"].LogisticRegression = logistic_regression

    started = time.perf_counter()
    adata = _normalised_in_memory(args.file)
    read = time.perf_counter() - started
    large = adata.n_obs > 50_000
    # above 50,000 cells: CellTypist's own advice for large data (SGD on mini-batches) and with_mean=False,
    # its option to keep a sparse matrix sparse (centring would make 10⁵ × 2·10⁴ dense: 16 GB)
    model = celltypist.train(adata, labels=LABEL, feature_selection=False, n_jobs=1, use_SGD=large,
                             mini_batch=large, with_mean=not large, check_expression=False)
    trained = time.perf_counter() - started
    del adata
    test = _normalised_in_memory(args.test_file)
    if not model.scaler.with_mean:
        # CellTypist 1.7.1 scales a sparse matrix by dividing it by a dense array, which scipy ≥ 1.15 returns
        # as COO, and then assigns into it ("'coo_matrix' object does not support item assignment"): give it
        # the held-out cells dense (20,000 × 20,000 float32: 1.6 GB)
        test.X = test.X.toarray()
    predictions = celltypist.annotate(test, model=model, majority_voting=False)
    labels = predictions.predicted_labels["predicted_labels"].astype(str).to_numpy()
    accuracy = float((labels == test.obs[LABEL].astype(str).to_numpy()).mean())
    return {"code": 0, "seconds": time.perf_counter() - started, "read_seconds": read, "train_seconds": trained - read,
            "peak_mb": _peak_mb(), "accuracy": accuracy}


def child_deepinsight(args) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    import numpy as np
    from pyDeepInsight import ImageTransformer
    from sklearn.manifold import TSNE

    from napari_omicsimage.preprocess import PreprocessConfig
    from napari_omicsimage.streaming import fit_preprocessor, open_cells
    from napari_omicsimage.streaming.fit import transform_rows

    adata = open_cells(args.file)
    preprocessor = fit_preprocessor(adata, None, PreprocessConfig(log_scale=False))
    x = transform_rows(adata, np.arange(adata.n_obs), preprocessor).toarray()  # pyDeepInsight wants it dense
    started = time.perf_counter()
    transformer = ImageTransformer(feature_extractor=TSNE(n_components=2, metric="cosine", random_state=0),
                                   discretization="bin", pixels=(32, 32))
    transformer.fit(x)
    images = transformer.transform(x, img_format="rgb")
    return {"code": 0, "seconds": time.perf_counter() - started, "peak_mb": _peak_mb(),
            "images_mb": images.nbytes / 2**20}


def child_trust(args) -> dict:
    """Trustworthiness of DeepInsight gene layouts fitted on all cells and on stratified subsamples."""
    import numpy as np
    from bench_core import gene_trustworthiness

    from napari_omicsimage.preprocess import PreprocessConfig
    from napari_omicsimage.streaming import fit_preprocessor, open_cells
    from napari_omicsimage.streaming.cells import stratified_subsample
    from napari_omicsimage.streaming.fit import transform_rows
    from napari_omicsimage.training import fit_layout

    adata = open_cells(args.file)
    labels = adata.obs[LABEL].astype(str).to_numpy()
    preprocessor = fit_preprocessor(adata, None, PreprocessConfig(log_scale=False))
    x_all = transform_rows(adata, np.arange(adata.n_obs), preprocessor).toarray()
    genes = np.arange(x_all.shape[1])
    report = {"code": 0, "cells": int(adata.n_obs)}
    for n in [adata.n_obs, *args.trust_cells]:
        if n > adata.n_obs:
            continue
        rows = stratified_subsample(labels, np.arange(adata.n_obs), int(n), seed=0)
        scores = []
        for seed in (0, 1, 2):  # t-SNE's own variation, to compare the change against
            started = time.perf_counter()
            layout, _ = fit_layout({"method": "deepinsight", "size": 32, "random_state": seed}, x_all[rows],
                                   preprocessor.genes_)
            seconds = time.perf_counter() - started
            scores.append(gene_trustworthiness(x_all, layout.pixel_map_.gene_pixels[0], genes))
        report[f"trust_{n}"] = scores
        report[f"fit_seconds_{n}"] = seconds
    report["peak_mb"] = _peak_mb()
    return report


def child_ratio(args) -> dict:
    """Pipeline against the network alone on ``--file`` with the preprocessing and layout of ``--model-file``.

    The same training as ``omicsimage train`` (``CellBatches`` with the cells held in memory within
    ``--cache-gb``, ``StreamingBatches``, ``train_loop``, a fresh network) for ``--steps`` steps, alternating
    with the network alone every ``--segment-steps`` steps; without the preprocessing pass and layout fit.
    """
    import numpy as np
    import torch

    from napari_omicsimage.checkpoint import load_checkpoint
    from napari_omicsimage.models import build_model, resolve_device
    from napari_omicsimage.streaming import open_cells
    from napari_omicsimage.streaming.loader import DEFAULT_CACHE_GB, CellBatches, StreamingBatches, cache_cells
    from napari_omicsimage.streaming.run import label_codes
    from napari_omicsimage.training import TrainConfig, train_loop

    device = resolve_device(args.device)
    trained = load_checkpoint(args.model_file, device="cpu")
    adata = open_cells(args.file, label_column=LABEL)
    classes, y = label_codes(adata, LABEL)
    rows = np.arange(adata.n_obs)
    started = time.perf_counter()
    budget = DEFAULT_CACHE_GB if args.cache_gb is None else args.cache_gb
    cache = cache_cells(adata, rows, trained.preprocessor, budget)
    cache_seconds = time.perf_counter() - started
    meter = _Interleaved(args.model, args.segment_steps)
    meter.install()
    dataset = CellBatches(adata, rows, y, trained.preprocessor, args.batch_size, seed=0, cache=cache)
    source = StreamingBatches(dataset, trained.layout, device, rows[:1000])
    torch.manual_seed(0)
    model = build_model(args.model, trained.layout.n_channels, len(classes)).to(device)
    config = TrainConfig(model=args.model, epochs=1, batch_size=args.batch_size, lr=1e-3,
                         recalibrate_batchnorm=False)
    train_loop(model, source, config, max_steps=args.steps)
    return {"code": 0, "peak_mb": _peak_mb(), "cache_gb": None if cache is None else cache.nbytes / 2**30,
            "cache_seconds": cache_seconds, "segment_steps": args.segment_steps, "steps": args.steps,
            "pipeline_ips": meter.pipeline_images / meter.pipeline_seconds,
            "network_ips": meter.network_images / meter.network_seconds}


CHILDREN = {"ratio": child_ratio, "trust": child_trust, "ours-train": child_ours_train, "ours-predict": child_ours_predict, "celltypist": child_celltypist,
            "deepinsight": child_deepinsight}


# -------------------------------------------------------------------- parent
def run_child(mode: str, cap_gb: float, threads: int, timeout: float, **options) -> dict:
    """Run one child (this script, ``--child MODE``), watching its memory; returns its JSON report."""
    import psutil

    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                      "NUMBA_NUM_THREADS")}}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, __file__, "--child", mode]
    for key, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"--{key.replace('_', '-')}", *map(str, values)]
    report_file = Path(tempfile.mkstemp(suffix=".json")[1])
    argv += ["--report", str(report_file)]
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(process.pid)
    polled, killed = 0.0, None
    while process.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [watched, *watched.children(recursive=True)])
        except psutil.Error:
            rss = 0
        polled = max(polled, rss / 2**20)
        if rss > cap_gb * 2**30:
            killed = f"killed above the {cap_gb:g} GB cap"
        elif time.perf_counter() - started > timeout:
            killed = f"killed after the {timeout:.0f} s time limit"
        if killed:
            process.kill()
            break
        time.sleep(0.2)
    stderr = process.communicate()[1]
    report = json.loads(report_file.read_text()) if report_file.stat().st_size else {}
    report_file.unlink(missing_ok=True)
    report.setdefault("peak_mb", polled)
    report["wall_seconds"] = time.perf_counter() - started
    if killed or process.returncode != 0:
        report["failed"] = killed or (stderr.strip().splitlines() or ["exit %d" % process.returncode])[-1][:200]
    return report


def _fmt(value, spec=",.0f", missing="–"):
    return missing if value is None else format(value, spec)


def bench_size(n_cells: int, args, folder: Path) -> dict:
    from napari_omicsimage.streaming.synthetic import synthetic_counts_h5ad

    row = {"cells": n_cells, "genes": args.genes}
    data = folder / f"cells_{n_cells}.h5ad"
    started = time.perf_counter()
    synthetic_counts_h5ad(data, n_cells, args.genes, density=args.density, seed=0)
    row["write_seconds"] = time.perf_counter() - started
    row["file_mb"] = data.stat().st_size / 2**20
    print(f"  wrote {data.name}: {row['file_mb']:,.0f} MB in {row['write_seconds']:.0f} s", flush=True)
    test = folder / "held_out.h5ad"
    if not test.exists():
        synthetic_counts_h5ad(test, args.test_cells, args.genes, density=args.density, seed=0, cell_seed=99,
                              name_prefix="test")
    model_file = folder / f"model_{n_cells}.pt"
    common = {"cap_gb": args.cap_gb, "threads": args.threads, "timeout": args.timeout}
    train = {"failed": "not run (--tools)"}
    if "ours" in args.tools:
        cache = {} if args.cache_gb is None else {"cache_gb": args.cache_gb}
        train = run_child("ours-train", **common, file=data, model_file=model_file, steps=args.steps,
                          batch_size=args.batch_size, model=args.model, device=args.device,
                          segment_steps=args.segment_steps, **cache)
        print(f"  ours train: {json.dumps(train)}", flush=True)
    row["ours_train"] = train

    def predict(name, path):
        if "failed" in train:
            return
        if name == "ours_predict_all" and n_cells > args.predict_all_max:
            row[name] = {"failed": f"not run: above --predict-all-max {args.predict_all_max:,} cells (time)"}
            return
        row[name] = run_child("ours-predict", **common, file=path, model_file=model_file,
                              out_csv=folder / f"{name}_{n_cells}.csv", device=args.device)
        print(f"  {name}: {json.dumps(row[name])}", flush=True)

    predict("ours_predict_test", test)
    reference = {**common, "cap_gb": args.cap_gb_reference or args.cap_gb}
    if "celltypist" in args.tools:
        row["celltypist"] = run_child("celltypist", **reference, file=data, test_file=test)
        print(f"  celltypist: {json.dumps(row['celltypist'])}", flush=True)
    if "deepinsight" in args.tools:
        images_gb = n_cells * 32 * 32 * 3 * 8 / 2**30
        if images_gb > (args.cap_gb_reference or args.cap_gb):
            row["deepinsight"] = {"failed": f"not run: its float64 images alone are {images_gb:.1f} GB > cap"}
        else:
            row["deepinsight"] = run_child("deepinsight", **reference, file=data)
        print(f"  deepinsight: {json.dumps(row['deepinsight'])}", flush=True)
    predict("ours_predict_all", data)  # last: at 10⁶ cells the longest stage, and the others are in by then
    for path in folder.glob(f"*_{n_cells}.*"):
        path.unlink()
    return row


def trust_report(args, folder: Path) -> str:
    from napari_omicsimage.streaming.synthetic import synthetic_counts_h5ad

    try:
        data = synthetic_counts_h5ad(folder / "trust.h5ad", args.trust, args.genes, density=args.density, seed=0)
        result = run_child("trust", cap_gb=args.cap_gb, threads=args.threads, timeout=args.timeout, file=data,
                           trust_cells=args.trust_cells)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if "failed" in result:
        return f"trustworthiness run failed: {result['failed']}"
    import numpy as np

    lines = [f"DeepInsight (t-SNE, 32²) gene layouts of {args.trust:,} cells × {args.genes:,} genes (2,000 HVG): "
             "trustworthiness (10 neighbours, cosine) against the gene profiles over ALL cells, 3 t-SNE seeds",
             "", "| layout fitted on | trustworthiness (mean ± sd of 3 seeds) | change vs all cells | fit time |",
             "|---|---:|---:|---:|"]
    reference = np.mean(result[f"trust_{args.trust}"])
    for key in [k for k in result if k.startswith("trust_")]:
        n = int(key.split("_")[1])
        scores = np.asarray(result[key])
        lines.append(f"| {n:,} cells | {scores.mean():.4f} ± {scores.std(ddof=1):.4f} | "
                     f"{scores.mean() - reference:+.4f} | {result[f'fit_seconds_{n}']:.0f} s |")
    report = "\n".join(lines)
    print(report)
    return report


def table(rows: list[dict]) -> str:
    lines = ["| cells × genes | file | tool | peak memory | read | preprocess | cells into memory | layout | "
             "train (steps) | calibrate | predict all | pipeline / network img/s | held-out accuracy |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        size = f"{row['cells']:,} × {row['genes']:,}"
        train = row["ours_train"]
        stages = train.get("stages", {})
        predict_all = row.get("ours_predict_all", {})
        predict_note = predict_all.get("failed")
        test = row.get("ours_predict_test", {})
        peak = max(train.get("peak_mb", 0), predict_all.get("peak_mb", 0), test.get("peak_mb", 0))
        ratio = (f"{train['pipeline_ips']:,.0f} / {train['network_ips']:,.0f} = "
                 f"{train['pipeline_ips'] / train['network_ips']:.2f}") if train.get("network_ips") else "–"
        if train.get("failed") == "not run (--tools)":
            lines.append(f"| {size} | {row['file_mb']:,.0f} MB | ours: in another run | | | | | | | | | | |")
        else:
            status = f" ({train['failed']})" if "failed" in train else ""
            lines.append(
                f"| {size} | {row['file_mb']:,.0f} MB | ours{status} | {peak / 1024:.2f} GB (train "
                f"{train.get('peak_mb', 0) / 1024:.2f}, predict {predict_all.get('peak_mb', 0) / 1024:.2f}) | "
                f"{_fmt(stages.get('read'), '.1f')} s | {_fmt(stages.get('preprocess'), '.1f')} s | "
                f"{_fmt(stages.get('cache'), '.1f')} s | {_fmt(stages.get('layout'), '.1f')} s | {_fmt(stages.get('train'), '.1f')} s "
                f"({_fmt(stages.get('train_steps'), '.0f')}) | {_fmt(stages.get('calibrate'), '.1f')} s | "
                f"{predict_note or _fmt(predict_all.get('seconds'), '.0f') + ' s'} | {ratio} | "
                f"{_fmt(test.get('accuracy'), '.3f')} |")
        for tool in ("celltypist", "deepinsight"):
            if tool not in row:
                continue
            result = row[tool]
            name = {"celltypist": "CellTypist", "deepinsight": "pyDeepInsight ImageTransformer"}[tool]
            if "failed" in result:
                lines.append(f"| {size} | | {name} | {result.get('peak_mb', 0) / 1024:.2f} GB | {result['failed']} "
                             "| | | | | | | | |")
                continue
            if tool == "celltypist":
                lines.append(f"| {size} | | {name} | {result['peak_mb'] / 1024:.2f} GB | "
                             f"{result['read_seconds']:.1f} s (read + normalise) | | | | "
                             f"{result['train_seconds']:.1f} s (all cells) | | | | {result['accuracy']:.3f} |")
            else:
                lines.append(f"| {size} | | {name} | {result['peak_mb'] / 1024:.2f} GB | | | | "
                             f"fit + transform {result['seconds']:.0f} s | | | | | |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    flat = []
    for row in rows:
        for tool in ("ours_train", "ours_predict_all", "ours_predict_test", "celltypist", "deepinsight"):
            if tool in row:
                result = dict(row[tool])
                stages = result.pop("stages", {})
                flat.append({"cells": row["cells"], "genes": row["genes"], "file_mb": round(row["file_mb"], 1),
                             "tool": tool, **{f"stage_{k}": v for k, v in stages.items()}, **result})
    keys = sorted({k for r in flat for k in r}, key=lambda k: (k not in ("cells", "genes", "file_mb", "tool"), k))
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.03, help="mean detection probability (default 3 %%)")
    parser.add_argument("--test-cells", type=int, default=20_000, help="held-out cells for the accuracies")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps of our training (default 200)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-gb", type=float, default=None,
                        help="our training's --cache-gb (default: the CLI's; 0 streams from the file every epoch)")
    parser.add_argument("--segment-steps", type=int, default=20,
                        help="steps per alternating pipeline / network-alone segment (default 20)")
    parser.add_argument("--tools", nargs="+", default=["ours", "celltypist", "deepinsight"])
    parser.add_argument("--predict-all-max", type=int, default=200_000,
                        help="predict every cell of the file up to this size (above: the held-out cells only)")
    parser.add_argument("--cap-gb-reference", type=float, default=None,
                        help="memory cap for CellTypist and pyDeepInsight (default: --cap-gb)")
    parser.add_argument("--threads", type=int, default=1, help="threads per child (pinned)")
    parser.add_argument("--cap-gb", type=float, default=23.0, help="kill a child above this resident memory")
    parser.add_argument("--timeout", type=float, default=3600.0, help="kill a child after this many seconds")
    parser.add_argument("--tmp", default=None, help="folder for the generated files (default: the system's)")
    parser.add_argument("--csv", default=None, help="write the raw results here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3,000 cells × 2,000 genes, 20 steps")
    # child mode (internal)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--trust", type=int, default=None, metavar="CELLS",
                        help="instead: generate CELLS cells and compare layout trustworthiness, fitted on all cells "
                             "and on --trust-cells subsamples")
    parser.add_argument("--trust-cells", type=int, nargs="+", default=[20_000, 5_000])
    parser.add_argument("--ratio", default=None, metavar="H5AD",
                        help="instead: pipeline vs network alone on this file, with --model-file's preprocessing "
                             "and layout (e.g. one the size run wrote), --steps steps in --segment-steps segments")
    for name in ("file", "test-file", "model-file", "out-csv", "report"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.genes, args.test_cells, args.steps, args.batch_size = [3000], 2000, 1000, 20, 64
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.child:
        report = CHILDREN[args.child](args)
        Path(args.report).write_text(json.dumps(report))
        return ""
    folder = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.tmp))
    if args.trust:
        return trust_report(args, folder)
    if args.ratio:
        shutil.rmtree(folder, ignore_errors=True)
        result = run_child("ratio", cap_gb=args.cap_gb, threads=args.threads, timeout=args.timeout,
                           file=args.ratio, model_file=args.model_file, steps=args.steps, batch_size=args.batch_size,
                           model=args.model, device=args.device, segment_steps=args.segment_steps,
                           **({} if args.cache_gb is None else {"cache_gb": args.cache_gb}))
        print(json.dumps(result))
        if "failed" not in result:
            print(f"pipeline / network alone: {result['pipeline_ips']:.1f} / {result['network_ips']:.1f} img/s = "
                  f"{result['pipeline_ips'] / result['network_ips']:.2f}")
        return json.dumps(result)
    rows = []
    try:
        for n_cells in args.sizes:
            print(f"{n_cells:,} cells × {args.genes:,} genes", flush=True)
            rows.append(bench_size(n_cells, args, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    import torch

    header = (f"Scale benchmark: {os.cpu_count()} cores, {args.threads} thread(s) per child, torch "
              f"{torch.__version__}; {args.steps} steps of batch {args.batch_size}, {args.model} CNN, "
              f"DeepInsight (t-SNE) 32², held-out {args.test_cells:,} cells")
    report = header + "\n\n" + table(rows)
    print()
    print(report)
    if args.csv:
        write_csv(rows, Path(args.csv))
    return report


if __name__ == "__main__":
    main()
