"""Saliency widget: which genes drove the model (gene attribution), per sample or per class,
with the paper's pixel saliency beside it."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QPushButton,
    QWidget,
)

from .._hover import SaliencyView
from ..errors import Cancelled, OmicsInputError
from ._common import (
    button_row,
    cancel_button,
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
#: shown in the table (the CSV export has every column of explain.gene_table)
COLUMNS = ["rank", "gene", "attribution", "pixel_saliency", "expression", "pixel_genes", "row", "col"]
#: images per saliency call: small enough to report progress and cancel often
CHUNK = 32


class SaliencyWidget(QWidget):
    """Compute gene attribution and pixel saliency for every loaded sample; list the genes that drove it."""

    def __init__(self, napari_viewer):
        super().__init__()
        from ..attribution import DEFAULT_GENE_METHOD, GENE_METHODS
        from ..explain import SALIENCY_METHODS

        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.task = BackgroundTask()
        self._cancel = threading.Event()
        self.table_frame = pd.DataFrame(columns=COLUMNS)

        self.gene_method_combo = QComboBox()
        self.gene_method_combo.addItems(list(GENE_METHODS))
        self.gene_method_combo.setCurrentText(DEFAULT_GENE_METHOD)
        self.gene_method_combo.setToolTip(
            "attribution onto each gene's expression, through the image layout (genes sharing a pixel get "
            "their own values); integrated-gradients (from the training mean profile) is the default")
        self.method_combo = QComboBox()
        self.method_combo.addItems(list(SALIENCY_METHODS))
        self.method_combo.setToolTip("the paper's pixel saliency (all genes of a pixel share its value): "
                                     "gradient: fastest; smoothgrad / integrated-gradients: less noisy; "
                                     "gradcam: coarse regions")
        form = QFormLayout()
        form.addRow("gene attribution:", self.gene_method_combo)
        form.addRow("pixel saliency:", self.method_combo)
        self.compute_button = QPushButton("Compute")
        self.compute_button.clicked.connect(self.run)
        self.cancel_button = cancel_button(self._cancel.set)
        buttons = button_row(self.compute_button, self.cancel_button)
        self.progress = progress_bar()
        self.status = wrapped_label("Needs a model: train one or load a checkpoint.")

        self.target_combo = QComboBox()
        self.target_combo.setToolTip("a class shows the mean attribution and saliency of its correctly predicted "
                                     "samples")
        self.target_combo.currentTextChanged.connect(self._target_chosen)
        target_form = QFormLayout()
        target_form.addRow("explain:", self.target_combo)
        self.context = wrapped_label("")
        self.table = make_table(COLUMNS)
        self.table.setMinimumHeight(220)
        self.table.itemSelectionChanged.connect(self._row_selected)
        self.export_button = QPushButton("Export gene table (CSV)…")
        self.export_button.clicked.connect(self._choose_export)

        layout = scroll_layout(self)
        layout.addWidget(group("Explain predictions", form))
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(group("Top genes by |attribution| (click one to mark its pixels)", target_form, self.context, self.table,
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
        method, gene_method = self.method_combo.currentText(), self.gene_method_combo.currentText()
        images, expression = imageset.images, imageset.expression
        classes = np.asarray(trained.classes, dtype=object)
        relay, cancel = self._relay, self._cancel

        def work():
            import torch

            from ..attribution import gene_attributions, merge_attributions

            model = trained.model
            model.eval()
            device = next(model.parameters()).device
            maps, attributions, predicted = [], [], []
            for start in range(0, len(images), CHUNK):
                if cancel.is_set():
                    raise Cancelled()
                chunk = np.asarray(images[start:start + CHUNK], dtype=np.float32)  # a lazy stack renders here
                with torch.no_grad():
                    target = model(torch.as_tensor(chunk, device=device)).argmax(1).cpu().numpy()
                # explain each sample for the class the model predicts (the paper's saliency)
                maps.append(np.asarray(saliency(model, chunk, method, target=target), dtype=np.float32))
                attributions.append(gene_attributions(trained, np.asarray(expression[start:start + CHUNK]), gene_method,
                                                      target=target))
                predicted.append(classes[target])
                relay.event.emit((min(start + CHUNK, len(images)), len(images)))
            return np.concatenate(maps), merge_attributions(attributions), np.concatenate(predicted)

        self._cancel.clear()
        self.progress.setValue(0)
        self.status.setText(f"{gene_method} gene attribution and {method} pixel saliency of {len(images)} samples…")
        self.compute_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.task.start(work, on_done=lambda value: self._done(value, method, imageset),
                        on_error=self._failed, on_finished=self._finished)

    def _on_progress(self, value) -> None:
        done, total = value
        self.progress.setValue(int(self.progress.maximum() * done / max(total, 1)))
        self.status.setText(f"explaining: {done}/{total} samples")

    def _done(self, value, method: str, imageset) -> None:
        maps, attribution, predicted = value
        if imageset is not self.session.imageset:
            self.status.setText("the images changed while computing; compute again")
            return
        view = SaliencyView.from_predictions(method, maps, predicted, imageset.labels, attribution)
        try:
            self.session.set_saliency(view)
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return
        self._fill_targets()
        report_info("explanation ready: hover the image to see each gene's attribution")

    def _failed(self, exc) -> None:
        if isinstance(exc, Cancelled):
            self.status.setText("cancelled; no explanation kept")
            return
        self.status.setText(f"failed: {exc}")
        report_error(exc)

    def _finished(self) -> None:
        self.compute_button.setEnabled(self.session.trained is not None)
        self.cancel_button.setEnabled(False)
        if not self._cancel.is_set():
            self.progress.setValue(self.progress.maximum())
        if not self.status.text().startswith(("failed", "cancelled", "the images changed")):
            self._show_state()

    # ------------------------------------------------------------ display
    def _model_changed(self) -> None:
        self.compute_button.setEnabled(self.session.trained is not None and not self.task.running)
        self._fill_targets()

    def _show_state(self) -> None:
        """Say what is shown, also when the explanation was computed elsewhere (the demo, a script)."""
        if self.task.running:
            return
        imageset, trained = self.session.imageset, self.session.trained
        view = imageset.saliency if imageset is not None else None
        if view is not None:
            n = len(view.per_sample)
            self.status.setText(f"done: {view.gene_method or 'no'} gene attribution and {view.method} pixel "
                                f"saliency of {n} samples (each for its predicted class); class maps: "
                                f"{view.grouping} ({len(view.per_class)} classes). Hover the image.")
            self.progress.setValue(self.progress.maximum())
        elif trained is not None:
            self.status.setText(f"model: {trained.config.model}; choose a method and compute")
            self.progress.setValue(0)
        else:
            self.status.setText("train a model (Train widget) or load one (Load model widget) first")

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
        self._show_state()

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
        self.context.setText(f"{frame['shown'].iloc[0] if len(frame) else ''}: {imageset.saliency.gene_method} "
                             "attribution (+ for / − against the class explained); pixel saliency relative to "
                             "the most salient pixel; expression scaled 0–1")
        self.table_frame = frame
        columns = COLUMNS if imageset.n_channels == 1 else COLUMNS[:-2] + ["channel", "row", "col"]
        fill_table(self.table, frame, columns, max_rows=200)

    def _row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows or self.table_frame.empty:
            return
        record = self.table_frame.iloc[rows[0].row()]
        self.session.highlight_gene(str(record["gene"]))

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

