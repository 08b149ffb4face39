"""Gene inspector: every gene in the pixel under the cursor (crowded pixels hold dozens)."""

from __future__ import annotations

from qtpy.QtWidgets import QVBoxLayout, QWidget

from ._common import fill_table, make_table, wrapped_label
from ._state import get_session

COLUMNS = ["gene", "attribution", "expression", "saliency", "channel"]


class GeneInspectorWidget(QWidget):
    """Lists all genes of the hovered pixel, largest |gene attribution| first, with expression and pixel saliency."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.header = wrapped_label("Hover over an omicsimage layer to list the genes of a pixel.")
        self.table = make_table(COLUMNS)
        self.table.setToolTip("attribution: the gene's own signed attribution (+ for / − against the class "
                              "explained), so genes sharing the pixel are told apart; expression: scaled "
                              "log-expression (0 = lowest, 1 = highest over the samples); saliency: the pixel's "
                              "saliency relative to the most salient pixel (the same for all its genes)")
        layout = QVBoxLayout(self)
        layout.addWidget(self.header)
        layout.addWidget(self.table, 1)
        self.report = None
        self.session.hovered.connect(self.show_report)

    def show_report(self, report) -> None:
        if report is None:
            return  # keep the last pixel listed while the cursor is off the images
        self.report = report
        self.header.setText(f"pixel ({report.row}, {report.col}) · {report.context} · "
                            f"{len(report.table)} gene(s)")
        columns = COLUMNS if report.table["channel"].astype(bool).any() else COLUMNS[:-1]
        fill_table(self.table, report.table, columns)
