"""Load model widget: open a checkpoint, predict the loaded samples, compare with their labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtWidgets import QFileDialog, QPushButton, QWidget

from ..errors import OmicsInputError
from ._common import (
    BackgroundTask,
    button_row,
    cancel_button,
    fill_table,
    progress_bar,
    group,
    make_table,
    report_error,
    scroll_layout,
    wrapped_label,
)
from ._state import get_session, model_view

COLUMNS = ["sample", "label", "predicted", "probability", "correct"]


class LoadModelWidget(QWidget):
    """Open a saved model and see its predictions against the labels of the loaded samples."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.loaded = None
        self.path: Path | None = None
        self.table_frame = pd.DataFrame(columns=COLUMNS)

        self.open_button = QPushButton("Open checkpoint…")
        self.open_button.clicked.connect(self._choose)
        self.predict_button = QPushButton("Predict loaded samples")
        self.predict_button.setEnabled(False)
        self.predict_button.clicked.connect(self.predict)
        self.cancel_button = cancel_button(self.cancel)
        buttons = button_row(self.open_button, self.predict_button, self.cancel_button)
        self.task = BackgroundTask()
        self._run_id = 0
        self.progress = progress_bar()
        self.progress.setVisible(False)
        self.status = wrapped_label("")
        self.model_summary = wrapped_label("No model loaded.")
        self.prediction_summary = wrapped_label("")
        self.table = make_table(COLUMNS)
        self.table.setMinimumHeight(200)
        self.table.itemSelectionChanged.connect(self._row_selected)

        layout = scroll_layout(self)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(group("Model", self.model_summary))
        layout.addWidget(group("Predictions (click a row to show that sample)", self.prediction_summary, self.table))
        self.session.data_changed.connect(self._update_buttons)
        self.session.model_changed.connect(self._show_predictions)

    def _choose(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open checkpoint", "", "Checkpoint (*.pt *.pth);;All files (*)")
        if path:
            self.load(path)

    def load(self, path) -> bool:
        from ..checkpoint import load_checkpoint

        try:
            trained = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return False
        self.loaded, self.path = trained, Path(path)
        history = trained.history or []
        self.model_summary.setText(
            f"{self.path.name}: {trained.config.model} on {trained.layout.describe()}, "
            f"{len(trained.genes)} genes, {len(trained.classes)} classes ({', '.join(trained.classes)}); "
            f"trained {len(history)} epoch(s)" + (f" on labels {trained.label_column!r}" if trained.label_column else ""))
        self._update_buttons()
        return True

    def _update_buttons(self) -> None:
        self.predict_button.setEnabled(self.loaded is not None and self.session.adata is not None
                                       and not self.task.running)

    def predict(self) -> bool:
        """Predict every loaded sample (in a worker) and show the model's images, predictions and agreement."""
        session = self.session
        try:
            if self.loaded is None:
                raise OmicsInputError("open a checkpoint first.")
            adata = session.require_in_memory(
                "prediction", f"omicsimage predict model.pt {session.source or 'FILE'} --out predictions.csv")
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return False
        trained, label_column = self.loaded, session.label_column
        self._run_id += 1
        run_id = self._run_id
        self.progress.setVisible(True)
        self.progress.setRange(0, 0)  # busy: preprocessing, rendering and predicting report no steps
        self.status.setText(f"predicting {adata.n_obs:,} samples: preprocessing, rendering, predicting…")
        self.predict_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.task.start(lambda: model_view(trained, adata, label_column),
                        on_done=lambda prepared: self._predicted(prepared, trained, run_id),
                        on_error=lambda exc: self._predict_failed(exc, run_id), on_finished=self._predict_finished)
        return True

    def cancel(self) -> None:
        """Stop waiting for the prediction (it cannot be interrupted; its result is discarded)."""
        if self.task.running:
            self._run_id += 1
            self.task.detach()
            self._predict_finished()
            self.status.setText("cancelled (the prediction finishes in the background and is discarded)")

    def _predicted(self, prepared, trained, run_id) -> None:
        if run_id != self._run_id:
            return
        try:
            self.session.set_trained(trained, prepared=prepared)
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return
        self.status.setText(f"predicted {prepared[0].n_samples:,} samples")

    def _predict_failed(self, exc, run_id) -> None:
        if run_id == self._run_id:
            self.status.setText("failed: " + report_error(exc))

    def _predict_finished(self) -> None:
        self.progress.setRange(0, 1000)
        self.progress.setValue(1000)
        self.cancel_button.setEnabled(False)
        self._update_buttons()

    def _show_predictions(self) -> None:
        imageset = self.session.imageset
        if imageset is None or imageset.predictions is None or self.session.trained is not self.loaded:
            return
        predictions = imageset.predictions.reindex(imageset.samples)
        predicted = predictions["predicted"].astype(str).to_numpy()
        probability = np.array([predictions[f"prob_{p}"].iloc[i] for i, p in enumerate(predicted)])
        labels = imageset.labels if imageset.labels is not None else np.full(len(predicted), "")
        frame = pd.DataFrame({"sample": imageset.samples, "label": labels, "predicted": predicted,
                              "probability": probability})
        n_missing = predictions.attrs.get("n_missing_genes", 0)
        notes = []
        if imageset.labels is not None:
            known = np.isin(labels, self.loaded.classes)
            frame["correct"] = np.where(known, np.where(labels == predicted, "yes", "no"), "unknown class")
            if known.any():
                correct = int((labels[known] == predicted[known]).sum())
                notes.append(f"agreement with {imageset.label_column!r}: {correct}/{int(known.sum())} "
                             f"({correct / known.sum():.1%})")
            if (~known).any():
                notes.append(f"{int((~known).sum())} sample(s) carry labels the model does not know")
        else:
            frame["correct"] = ""
            notes.append("no labels chosen: predictions only")
        if getattr(self.loaded, "label_column", None) is not None:
            notes.append("samples the model was trained on score optimistically")
        if n_missing:
            notes.append(f"{n_missing} model gene(s) missing from these data were filled with training means")
        self.table_frame = frame
        self.prediction_summary.setText("; ".join(notes))
        fill_table(self.table, frame, COLUMNS)

    def _row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.session.go_to_sample(rows[0].row())
