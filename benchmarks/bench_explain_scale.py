"""Atlas scale for ``explain`` and ``render``: peak memory and time, streamed (``--backed yes``) beside in memory.

Per size (cells × ``--genes`` synthetic counts, 10 cell types,
``napari_omicsimage.streaming.synthetic``; written in chunks into a temporary
folder that is deleted afterwards) the script trains one small CNN on the
streaming path (grid layout 32 × 32, ``--steps`` optimiser steps), then runs,
each in a fresh child process with one thread, exactly as a user types them:

* ``omicsimage explain MODEL cells.h5ad --backed yes|no --cells-per-class K``
  (Integrated Gradients, ``--ig-steps`` steps, contrastive scores and the
  gradient pixel saliency): one prediction pass over every cell chooses at
  most K cells per predicted class; those are explained block by block
  (streamed) or as one subset (in memory, after reading the whole file);
* ``omicsimage render cells.h5ad --backed yes|no`` (grid 32 × 32):
  ``images.npy`` of every cell, appended block by block (streamed) or built in
  memory.

Peak memory is the child's ``ru_maxrss`` (imported libraries included, about
0.7 GB); a watchdog kills a child above ``--cap-gb``.  The two sizes show
whether memory grows with the cells.

    python benchmarks/bench_explain_scale.py                  # 10,000 and 50,000 cells × 20,000 genes
    python benchmarks/bench_explain_scale.py --quick          # smoke: 2,000 and 6,000 cells × 2,000 genes
"""

from __future__ import annotations

import argparse
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

#: the command-line runs measured, ``{model}``, ``{file}`` and ``{out}`` filled in per run
RUNS = {
    "explain": ["explain", "{model}", "{file}", "--label-column", "cell_type", "--device", "cpu",
                "--cells-per-class", "{cells_per_class}", "--steps", "{ig_steps}", "--out", "{out}"],
    "render": ["render", "{file}", "--label-column", "cell_type", "--method", "grid", "--size", "32",
               "--layout-cells", "{layout_cells}", "--out", "{out}"],
}

_CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from napari_omicsimage.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - started,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_cli(argv: list[str], cap_gb: float, timeout: float) -> dict:
    """``omicsimage ARGV`` in a fresh one-thread child; its exit code, seconds and peak memory (MB)."""
    import psutil

    env = {**os.environ, **{k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                             "NUMBA_NUM_THREADS")}}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    process = subprocess.Popen([sys.executable, "-c", _CHILD, *argv], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    started, killed = time.perf_counter(), None
    while process.poll() is None:
        try:
            rss = psutil.Process(process.pid).memory_info().rss
        except psutil.Error:
            rss = 0
        if rss > cap_gb * 2**30 or time.perf_counter() - started > timeout:
            killed = f"killed above {cap_gb:g} GB" if rss > cap_gb * 2**30 else f"killed after {timeout:.0f} s"
            process.kill()
        time.sleep(0.2)
    stdout, stderr = process.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    if killed or process.returncode or report.get("code"):
        report["failed"] = killed or (stderr.strip().splitlines() or [f"exit {process.returncode}"])[-1][:160]
    return report


def bench_size(n_cells: int, args, folder: Path) -> list[dict]:
    from napari_omicsimage.streaming.synthetic import synthetic_counts_h5ad

    cells = synthetic_counts_h5ad(folder / f"cells_{n_cells}.h5ad", n_cells, args.genes, n_types=10,
                                  density=args.density, seed=0)
    model = folder / f"model_{n_cells}.pt"
    trained = run_cli(["train", str(cells), "--label-column", "cell_type", "--backed", "yes", "--method", "grid",
                       "--size", "32", "--epochs", "1", "--max-steps", str(args.steps), "--batch-size", "128",
                       "--device", "cpu", "--out", str(model)], args.cap_gb, args.timeout)
    if "failed" in trained:
        return [{"cells": n_cells, "command": "train", "failed": trained["failed"]}]
    rows = []
    for command in args.commands:
        for backed in ("yes", "no"):
            out = folder / f"{command}_{n_cells}_{backed}"
            values = {"model": model, "file": cells, "out": out, "cells_per_class": args.cells_per_class,
                      "ig_steps": args.ig_steps, "layout_cells": args.layout_cells}
            argv = [part.format(**values) for part in RUNS[command]] + ["--backed", backed]
            print(f"  {command} --backed {backed}", flush=True)
            report = run_cli(argv, args.cap_gb, args.timeout)
            rows.append({"cells": n_cells, "command": command, "backed": backed, **report})
            print("   ", json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    cells.unlink()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| cells | command | path | peak memory | seconds |", "|---:|---|---|---:|---:|"]
    for row in rows:
        path = {"yes": "streamed (`--backed yes`)", "no": "in memory (`--backed no`)"}.get(row.get("backed"), "")
        memory = row.get("failed") or f"{row['peak_mb'] / 1024:.2f} GB"
        seconds = f"{row['seconds']:.0f}" if "seconds" in row and "failed" not in row else "–"
        lines.append(f"| {row['cells']:,} | {row['command']} | {path} | {memory} | {seconds} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.02, help="mean detection probability (default 2 %%)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the explained model (default 20)")
    parser.add_argument("--cells-per-class", type=int, default=20, help="explained cells per class (default 20)")
    parser.add_argument("--ig-steps", type=int, default=16, help="Integrated Gradients steps (default 16)")
    parser.add_argument("--layout-cells", type=int, default=20_000, help="render: layout subsample (default 20,000)")
    parser.add_argument("--commands", nargs="+", choices=sorted(RUNS), default=sorted(RUNS))
    parser.add_argument("--cap-gb", type=float, default=12.0, help="kill a child above this resident memory")
    parser.add_argument("--timeout", type=float, default=1800.0, help="kill a child after this many seconds")
    parser.add_argument("--tmp", default=None, help="folder for the generated files (default: the system's)")
    parser.add_argument("--csv", default=None, help="write the raw results here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 and 6,000 cells × 2,000 genes")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.genes, args.steps = [2_000, 6_000], 2_000, 5
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench_explain_scale_", dir=args.tmp))
    rows = []
    try:
        for n_cells in args.sizes:
            print(f"{n_cells:,} cells × {args.genes:,} genes", flush=True)
            rows += bench_size(n_cells, args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report = (f"explain / render at scale: {os.cpu_count()} cores, 1 thread per child; explain: Integrated "
              f"Gradients ({args.ig_steps} steps) + contrastive + gradient saliency of at most "
              f"{args.cells_per_class} cells per predicted class; render: grid 32 × 32 of every cell\n\n"
              + table(rows))
    print()
    print(report)
    if args.csv:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.csv, index=False)
    return report


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
