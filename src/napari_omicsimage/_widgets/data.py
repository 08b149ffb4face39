"""Data widget: open expression data (or the bundled sample), pick the labels, set preprocessing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QPushButton,
    QSpinBox,
    QWidget,
)

from .._reader import guess_label_column
from ..errors import OmicsInputError
from ..io import SAMPLE_DATASETS, load_sample_data, read_expression, read_labels_table, reading_notes
from ..preprocess import PreprocessConfig, decide_scale
from ..streaming import STREAM_ABOVE_CELLS, open_cells, wants_streaming
from ._common import (
    BackgroundTask,
    ElidedLabel,
    cancel_button,
    fill_table,
    group,
    make_table,
    progress_bar,
    report_error,
    scroll_layout,
    wrapped_label,
)
from ._state import get_session

ORIENTATIONS = {"detect automatically": "auto", "genes in rows": "genes-in-rows",
                "samples in rows": "samples-in-rows"}
SCALES = {"detect automatically": None, "already log-scale (microarray, normalised)": True,
          "raw counts (normalise + log1p)": False}
NO_LABELS = "(no labels)"
#: how an .h5ad is read: the CLI's --backed auto|yes|no (backed: X stays on disk, cells stream in blocks)
READ_MODES = {f"automatic (backed above {STREAM_ABOVE_CELLS:,} cells)": "auto",
              "backed: cells stay on disk (.h5ad)": "yes", "in memory": "no"}
EXPRESSION_FILTER = "Expression data (*.h5ad *.csv *.tsv *.txt *.csv.gz *.tsv.gz *.txt.gz *.h5 *.mtx *.mtx.gz)"


def _first_class_column(labels_path) -> str | None:
    """For a labels table with several columns: the first that looks like classes (all columns are
    joined; the label-column menu switches between them)."""
    if labels_path is None:
        return None
    try:
        frame = read_labels_table(labels_path).iloc[:, 1:]
    except (OSError, ValueError):
        return None  # read_expression reports what is wrong with the file
    if frame.shape[1] <= 1 or frame.columns.duplicated().any():
        return None  # read_expression names the repeated column
    for column in frame.columns:
        values = frame[column]
        if values.notna().all() and 2 <= values.nunique() <= 50:
            return column
    return None


class DataWidget(QWidget):
    """Open a file or the bundled sample, choose the label column and preprocessing."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self._labels_path: str | None = None

        self.open_button = QPushButton("Open expression file…")
        self.open_button.setToolTip(EXPRESSION_FILTER)
        self.open_button.clicked.connect(self._choose_file)
        self.sample_combo = QComboBox()
        self.sample_combo.addItems(list(SAMPLE_DATASETS))
        self.sample_button = QPushButton("Load sample data")
        self.sample_button.setToolTip("scanpy's pbmc68k_reduced: 700 blood cells × 765 genes, 10 cell types")
        self.sample_button.clicked.connect(lambda: self.load_sample(self.sample_combo.currentText()))
        self.labels_button = QPushButton("Labels table…")
        self.labels_button.setToolTip("optional CSV/TSV with one row per sample (ids in the first column)")
        self.labels_button.clicked.connect(self._choose_labels)
        self.labels_path_label = ElidedLabel("no separate labels table")
        self.orientation_combo = QComboBox()
        self.orientation_combo.addItems(list(ORIENTATIONS))
        self.read_combo = QComboBox()
        self.read_combo.addItems(list(READ_MODES))
        self.read_combo.setToolTip("backed: the .h5ad stays on disk; preprocessing and images stream cells in "
                                   "blocks, so memory does not grow with the number of cells")
        self.task = BackgroundTask()
        self._read_id = 0
        #: (id of a backed AnnData, its auto scale decision): judged once, on its first cells, while reading
        self._backed_scale: tuple[int, str] | None = None
        self.cancel_button = cancel_button(self.cancel)
        self.progress = progress_bar()
        self.progress.setVisible(False)
        self.read_status = wrapped_label("")

        open_row = QHBoxLayout()
        open_row.addWidget(self.open_button)
        open_row.addWidget(self.labels_button)
        sample_row = QHBoxLayout()
        sample_row.addWidget(self.sample_combo)
        sample_row.addWidget(self.sample_button)
        orientation_form = QFormLayout()
        orientation_form.addRow("tables:", self.orientation_combo)
        orientation_form.addRow(".h5ad:", self.read_combo)
        read_row = QHBoxLayout()
        read_row.addWidget(self.progress, 1)
        read_row.addWidget(self.cancel_button)

        self.summary = wrapped_label("No data loaded. Open a file, drop one on the canvas, or load the sample data.")
        self.label_combo = QComboBox()
        self.label_combo.currentTextChanged.connect(self._label_column_chosen)
        label_form = QFormLayout()
        label_form.addRow("label column:", self.label_combo)
        self.class_table = make_table(["class", "samples"])
        self.class_table.setMinimumHeight(120)

        self.scale_combo = QComboBox()
        self.scale_combo.addItems(list(SCALES))
        self.top_genes = QSpinBox()
        self.top_genes.setRange(0, 100000)
        self.top_genes.setValue(2000)
        self.top_genes.setToolTip("keep this many highly variable genes (0 keeps every gene)")
        self.min_genes = QSpinBox()
        self.min_genes.setRange(0, 100000)
        self.min_genes.setToolTip("quality control: training samples with fewer detected genes are left out of "
                                  "fitting and training (0 keeps all); every sample is still imaged and predicted")
        pre_form = QFormLayout()
        pre_form.addRow("values:", self.scale_combo)
        pre_form.addRow("top variable genes:", self.top_genes)
        pre_form.addRow("min genes per sample:", self.min_genes)
        for signal in (self.scale_combo.currentTextChanged, self.top_genes.valueChanged, self.min_genes.valueChanged):
            signal.connect(self._preprocessing_changed)

        layout = scroll_layout(self)
        layout.addWidget(group("Open", open_row, self.labels_path_label, orientation_form, sample_row, read_row,
                               self.read_status))
        layout.addWidget(group("Samples and classes", self.summary, label_form, self.class_table))
        layout.addWidget(group("Preprocessing (used by Imagify and Train)", pre_form))
        layout.addStretch(1)

        self.session.data_changed.connect(self.refresh)
        self._preprocessing_changed()
        self.refresh()

    # --------------------------------------------------------------- loading
    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open expression data", "", EXPRESSION_FILTER)
        if path:
            self.load_path(path)

    def _choose_labels(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Labels table", "", "Tables (*.csv *.tsv *.txt)")
        if path:
            self.set_labels_table(path)

    def set_labels_table(self, path: str | Path) -> bool:
        """Use a labels table; data already opened from a file are read again with it."""
        self._labels_path = str(path)
        self.labels_path_label.setText(f"labels: {path}")
        if self.session.source_path is not None:
            return self.load_path(self.session.source_path, path)
        return True

    def load_path(self, path: str | Path, labels: str | Path | None = None) -> bool:
        """Start reading an expression file (and optional labels table) into the session.

        The read runs in a thread worker (the window stays responsive; the
        progress bar says "reading…", Cancel stops waiting); the data arrive in the
        session when it finishes (``task.running`` turns False).  A large
        ``.h5ad`` (the CLI's ``--backed auto`` rule, or the ".h5ad" choice) is
        opened backed: nothing of cells × genes is read.  Returns False when the
        read could not start.
        """
        labels = labels if labels is not None else self._labels_path
        orientation = ORIENTATIONS[self.orientation_combo.currentText()]
        try:
            if self.task.running:
                raise OmicsInputError("a file is being read; wait for it or press Cancel first.")
            backed = wants_streaming(path, READ_MODES[self.read_combo.currentText()])
        except Exception as exc:  # noqa: BLE001 - every failure becomes a notification
            report_error(exc)
            return False
        label_column = _first_class_column(labels)

        def work():
            if not backed:
                adata = read_expression(path, orientation=orientation, labels=labels, label_column=label_column)
                return adata, None
            from ..streaming.fit import decide_scale_streaming

            adata = open_cells(path, labels=labels, label_column=label_column if labels is not None else None)
            # judged once here, on the first cells: the summary must not read a backed file on the main thread
            return adata, decide_scale_streaming(adata, None, PreprocessConfig()).describe()

        self._read_id += 1
        read_id = self._read_id
        self.progress.setVisible(True)
        # a read reports no progress; a still bar with its text, not Qt's animated busy bar, whose repaints
        # take the GIL from the worker (see imagify.STAGE_SPANS)
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setFormat("reading…")
        how = "backed (cells stay on disk)" if backed else "into memory"
        self.read_status.setText(f"reading {Path(path).name} {how}…")
        self._set_busy(True)
        self.task.start(work, on_done=lambda value: self._read_done(value, labels, path, read_id),
                        on_error=lambda exc: self._read_failed(exc, read_id), on_finished=self._read_finished)
        return True

    def _read_done(self, value, labels, path, read_id) -> None:
        if read_id != self._read_id:
            return
        adata, scale = value
        self._backed_scale = (id(adata), scale) if scale is not None else None
        label_column = guess_label_column(adata)
        if labels is not None:
            # the labels table's own column (the first one, or the only one) holds the classes
            label_column = adata.uns.get("omicsimage", {}).get("label_column", label_column)
        backed = " (backed: cells stay on disk)" if adata.isbacked else ""
        self.read_status.setText(f"read {Path(path).name}: {adata.n_obs:,} samples{backed}")
        self.session.set_data(adata, label_column, source=Path(path).name, path=str(path))

    def _read_failed(self, exc, read_id) -> None:
        if read_id == self._read_id:
            self.read_status.setText(f"failed: {exc}")
            report_error(exc)

    def _read_finished(self) -> None:
        self.progress.setFormat("%p%")
        self.progress.setVisible(False)
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        for widget in (self.open_button, self.labels_button, self.sample_button):
            widget.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def cancel(self) -> None:
        """Stop waiting for the read: it cannot be interrupted, so its result is discarded when it ends."""
        if self.task.running:
            self._read_id += 1
            self.task.detach()
            self._read_finished()
            self.read_status.setText("cancelled (the read finishes in the background and is discarded)")

    def load_sample(self, name: str = "pbmc68k_reduced") -> bool:
        try:
            adata = load_sample_data(name)
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return False
        self.session.set_data(adata, SAMPLE_DATASETS[name], source=name)
        return True

    # ------------------------------------------------------------ labels
    def _label_column_chosen(self, text: str) -> None:
        if getattr(self, "_refreshing", False) or self.session.adata is None:
            return
        try:
            self.session.set_label_column(None if text in ("", NO_LABELS) else text)
        except OmicsInputError as exc:
            report_error(exc)
            self.refresh()

    def _preprocessing_changed(self, *_) -> None:
        top = self.top_genes.value()
        self.session.preprocess = PreprocessConfig(
            log_scale=SCALES[self.scale_combo.currentText()],
            n_top_genes=None if top == 0 else top,
            min_genes=self.min_genes.value(),
        )
        self.refresh()

    # ----------------------------------------------------------- display
    def _scale_note(self, adata) -> str:
        """How the values will be read; for a backed file the decision made while reading (its first cells)."""
        choice = SCALES[self.scale_combo.currentText()]
        if adata.isbacked and choice is None:
            if self._backed_scale is not None and self._backed_scale[0] == id(adata):
                return self._backed_scale[1]
            return "values: judged on the first cells when imagifying"
        return decide_scale(adata, choice).describe()

    def refresh(self) -> None:
        adata = self.session.adata
        self._refreshing = True
        try:
            self.label_combo.clear()
            if adata is None:
                self.class_table.setRowCount(0)
                return
            notes = [*reading_notes(adata), self._scale_note(adata)]
            source = self.session.source or "data"
            self.label_combo.addItem(NO_LABELS)
            self.label_combo.addItems([str(c) for c in adata.obs.columns])
            column = self.session.label_column
            self.label_combo.setCurrentText(column if column is not None else NO_LABELS)
            if column is not None:
                counts = adata.obs[column].astype(str).value_counts()
                frame = pd.DataFrame({"class": counts.index, "samples": counts.to_numpy()})
                fill_table(self.class_table, frame)
                classes = f", {len(counts)} classes in {column!r}"
            else:
                self.class_table.setRowCount(0)
                classes = "; no labels chosen (training needs them)"
            backed = "; backed: cells stay on disk" if adata.isbacked else ""
            self.summary.setText(f"{source}: {adata.n_obs} samples × {adata.n_vars} genes{classes}{backed}"
                                 + "".join(f"\n({note})" for note in notes))
        finally:
            self._refreshing = False
