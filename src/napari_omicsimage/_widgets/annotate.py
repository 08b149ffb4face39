"""Annotate widget: genes inside hand-drawn regions, ranked by gene attribution, exported as CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QPushButton,
    QWidget,
)

from .._regions import GENE_TABLE_COLUMNS, Regions, load_regions, save_regions
from ..errors import OmicsInputError
from . import _layers as L
from ._common import (
    fill_table,
    group,
    make_table,
    report_error,
    report_info,
    scroll_layout,
    wrapped_label,
)
from ._state import get_session

#: the table shows every column of the CSV export
COLUMNS = GENE_TABLE_COLUMNS


class AnnotateWidget(QWidget):
    """Draw or paint regions over the images; list and export the genes inside them."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.table_frame = pd.DataFrame(columns=COLUMNS)
        self._watched = None

        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("the Shapes or Labels layer whose regions are listed")
        self.layer_combo.currentTextChanged.connect(self._layer_chosen)
        self.new_shapes_button = QPushButton("Draw regions")
        self.new_shapes_button.setToolTip("adds a Shapes layer in polygon mode; rectangles and ellipses work too")
        self.new_shapes_button.clicked.connect(self.new_shapes_layer)
        self.new_labels_button = QPushButton("Paint regions")
        self.new_labels_button.setToolTip("adds a Labels layer to paint; each label value is one region")
        self.new_labels_button.clicked.connect(self.new_labels_layer)
        buttons = QHBoxLayout()
        buttons.addWidget(self.new_shapes_button)
        buttons.addWidget(self.new_labels_button)

        self.context = wrapped_label("")
        self.table = make_table(COLUMNS)
        self.table.setMinimumHeight(200)
        self.table.itemSelectionChanged.connect(self._row_selected)
        self.export_button = QPushButton("Export genes (CSV)…")
        self.export_button.clicked.connect(self._choose_export)
        self.save_button = QPushButton("Save regions…")
        self.save_button.clicked.connect(self._choose_save)
        self.load_button = QPushButton("Load regions…")
        self.load_button.clicked.connect(self._choose_load)
        files = QHBoxLayout()
        files.addWidget(self.export_button)
        files.addWidget(self.save_button)
        files.addWidget(self.load_button)

        layout = scroll_layout(self)
        layout.addWidget(group("Region layer", self.layer_combo, buttons))
        layout.addWidget(group("Genes inside each region (largest gene attribution first)", self.context, self.table))
        layout.addLayout(files)

        for emitter in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            emitter.connect(self._layers_changed)
        self.session.sample_changed.connect(lambda *_: self.update_table())
        self.session.saliency_changed.connect(self.update_table)
        self.session.images_changed.connect(self.update_table)
        self._layers_changed()

    # ----------------------------------------------------------- layers
    def region_layers(self) -> list:
        from napari.layers import Labels, Shapes

        out = []
        for layer in self.viewer.layers:
            role = L.role_of(layer)
            if isinstance(layer, Shapes) and role in (None, "regions") or isinstance(layer, Labels) and role in (None, "regions"):
                out.append(layer)
        return out

    def current_layer(self):
        name = self.layer_combo.currentText()
        for layer in self.region_layers():
            if layer.name == name:
                return layer
        return None

    def _layers_changed(self, event=None) -> None:
        current = self.layer_combo.currentText()
        names = [layer.name for layer in self.region_layers()]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if event is not None and getattr(event, "type", "") == "inserted" and event.value.name in names:
            current = event.value.name  # a layer just added is the one the user wants to annotate
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self._layer_chosen(self.layer_combo.currentText())

    def _layer_chosen(self, name: str) -> None:
        layer = self.current_layer()
        if self._watched is not None and self._watched is not layer:
            self._disconnect(self._watched)
        if layer is not None and self._watched is not layer:
            layer.events.data.connect(self._on_regions_edited)
            if hasattr(layer.events, "paint"):
                layer.events.paint.connect(self._on_regions_edited)
        self._watched = layer
        self.update_table()

    def _disconnect(self, layer) -> None:
        for name in ("data", "paint"):
            emitter = getattr(layer.events, name, None)
            if emitter is not None:
                emitter.disconnect(self._on_regions_edited)

    def _on_regions_edited(self, event=None) -> None:
        # napari emits data events while a shape is being drawn ("adding") and when done ("added")
        action = getattr(event, "action", None)
        if action is None or str(action).split(".")[-1].lower() in ("added", "removed", "changed"):
            self.update_table()

    def new_shapes_layer(self):
        if self.session.imageset is None:
            report_error(OmicsInputError("imagify the data first, then draw regions on the images."))
            return None
        layer = self.session.add_regions_layer(self._free_name("regions"))
        return layer

    def new_labels_layer(self):
        imageset = self.session.imageset
        if imageset is None:
            report_error(OmicsInputError("imagify the data first, then paint regions on the images."))
            return None
        layer = self.viewer.add_labels(
            np.zeros(imageset.shape, dtype=np.int32), name=self._free_name("painted regions"),
            metadata={L.META_KEY: {"role": "regions", "imageset": imageset}}, opacity=0.5)
        layer.mode = "paint"
        layer.brush_size = max(1, imageset.shape[0] // 16)
        return layer

    def _free_name(self, base: str) -> str:
        names = {layer.name for layer in self.viewer.layers}
        if base not in names:
            return base
        i = 2
        while f"{base} [{i}]" in names:
            i += 1
        return f"{base} [{i}]"

    # ------------------------------------------------------------ table
    def update_table(self) -> None:
        layer = self.current_layer()
        if layer is None or self.session.imageset is None:
            self.table_frame = pd.DataFrame(columns=COLUMNS)
            self.table.setRowCount(0)
            self.context.setText("Draw regions (or paint them) over the images to list their genes.")
            return
        try:
            frame = self.session.region_table(layer)
            _, _, context = self.session.saliency_context()
        except OmicsInputError as exc:
            self.table_frame = pd.DataFrame(columns=COLUMNS)
            self.table.setRowCount(0)
            self.context.setText(str(exc))
            return
        self.table_frame = frame
        has_attribution = bool(frame["attribution"].notna().any()) if len(frame) else False
        has_saliency = bool(frame["saliency"].notna().any()) if len(frame) else False
        ranked = ("|gene attribution| (+ for / − against the class)" if has_attribution
                  else "pixel saliency" if has_saliency else "expression (no saliency computed yet)")
        n_regions = frame["region"].nunique() if len(frame) else 0
        self.context.setText(f"{len(frame)} gene(s) in {n_regions} region(s) of {layer.name!r}; "
                             f"values for {context}, ranked by {ranked}.")
        columns = COLUMNS if self.session.imageset.n_channels > 1 else [c for c in COLUMNS if c != "channel"]
        fill_table(self.table, frame, columns)

    def _row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows or self.table_frame.empty:
            return
        record = self.table_frame.iloc[rows[0].row()]
        self.session.highlight_gene(str(record["gene"]))

    # ------------------------------------------------------------ files
    def _choose_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export region genes", "region_genes.csv", "CSV (*.csv)")
        if path:
            self.export_csv(path)

    def export_csv(self, path) -> Path | None:
        self.update_table()
        if self.table_frame.empty:
            report_error(OmicsInputError("no gene inside any region yet: draw regions over the images first."))
            return None
        path = Path(path)
        self.table_frame.to_csv(path, index=False)
        report_info(f"wrote {len(self.table_frame)} genes to {path.name}")
        return path

    def _choose_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save regions", "regions.json", "Regions (*.json)")
        if path:
            self.save(path)

    def save(self, path) -> Path | None:
        layer = self.current_layer()
        try:
            if layer is None:
                raise OmicsInputError("no region layer: draw or paint regions first.")
            return save_regions(self.session.regions_of(layer), path)
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return None

    def _choose_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load regions", "", "Regions (*.json)")
        if path:
            self.load(path)

    def load(self, path) -> list:
        """Add the regions of a file as layers (the same as dropping the file on the canvas)."""
        from .._reader import regions_layer_data

        try:
            regions: Regions = load_regions(path)
            imageset = self.session.imageset
            if imageset is not None and tuple(regions.image_shape) != tuple(imageset.shape):
                raise OmicsInputError(f"the regions were drawn on {regions.image_shape[0]}×{regions.image_shape[1]} "
                                      f"images, these are {imageset.shape[0]}×{imageset.shape[1]}; "
                                      "imagify at that size first.")
        except Exception as exc:  # noqa: BLE001
            report_error(exc)
            return []
        from napari.layers import Layer

        added = []
        for data, kwargs, kind in regions_layer_data(regions, Path(path).stem):
            kwargs.setdefault("metadata", {})[L.META_KEY] = {"role": "regions", "imageset": imageset}
            added.append(self.viewer.add_layer(Layer.create(data, kwargs, kind)))
        return added
