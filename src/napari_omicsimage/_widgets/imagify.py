"""Imagify widget: method and parameters → image stack, gene density and class means."""

from __future__ import annotations

import threading

from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..layouts import (
    ASSIGNMENT_DISCRETIZATIONS,
    DEFAULT_GRID_ORDER,
    DEFAULT_IMAGE_SIZE,
    DISCRETIZATIONS,
    FEATURE_EXTRACTORS,
    GRID_ORDERS,
    METHODS,
)
from .._hover import ImageSet
from ..errors import OmicsInputError
from ..pipeline import imagify
from ..progress import ProgressEvent
from ..streaming.lazy import imagify_cells
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
from ._state import get_session, make_layers

METHOD_HELP = {
    "deepinsight": "genes placed by a 2-D embedding of their profiles (similar genes sit together)",
    "fotomics": "genes placed by the Fourier transform of the samples",
    "rgb-layouts": "three gene layouts (t-SNE, PCA, UMAP) as red, green and blue",
    "grid": "one gene per pixel, row by row (co-expression cluster, chromosome or input order)",
    "rgb-embedding": "the published RGB method: one dot per sample; pixels are NOT genes (no gene hover)",
    "som": "a self-organising map of gene profiles, then one gene per pixel (similar genes sit together)",
}
#: methods whose random seed changes the layout
SEEDED_METHODS = ("deepinsight", "rgb-layouts", "rgb-embedding", "som")
DISCRETIZED_METHODS = ("deepinsight", "fotomics", "rgb-layouts")


#: the share of the progress bar each stage of an Imagify run fills (steps that report no progress, like the
#: layout fit, hold the bar still with their name beside it).  Never Qt's animated busy bar: its repaints
#: take the GIL from the worker many times a second, and fitting a 10,000-cell DeepInsight layout took 5×
#: as long (52 s → 245-270 s, benchmarks/bench_napari_scale.py --quick) while it was on screen.
STAGE_SPANS = (("preprocessing", (0.0, 0.3)), ("fitting", (0.3, 0.3)), ("class means", (0.6, 0.95)),
               ("rendering a preview", (0.95, 0.95)), ("making the layers", (0.97, 0.97)),
               ("rendering images", (0.6, 1.0)))


def _default_size_spin(method: str, discretization: str = "bin") -> int:
    """The size box's default for a method (0 shows 'automatic')."""
    if method in ("grid", "rgb-embedding", "som"):
        return 0
    if method in DISCRETIZED_METHODS and discretization in ASSIGNMENT_DISCRETIZATIONS:
        return 0  # one pixel per gene: sized when the genes are known
    return DEFAULT_IMAGE_SIZE


class ImagifyWidget(QWidget):
    """Turn the loaded samples into images shown as napari layers."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.task = BackgroundTask()
        self._cancel = threading.Event()
        self._run_id = 0
        self._method: str | None = None  # the method whose default size the size box shows
        self._discretization = "bin"  # and the discretisation it was shown for

        self.method_combo = QComboBox()
        self.method_combo.addItems(list(METHODS))
        self.method_combo.currentTextChanged.connect(self._method_changed)
        self.method_help = wrapped_label()
        self.size_spin = QSpinBox()
        self.size_spin.setRange(0, 512)
        self.size_spin.setValue(DEFAULT_IMAGE_SIZE)
        self.size_spin.setSpecialValueText("automatic")
        self.size_spin.setToolTip(f"image side in pixels ('automatic': {DEFAULT_IMAGE_SIZE} for gene layouts, the "
                                  "smallest square with a pixel per gene for grids, SOMs and the lsa/ags "
                                  "discretisations, 128 for rgb-embedding)")
        self.extractor_combo = QComboBox()
        self.extractor_combo.addItems(list(FEATURE_EXTRACTORS))
        self.extractor_combo.setToolTip("tsne: best-looking layouts; pca: fastest")
        self.discretization_combo = QComboBox()
        self.discretization_combo.addItems(list(DISCRETIZATIONS))
        self.discretization_combo.setToolTip("bin/qtb: nearby genes share pixels; lsa/ags: every gene its own pixel")
        self.discretization_combo.currentTextChanged.connect(self._discretization_changed)
        self.order_combo = QComboBox()
        self.order_combo.addItems(list(GRID_ORDERS))
        self.order_combo.setCurrentText(DEFAULT_GRID_ORDER)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        form = QFormLayout()
        form.addRow("method:", self.method_combo)
        form.addRow("", self.method_help)
        form.addRow("image size:", self.size_spin)
        form.addRow("gene embedding:", self.extractor_combo)
        form.addRow("discretisation:", self.discretization_combo)
        form.addRow("grid order:", self.order_combo)
        form.addRow("random seed:", self.seed_spin)

        self.run_button = QPushButton("Imagify")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = cancel_button(self.cancel)
        buttons = button_row(self.run_button, self.cancel_button)
        self.progress = progress_bar()
        self.status = wrapped_label("")
        self.caption = wrapped_label("")
        self.notes = wrapped_label("")

        layout = scroll_layout(self)
        layout.addWidget(group("Layout", form))
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(group("Current sample (move the slider under the canvas)", self.caption, self.notes))
        layout.addStretch(1)

        self._relay = Relay()
        self._relay.event.connect(self._on_progress)
        self.session.images_changed.connect(self._images_changed)
        self.session.sample_changed.connect(lambda *_: self.caption.setText(self.session.caption()))
        self.session.data_changed.connect(self._data_changed)
        self._method_changed(self.method_combo.currentText())
        self._data_changed()
        self._images_changed()

    # ----------------------------------------------------------- options
    def _method_changed(self, method: str) -> None:
        # Follow the new method's own default size unless the user has set one: grids and the published RGB
        # method size themselves ('automatic'), gene layouts use DEFAULT_IMAGE_SIZE.
        self._follow_default_size(method, self._discretization)
        self.method_help.setText(METHOD_HELP.get(method, ""))
        self.extractor_combo.setEnabled(method == "deepinsight")
        self.discretization_combo.setEnabled(method in DISCRETIZED_METHODS)
        self.order_combo.setEnabled(method == "grid")
        self.seed_spin.setEnabled(method in SEEDED_METHODS)

    def _discretization_changed(self, discretization: str) -> None:
        if self._method is not None:
            self._follow_default_size(self._method, discretization)

    def _follow_default_size(self, method: str, discretization: str) -> None:
        previous = (self._method, self._discretization)
        if previous[0] is not None and self.size_spin.value() == _default_size_spin(*previous):
            self.size_spin.setValue(_default_size_spin(method, discretization))
        self._method, self._discretization = method, discretization

    def layout_spec(self) -> dict:
        """``{"method", "size", **params}`` as :func:`layouts.make_layout` and training take it."""
        method = self.method_combo.currentText()
        params: dict = {}
        if method in SEEDED_METHODS:
            params["random_state"] = self.seed_spin.value()
        if method == "deepinsight":
            params["feature_extractor"] = self.extractor_combo.currentText()
        if method in DISCRETIZED_METHODS:
            params["discretization"] = self.discretization_combo.currentText()
        if method == "grid":
            params["order"] = self.order_combo.currentText()
        size = self.size_spin.value() or None
        return {"method": method, "size": size, **params}

    def set_layout_spec(self, spec: dict) -> None:
        """Show ``spec`` in the form (used when data arrive with a layout already fitted)."""
        self.method_combo.setCurrentText(spec.get("method", "deepinsight"))
        self.size_spin.setValue(int(spec.get("size") or 0))
        if "feature_extractor" in spec:
            self.extractor_combo.setCurrentText(spec["feature_extractor"])
        if "discretization" in spec:
            self.discretization_combo.setCurrentText(spec["discretization"])
        if "order" in spec:
            self.order_combo.setCurrentText(spec["order"])
        if "random_state" in spec:
            self.seed_spin.setValue(int(spec["random_state"]))

    # --------------------------------------------------------------- run
    def run(self) -> None:
        session = self.session
        try:
            adata = session.require_data()
            spec = self.layout_spec()
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return
        params = {k: v for k, v in spec.items() if k not in ("method", "size")}
        label_column, preprocess = session.label_column, session.preprocess
        relay, cancel = self._relay, self._cancel
        if spec["method"] == "rgb-embedding" and adata.isbacked:
            report_error(OmicsInputError("the rgb-embedding method places every sample at fit time and cannot "
                                         "stream a backed file; use a gene layout (deepinsight, fotomics, "
                                         "rgb-layouts, grid, som)."))
            return

        def work():
            if spec["method"] == "rgb-embedding":  # places samples, not genes: rendered at fit, in memory
                return imagify(adata, spec["method"], size=spec["size"], label_column=label_column,
                               preprocess=preprocess, layout_params=params,
                               progress=lambda event: relay.event.emit(("rendering images", event.done,
                                                                         event.n_batches or 0)))

            def progress(event):
                relay.event.emit((event.stage, event.done, event.n_batches or 0))
                return cancel.is_set()

            # gene layouts: a lazy stack (napari renders the image under the slider), streamed class means
            result = imagify_cells(adata, spec["method"], size=spec["size"], label_column=label_column,
                                   preprocess=preprocess, layout_params=params, progress=progress)
            progress(ProgressEvent("making the layers"))
            imageset = ImageSet.from_imagified(result, label_column)
            return result, (imageset, make_layers(imageset))  # here, not in the window's thread

        self._run_id += 1
        run_id = self._run_id
        self._cancel.clear()
        self.progress.setRange(0, 1000)  # never the animated busy bar: see STAGE_SPANS
        self.progress.setValue(0)
        self.status.setText(f"fitting the {spec['method']} layout on {adata.n_obs} samples…")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.task.start(work, on_done=lambda result: self._done(result, spec, run_id),
                        on_error=lambda exc: self._failed(exc, run_id), on_finished=self._finished)

    def cancel(self) -> None:
        """Stop: the streaming passes stop at their next block; a layout fit cannot be interrupted, so its
        result is discarded when it ends."""
        if self.task.running:
            self._cancel.set()
            self._run_id += 1
            self.task.detach()
            self._finished()
            self.progress.setValue(0)
            self.status.setText("cancelled (work under way stops at its next step and is discarded)")

    def _on_progress(self, value) -> None:
        stage, done, total = value
        if not self.task.running:
            return
        first, last = next((span for prefix, span in STAGE_SPANS if stage.startswith(prefix)), (0.0, 1.0))
        share = first + (last - first) * (done / total if total else 0.0)
        self.progress.setValue(max(self.progress.value(), int(self.progress.maximum() * share)))
        self.status.setText(f"{stage}: {done:,}/{total:,}" if total else f"{stage}…")

    def _done(self, result, spec, run_id) -> None:
        if run_id != self._run_id:
            return
        result, prepared = result if isinstance(result, tuple) else (result, None)
        try:
            self.session.set_imagified(result, spec, prepared)
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return
        self.notes.setText("\n".join(result.notes))
        report_info(f"imagified {result.images.shape[0]} samples: {result.layout.describe()}")

    def _failed(self, exc, run_id) -> None:
        if run_id == self._run_id:
            self.status.setText(f"failed: {exc}")
            report_error(exc)

    def _finished(self) -> None:
        self.progress.setRange(0, 1000)
        self.progress.setValue(self.progress.maximum())
        self.run_button.setEnabled(self.session.adata is not None)
        self.cancel_button.setEnabled(False)
        if self.session.imageset is not None and not self.status.text().startswith("failed"):
            self.status.setText(f"showing: {self.session.imageset.description}")

    def _data_changed(self) -> None:
        adata = self.session.adata
        self.run_button.setEnabled(adata is not None and not self.task.running)
        if adata is not None and self.session.imageset is None and not self.task.running:
            self.status.setText(f"{adata.n_obs} samples × {adata.n_vars} genes loaded: press Imagify to show them")
        if self.session.layout_spec is not None:
            self.set_layout_spec(self.session.layout_spec)

    def _images_changed(self) -> None:
        imageset = self.session.imageset
        if imageset is not None and not self.task.running:
            # also when the images came from elsewhere (a model, the demo, a dropped file)
            self.status.setText(f"showing: {imageset.description}")
            self.progress.setValue(self.progress.maximum())
        self.caption.setText(self.session.caption() if imageset is not None else "no images yet")
        if imageset is not None and imageset.pixel_map is None:
            self.notes.setText("these images have no gene map: hover, saliency genes and annotation need "
                               "a gene layout (deepinsight, fotomics, rgb-layouts or grid)")
