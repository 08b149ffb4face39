"""Saliency widget: which pixels (genes) drove the model, per sample or per class."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QPushButton,
    QWidget,
)

from .._hover import SaliencyView
from ..errors import OmicsInputError
from ._common import (
    BackgroundTask,
    Relay,
    fill_table,
    group,
    make_table,
    progress_bar,
    report_error,
    report_info,
    scroll_layout,
    wrapped_label,
)
from ._state import get_session

FOLLOW_SLIDER = "each sample (follows the slider)"
#: shown in the table (the CSV export has every column of explain.gene_table, e.g. gene_gradient)
COLUMNS = ["rank", "gene", "saliency", "expression", "pixel_genes", "row", "col"]
#: images per saliency call: small enough to report progress and cancel often
CHUNK = 32


class _Cancelled(Exception):
    pass


class SaliencyWidget(QWidget):
    """Compute saliency for every loaded sample and list the most salient genes."""

    def __init__(self, napari_viewer):
        super().__init__()
        from ..explain import SALIENCY_METHODS

        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.task = BackgroundTask()
        self._cancel = threading.Event()
        self.table_frame = pd.DataFrame(columns=COLUMNS)

        self.method_combo = QComboBox()
        self.method_combo.addItems(list(SALIENCY_METHODS))
        self.method_combo.setToolTip("gradient: fastest; smoothgrad / integrated-gradients: less noisy; "
                                     "gradcam: coarse regions")
        form = QFormLayout()
        form.addRow("method:", self.method_combo)
        self.compute_button = QPushButton("Compute saliency")
        self.compute_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self._cancel.set)
        buttons = QHBoxLayout()
        buttons.addWidget(self.compute_button)
        buttons.addWidget(self.cancel_button)
        self.progress = progress_bar()
        self.status = wrapped_label("Needs a model: train one or load a checkpoint.")

        self.target_combo = QComboBox()
        self.target_combo.setToolTip("a class shows the mean saliency of its correctly predicted samples")
        self.target_combo.currentTextChanged.connect(self._target_chosen)
        target_form = QFormLayout()
        target_form.addRow("show saliency of:", self.target_combo)
        self.context = wrapped_label("")
        self.table = make_table(COLUMNS)
        self.table.setMinimumHeight(220)
        self.table.itemSelectionChanged.connect(self._row_selected)
        self.export_button = QPushButton("Export gene table (CSV)…")
        self.export_button.clicked.connect(self._choose_export)

        layout = scroll_layout(self)
        layout.addWidget(group("Saliency", form))
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(group("Top genes (click one to mark its pixel)", target_form, self.context, self.table,
                               self.export_button))

        self._relay = Relay()
        self._relay.event.connect(self._on_progress)
        self.session.sample_changed.connect(lambda *_: self.update_table())
        self.session.model_changed.connect(self._model_changed)
        self.session.images_changed.connect(self._images_changed)
        self.session.saliency_changed.connect(self._fill_targets)
        self._model_changed()

    # ---------------------------------------------------------------- run
    def run(self) -> None:
        from ..explain import saliency

        try:
            trained = self.session.require_model()
            imageset = self.session.imageset
            if imageset is None:
                raise OmicsInputError("no images shown: train or load a model on the loaded data first.")
            if imageset.pixel_map is None:
                raise OmicsInputError("these images have no gene map (published RGB method): saliency cannot be "
                                      "traced to genes. Use a gene layout (deepinsight, fotomics, rgb-layouts, grid).")
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return
        method = self.method_combo.currentText()
        images, layout = imageset.images, imageset.layout
        classes = np.asarray(trained.classes, dtype=object)
        relay, cancel = self._relay, self._cancel

        def work():
            import torch

            from ..explain import gene_gradient, signed_gradient

            model = trained.model
            model.eval()
            device = next(model.parameters()).device
            maps, gradients, predicted = [], [], []
            for start in range(0, len(images), CHUNK):
                if cancel.is_set():
                    raise _Cancelled()
                chunk = images[start:start + CHUNK]
                with torch.no_grad():
                    target = model(torch.as_tensor(chunk, device=device)).argmax(1).cpu().numpy()
                # explain each sample for the class the model predicts (the paper's saliency)
                maps.append(np.asarray(saliency(model, chunk, method, target=target), dtype=np.float32))
                gradients.append(gene_gradient(layout, signed_gradient(model, chunk, target=target)))
                predicted.append(classes[target])
                relay.event.emit((min(start + CHUNK, len(images)), len(images)))
            return np.concatenate(maps), np.concatenate(gradients), np.concatenate(predicted)

        self._cancel.clear()
        self.progress.setValue(0)
        self.status.setText(f"{method} saliency of {len(images)} samples…")
        self.compute_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.task.start(work, on_done=lambda value: self._done(value, method, imageset),
                        on_error=self._failed, on_finished=self._finished)

    def _on_progress(self, value) -> None:
        done, total = value
        self.progress.setValue(int(self.progress.maximum() * done / max(total, 1)))
        self.status.setText(f"saliency: {done}/{total} samples")

    def _done(self, value, method: str, imageset) -> None:
        maps, gradients, predicted = value
        if imageset is not self.session.imageset:
            self.status.setText("the images changed while computing; compute again")
            return
        view = SaliencyView.from_predictions(method, maps, predicted, imageset.labels, gradients)
        try:
            self.session.set_saliency(view)
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return
        self.status.setText(f"{method} saliency of {len(maps)} samples (each for its predicted class); "
                            f"class maps: {view.grouping} ({len(view.per_class)} classes)")
        self._fill_targets()
        report_info("saliency ready: hover the image to see genes and their saliency")

    def _failed(self, exc) -> None:
        if isinstance(exc, _Cancelled):
            self.status.setText("cancelled; no saliency kept")
            return
        self.status.setText(f"failed: {exc}")
        report_error(exc)

    def _finished(self) -> None:
        self.compute_button.setEnabled(self.session.trained is not None)
        self.cancel_button.setEnabled(False)
        if not self._cancel.is_set():
            self.progress.setValue(self.progress.maximum())

    # ------------------------------------------------------------ display
    def _model_changed(self) -> None:
        self.compute_button.setEnabled(self.session.trained is not None and not self.task.running)
        if self.session.trained is not None and not self.task.running:
            self.status.setText(f"model: {self.session.trained.config.model}; choose a method and compute")
        self._fill_targets()

    def _images_changed(self) -> None:
        self._fill_targets()
        self.update_table()

    def _fill_targets(self) -> None:
        imageset = self.session.imageset
        self.target_combo.blockSignals(True)
        self.target_combo.clear()
        self.target_combo.addItem(FOLLOW_SLIDER)
        if imageset is not None and imageset.saliency is not None:
            self.target_combo.addItems(sorted(imageset.saliency.per_class))
            if imageset.saliency.target_class is not None:
                self.target_combo.setCurrentText(imageset.saliency.target_class)
        self.target_combo.blockSignals(False)
        self.update_table()

    def _target_chosen(self, text: str) -> None:
        imageset = self.session.imageset
        if imageset is None or imageset.saliency is None or not text:
            return
        try:
            self.session.show_saliency(None if text == FOLLOW_SLIDER else text)
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
        self.update_table()

    def update_table(self) -> None:
        imageset = self.session.imageset
        if imageset is None or imageset.saliency is None or imageset.pixel_map is None:
            self.table_frame = pd.DataFrame(columns=COLUMNS)
            self.table.setRowCount(0)
            self.context.setText("")
            return
        frame = imageset.gene_table()
        self.context.setText(f"{frame['shown'].iloc[0] if len(frame) else ''}: saliency relative to the most "
                             "salient pixel; expression scaled 0–1")
        self.table_frame = frame
        columns = COLUMNS if imageset.n_channels == 1 else COLUMNS[:-2] + ["channel", "row", "col"]
        fill_table(self.table, frame, columns, max_rows=200)

    def _row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows or self.table_frame.empty:
            return
        record = self.table_frame.iloc[rows[0].row()]
        self.session.highlight_pixel(int(record["row"]), int(record["col"]), str(record["gene"]))

    def _choose_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export gene table", "saliency_genes.csv", "CSV (*.csv)")
        if path:
            self.export_csv(path)

    def export_csv(self, path) -> Path | None:
        if self.table_frame.empty:
            report_error(OmicsInputError("no saliency gene table yet: compute saliency first."))
            return None
        path = Path(path)
        self.table_frame.to_csv(path, index=False)
        report_info(f"wrote {len(self.table_frame)} genes to {path.name}")
        return path

