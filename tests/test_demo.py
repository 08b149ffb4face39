"""``omicsimage demo``: headless files (without Qt) and the napari window with everything ready."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import napari_omicsimage._widgets  # noqa: F401  (keeps triton out before napari creates a GL context)
from napari_omicsimage.cli import main
from napari_omicsimage.outputs import MANIFEST

#: a layout that fits in a fraction of a second, so tests need not wait for t-SNE
QUICK = {"method": "grid", "size": None, "order": "cluster"}

#: the README's command run through the CLI entry point, then a look at what got imported
HEADLESS_SCRIPT = """
import sys
from napari_omicsimage.cli import main
code = main(["demo", "--headless", "--out", {out!r}])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy", "napari"))
print("QT_MODULES", leaked)
sys.exit(code)
"""


#: canonical CD14+ monocyte genes (classical monocyte / myeloid markers)
MONOCYTE_MARKERS = {"LST1", "AIF1", "FCN1", "TYROBP", "S100A8", "S100A9", "LYZ", "CST3", "FCER1G", "TIMP1",
                    "LGALS3", "TYMP", "CD14", "FCGR3A", "SERPINA1", "COTL1", "CPVL", "FPR1"}
TOP_N, MIN_MARKERS = 20, 5


def _random_ranking_passes(n_genes: int, n_markers: int) -> float:
    """P(a uniformly random ranking puts >= MIN_MARKERS of n_markers genes in its top TOP_N)."""
    from scipy.stats import hypergeom

    return float(hypergeom.sf(MIN_MARKERS - 1, n_genes, n_markers, TOP_N))


def test_the_marker_check_rejects_random_rankings():
    assert _random_ranking_passes(765, 15) == pytest.approx(1.83e-5, rel=0.01)
    # and it does: 20,000 shuffled rankings of the 765 genes, of which 15 are markers
    rng = np.random.default_rng(0)
    hits = (np.argsort(rng.random((20_000, 765)), axis=1)[:, :TOP_N] < 15).sum(axis=1)
    assert (hits >= MIN_MARKERS).mean() < 1e-3


@pytest.fixture(scope="module")
def quick_result():
    from napari_omicsimage.demo import run_demo

    return run_demo(epochs=1, layout_spec=QUICK, say=lambda *_: None)


def test_demo_cli_refuses_bad_output_options(tmp_path, capsys):
    assert main(["demo", "--headless"]) == 2
    assert "--headless writes files: give --out DIR" in capsys.readouterr().err
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "notes.txt").write_text("the user's")  # an empty folder may be used; one with files may not
    assert main(["demo", "--headless", "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "x")]) == 2
    assert "--out is for --headless" in capsys.readouterr().err


@pytest.mark.slow
def test_headless_demo_writes_everything_without_qt(tmp_path):
    """``omicsimage demo --headless --out DIR`` as a user runs it: t-SNE DeepInsight layout, 8 epochs."""
    out = tmp_path / "demo_out"
    done = subprocess.run([sys.executable, "-c", HEADLESS_SCRIPT.format(out=str(out))], capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr
    assert "QT_MODULES []" in done.stdout, done.stdout
    assert f"wrote images, model, saliency, gene tables and figures to {out}" in done.stdout
    expected = {"images.npy", "saliency.npy", "model.pt", "layout.npz", "pixel_genes.csv", "predictions.csv",
                "class_gene_tables.csv", "summary.json", "sample_images.png", "saliency.png", "density.png",
                MANIFEST}
    assert expected == {p.name for p in out.iterdir()}
    images, saliency = np.load(out / "images.npy"), np.load(out / "saliency.npy")
    assert images.shape == saliency.shape == (700, 1, 32, 32)
    assert (saliency >= 0).all() and saliency.max() > 0
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 700 and (predictions["split"] == "held out").sum() == 140
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layout"]["method"] == "deepinsight" and summary["epochs"] == 8
    assert summary["held_out_accuracy"] > 0.6  # 10 cell types; the largest class is 34 % of cells
    held_out = predictions[predictions["split"] == "held out"]
    assert summary["held_out_accuracy"] == pytest.approx((held_out["label"] == held_out["predicted"]).mean())
    genes = pd.read_csv(out / "class_gene_tables.csv")
    assert {"cell_type", "rank", "gene", "attribution", "pixel_saliency", "expression"} <= set(genes.columns)
    assert summary["gene_attribution"]["method"] == "integrated-gradients"
    # completeness is guaranteed: every cell within 1 %, or named as a failure (none expected here)
    attribution = summary["gene_attribution"]
    assert attribution["completeness_failures"] == []
    assert attribution["completeness_max_relative_error"] <= attribution["completeness_tolerance"] == 0.01
    # pixel-mates get their own values: no run of tied genes at the top (the paper's pixel saliency had 7)
    monocytes = genes[genes["cell_type"] == "CD14+ Monocyte"].head(10)
    assert monocytes["attribution"].round(6).nunique() == 10
    # biology check: the genes that explain monocytes are known monocyte genes, far more often than chance
    monocyte = genes[genes["cell_type"] == "CD14+ Monocyte"].sort_values("rank")
    markers = MONOCYTE_MARKERS & set(monocyte["gene"])  # 15 of the 18 are among the demo's 765 genes
    top = set(monocyte.head(TOP_N)["gene"])
    # a random ranking puts >= MIN_MARKERS of the 15 in the top 20 of 765 with probability 1.8e-5
    # (hypergeometric tail, computed here)
    assert _random_ranking_passes(len(monocyte), len(markers)) < 1e-3
    assert len(top & markers) >= MIN_MARKERS, sorted(top & markers)
    for name in ("sample_images.png", "saliency.png", "density.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10_000
    from napari_omicsimage.checkpoint import load_checkpoint

    assert len(load_checkpoint(out / "model.pt").classes) == 10


@pytest.mark.gui
@pytest.mark.slow
def test_demo_window_has_every_layer_ready_to_hover(make_napari_viewer, quick_result):
    from napari_omicsimage._widgets._state import get_session, text_overlay
    from napari_omicsimage.demo import show_demo

    viewer = make_napari_viewer()
    viewer, docks = show_demo(quick_result, viewer=viewer, run=False)
    names = {layer.name for layer in viewer.layers}
    assert {"expression images", "class means", "gene density", "gene pixels", "saliency (gradient)",
            "attribution (integrated-gradients)"} <= names
    assert set(docks) == {"1 Data", "2 Imagify", "3 Train / evaluate", "4 Load model", "5 Saliency",
                          "Annotate regions", "Gene inspector"}
    session = get_session(viewer)
    assert session.trained is quick_result.trained and session.adata.n_obs == 700
    # opens on a held-out monocyte (what the README shows), not on a cell the model was trained on
    sample = session.current_sample()
    assert sample in set(quick_result.held_out) and session.imageset.labels[sample] == "CD14+ Monocyte"
    assert "[held out]" in text_overlay(viewer).text
    # the docks say what is shown, not what to do: the demo computed it all
    assert docks["5 Saliency"][1].status.text().startswith("done:")
    assert docks["2 Imagify"][1].status.text().startswith("showing:")
    saliency_widget = docks["5 Saliency"][1]
    top = saliency_widget.table_frame.iloc[0]
    status = session.layer("attribution").get_status((0, top["row"], top["col"]), world=True)["coordinates"]
    assert top["gene"] in status and "attribution" in status and "saliency" in status
    assert docks["3 Train / evaluate"][1].metrics_table.rowCount() == len(quick_result.trained.history)


@pytest.mark.gui
@pytest.mark.slow
def test_demo_window_is_large_and_every_class_name_stays_inside_its_own_tile(make_napari_viewer, quick_result):
    """Rendered, not computed: every lit pixel of the class names lies in the band above its own tile."""
    from qtpy.QtGui import QGuiApplication
    from qtpy.QtWidgets import QApplication

    from napari_omicsimage._widgets._layers import mosaic_transform
    from napari_omicsimage._widgets._state import _camera, text_overlay
    from napari_omicsimage.demo import DEMO_WINDOW, show_demo

    viewer = make_napari_viewer(show=True)
    viewer, _ = show_demo(quick_result, viewer=viewer, run=False)
    window = viewer.window._qt_window
    available = QGuiApplication.primaryScreen().availableGeometry()
    assert available.width() >= DEMO_WINDOW[0] and available.height() >= DEMO_WINDOW[1]  # pytest-xvfb's screen
    assert window.width() >= DEMO_WINDOW[0] and window.height() >= DEMO_WINDOW[1]
    names = next(layer for layer in viewer.layers if layer.name == "class names")
    assert names.text.scaling  # the names grow and shrink with the tiles
    for layer in viewer.layers:
        layer.visible = layer is names
    text_overlay(viewer).visible = False
    imageset = quick_result.imageset
    mosaic = imageset.mosaic
    (scale_r, scale_c), (shift_r, shift_c) = mosaic_transform(imageset)
    (_, tile_w), (gap_r, _) = mosaic.tile, mosaic.gap
    camera = _camera(viewer)
    for zoom_change in (1.0, 2.0, 0.5):
        camera.zoom = camera.zoom * zoom_change
        for _ in range(10):
            QApplication.processEvents()
        shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
        lit = shot.max(axis=-1) > 60
        height, width = lit.shape
        centre, zoom = np.asarray(camera.center[-2:]), camera.zoom
        allowed = np.zeros_like(lit)
        for k in range(len(imageset.classes)):
            top, left = mosaic.origin(k)
            # the band above tile k in world units, then on screen (1 px of anti-aliasing allowed)
            rows = shift_r + scale_r * np.array([top - gap_r - 0.5, top - 0.5])
            cols = shift_c + scale_c * np.array([left - 0.5, left + tile_w - 0.5])
            r0, r1 = (height / 2 + (rows - centre[0]) * zoom + [-1, 1]).round().astype(int)
            c0, c1 = (width / 2 + (cols - centre[1]) * zoom + [-1, 1]).round().astype(int)
            band = (slice(max(r0, 0), max(r1, 0)), slice(max(c0, 0), max(c1, 0)))
            if r0 >= 0 and c0 >= 0 and r1 <= height and c1 <= width:  # on screen: its name is drawn in it
                assert lit[band].sum() > 20, imageset.classes[k]
            allowed[band] = True
        stray = lit & ~allowed
        assert stray.sum() == 0, f"zoom ×{zoom_change}: {stray.sum()} lit pixels outside the name bands"
