"""Maintainer tool: the histology screenshots for the docs, from her2st patient C.

    xvfb-run -a -s "-screen 0 1920x1200x24" python -m napari_omicsimage._widgets._histology_screenshots \
        docs/images ../shared/data/her2st_patient_c

Drives the Histology widget as a user would: training sections C2–C5,
predict C6 with the weight-free features, pick the best-predicted gene, hover
a spot (tooltip with its top genes), then the Shannon-selection mask.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WINDOW = (1680, 1050)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("data", type=Path, help="the her2st_patient_c folder")
    parser.add_argument("--train", default="C2,C3,C4,C5")
    parser.add_argument("--predict", default="C6")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp()) / "settings.yaml")

    import napari
    from napari.settings import get_settings
    from qtpy.QtCore import QPoint
    from qtpy.QtWidgets import QApplication, QToolTip

    from ._screenshots import _settle, _wait, grab_window
    from ._state import _camera
    from .histology import HistologyWidget

    get_settings().application.gui_notification_level = "error"
    viewer = napari.Viewer(title="napari-omicsimage: H&E → predicted gene expression (her2st C6)")
    window = viewer.window._qt_window
    window.resize(*WINDOW)
    window.move(0, 0)
    app = QApplication.instance()
    widget = HistologyWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Histology to expression", area="right")
    widget.train_edit.setPlainText("\n".join(str(args.data / s) for s in args.train.split(",")))
    widget.section_edit.setText(str(args.data / args.predict))
    widget.features_combo.setCurrentText("handcrafted+fourier")
    widget.keep_spin.setValue(0.75)
    widget.device_combo.setCurrentText("cpu")
    canvas = viewer.window._qt_viewer.canvas.native

    def save(name: str, *, screen: bool = False) -> None:
        _settle(app)
        grab_window(window, args.out / name, screen=screen)

    widget.run_fit()
    end = time.monotonic() + 1800
    while widget.task.running and widget.progress.value() < 30 and time.monotonic() < end:
        app.processEvents()
        time.sleep(0.05)
    save("histology_progress.png")
    _wait(app, widget.task, timeout=1800)
    predictions = widget.predictions
    x, y = predictions.X, predictions.layers["measured"]
    r = [np.corrcoef(x[:, j], y[:, j])[0, 1] if np.ptp(y[:, j]) > 0 else -1 for j in range(x.shape[1])]
    best = predictions.var_names[int(np.nanargmax(r))]
    widget.gene_combo.setCurrentText(best)
    _settle(app, 1.0)
    widget.fit_view()

    # hover the spot with the highest predicted value of that gene
    layer = widget._layers["predicted"]
    spot = int(np.argmax(np.asarray(predictions[:, best].X).ravel()))
    world = layer.data_to_world(layer.data[spot])
    viewer.layers.selection.active = layer
    viewer.mouse_over_canvas = True
    viewer.cursor.position = tuple(world)
    viewer.update_status_from_cursor()
    camera = _camera(viewer)
    size = np.array([canvas.height(), canvas.width()], dtype=float)
    screen = size / 2 + (np.asarray(world) - np.asarray(camera.center[-2:])) * camera.zoom
    QToolTip.showText(canvas.mapToGlobal(QPoint(int(screen[1]), int(screen[0]))) + QPoint(14, 14),
                      viewer.tooltip.text, canvas)
    _settle(app, 0.3)
    save("histology_widget.png", screen=True)
    QToolTip.hideText()

    for key in ("predicted", "measured", "slide measured"):
        widget._layers[key].visible = False
    widget._layers["shannon"].visible = True
    widget._layers["spots"].visible = True
    viewer.layers.selection.active = widget._layers["shannon"]
    widget.fit_view()
    save("histology_shannon.png")
    print(f"best gene {best}: r = {np.nanmax(r):.3f}; tooltip: {viewer.tooltip.text!r}")
    viewer.close()
    return 0


if __name__ == "__main__":  # pragma: no cover - maintainer tool
    sys.exit(main())
