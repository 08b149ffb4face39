"""Maintainer tool: regenerate the documentation screenshots from the demo.

    xvfb-run -a -s "-screen 0 1920x1200x24" python -m napari_omicsimage._widgets._screenshots docs/images

Runs ``omicsimage demo``'s pipeline, opens its window (``demo.DEMO_WINDOW``, 1600×1000), drives
each widget the way a user would and saves ``docs/images/*.png``.  Needs a
display (a real one or Xvfb).  ``--quick`` uses a PCA layout and 2 epochs, for
checking the script itself; ``--only NAME.png ...`` writes just those pictures (and skips the
training steps when none of their pictures is asked for).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

def _settle(app, seconds: float = 0.6) -> None:
    """Let Qt and vispy repaint (layers are sliced and drawn asynchronously)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.03)


def _wait(app, task, timeout: float = 900) -> None:
    end = time.monotonic() + timeout
    while task.running and time.monotonic() < end:
        app.processEvents()
        time.sleep(0.05)
    _settle(app)


def grab_window(window, path: Path, *, screen: bool = False) -> None:
    """Save the window as a PNG; ``screen``: the screen under it, so tooltip pop-ups (own windows) show."""
    from qtpy.QtGui import QGuiApplication

    if screen:
        frame = window.frameGeometry()
        pixmap = QGuiApplication.primaryScreen().grabWindow(0, frame.x(), frame.y(), frame.width(), frame.height())
    else:
        pixmap = window.grab()
    pixmap.save(str(path))
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", metavar="NAME.png", default=None, help="write only these pictures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # keep the user's napari settings untouched, and info toasts out of the pictures
    os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp()) / "settings.yaml")

    from ..demo import DEMO_EPOCHS, DEMO_LAYOUT, run_demo, show_demo

    spec = dict(DEMO_LAYOUT, feature_extractor="pca") if args.quick else None
    result = run_demo(epochs=2 if args.quick else DEMO_EPOCHS, layout_spec=spec)

    import napari
    from napari.settings import get_settings
    from qtpy.QtCore import QPoint
    from qtpy.QtWidgets import QApplication, QToolTip

    get_settings().application.gui_notification_level = "error"
    viewer = napari.Viewer(title="napari-omicsimage demo: PBMC cell types")
    window = viewer.window._qt_window
    window.move(0, 0)
    viewer, docks = show_demo(result, viewer=viewer, run=False)  # sizes the window as the demo does
    app = QApplication.instance()
    from ._state import _camera, get_session

    session = get_session(viewer)
    imageset = session.imageset
    canvas = viewer.window._qt_viewer.canvas.native

    last_hover: list = []

    def save(name: str, *, screen: bool = False) -> None:
        if args.only is not None and name not in args.only:
            return
        _settle(app)
        if screen and last_hover:
            hover(*last_hover[-1], settle=False)  # a repaint elsewhere may have hidden the tooltip
            _settle(app, 0.15)
        grab_window(window, args.out / name, screen=screen)

    def raise_dock(name: str):
        dock, widget = docks[name]
        dock.raise_()
        _settle(app, 0.3)
        return widget

    def hover(layer, row: float, col: float, sample: int | None = None, tooltip: bool = True,
              settle: bool = True) -> None:
        """Put the cursor on a pixel: status bar, inspector and (optionally) the tooltip follow."""
        if settle:
            last_hover.append((layer, row, col, sample, tooltip))
        viewer.layers.selection.active = layer
        world = layer.data_to_world((row, col)) if layer.ndim == 2 else layer.data_to_world((sample, row, col))[-2:]
        position = (viewer.dims.current_step[0], *world)
        viewer.mouse_over_canvas = True
        viewer.cursor.position = position
        viewer.update_status_from_cursor()
        if tooltip:
            # screen position of the world point (napari maps canvas pixels ↔ world through the camera)
            camera = _camera(viewer)
            size = np.array([canvas.height(), canvas.width()], dtype=float)
            offset = (np.asarray(world) - np.asarray(camera.center[-2:])) * camera.zoom
            screen = size / 2 + offset
            point = canvas.mapToGlobal(QPoint(int(screen[1]), int(screen[0])))
            QToolTip.showText(point + QPoint(14, 14), viewer.tooltip.text, canvas)
        if settle:
            _settle(app)

    # pick a held-out, correctly predicted monocyte: the caption then reads "✓ [held out]"
    predictions = imageset.predictions.reindex(imageset.samples)
    monocyte = "CD14+ Monocyte"
    candidates = [i for i in result.held_out
                  if imageset.labels[i] == monocyte and predictions["predicted"].iloc[i] == monocyte]
    sample = int(candidates[0] if candidates else result.held_out[0])
    session.go_to_sample(sample)
    _settle(app, 1.0)
    session.fit_view()  # now that the window has its final size
    from ..demo import _share_dock_height

    _share_dock_height(viewer, docks["5 Saliency"][0], docks["Gene inspector"][0], 0.66)

    # 1. overview: gene attribution over the image, hovering the top gene, tooltip + inspector
    saliency_widget = raise_dock("5 Saliency")
    saliency_widget.update_table()
    top = saliency_widget.table_frame.iloc[0]
    hover(session.layer("images"), top["row"], top["col"], sample)
    save("overview.png", screen=True)
    QToolTip.hideText()
    last_hover.clear()

    # 2. data widget
    raise_dock("1 Data")
    save("data_widget.png")

    # 3. imagify widget, without the explanation layers: the expression image and class means
    overlays = [layer for layer in (session.layer("saliency"), session.layer("attribution")) if layer is not None]
    shown = [layer.visible for layer in overlays]
    for layer in overlays:
        layer.visible = False
    raise_dock("2 Imagify")
    hover(session.layer("images"), top["row"], top["col"], sample, tooltip=False)
    save("imagify_widget.png")

    # 4. gene density layer
    density = session.layer("density")
    density.visible = True
    viewer.layers.selection.active = density
    crowded = np.unravel_index(np.argmax(imageset.pixel_map.density()[0]), imageset.shape)
    hover(density, *crowded, tooltip=False)
    save("gene_density.png")
    density.visible = False
    for layer, visible in zip(overlays, shown):
        layer.visible = visible

    # 5. saliency widget: a class's mean attribution map, its top gene selected (cyan square)
    saliency_widget = raise_dock("5 Saliency")
    saliency_widget.target_combo.setCurrentText(monocyte)
    _settle(app)
    saliency_widget.table.selectRow(0)
    save("saliency_widget.png")

    # 6. annotate: a region around the class's most salient genes
    annotate = raise_dock("Annotate regions")
    table = saliency_widget.table_frame.head(4)
    r0, r1 = table["row"].min() - 2.5, table["row"].max() + 2.5
    c0, c1 = table["col"].min() - 2.5, table["col"].max() + 2.5
    regions = annotate.new_shapes_layer()
    regions.add_polygons([np.array([[r0, c0], [r0 - 1, (c0 + c1) / 2], [r0, c1], [r1, c1 + 1], [r1 + 1, c0]])])
    regions.mode = "select"
    annotate.update_table()
    save("annotate_widget.png")

    # 7. inspector on a crowded pixel of the class-means mosaic
    raise_dock("1 Data")
    _share_dock_height(viewer, docks["1 Data"][0], docks["Gene inspector"][0], 0.4)
    mosaic = session.layer("class-means")
    k = imageset.classes.index(monocyte)
    top_r, top_c = imageset.mosaic.origin(k)
    # a crowded pixel that monocytes express: the interesting kind to list
    busy = (imageset.pixel_map.density()[0] >= 3) * imageset.class_images[k, 0]
    pixel = np.unravel_index(np.argmax(busy), imageset.shape)
    hover(mosaic, top_r + pixel[0], top_c + pixel[1])
    save("inspector_class_means.png", screen=True)
    QToolTip.hideText()
    last_hover.clear()
    _share_dock_height(viewer, docks["1 Data"][0], docks["Gene inspector"][0], 0.66)

    later = {"train_progress.png", "train_widget.png", "load_model_widget.png"}
    if args.only is not None and not later & set(args.only):
        viewer.close()
        return 0

    # 8. training from the widget: progress while it runs, curves and confusion matrix at the end
    train = raise_dock("3 Train / evaluate")
    train.folds_spin.setValue(3)
    train.epochs_spin.setValue(2 if args.quick else 6)
    train.metric_rows = []
    train.run()
    end = time.monotonic() + 900
    while train.task.running and len(train.metric_rows) < 4 and time.monotonic() < end:
        app.processEvents()
        time.sleep(0.05)
    save("train_progress.png")
    _wait(app, train.task)
    # the result is the curves and the confusion matrix below the table: give the dock the column and show them
    from qtpy.QtWidgets import QScrollArea

    _share_dock_height(viewer, docks["3 Train / evaluate"][0], docks["Gene inspector"][0], 0.93)
    _settle(app)
    if train.figure_canvas is not None:
        train.findChild(QScrollArea).ensureWidgetVisible(train.figure_canvas)
    save("train_widget.png")
    _share_dock_height(viewer, docks["3 Train / evaluate"][0], docks["Gene inspector"][0], 0.66)

    # 9. load the saved model and predict
    checkpoint = Path(tempfile.mkdtemp()) / "pbmc_small_cnn.pt"
    train.save(checkpoint)
    loader = raise_dock("4 Load model")
    loader.load(checkpoint)
    loader.predict()
    _settle(app)
    loader.table.selectRow(int(np.flatnonzero(loader.table_frame["correct"] == "no")[0])
                           if (loader.table_frame["correct"] == "no").any() else 0)
    save("load_model_widget.png")
    viewer.close()
    return 0


if __name__ == "__main__":  # pragma: no cover - maintainer tool
    sys.exit(main())
