"""The histology widget in a real napari viewer: fit, predict, gene maps, hover text, cancel, save."""

import numpy as np
import pytest
from histology_fixtures import make_st_section

import napari_omicsimage._widgets  # noqa: F401  (keeps triton out before napari creates a GL context)
from napari_omicsimage._widgets.histology import HistologyWidget

pytestmark = pytest.mark.gui


@pytest.fixture
def widget(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    widget = HistologyWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Histology")
    folders = [make_st_section(tmp_path / f"S{i}", seed=i) for i in range(3)]
    widget.train_edit.setPlainText("\n".join(str(f) for f in folders[:2]))
    widget.section_edit.setText(str(folders[2]))
    widget.features_combo.setCurrentText("handcrafted+fourier")
    widget.genes_spin.setValue(4)
    widget.keep_spin.setValue(0.75)
    widget.device_combo.setCurrentText("cpu")
    return viewer, widget


def test_fit_and_predict_shows_gene_maps_with_top_genes_on_hover(widget, qtbot, tmp_path):
    viewer, w = widget
    w.run_fit()
    qtbot.waitUntil(lambda: not w.task.running, timeout=120_000)
    assert w.predictions is not None and w.predictions.n_obs == 64
    names = [layer.name for layer in viewer.layers]
    gene = w.gene_combo.currentText()
    assert {"slide S2", "slide S2 (measured)", f"predicted {gene}", f"measured {gene}"} <= set(names)
    assert any(name.startswith("Shannon: ") for name in names)
    predicted = viewer.layers[f"predicted {gene}"]
    assert predicted.size[0] == pytest.approx(w.section.spot_diameter_px)
    # the measured copy sits right of the slide
    assert viewer.layers[f"measured {gene}"].translate[1] > w.section.slide.shape[1]
    # hover: the spot's row names its top genes with predicted and measured values
    viewer.layers.selection.active = predicted
    viewer.mouse_over_canvas = True
    viewer.cursor.position = tuple(predicted.data_to_world(predicted.data[5]))
    viewer.update_status_from_cursor()
    assert "pred" in viewer.tooltip.text and "meas" in viewer.tooltip.text
    # the measured copy answers hover too
    measured = viewer.layers[f"measured {gene}"]
    viewer.layers.selection.active = measured
    viewer.cursor.position = tuple(measured.data_to_world(measured.data[5]))
    viewer.update_status_from_cursor()
    assert f"measured {gene}" in viewer.tooltip.text and "pred / meas" in viewer.tooltip.text
    # each copy labelled on the canvas, each with its colour bar and its own colour range
    labels = viewer.layers["copy labels"]
    assert list(labels.features["label"]) == [f"predicted {gene}", f"measured {gene}"]
    assert predicted.face_colorbar.visible and measured.face_colorbar.visible
    values = np.maximum(np.asarray(w.predictions[:, gene].X, dtype=float).ravel(), 0)
    assert predicted.face_contrast_limits[1] <= values.max() + 1e-9
    assert tuple(predicted.face_contrast_limits) != tuple(measured.face_contrast_limits)
    w.shared_scale.setChecked(True)
    predicted, measured = viewer.layers[f"predicted {gene}"], viewer.layers[f"measured {gene}"]
    assert tuple(predicted.face_contrast_limits) == tuple(measured.face_contrast_limits)
    # the mask's name tells what the summary tells
    mask = next(layer for layer in viewer.layers if layer.name.startswith("Shannon"))
    import re

    n_kept, n_dropped = map(int, re.match(r"Shannon: (\d+) kept \(green\), (\d+) dropped", mask.name).groups())
    assert n_kept + n_dropped == 64 and f"kept {n_kept} of 64" in w.summary.text()
    other = w.predictions.var_names[-1]
    w.gene_combo.setCurrentText(other)
    assert f"predicted {other}" in [layer.name for layer in viewer.layers]
    assert f"predicted {gene}" not in [layer.name for layer in viewer.layers]
    mask = next(layer for layer in viewer.layers if layer.name.startswith("Shannon"))
    assert set(np.unique(mask.data)) == {0, 1, 2}  # kept and dropped patches both shown
    saved = w.save_model(tmp_path / "m.pt")
    assert saved is not None and saved.exists()


def test_cancel_stops_the_fit_and_fits_nothing(widget, qtbot):
    _, w = widget
    w._cancel.set()  # cancel is asked for before the first batch finishes
    original = w._cancel.clear
    w._cancel.clear = lambda: None  # keep it set through _start
    try:
        w.run_fit()
        qtbot.waitUntil(lambda: not w.task.running, timeout=120_000)
    finally:
        w._cancel.clear = original
    assert w.predictions is None and "cancelled" in w.status.text()


def test_fine_tuned_head_is_a_model_choice_that_fits_and_predicts(widget, qtbot):
    viewer, w = widget
    w.model_combo.setCurrentText("fine-tuned CNN head (ST-Net)")
    assert w.features_combo.currentText() == "densenet121"  # ST-Net's backbone replaces a weight-free set
    assert w.epochs_spin.isEnabled() and w.input_spin.isEnabled()
    w.features_combo.setCurrentText("resnet18")
    w.weights_edit.setText("random")
    w.epochs_spin.setValue(1)
    w.input_spin.setValue(32)
    config = w.config()
    assert (config.model, config.features, config.epochs, config.input_px) == ("finetune", "resnet18", 1, 32)
    w.run_fit()
    qtbot.waitUntil(lambda: not w.task.running, timeout=120_000)
    assert w.predictions is not None and w.predictions.n_obs == 64
    assert "fine-tuned" in w.summary.text() and "RANDOM" in w.summary.text()
    assert f"predicted {w.gene_combo.currentText()}" in [layer.name for layer in viewer.layers]
    w.model_combo.setCurrentText("PCA + ridge on patch features (HEST)")
    assert not w.epochs_spin.isEnabled()
