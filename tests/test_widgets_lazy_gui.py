"""Atlas scale in napari: the Data widget reads in a worker and keeps a large .h5ad backed; the Imagify
widget shows a lazy stack (only the image under the slider is rendered) with streamed class means."""

import threading

import anndata as ad
import numpy as np
import pytest

import napari_omicsimage._widgets  # noqa: F401  (keeps triton out before napari creates a GL context)
import napari_omicsimage._widgets.data as data_module
import napari_omicsimage.streaming.cells as cells_module
from napari_omicsimage._widgets._common import table_column
from napari_omicsimage._widgets._state import get_session
from napari_omicsimage._widgets.data import DataWidget
from napari_omicsimage._widgets.imagify import ImagifyWidget
from napari_omicsimage.streaming.lazy import CHUNK_CELLS, is_lazy
from napari_omicsimage.streaming.synthetic import synthetic_counts_h5ad

pytestmark = pytest.mark.gui

N_CELLS = 3000


@pytest.fixture(scope="module")
def cells_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lazy_gui") / "atlas.h5ad"
    return synthetic_counts_h5ad(path, N_CELLS, 300, n_types=5, markers=12, density=0.05, seed=2, chunk_cells=1000)


def wait(qtbot, task, timeout=120_000):
    qtbot.waitUntil(lambda: not task.running, timeout=timeout)


@pytest.fixture
def backed_viewer(make_napari_viewer, qtbot, cells_file, monkeypatch):
    """Data + Imagify widgets; the file counts as large (the CLI's auto rule, threshold lowered)."""
    monkeypatch.setattr(cells_module, "STREAM_ABOVE_CELLS", N_CELLS // 2)
    threads = []
    real_open = data_module.open_cells
    monkeypatch.setattr(data_module, "open_cells", lambda *a, **k: threads.append(threading.current_thread())
                        or real_open(*a, **k))
    viewer = make_napari_viewer()
    data, imagify = DataWidget(viewer), ImagifyWidget(viewer)
    viewer.window.add_dock_widget(data, name="Data")
    viewer.window.add_dock_widget(imagify, name="Imagify")
    assert data.load_path(cells_file)
    # the read runs in a worker: the call returns at once, the window keeps processing events
    assert data.task.running and data.cancel_button.isEnabled() and not data.open_button.isEnabled()
    assert "backed" in data.read_status.text() and data.progress.maximum() > 0  # a still bar, not Qt's busy one
    wait(qtbot, data.task)
    assert threads and all(t is not threading.main_thread() for t in threads)
    return viewer, data, imagify


def test_a_large_h5ad_opens_backed_in_a_worker(backed_viewer):
    viewer, data, _ = backed_viewer
    session = get_session(viewer)
    assert session.adata.isbacked and session.adata.n_obs == N_CELLS
    assert session.label_column == "cell_type" and len(table_column(data.class_table, "class")) == 5
    assert "backed" in data.summary.text() and "judged on the first" in data.summary.text()
    assert not data.cancel_button.isEnabled() and data.open_button.isEnabled()


def test_imagify_shows_a_lazy_stack_that_renders_only_the_slice_shown(backed_viewer, qtbot):
    viewer, _, imagify = backed_viewer
    session = get_session(viewer)
    imagify.method_combo.setCurrentText("grid")
    imagify.order_combo.setCurrentText("input")
    imagify.size_spin.setValue(0)
    imagify.run()
    assert imagify.task.running and imagify.cancel_button.isEnabled()
    shares = []
    imagify._relay.event.connect(lambda _: shares.append((imagify.progress.maximum(), imagify.progress.value())))
    wait(qtbot, imagify.task)
    # never the animated busy bar (its repaints slow the worker 5×); the bar only moves forward
    assert shares and all(top == 1000 for top, _ in shares)
    assert [v for _, v in shares] == sorted(v for _, v in shares)
    assert session.adata.isbacked  # imagifying did not read the file into memory
    layer = session.layer("images")
    h, w = session.imageset.shape
    assert is_lazy(layer.data) and layer.data.shape == (N_CELLS, h, w)
    cells = session.imagified.cells
    rendered = []
    real_render = cells.render
    cells.render = lambda x: rendered.append(x.shape[0]) or real_render(x)
    cells._cache.clear()
    viewer.dims.set_current_step(0, 1234)
    qtbot.waitUntil(lambda: bool(rendered), timeout=10_000)
    assert 1 <= sum(rendered) <= CHUNK_CELLS  # only the chunk under the slider
    assert set(cells._cache) == {1234 // CHUNK_CELLS}
    # what is shown is the eager rendering of that cell
    x = session.imagified.preprocessor.transform(ad.read_h5ad(session.adata.filename)[1230:1240])
    expected = np.asarray(session.imagified.layout.transform(x))[4, 0]
    np.testing.assert_allclose(np.asarray(layer.data[1234]), expected, rtol=1e-5, atol=1e-6)
    # hover names the gene under the cursor with this cell's expression
    row, col = np.argwhere(session.imageset.pixel_map.density()[0] > 0)[0]
    gene = session.imageset.pixel_map.gene_names_at(0, row, col)[0]
    status = layer.get_status((1234, row, col), world=True)["coordinates"]
    assert gene in status and "sample cell" in status
    # the class means mosaic comes from the streamed means, and is the mean of the classes' images
    labels = session.adata.obs["cell_type"].astype(str).to_numpy()
    k = session.imageset.classes.index(labels[1234])
    members = np.flatnonzero(labels == labels[1234])[:50]
    assert session.imageset.class_means.counts[k] == (labels == labels[1234]).sum()
    assert session.layer("class-means").data.shape[0] > h
    assert "lazy stack" in imagify.notes.text()
    assert np.asarray(layer.data[members]).shape == (50, h, w)


def test_training_a_backed_file_points_to_the_command_line(backed_viewer, monkeypatch):
    from napari_omicsimage._widgets import train as train_module

    viewer, _, _ = backed_viewer
    errors = []
    monkeypatch.setattr(train_module, "report_error", lambda exc: errors.append(str(exc)))
    widget = train_module.TrainWidget(viewer)
    widget.run()
    assert not widget.task.running and errors and "omicsimage train atlas.h5ad" in errors[0]


def test_cancelled_imagify_is_discarded(backed_viewer, qtbot):
    viewer, _, imagify = backed_viewer
    imagify.method_combo.setCurrentText("grid")
    imagify.run()
    imagify.cancel()
    assert not imagify.task.running and "cancelled" in imagify.status.text()
    qtbot.wait(3000)
    assert get_session(viewer).imageset is None and imagify.run_button.isEnabled()


def test_a_large_h5ad_dropped_on_the_canvas_opens_backed_as_a_lazy_stack(make_napari_viewer, cells_file,
                                                                          monkeypatch):
    monkeypatch.setattr(cells_module, "STREAM_ABOVE_CELLS", N_CELLS // 2)
    viewer = make_napari_viewer()
    viewer.open(str(cells_file), plugin="napari-omicsimage")
    session = get_session(viewer)
    assert session.adata.isbacked and session.label_column == "cell_type"
    layer = session.layer("images")
    assert is_lazy(layer.data) and layer.data.shape[0] == N_CELLS
    assert session.imageset.class_images.shape[0] == 5


def test_napari_scale_benchmark_runs_and_prints_its_table(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_napari_scale.py"
    out = subprocess.run([sys.executable, str(script), "--cells", "2000", "--genes", "200", "--method", "grid",
                          "--steps", "3", "--tmp", str(tmp_path), "--csv", str(tmp_path / "r.csv")],
                         capture_output=True, text=True, timeout=600, env={**os.environ})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| napari (lazy) | " in out.stdout and "| in memory (before) | " in out.stdout
    assert "failed" not in out.stdout and "layer data: dask.Array [2000," in out.stdout
    assert (tmp_path / "r.csv").read_text().count("\n") == 3
