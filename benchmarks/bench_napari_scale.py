"""Atlas scale in napari: open a large .h5ad in the Data widget, imagify it, move the slider; beside the
in-memory path the Imagify widget used before (``pipeline.imagify``: every image and the dense matrix in memory).

Writes ``--cells`` × ``--genes`` synthetic counts (``streaming.synthetic``, 10 cell types) into ``--tmp``
(deleted afterwards), then runs, each in its own child process with one thread:

* **napari (lazy)**: a napari viewer with the Data and Imagify widgets, driven as a user would: the file
  is opened (``load_path``: a thread worker; above 50,000 cells it is opened backed), imagified with
  ``--method`` (``imagify_cells``: streamed preprocessing, layout on a 20,000-cell stratified subsample,
  streamed class means, a lazy dask stack), then the slider is moved to ``--steps`` positions spread over
  the cells and the genes under a pixel are asked for at each.  Measured: seconds per stage, the longest
  time the Qt event loop went without running (a 20 ms timer's largest gap: how long the window froze),
  milliseconds per slider step and per hover, and the peak resident memory (``ru_maxrss``; psutil's RSS at
  the end beside it).  ``--screenshot PNG`` saves ``viewer.screenshot`` of the window at the end;
* **in memory (before)**: ``anndata.read_h5ad`` + ``pipeline.imagify`` with the same method, what the
  Imagify widget ran before (no viewer: its memory is the images and matrices alone).

    xvfb-run -a -s "-screen 0 1920x1200x24" python benchmarks/bench_napari_scale.py   # 100,000 × 2,000
    xvfb-run -a -s "-screen 0 1920x1200x24" python benchmarks/bench_napari_scale.py --quick
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
LABEL = "cell_type"
THREADS = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


# ------------------------------------------------------------------ children
def child_napari(path: str, method: str, steps: int, screenshot: str | None) -> dict:
    os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp()) / "settings.yaml")
    import numpy as np

    import napari_omicsimage._widgets  # noqa: F401
    import napari
    from napari.settings import get_settings
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_omicsimage._widgets._state import get_session
    from napari_omicsimage._widgets.data import DataWidget
    from napari_omicsimage._widgets.imagify import ImagifyWidget

    get_settings().application.gui_notification_level = "error"
    viewer = napari.Viewer(title="napari-omicsimage: 100,000 cells, lazy stack")
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    data, imagify = DataWidget(viewer), ImagifyWidget(viewer)
    viewer.window.add_dock_widget(data, name="Data", area="right")
    imagify_dock = viewer.window.add_dock_widget(imagify, name="Imagify", area="right", tabify=True)
    app = QApplication.instance()
    session = get_session(viewer)

    gaps = {"last": time.monotonic(), "max": 0.0}

    def tick():
        now = time.monotonic()
        gaps["max"] = max(gaps["max"], now - gaps["last"])
        gaps["last"] = now

    ticker = QTimer()
    ticker.setInterval(20)
    ticker.timeout.connect(tick)

    def run_until(done, timeout: float = 3600) -> tuple[float, float]:
        """Run the Qt event loop (as napari does) until ``done()``; ``(seconds, longest stall)``."""
        loop, poll = QEventLoop(), QTimer()
        poll.setInterval(50)
        poll.timeout.connect(lambda: loop.quit() if done() else None)
        started = time.monotonic()
        gaps.update(last=started, max=0.0)
        ticker.start()
        poll.start()
        QTimer.singleShot(int(timeout * 1000), loop.quit)
        loop.exec()
        poll.stop()
        ticker.stop()
        return time.monotonic() - started, gaps["max"]

    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    out: dict = {"rss_start_gb": _rss_gb()}
    started = time.monotonic()
    assert data.load_path(path)
    out["read_call_s"] = time.monotonic() - started  # the call returns at once: the read runs in a worker
    out["read_s"], out["read_stall_s"] = run_until(lambda: not data.task.running)
    out["backed"] = bool(session.adata is not None and session.adata.isbacked)
    imagify.method_combo.setCurrentText(method)
    imagify_dock.raise_()  # on screen while it runs, as for a user watching its progress bar
    started = time.monotonic()
    imagify.run()
    out["imagify_call_s"] = time.monotonic() - started
    out["imagify_s"], out["imagify_stall_s"] = run_until(lambda: not imagify.task.running)
    layer = session.layer("images")
    out["layer_type"] = type(layer.data).__module__.split(".")[0] + "." + type(layer.data).__name__
    out["stack_shape"] = list(layer.data.shape)
    out["stack_gb_if_dense"] = float(np.prod(session.imageset.images.shape)) * 4 / 2**30
    n = session.imageset.n_samples
    step_ms, hover_ms = [], []
    rows, cols = np.nonzero(session.imageset.pixel_map.density().sum(axis=0))
    for k, i in enumerate(np.linspace(0, n - 1, steps).astype(int)):
        started = time.perf_counter()
        viewer.dims.set_current_step(0, int(i))
        app.processEvents()
        step_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        report = session.report_at(layer, (int(i), rows[k % len(rows)], cols[k % len(cols)]))
        hover_ms.append(1000 * (time.perf_counter() - started))
        assert report is not None and report.genes
    out["slider_ms_median"], out["slider_ms_max"] = float(np.median(step_ms)), float(np.max(step_ms))
    out["hover_ms_median"], out["hover_ms_max"] = float(np.median(hover_ms)), float(np.max(hover_ms))
    out["notes"] = imagify.notes.text()
    viewer.dims.set_current_step(0, int(n * 0.4321))
    for _ in range(30):
        app.processEvents()
        time.sleep(0.03)
    if screenshot:
        viewer.screenshot(screenshot, canvas_only=False, flash=False)
    out["peak_gb"], out["rss_end_gb"] = _peak_gb(), _rss_gb()
    viewer.close()
    return out


def child_eager(path: str, method: str) -> dict:
    import anndata as ad

    from napari_omicsimage.pipeline import imagify

    started = time.monotonic()
    adata = ad.read_h5ad(path)
    read_s = time.monotonic() - started
    started = time.monotonic()
    result = imagify(adata, method, label_column=LABEL)
    return {"read_s": read_s, "imagify_s": time.monotonic() - started, "stack_shape": list(result.images.shape),
            "peak_gb": _peak_gb(), "rss_end_gb": _rss_gb()}


def run_child(kind: str, args, path: Path, cap_gb: float) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--file", str(path), "--method", args.method,
               "--steps", str(args.steps)] + (["--screenshot", str(args.screenshot)] if args.screenshot else [])
    env = {**os.environ, **THREADS, "PYTHONPATH": str(ROOT / "src")}
    cap = int(cap_gb * 2**30)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    # the address-space cap keeps a runaway child off the shared machine; napari maps far more than it
    # uses (GL, fonts), so its child gets more room
    proc = subprocess.run(command, env=env, capture_output=True, text=True, preexec_fn=limit)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"failed": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--method", default="deepinsight")
    parser.add_argument("--steps", type=int, default=25, help="slider positions visited")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the generated file (deleted after)")
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--no-reference", action="store_true", help="skip the in-memory run")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="10,000 cells (smoke run)")
    parser.add_argument("--child", choices=["napari", "eager"], help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "napari":
        print("RESULT " + json.dumps(child_napari(args.file, args.method, args.steps,
                                                  str(args.screenshot) if args.screenshot else None)))
        return 0
    if args.child == "eager":
        print("RESULT " + json.dumps(child_eager(args.file, args.method)))
        return 0
    if args.quick:
        args.cells = 10_000

    from napari_omicsimage.streaming.synthetic import synthetic_counts_h5ad

    folder = Path(tempfile.mkdtemp(prefix="napari_scale_", dir=args.tmp))
    try:
        started = time.monotonic()
        path = synthetic_counts_h5ad(folder / "cells.h5ad", args.cells, args.genes, n_types=10, density=0.03)
        print(f"wrote {args.cells:,} × {args.genes:,} cells ({path.stat().st_size / 2**20:.0f} MB) in "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr)
        rows = [("napari (lazy)", run_child("napari", args, path, cap_gb=16))]
        if not args.no_reference:
            rows.append(("in memory (before)", run_child("eager", args, path, cap_gb=12)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    header = ["path", "peak memory (GB)", "read (s)", "longest freeze while reading (s)", "imagify (s)",
              "longest freeze while imagifying (s)", "slider step (ms, median / max)", "hover (ms, median / max)"]
    print(f"\n{args.cells:,} cells × {args.genes:,} genes, {args.method}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    table = []
    for name, r in rows:
        if "failed" in r:
            print(f"| {name} | failed: {r['failed']} |")
            table.append({"path": name, "failed": r["failed"]})
            continue
        cells = [name, f"{r['peak_gb']:.2f}", f"{r['read_s']:.1f}", f"{r.get('read_stall_s', float('nan')):.2f}",
                 f"{r['imagify_s']:.1f}", f"{r.get('imagify_stall_s', float('nan')):.2f}",
                 f"{r.get('slider_ms_median', float('nan')):.0f} / {r.get('slider_ms_max', float('nan')):.0f}",
                 f"{r.get('hover_ms_median', float('nan')):.0f} / {r.get('hover_ms_max', float('nan')):.0f}"]
        print("| " + " | ".join(cells) + " |")
        table.append({"path": name, **{k: v for k, v in r.items() if k != "notes"}})
    napari_row = rows[0][1]
    if "failed" not in napari_row:
        print(f"\nlayer data: {napari_row['layer_type']} {napari_row['stack_shape']} (dense it would be "
              f"{napari_row['stack_gb_if_dense']:.2f} GB); backed: {napari_row['backed']}; the widget calls "
              f"returned in {napari_row['read_call_s']:.2f} s (read) and {napari_row['imagify_call_s']:.2f} s "
              f"(imagify)\n{napari_row['notes']}")
    if args.csv:
        keys = sorted({k for row in table for k in row})
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
