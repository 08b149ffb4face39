"""Histology widget: fit a slide → expression model and show predicted gene maps over the slide.

A thin shell over :mod:`napari_omicsimage.histology`: reading, fitting and
predicting run in a napari thread worker with a progress bar and cancel; the
layers come from :mod:`napari_omicsimage.histology.layers`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..errors import Cancelled, OmicsInputError
from ._common import (
    button_row,
    cancel_button,
    BackgroundTask,
    Relay,
    group,
    progress_bar,
    report_error,
    report_info,
    scroll_layout,
    wrapped_label,
)

FEATURE_CHOICES = ["handcrafted+fourier", "resnet50", "efficientnet_b0", "densenet121", "efficientnet-lite0",
                   "resnet18", "resnet50+fourier", "handcrafted", "fourier"]
#: model combo text → HistologyConfig.model
MODEL_CHOICES = {"PCA + ridge on patch features (HEST)": "ridge",
                 "fine-tuned CNN head (ST-Net)": "finetune"}


class HistologyWidget(QWidget):
    """Training sections + a section to predict → predicted and measured gene maps, hover for top genes."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.task = BackgroundTask()
        self._cancel = threading.Event()
        self.model = None
        self.section = None
        self.predictions = None
        self._layers: dict[str, object] = {}

        self.train_edit = QPlainTextEdit()
        self.train_edit.setPlaceholderText("training sections, one per line (legacy ST folder, Space Ranger "
                                           "folder, or .h5ad)")
        self.train_edit.setMaximumHeight(90)
        add_train = QPushButton("Add section folder…")
        add_train.clicked.connect(self._add_train_folder)
        self.section_edit = QLineEdit()
        self.section_edit.setPlaceholderText("section to predict (folder, .h5ad or slide image)")
        self.image_edit = QLineEdit()
        self.image_edit.setPlaceholderText("its full-resolution image (.h5ad / Space Ranger only)")
        self.um_spin = QDoubleSpinBox()
        self.um_spin.setRange(0.0, 100.0)
        self.um_spin.setDecimals(4)
        self.um_spin.setSpecialValueText("from the data")
        self.um_spin.setToolTip("µm per pixel; 'from the data' derives it from the slide, spot diameter or pitch")
        self.features_combo = QComboBox()
        self.features_combo.setEditable(True)
        self.features_combo.addItems(FEATURE_CHOICES)
        self.features_combo.setToolTip("handcrafted and fourier need no weights; CNN backbones need ImageNet "
                                       "weights (downloaded, or a local file) or 'random' as a baseline")
        self.weights_edit = QLineEdit("imagenet")
        self.weights_edit.setToolTip("imagenet, random (baseline, labelled so), or the path of a torchvision .pth")
        self.features_combo.currentTextChanged.connect(self._weights_apply)
        self._weights_apply(self.features_combo.currentText())
        self.model_combo = QComboBox()
        self.model_combo.addItems(list(MODEL_CHOICES))
        self.model_combo.setToolTip("PCA + ridge reads frozen patch features; the fine-tuned head trains the "
                                    "features' CNN backbone end to end (slow on a CPU)")
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(10)
        self.input_spin = QSpinBox()
        self.input_spin.setRange(32, 512)
        self.input_spin.setSingleStep(16)
        self.input_spin.setValue(224)
        self.input_spin.setToolTip("network input side in pixels (fine-tuned head); smaller trains faster")
        self.model_combo.currentTextChanged.connect(self._model_apply)
        self._model_apply(self.model_combo.currentText())
        self.genes_spin = QSpinBox()
        self.genes_spin.setRange(1, 2000)
        self.genes_spin.setValue(50)
        self.genes_spin.setToolTip("predict this many genes: those whose expression varies most between spots "
                                   "(highly variable genes) in the training sections")
        self.keep_spin = QDoubleSpinBox()
        self.keep_spin.setRange(0.05, 1.0)
        self.keep_spin.setSingleStep(0.05)
        self.keep_spin.setValue(1.0)
        self.keep_spin.setToolTip("Shannon selection (ISG): train on this fraction of spots whose patches have "
                                  "the most texture (highest Shannon entropy of their pixel values); 1 keeps all. "
                                  "The mask layer shows kept (green) and dropped (red) patches.")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        form = QFormLayout()
        form.addRow("predict:", self.section_edit)
        form.addRow("image:", self.image_edit)
        form.addRow("µm per pixel:", self.um_spin)
        form.addRow("model:", self.model_combo)
        form.addRow("features:", self.features_combo)
        form.addRow("weights:", self.weights_edit)
        form.addRow("epochs:", self.epochs_spin)
        form.addRow("input pixels:", self.input_spin)
        form.addRow("genes (most variable):", self.genes_spin)
        form.addRow("keep textured spots:", self.keep_spin)
        form.addRow("device:", self.device_combo)

        self.fit_button = QPushButton("Fit and predict")
        self.fit_button.clicked.connect(self.run_fit)
        self.load_button = QPushButton("Predict with model file…")
        self.load_button.clicked.connect(self._choose_model)
        self.cancel_button = cancel_button(self.cancel)
        buttons = button_row(self.fit_button, self.load_button, self.cancel_button)
        self.progress = progress_bar()
        self.status = wrapped_label("")
        self.gene_combo = QComboBox()
        self.gene_combo.currentTextChanged.connect(self.show_gene)
        self.shared_scale = QCheckBox("one colour scale for predicted and measured")
        self.shared_scale.setToolTip("off: each copy spans its own range (predictions are often narrower "
                                     "than the measurements and would look flat on theirs)")
        self.shared_scale.toggled.connect(lambda *_: self.show_gene(self.gene_combo.currentText()))
        self.summary = wrapped_label("")
        self.save_button = QPushButton("Save model…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._choose_save)

        layout = scroll_layout(self)
        layout.addWidget(group("Training sections", self.train_edit, add_train))
        layout.addWidget(group("Section, features and model", form))
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(group("Predicted gene (left) and measured (right)", self.gene_combo, self.shared_scale,
                               self.summary))
        layout.addWidget(self.save_button)
        layout.addStretch(1)
        self._relay = Relay()
        self._relay.event.connect(self._on_event)
        # napari hides layer tooltips by default; a spot's top genes are the point of hovering here
        napari_viewer.tooltip.visible = True

    # ------------------------------------------------------------ options
    def _scale(self):
        from ..histology import Scale

        return Scale(um_per_px=self.um_spin.value() or None)

    def config(self):
        from ..histology import HistologyConfig

        keep = self.keep_spin.value()
        return HistologyConfig(model=MODEL_CHOICES[self.model_combo.currentText()],
                               features=self.features_combo.currentText().strip(),
                               weights=self.weights_edit.text().strip() or "imagenet",
                               n_genes=self.genes_spin.value(), keep_fraction=None if keep >= 1 else keep,
                               epochs=self.epochs_spin.value(), input_px=self.input_spin.value(),
                               device=self.device_combo.currentText()).validate()

    def _weights_apply(self, spec: str) -> None:
        """Weights matter only for CNN backbones: the box is off for the weight-free feature sets."""
        from ..histology.features import BACKBONES

        self.weights_edit.setEnabled(any(part.strip() in BACKBONES for part in spec.split("+")))

    def _model_apply(self, text: str) -> None:
        """The fine-tuned head trains one backbone (DenseNet-121 as ST-Net unless one is chosen)."""
        from ..histology.features import BACKBONES
        from ..histology.models import DEFAULT_FEATURES

        finetune = MODEL_CHOICES[text] == "finetune"
        self.epochs_spin.setEnabled(finetune)
        self.input_spin.setEnabled(finetune)
        if finetune and self.features_combo.currentText().strip() not in BACKBONES:
            self.features_combo.setCurrentText(DEFAULT_FEATURES["finetune"])

    def train_paths(self) -> list[str]:
        return [line.strip() for line in self.train_edit.toPlainText().splitlines() if line.strip()]

    def _add_train_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Training section folder")
        if folder:
            self.train_edit.appendPlainText(folder)

    # ---------------------------------------------------------------- run
    def _progress(self, what: str):
        relay, cancel = self._relay, self._cancel

        def callback(event):
            try:
                relay.event.emit((what, event))
            except RuntimeError:  # the widget was closed
                return True
            return cancel.is_set()
        return callback

    def fit_work(self, train_paths, section_path, image, config, scale, model=None):
        """Read, fit (unless ``model`` is given) and predict; runs in the worker thread."""
        from ..histology import fit, read_section

        if not section_path:
            raise OmicsInputError("name the section to predict.")
        if model is None:
            if not train_paths:
                raise OmicsInputError("give at least one training section (one per line).")
            train = [read_section(p, scale=scale) for p in train_paths]
            model = fit(train, config, progress=self._progress("fitting"))
        section = read_section(section_path, image=image or None, scale=scale, require_counts=False)
        predictions = model.predict(section, progress=self._progress("predicting"),
                                    device=config.device if config is not None else None)
        return model, section, predictions

    def _start(self, work) -> None:
        self._cancel.clear()
        self.progress.setValue(0)
        self.status.setText("reading…")
        self.fit_button.setEnabled(False)
        self.load_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.task.start(work, on_done=self.show_result, on_error=self._failed, on_finished=self._finished)

    def run_fit(self) -> None:
        try:
            config, scale = self.config(), self._scale()
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return
        paths, section, image = self.train_paths(), self.section_edit.text().strip(), self.image_edit.text().strip()
        self._start(lambda: self.fit_work(paths, section, image, config, scale))

    def _choose_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Histology model", "", "Model (*.pt)")
        if path:
            self.run_predict(path)

    def run_predict(self, model_path) -> None:
        from ..histology import load_model

        try:
            model = load_model(model_path)
            scale = self._scale()
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return
        section, image = self.section_edit.text().strip(), self.image_edit.text().strip()
        self._start(lambda: self.fit_work([], section, image, None, scale, model=model))

    def cancel(self) -> None:
        if self.task.running:
            self._cancel.set()
            self.status.setText("cancelling after this batch…")

    def _on_event(self, value) -> None:
        what, event = value
        if event.stage in ("features", "patches") and event.n_batches:
            section, n_sections = int(event.metrics.get("section", 0)), int(event.metrics.get("n_sections", 1))
            done = (section + (event.batch + 1) / event.n_batches) / max(n_sections, 1)
            self.progress.setValue(int(self.progress.maximum() * done))
            kind = "patch features" if event.stage == "features" else "patches"
            self.status.setText(f"{what}: {kind} of section {section + 1}/{n_sections}, "
                                f"batch {event.batch + 1}/{event.n_batches}")
        elif event.stage == "batch" and event.n_epochs:
            done = (event.epoch + (event.batch + 1) / event.n_batches) / event.n_epochs
            self.progress.setValue(int(self.progress.maximum() * done))
            self.status.setText(f"{what}: training, epoch {event.epoch + 1}/{event.n_epochs}, "
                                f"batch {event.batch + 1}/{event.n_batches}, loss {event.loss:.3f}")

    def _failed(self, exc) -> None:
        if isinstance(exc, Cancelled):
            self.status.setText("cancelled: nothing was fitted")
            return
        self.status.setText("failed: " + report_error(exc))

    def _finished(self) -> None:
        self.fit_button.setEnabled(True)
        self.load_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    # --------------------------------------------------------------- show
    def show_result(self, value) -> None:
        from ..histology import layers
        from ..histology.tiles import shannon_select

        self.model, self.section, self.predictions = value
        section, predictions = self.section, self.predictions
        for layer in list(self._layers.values()):
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self._layers = {}
        self._add("slide", layers.slide_layer(section))
        if "measured" in predictions.layers:
            self._add("slide measured", layers.slide_layer(section, name=f"slide {section.name} (measured)",
                                                         translate=layers.measured_offset(section)))
        keep = self.model.config.keep_fraction
        selection = shannon_select(predictions.obs["entropy"].to_numpy(), keep_fraction=keep)
        self._add("shannon", layers.shannon_mask_layer(section, selection.keep, patch_um=self.model.config.patch_um))
        self._layers["shannon"].visible = False
        self._add("spots", layers.spots_layer(section, predictions))
        self._layers["spots"].visible = False
        self.gene_combo.blockSignals(True)
        self.gene_combo.clear()
        self.gene_combo.addItems(list(predictions.var_names))
        self.gene_combo.blockSignals(False)
        self.show_gene(predictions.var_names[0])
        self.fit_view()
        # again once the window has laid out the canvas beside the dock (its size may still change now)
        from qtpy.QtCore import QTimer

        QTimer.singleShot(100, self.fit_view)
        notes = [(f"{predictions.n_obs} {section.kind} of {section.name}, {predictions.n_vars} genes; "
                  f"model: {self.model.config.model_description}"),
                 f"values: {self.model.scale}", selection.describe(), *self.model.notes]
        self.summary.setText("\n".join(notes))
        self.status.setText("done: hover a spot for its top predicted genes")
        self.save_button.setEnabled(True)
        report_info(notes[0])

    def fit_view(self) -> None:
        """Zoom onto the spots (both copies when the measured one is shown), not the whole glass slide."""
        from ..histology.layers import measured_offset
        from ._state import _camera

        if self.section is None:
            return
        xy = self.section.centres
        pad = self.section.spot_diameter_px
        x0, x1 = xy[:, 0].min() - pad, xy[:, 0].max() + pad
        y0, y1 = xy[:, 1].min() - pad, xy[:, 1].max() + pad
        measured = self._layers.get("measured")
        if measured is not None and measured.visible:
            x1 += measured_offset(self.section)
        y0 -= 2 * pad  # room for the copy labels above the spots
        canvas = self.viewer.window._qt_viewer.canvas.native
        camera = _camera(self.viewer)
        camera.center = ((y0 + y1) / 2, (x0 + x1) / 2)
        camera.zoom = 0.88 * min(canvas.height() / max(y1 - y0, 1), canvas.width() / max(x1 - x0, 1))

    def _add(self, key: str, layer_data: tuple) -> None:
        data, kwargs, kind = layer_data
        self._layers[key] = getattr(self.viewer, f"add_{kind}")(data, **kwargs)

    def show_gene(self, gene: str) -> None:
        """The gene's predicted map (left) and measured map (right), each labelled and with its colour bar."""
        from ..histology import layers

        if self.predictions is None or gene not in self.predictions.var_names:
            return
        for key in ("predicted", "measured", "labels"):
            layer = self._layers.pop(key, None)
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        predicted = np.maximum(np.asarray(self.predictions[:, gene].X, dtype=float).ravel(), 0.0)
        has_measured = "measured" in self.predictions.layers
        limits = {"predicted": layers.gene_limits(predicted)}
        if has_measured:
            measured = np.asarray(self.predictions[:, gene].layers["measured"], dtype=float).ravel()
            limits["measured"] = layers.gene_limits(measured)
            if self.shared_scale.isChecked():
                both = (min(limits["predicted"][0], limits["measured"][0]),
                        max(limits["predicted"][1], limits["measured"][1]))
                limits = {"predicted": both, "measured": both}
            self._add("measured", layers.expression_layer(self.section, self.predictions, gene, measured=True,
                                                          contrast=limits["measured"]))
        self._add("predicted", layers.expression_layer(self.section, self.predictions, gene,
                                                       contrast=limits["predicted"]))
        # colour bars in the canvas corners under their copies: predicted left, measured right
        for key, corner in (("predicted", "bottom_left"), ("measured", "bottom_right")):
            layer = self._layers.get(key)
            if layer is not None:
                layer.face_colorbar.visible = True
                layer.face_colorbar.position = corner
        self._add("labels", layers.copy_labels_layer(self.section, gene, has_measured))
        self.viewer.layers.selection.active = self._layers["predicted"]
        text = f"{gene}: predicted {predicted.min():.2f}–{predicted.max():.2f}"
        if has_measured:
            r = np.corrcoef(predicted, measured)[0, 1] if np.ptp(measured) > 0 and np.ptp(predicted) > 0 else np.nan
            text += (f", measured {np.nanmin(measured):.2f}–{np.nanmax(measured):.2f}; Pearson r on this "
                     f"section {r:.2f}; " + ("one colour scale" if self.shared_scale.isChecked()
                                            else "each map its own colour scale"))
        self.status.setText(text)

    def _choose_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save histology model", "histology_model.pt", "Model (*.pt)")
        if path:
            self.save_model(path)

    def save_model(self, path) -> Path | None:
        from ..histology import save_model

        try:
            written = save_model(self.model, path)
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return None
        report_info(f"saved {written}")
        return written
