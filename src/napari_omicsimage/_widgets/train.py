"""Train / evaluate widget: cross-validate and train a CNN in a thread, with progress and cancel."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import Cancelled, OmicsInputError
from ._common import (
    button_row,
    cancel_button,
    BackgroundTask,
    Relay,
    group,
    make_table,
    progress_bar,
    report_error,
    report_info,
    scroll_layout,
    wrapped_label,
)
from ._state import get_session, model_view

MODEL_HELP = {"small": "small CNN: trains in seconds on a CPU", "resnet18": "ResNet-18 (slow on a CPU)",
              "efficientnet_b0": "EfficientNet-B0 (slow on a CPU)"}
METRIC_COLUMNS = ["phase", "epoch", "loss", "train acc", "test acc", "baseline acc"]


class TrainWidget(QWidget):
    """Model, folds and epochs → cross-validation metrics, a trained model and its checkpoint."""

    def __init__(self, napari_viewer):
        super().__init__()
        from ..models import MODEL_NAMES
        from ..training import PROTOCOLS

        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.task = BackgroundTask()
        self._cancel = threading.Event()
        self.result = None  # (trained, cv) of the last run
        self.metric_rows: list[dict] = []

        self.model_combo = QComboBox()
        self.model_combo.addItems(list(MODEL_NAMES))
        self.model_combo.setCurrentText("small")
        self.model_combo.currentTextChanged.connect(lambda m: self.model_combo.setToolTip(MODEL_HELP.get(m, "")))
        self.folds_spin = QSpinBox()
        self.folds_spin.setRange(0, 20)
        self.folds_spin.setValue(5)
        self.folds_spin.setSpecialValueText("none (train only)")
        self.folds_spin.setToolTip("stratified cross-validation folds before the final model is trained on all "
                                   "samples; the layout is refitted on each training fold")
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(PROTOCOLS["recommended"]["epochs"])
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 4096)
        self.batch_spin.setValue(PROTOCOLS["recommended"]["batch_size"])
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(0.00001, 1.0)
        self.lr_spin.setSingleStep(0.0001)
        self.lr_spin.setValue(PROTOCOLS["recommended"]["lr"])
        self.lr_spin.setToolTip("Adam learning rate. Defaults: the recommended protocol (20 epochs, batch 16, "
                                "0.001). The seed paper's protocol (5 epochs, batch 32, 0.0001) underfits data "
                                "sets of tens to hundreds of samples (docs/benchmarks.md)")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        form = QFormLayout()
        form.addRow("model:", self.model_combo)
        form.addRow("cross-validation folds:", self.folds_spin)
        form.addRow("epochs:", self.epochs_spin)
        form.addRow("batch size:", self.batch_spin)
        form.addRow("learning rate:", self.lr_spin)
        form.addRow("device:", self.device_combo)
        form.addRow("seed:", self.seed_spin)
        self.layout_note = wrapped_label("")

        self.train_button = QPushButton("Train")
        self.train_button.clicked.connect(self.run)
        self.cancel_button = cancel_button(self.cancel)
        buttons = button_row(self.train_button, self.cancel_button)
        self.progress = progress_bar()
        self.status = wrapped_label("")
        self.metrics_table = make_table(METRIC_COLUMNS)
        self.metrics_table.setMinimumHeight(140)
        self.summary = wrapped_label("")
        self.figure_canvas = None
        self.figure_box = QVBoxLayout()
        self.save_button = QPushButton("Save checkpoint…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._choose_save)

        layout = scroll_layout(self)
        layout.addWidget(group("Model and protocol", form, self.layout_note))
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(group("Metrics per epoch and fold (as they come)", self.metrics_table, self.summary))
        layout.addLayout(self.figure_box)
        layout.addWidget(self.save_button)
        layout.addStretch(1)

        self._relay = Relay()
        self._relay.event.connect(self._on_event)
        self.session.data_changed.connect(self._refresh_note)
        self.session.images_changed.connect(self._refresh_note)
        self._refresh_note()

    # ------------------------------------------------------------ options
    def config(self):
        from ..training import TrainConfig

        return TrainConfig(model=self.model_combo.currentText(), epochs=self.epochs_spin.value(),
                           batch_size=self.batch_spin.value(), lr=self.lr_spin.value(),
                           seed=self.seed_spin.value(), device=self.device_combo.currentText(),
                           preprocess=self.session.preprocess).validate()

    def layout_spec(self) -> dict:
        spec = self.session.layout_spec
        if spec is None:
            raise OmicsInputError("imagify the data first (Imagify widget): training uses the same layout.")
        return dict(spec)

    def _refresh_note(self) -> None:
        spec = self.session.layout_spec
        if spec is None:
            self.layout_note.setText("images: imagify the data first; training uses the Imagify layout.")
        else:
            details = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "method")
            self.layout_note.setText(f"images: {spec['method']} ({details}), refitted on each training fold")

    # ---------------------------------------------------------------- run
    def run(self) -> None:
        from ..evaluation import cross_validate
        from ..training import train

        session = self.session
        try:
            label_column = session.require_labels()
            adata = session.require_in_memory(
                "training", f"omicsimage train {session.source or 'FILE'} --label-column {label_column} "
                "--out model.pt")
            spec = self.layout_spec()
            config = self.config()
            folds = self.folds_spin.value()
            if folds == 1:
                raise OmicsInputError("cross-validation needs at least 2 folds; choose 0 to train without it.")
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return
        relay, cancel = self._relay, self._cancel
        n_phases = folds + 1 if folds >= 2 else 1

        def progress(phase):
            def callback(event):
                try:
                    relay.event.emit((phase, n_phases, event))
                except RuntimeError:  # the widget was closed (its Qt object deleted): stop training
                    return True
                return cancel.is_set()
            return callback

        def work():
            cv = None
            if folds >= 2:
                try:
                    cv = cross_validate(adata, label_column, spec, config, folds=folds, progress=progress("cv"))
                except Cancelled:
                    raise Cancelled("cancelled before the first fold finished") from None
                if cv.cancelled or cancel.is_set():
                    return None, cv, None
            try:
                trained = train(adata, label_column, spec, config, progress=progress("final"))
            except Cancelled:
                raise Cancelled("cancelled before the first epoch finished") from None
            # the model's own images and predictions, here in the worker, not on the Qt main thread
            relay.event.emit(("view", n_phases, None))
            predictions = None
            if cv is not None and not cv.cancelled:
                # out-of-fold predictions: each sample predicted by a model that never saw it
                predictions = cv.predictions.set_index("sample")
            return trained, cv, model_view(trained, adata, label_column, predictions)

        self._cancel.clear()
        self._clear_figures()
        self.metric_rows = []
        self.metrics_table.setRowCount(0)
        self.summary.setText("")
        self.progress.setValue(0)
        self.status.setText("fitting the image layout on the training samples…")
        self.train_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.save_button.setEnabled(False)
        self.task.start(work, on_done=self._done, on_error=self._failed, on_finished=self._finished)

    def cancel(self) -> None:
        """Ask the training loop to stop at the next batch; finished epochs and folds are kept."""
        if self.task.running:
            self._cancel.set()
            self.status.setText("cancelling at the next batch…")

    def _on_event(self, value) -> None:
        phase, n_phases, event = value
        if phase == "view":
            self.status.setText("trained; rendering the images through the model and predicting every sample…")
            return
        n_epochs = event.n_epochs or 1
        if event.stage == "batch" and event.n_batches:
            index = (event.fold or 0) if phase == "cv" else n_phases - 1
            done = index * n_epochs * event.n_batches + event.epoch * event.n_batches + event.batch + 1
            self.progress.setValue(int(self.progress.maximum() * done / (n_phases * n_epochs * event.n_batches)))
            where = f"fold {event.fold + 1}/{event.n_folds}" if phase == "cv" else "final model (all samples)"
            self.status.setText(f"{where} · epoch {event.epoch + 1}/{n_epochs} · batch {event.batch + 1}/"
                                f"{event.n_batches} · loss {event.loss:.3f}")
        elif event.stage == "epoch":
            where = f"fold {event.fold + 1}" if phase == "cv" else "final"
            self._add_row({"phase": where, "epoch": event.epoch + 1, "loss": event.loss,
                           "train acc": event.metrics.get("train_accuracy")})
        elif event.stage == "fold":
            last = event.fold + 1 >= (event.n_folds or 0)
            self.status.setText(f"fold {event.fold + 1}/{event.n_folds} tested; fitting the image layout "
                                + ("for the final model on all samples…" if last else "for the next fold…"))
            self._add_row({"phase": f"fold {event.fold + 1} test", "loss": event.loss,
                           "test acc": event.metrics.get("accuracy"),
                           "baseline acc": event.metrics.get("baseline_accuracy")})

    def _add_row(self, row: dict) -> None:
        from ._common import fill_table

        self.metric_rows.append(row)
        frame = pd.DataFrame(self.metric_rows, columns=METRIC_COLUMNS)
        frame["epoch"] = frame["epoch"].astype("Int64")  # whole numbers, blank for fold rows
        fill_table(self.metrics_table, frame, METRIC_COLUMNS)
        self.metrics_table.scrollToBottom()

    def _done(self, value) -> None:
        trained, cv, *prepared = value
        self.result = (trained, cv)
        if trained is not None:
            try:
                self.session.set_trained(trained, cv, prepared=prepared[0])
            except Exception as exc:  # noqa: BLE001
                report_error(exc)
        notes = self.show_training(trained, cv)
        self.status.setText("cancelled" if self._cancel.is_set() else "done")
        report_info(notes[0] if notes else "training finished")

    def show_training(self, trained, cv) -> list[str]:
        """Summary, loss curves and confusion matrix of a finished (or cancelled) run."""
        notes = []
        if cv is not None:
            mean, sd = cv.metrics["mean"], cv.metrics["sd"]
            line = (f"cross-validation ({cv.n_folds_finished} folds): accuracy {mean['accuracy']:.3f}"
                    + (f" ± {sd['accuracy']:.3f}" if np.isfinite(sd["accuracy"]) else "")
                    + f", balanced accuracy {mean['balanced_accuracy']:.3f}")
            if "baseline" in cv.metrics:
                line += f"; logistic-regression baseline {cv.metrics['baseline']['accuracy']:.3f}"
            notes.append(line)
            if cv.cancelled:
                notes.append("cancelled: only the finished folds count; no final model was trained")
        if trained is not None:
            if not self.metric_rows:
                for record in trained.history:
                    self._add_row({"phase": "final", "epoch": record["epoch"], "loss": record["loss"],
                                   "train acc": record.get("train_accuracy")})
            n = self.session.adata.n_obs if self.session.adata is not None else "the"
            notes.append(f"final model trained on all {n} samples for {len(trained.history)} epoch(s)"
                         + (" (cancelled early)" if trained.cancelled else ""))
            self.save_button.setEnabled(True)
        self.summary.setText("\n".join(notes))
        self.show_figures(trained, cv)
        return notes

    def _failed(self, exc) -> None:
        if isinstance(exc, Cancelled):
            self.status.setText(f"{exc}; nothing was kept")
            return
        self.status.setText(f"failed: {exc}")
        report_error(exc)

    def _finished(self) -> None:
        self.train_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if not self._cancel.is_set():
            self.progress.setValue(self.progress.maximum())

    # ------------------------------------------------------------ figures
    def _clear_figures(self) -> None:
        if self.figure_canvas is not None:
            self.figure_box.removeWidget(self.figure_canvas)
            self.figure_canvas.deleteLater()
            self.figure_canvas = None

    def show_figures(self, trained, cv) -> None:
        """Loss curves and the confusion matrix under the metrics table."""
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(4.2, 2.5), dpi=100, layout="constrained")
        loss_ax, confusion_ax = figure.subplots(1, 2)
        if cv is not None:
            for f, curve in enumerate(cv.loss_curves):
                loss_ax.plot(np.arange(1, len(curve) + 1), curve, marker=".", alpha=0.6, label=f"fold {f + 1}")
        if trained is not None and trained.history:
            curve = [h["loss"] for h in trained.history]
            loss_ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", color="black", label="final")
        loss_ax.set_xlabel("epoch")
        loss_ax.set_ylabel("training loss")
        loss_ax.xaxis.get_major_locator().set_params(integer=True)
        loss_ax.grid(alpha=0.3)
        loss_ax.legend(fontsize=6)
        matrix, classes, title = self._confusion(trained, cv)
        if matrix is not None:
            totals = matrix.sum(axis=1, keepdims=True)
            share = np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)
            confusion_ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
            ticks = range(len(classes))
            short = [c if len(c) <= 12 else c[:11] + "…" for c in classes]
            confusion_ax.set_xticks(ticks, short, rotation=60, ha="right", fontsize=6)
            confusion_ax.set_yticks(ticks, short, fontsize=6)
            confusion_ax.set_xlabel("predicted", fontsize=7)
            confusion_ax.set_ylabel("true", fontsize=7)
            confusion_ax.set_title(title, fontsize=7)
        self._clear_figures()
        self.figure = figure
        self.figure_canvas = FigureCanvasQTAgg(figure)
        self.figure_canvas.setMinimumHeight(260)
        self.figure_box.addWidget(self.figure_canvas)

    def _confusion(self, trained, cv):
        if cv is not None:
            return cv.mean_confusion, cv.classes, f"out-of-fold, mean of {cv.n_folds_finished} folds"
        if trained is None or self.session.adata is None:
            return None, [], ""
        from sklearn.metrics import confusion_matrix

        imageset = self.session.imageset
        if self.session.trained is not trained or imageset is None or imageset.predictions is None:
            return None, [], ""
        # the predictions the worker made with the model's images (nothing is predicted here, on the Qt thread)
        predicted = imageset.predictions.reindex(self.session.adata.obs_names)["predicted"].astype(str).to_numpy()
        truth = self.session.adata.obs[self.session.label_column].astype(str).to_numpy()
        matrix = confusion_matrix(truth, predicted, labels=trained.classes)
        return matrix, trained.classes, "training samples (optimistic: no held-out data)"

    # -------------------------------------------------------------- save
    def _choose_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save checkpoint", "omicsimage_model.pt", "Checkpoint (*.pt)")
        if path:
            self.save(path)

    def save(self, path):
        from ..checkpoint import save_checkpoint

        try:
            trained = self.session.require_model()
            saved = save_checkpoint(trained, path, overwrite=True)  # the save dialog asked already
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return None
        report_info(f"saved the model to {path}")
        return saved if saved is not None else path
