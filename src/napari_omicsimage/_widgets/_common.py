"""Small Qt helpers shared by the widgets: errors, tables, background work."""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable

import numpy as np
import pandas as pd
from qtpy.QtCore import QObject, QSize, Qt, Signal
from qtpy.QtWidgets import (
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..errors import OmicsInputError

log = logging.getLogger("napari_omicsimage")


def report_error(exc: BaseException) -> str:
    """Show an error as a napari notification; returns the message shown.

    Input problems (:class:`OmicsInputError`) already say what to do; anything
    else is a bug, so its type is shown and the traceback is logged.
    """
    from napari.utils.notifications import show_error

    if isinstance(exc, OmicsInputError):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc}"
        log.error("napari-omicsimage: %s", "".join(traceback.format_exception(exc)))
    show_error(message)
    return message


def report_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def group(title: str, *widgets_or_layouts) -> QGroupBox:
    box = QGroupBox(title)
    layout = QVBoxLayout(box)
    layout.setContentsMargins(6, 6, 6, 6)
    for item in widgets_or_layouts:
        if isinstance(item, QWidget):
            layout.addWidget(item)
        else:
            layout.addLayout(item)
    return box


#: widest a widget asks its dock to be; wider content scrolls sideways instead of pushing the dock wider
DOCK_WIDTH = 460
#: narrowest a widget lets its dock become
DOCK_MIN_WIDTH = 280


class _DockScrollArea(QScrollArea):
    """Scrolls vertically, and sideways where the content cannot shrink to the dock's width.

    It asks for at most :data:`DOCK_WIDTH` pixels, so long texts (paths, errors) neither widen the dock
    past the screen nor, scrolled out of a too-narrow view, lose their left edge.
    """

    def __init__(self):
        super().__init__()
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)

    def _extra_width(self) -> int:
        return self.verticalScrollBar().sizeHint().width() + 2

    def sizeHint(self) -> QSize:
        hint = self.widget().sizeHint()
        return QSize(min(hint.width() + self._extra_width(), DOCK_WIDTH), min(hint.height(), 700))

    def minimumSizeHint(self) -> QSize:
        width = self.widget().minimumSizeHint().width() + self._extra_width()
        return QSize(min(width, DOCK_MIN_WIDTH), 120)


def scroll_layout(widget: QWidget) -> QVBoxLayout:
    """A vertical layout inside a scroll area filling ``widget``; the widget tabs itself with its siblings.

    napari stacks dock widgets; without scrolling, a tall widget (the Train
    widget with its figures) sets a minimum height that squeezes its
    neighbours, such as the gene inspector, to nothing.  Every omicsimage dock
    made this way joins the tabs of those already docked in its area
    (:func:`tab_with_siblings`), also when opened one by one from the Plugins menu.
    """
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = _DockScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    inner = QWidget()
    area.setWidget(inner)
    outer.addWidget(area)
    tab_with_siblings(widget)
    return QVBoxLayout(inner)


#: widgets that stay in a dock of their own (beside the tabs, not in them)
UNTABBED = ("GeneInspectorWidget",)


def _dock_of(widget: QWidget):
    from qtpy.QtWidgets import QDockWidget

    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def _is_omicsimage_dock(dock) -> bool:
    inner = dock.widget()
    found = [inner, *inner.findChildren(QWidget)] if inner is not None else []
    return any(type(w).__module__.startswith("napari_omicsimage") and type(w).__name__ not in UNTABBED
               and type(w).__name__.endswith("Widget") for w in found[:50])


def tab_into_siblings(dock) -> bool:
    """Tab ``dock`` with the omicsimage docks already in its area of the main window; True if it joined them."""
    from qtpy.QtWidgets import QDockWidget, QMainWindow

    window = dock.parentWidget()
    if not isinstance(window, QMainWindow) or dock.isFloating():
        return False
    area = window.dockWidgetArea(dock)
    siblings = [other for other in window.findChildren(QDockWidget)
                if other is not dock and not other.isFloating() and other.isVisible()
                and window.dockWidgetArea(other) == area and _is_omicsimage_dock(other)]
    if not siblings or any(other in window.tabifiedDockWidgets(dock) for other in siblings):
        return False
    window.tabifyDockWidget(siblings[0], dock)
    dock.show()
    dock.raise_()
    return True


class _TabWhenDocked(QObject):
    """On the widget's first show inside a dock: join the omicsimage tabs of that dock area."""

    def eventFilter(self, watched, event) -> bool:
        from qtpy.QtCore import QEvent

        if event.type() == QEvent.Type.Show:
            watched.removeEventFilter(self)
            dock = _dock_of(watched)
            if dock is not None:
                tab_into_siblings(dock)
        return False


def tab_with_siblings(widget: QWidget) -> None:
    if type(widget).__name__ in UNTABBED:
        return
    tabber = _TabWhenDocked(widget)
    widget.installEventFilter(tabber)


def wrapped_label(text: str = "") -> QLabel:
    """A label that wraps and never widens its dock: a long word (a path) is cut at the right, not the left."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    policy = label.sizePolicy()
    policy.setHorizontalPolicy(QSizePolicy.Policy.Ignored)
    label.setSizePolicy(policy)
    label.setMinimumWidth(60)
    return label


class ElidedLabel(QLabel):
    """One line, shortened in the middle to the width it has; the full text is its tooltip."""

    def __init__(self, text: str = ""):
        super().__init__()
        self._full = ""
        policy = self.sizePolicy()
        policy.setHorizontalPolicy(QSizePolicy.Policy.Ignored)
        self.setSizePolicy(policy)
        self.setMinimumWidth(60)
        self.setText(text)

    def setText(self, text: str) -> None:  # noqa: N802 - Qt's name
        self._full = str(text)
        self.setToolTip(self._full)
        self._elide()

    def text(self) -> str:
        return self._full

    def _elide(self) -> None:
        width = max(self.width(), 60)
        shown = self.fontMetrics().elidedText(self._full, Qt.TextElideMode.ElideMiddle, width)
        super().setText(shown)

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().resizeEvent(event)
        self._elide()


def make_table(columns: list[str]) -> QTableWidget:
    table = QTableWidget(0, len(columns))
    table.setHorizontalHeaderLabels(columns)
    table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
    table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
    table.verticalHeader().setVisible(False)
    table.verticalHeader().setDefaultSectionSize(22)
    # sized to contents once per fill (fill_table), not continuously: a dock must not grow with its table
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
    table.horizontalHeader().setStretchLastSection(True)
    table.setSizeAdjustPolicy(QTableWidget.SizeAdjustPolicy.AdjustIgnored)
    return table


def _cell(value, signed: bool = False) -> str:
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return ""
        return f"{float(value):+.3f}" if signed else f"{float(value):.3f}"
    return str(value)


#: friendlier headers for some table columns (CSV exports keep the column names)
HEADERS = {"pixel_genes": "genes in pixel", "pixel_saliency": "pixel saliency"}
#: columns shown with their sign (+ for the class, − against it)
SIGNED_COLUMNS = ("attribution", "contrastive")


def fill_table(table: QTableWidget, frame: pd.DataFrame, columns: list[str] | None = None,
               max_rows: int = 1000) -> None:
    """Show ``frame`` (first ``max_rows`` rows) in ``table``; each row keeps its frame row in UserRole."""
    columns = columns or list(frame.columns)
    table.setSortingEnabled(False)
    table.clearContents()
    table.setColumnCount(len(columns))
    table.setHorizontalHeaderLabels([HEADERS.get(c, c) for c in columns])
    shown = frame.head(max_rows)
    table.setRowCount(len(shown))
    for r, (index, row) in enumerate(shown.iterrows()):
        for c, name in enumerate(columns):
            item = QTableWidgetItem(_cell(row.get(name), signed=name in SIGNED_COLUMNS))
            if c == 0:
                item.setData(Qt.ItemDataRole.UserRole, index)
            table.setItem(r, c, item)
    table.resizeColumnsToContents()
    for c in range(table.columnCount()):
        table.setColumnWidth(c, min(table.columnWidth(c), 150))


def table_column(table: QTableWidget, name: str) -> list[str]:
    """Texts of one column (tests and exports read tables through this)."""
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    c = headers.index(name)
    return [table.item(r, c).text() for r in range(table.rowCount())]


def cancel_button(on_cancel: Callable) -> QPushButton:
    """A Cancel button, disabled until work starts (the widget enables it while its task runs)."""
    button = QPushButton("Cancel")
    button.setEnabled(False)
    button.clicked.connect(on_cancel)
    return button


def button_row(*buttons: QPushButton) -> QHBoxLayout:
    row = QHBoxLayout()
    for button in buttons:
        row.addWidget(button)
    return row


def progress_bar() -> QProgressBar:
    bar = QProgressBar()
    bar.setRange(0, 1000)  # per mille, so long runs visibly move from the first epoch
    bar.setValue(0)
    bar.setTextVisible(True)
    return bar


class Relay(QObject):
    """Carries events from a worker thread to the main thread (queued Qt signal)."""

    event = Signal(object)


class BackgroundTask:
    """Runs one function at a time in a napari thread worker.

    ``running`` tells tests and the UI whether work is under way; results and
    errors come back in the main thread through ``on_done`` / ``on_error``.
    """

    def __init__(self):
        self.worker = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, fn: Callable, *, on_done: Callable, on_error: Callable | None = None,
              on_finished: Callable | None = None) -> None:
        from napari.qt.threading import create_worker

        if self.worker is not None:
            raise OmicsInputError("a task is already running; wait for it or cancel it first.")
        worker = create_worker(fn, _start_thread=False, _ignore_errors=True)

        def finished():
            if self.worker is worker:  # not a worker detached by a cancel
                self.worker = None
                if on_finished is not None:
                    on_finished()

        worker.returned.connect(on_done)
        worker.errored.connect(on_error or report_error)
        worker.finished.connect(finished)
        self.worker = worker
        worker.start()

    def detach(self) -> None:
        """Stop waiting for the running worker (used when its work cannot be interrupted).

        Callers ignore its result by checking their own run token.
        """
        self.worker = None
