"""``omicsimage demo``: the whole pipeline on the bundled data, in napari or as files.

:func:`run_demo` is Qt-free: it loads scanpy's ``pbmc68k_reduced`` (700 blood
cells × 765 genes, 10 cell types), holds out a stratified 20 % of the cells,
trains the small CNN on DeepInsight t-SNE images of the rest, predicts every
cell, and explains every cell: genes ranked by Integrated Gradients attribution
through the layout (gene tables per class), the paper's gradient pixel saliency beside it.
:func:`write_demo_outputs` writes it all, with PNG figures, for
``--headless``; :func:`show_demo` opens napari with the same results as
layers, ready to hover, and the omicsimage widgets docked.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._hover import ImageSet, SaliencyView, relative
from .checkpoint import save_checkpoint
from .explain import explain
from .io import SAMPLE_DATASETS, load_sample_data
from .layouts import save_layout
from .outputs import write_output_dir
from .render import IMAGE_COLORMAP, image_contrast
from .training import TrainConfig, train

log = logging.getLogger(__name__)

DATASET = "pbmc68k_reduced"
#: t-SNE gene layouts separate co-expressed gene groups best; 32 px keeps the demo quick
DEMO_LAYOUT = {"method": "deepinsight", "size": 32, "feature_extractor": "tsne", "discretization": "bin",
               "random_state": 0}
DEMO_EPOCHS = 8
DEMO_LR = 1e-3
HELD_OUT = 0.2
SALIENCY_METHOD = "gradient"
#: the demo window (width, height): room for the canvas between the layer list and the docked widgets;
#: a smaller screen gets its whole available area instead
DEMO_WINDOW = (1600, 1000)
#: Integrated Gradients from 16 steps (samples missing completeness are redone with more) and no contrastive
#: scores: a quarter of the cost of the command line's defaults (32 steps, contrastive), for all 700 cells
DEMO_IG_STEPS = 16


@dataclass
class DemoResult:
    """Everything the demo computed (kept in memory for the napari view)."""

    adata: object
    label_column: str
    layout_spec: dict
    trained: object
    imageset: object  # napari_omicsimage._hover.ImageSet with predictions and saliency
    class_tables: dict[str, pd.DataFrame]
    held_out: np.ndarray  # indices of the held-out cells
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def held_out_accuracy(self) -> float:
        imageset = self.imageset
        predicted = imageset.predictions.reindex(imageset.samples)["predicted"].to_numpy()
        return float((predicted[self.held_out] == imageset.labels[self.held_out]).mean())


def run_demo(*, epochs: int = DEMO_EPOCHS, device: str = "auto", say: Callable[[str], None] = print,
             layout_spec: dict | None = None) -> DemoResult:
    """Train, predict and explain on the bundled data; returns the results (no files, no Qt)."""
    from sklearn.model_selection import train_test_split

    timings: dict[str, float] = {}
    started = time.perf_counter()
    label_column = SAMPLE_DATASETS[DATASET]
    adata = load_sample_data(DATASET)
    labels = adata.obs[label_column].astype(str).to_numpy()
    say(f"{DATASET}: {adata.n_obs} cells × {adata.n_vars} genes, {len(set(labels))} cell types "
        f"in {label_column!r}")
    index = np.arange(adata.n_obs)
    train_idx, held_out = train_test_split(index, test_size=HELD_OUT, stratify=labels, random_state=0)
    spec = dict(layout_spec or DEMO_LAYOUT)
    config = TrainConfig(model="small", epochs=int(epochs), batch_size=32, lr=DEMO_LR, seed=0, device=device)

    def progress(event):
        if event.stage == "epoch":
            say(f"  epoch {event.epoch + 1}/{event.n_epochs}: loss {event.loss:.3f}, "
                f"training accuracy {event.metrics.get('train_accuracy', float('nan')):.3f}")

    say(f"training a small CNN on {spec['method']} images of {len(train_idx)} cells "
        f"({len(held_out)} held out); fitting the layout first…")
    trained = train(adata[np.sort(train_idx)].copy(), label_column, spec, config, progress=progress)
    timings["train_s"] = time.perf_counter() - started

    step = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = explain(trained, adata, label_column=label_column, pixel_method=SALIENCY_METHOD,
                              n_steps=DEMO_IG_STEPS, contrastive=False)
    for warning in caught:  # e.g. a cell type that no cell was correctly predicted as
        say(f"note: {warning.message}")
    timings["saliency_s"] = time.perf_counter() - step
    predictions = pd.DataFrame({"sample": explanation.samples, "predicted": explanation.predicted})
    for k, name in enumerate(explanation.classes):
        predictions[f"prob_{name}"] = explanation.proba[:, k]
    split = np.full(adata.n_obs, "training", dtype=object)
    split[held_out] = "held out"
    predictions["split"] = split
    predictions = predictions.set_index("sample")

    layout = trained.layout
    imageset = ImageSet(images=explanation.images, samples=list(adata.obs_names), labels=labels,
                        expression=explanation.x, pixel_map=layout.pixel_map_, description=layout.describe(),
                        layout=layout, label_column=label_column, predictions=predictions)
    imageset.saliency = SaliencyView(method=SALIENCY_METHOD, per_sample=explanation.saliency,
                                     predicted=explanation.predicted, attribution=explanation.attribution,
                                     class_members=explanation.class_members, grouping=explanation.grouping)
    class_tables = {name: explanation.class_table(layout, name) for name in explanation.class_members}
    timings["total_s"] = time.perf_counter() - started
    result = DemoResult(adata, label_column, spec, trained, imageset, class_tables, np.sort(held_out), timings)
    say(f"held-out accuracy {result.held_out_accuracy:.3f} on {len(held_out)} cells; "
        f"done in {timings['total_s']:.0f} s")
    return result


# ================================================================== files
def write_demo_outputs(result: DemoResult, out_dir, *, overwrite: bool = False) -> Path:
    """Images, model, saliency, gene tables, predictions and PNG figures, written atomically
    (through :func:`napari_omicsimage.outputs.write_output_dir`)."""
    imageset = result.imageset

    def fill(tmp: Path) -> None:
        np.save(tmp / "images.npy", imageset.images.astype(np.float32))
        np.save(tmp / "saliency.npy", imageset.saliency.per_sample.astype(np.float32))
        save_checkpoint(result.trained, tmp / "model.pt")
        save_layout(result.trained.layout, tmp / "layout.npz")
        imageset.pixel_map.pixel_table().to_csv(tmp / "pixel_genes.csv", index=False)
        predictions = imageset.predictions.reindex(imageset.samples)
        predictions.insert(0, "label", imageset.labels)
        predictions.to_csv(tmp / "predictions.csv", index_label="sample")
        tables = [table.assign(cell_type=name) for name, table in result.class_tables.items()]
        genes = pd.concat(tables, ignore_index=True)
        genes = genes[["cell_type"] + [c for c in genes.columns if c != "cell_type"]]
        genes.to_csv(tmp / "class_gene_tables.csv", index=False)
        summary = {
            "dataset": DATASET, "label_column": result.label_column, "layout": result.layout_spec,
            "layout_description": imageset.description, "model": result.trained.config.model,
            "epochs": len(result.trained.history), "history": [
                {k: v for k, v in h.items() if k != "batch_losses"} for h in result.trained.history],
            "n_cells": imageset.n_samples, "n_held_out": len(result.held_out),
            "held_out_accuracy": result.held_out_accuracy, "saliency_method": imageset.saliency.method,
            "gene_attribution": _named_failures(imageset.saliency.attribution.describe(), imageset.samples),
            "class_maps": imageset.saliency.grouping, "timings_s": {k: round(v, 1) for k, v in result.timings.items()},
            "top_genes": {name: table["gene"].head(5).tolist() for name, table in result.class_tables.items()},
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_sample_images(imageset, tmp / "sample_images.png")
        plot_saliency(imageset, result.class_tables, tmp / "saliency.png")
        plot_density(imageset, tmp / "density.png")

    return write_output_dir(out_dir, fill, overwrite=overwrite)


def _figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas (no pyplot, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _first_of_each_class(imageset) -> list[int]:
    return [int(np.flatnonzero(imageset.labels == name)[0]) for name in imageset.classes]


def plot_sample_images(imageset, path) -> Path:
    """One cell per type (its image) and each type's mean image, same colour scale."""
    picks = _first_of_each_class(imageset)
    n = len(picks)
    fig = _figure(1.6 * n, 3.7)
    axes = fig.subplots(2, n, squeeze=False)
    vmax = image_contrast(imageset.images)[1]
    for j, (i, name) in enumerate(zip(picks, imageset.classes)):
        for r, (image, title) in enumerate(((imageset.images[i, 0], f"{imageset.samples[i][:14]}"),
                                            (imageset.class_images[j, 0], f"mean of {int((imageset.labels == name).sum())}"))):
            ax = axes[r, j]
            shown = ax.imshow(image, cmap=IMAGE_COLORMAP, vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title((_wrap(name) + "\n" if r == 0 else "") + title, fontsize=7)
    fig.colorbar(shown, ax=axes, shrink=0.6, label="scaled expression (pixel mean)")
    fig.suptitle(f"Cells as images — {imageset.description}; top: one cell per type, bottom: type mean",
                 fontsize=9)
    fig.savefig(path)
    return Path(path)


def plot_saliency(imageset, class_tables: dict, path, top: int = 3) -> Path:
    """Each cell type's mean pixel saliency over its mean image, its top genes (by gene attribution)
    marked and named."""
    view = imageset.saliency
    names = [c for c in imageset.classes if c in view.per_class]
    n_cols = min(5, len(names))
    n_rows = int(np.ceil(len(names) / n_cols))
    fig = _figure(2.3 * n_cols, 2.75 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, name in zip(axes.ravel(), names):
        k = imageset.classes.index(name)
        sal = relative(view.per_class[name]).max(axis=0)
        ax.imshow(imageset.class_images[k, 0], cmap="gray", interpolation="nearest")
        ax.imshow(sal, cmap="inferno", alpha=np.clip(sal, 0, 1) * 0.9, vmin=0, vmax=1, interpolation="nearest")
        table = class_tables[name].head(top)
        for rank, record in enumerate(table.itertuples(), start=1):
            ax.plot(record.col, record.row, marker="s", markersize=6, markerfacecolor="none",
                    markeredgecolor="cyan", markeredgewidth=1.0)
            ax.annotate(str(rank), (record.col, record.row), xytext=(3, 3), textcoords="offset points",
                        color="cyan", fontsize=7, fontweight="bold")
        genes = ", ".join(f"{r}.{g}" for r, g in enumerate(table["gene"], start=1))
        ax.set_title(f"{_wrap(name)}\n(n={len(view.class_members[name])}) {genes}", fontsize=6.5)
    fig.suptitle(f"Mean {view.method} pixel saliency per cell type ({view.grouping}); cyan: top {top} genes "
                 f"by {view.gene_method} attribution",
                 fontsize=9)
    fig.savefig(path)
    return Path(path)


def plot_density(imageset, path) -> Path:
    """How many genes each pixel holds (the layout's crowding), per channel."""
    density = imageset.pixel_map.density()
    names = imageset.channel_names
    fig = _figure(4.2 * density.shape[0], 3.8)
    axes = fig.subplots(1, density.shape[0], squeeze=False)[0]
    for c, ax in enumerate(axes):
        shown = ax.imshow(np.ma.masked_equal(density[c], 0), cmap="viridis", vmin=1, interpolation="nearest")
        ax.set_facecolor("white")
        ax.set_xticks([])
        ax.set_yticks([])
        occupied = (density[c] > 0).mean()
        ax.set_title(f"{names[c] + ': ' if names[c] else ''}{int(density[c].sum())} genes on "
                     f"{occupied:.0%} of pixels, up to {int(density[c].max())} per pixel", fontsize=8)
        fig.colorbar(shown, ax=ax, shrink=0.8, label="genes in pixel")
    fig.suptitle(f"Gene density — {imageset.description} (white: no gene)", fontsize=9)
    fig.savefig(path)
    return Path(path)


def _share_dock_height(viewer, top, bottom, top_share: float) -> None:
    """Split the right dock column between the tabbed widgets and the gene inspector."""
    from qtpy.QtCore import Qt

    window = viewer.window._qt_window
    height = max(window.height() - 120, 400)
    window.resizeDocks([top, bottom], [int(height * top_share), int(height * (1 - top_share))],
                       Qt.Orientation.Vertical)


def demo_window_size() -> tuple[int, int]:
    """:data:`DEMO_WINDOW`, shrunk to the screen's available area where that is smaller."""
    from qtpy.QtGui import QGuiApplication

    width, height = DEMO_WINDOW
    screen = QGuiApplication.primaryScreen()
    if screen is not None:
        available = screen.availableGeometry()
        width, height = min(width, available.width()), min(height, available.height())
    return width, height


#: the cell type the demo opens on (the README's screenshots show a held-out monocyte)
OPENING_CLASS = "CD14+ Monocyte"


def opening_sample(result: DemoResult) -> int:
    """The first held-out cell of :data:`OPENING_CLASS` predicted correctly (else the first held-out cell):
    what the model never saw, explained for the class it really is."""
    imageset = result.imageset
    held_out = np.asarray(result.held_out)
    if len(held_out) == 0:
        return 0
    predicted = imageset.predictions.reindex(imageset.samples)["predicted"].astype(str).to_numpy()
    labels = np.asarray(imageset.labels).astype(str)
    for i in held_out:
        if labels[i] == OPENING_CLASS and predicted[i] == OPENING_CLASS:
            return int(i)
    same_class = [int(i) for i in held_out if labels[i] == OPENING_CLASS]
    return same_class[0] if same_class else int(held_out[0])


def _wrap(name: str, width: int = 18) -> str:
    if len(name) <= width or "/" not in name:
        return name
    cut = name.rfind("/", 0, width + 1)
    return name[: cut + 1] + "\n" + name[cut + 1:] if cut > 0 else name


# ================================================================= napari
def show_demo(result: DemoResult, *, viewer=None, run: bool = True):
    """Open napari with the demo's layers and the omicsimage widgets (needs Qt)."""
    import napari

    # the napari half of the demo (lazy: Qt); it belongs with the widgets once they move to gui/
    from ._widgets._state import get_session

    viewer = viewer or napari.Viewer(title="napari-omicsimage demo: PBMC cell types")
    width, height = demo_window_size()
    window = viewer.window._qt_window
    window.resize(width, height)
    session = get_session(viewer)
    session.set_data(result.adata, result.label_column, source=DATASET)
    session.layout_spec = dict(result.layout_spec)
    session.trained = result.trained
    session.show_imageset(result.imageset)
    session.show_saliency(None)
    session.model_changed.emit()
    session.saliency_changed.emit()
    docks = {}  # display name → (dock widget, omicsimage widget)
    for name in ("1 Data", "2 Imagify", "3 Train / evaluate", "4 Load model", "5 Saliency", "Annotate regions"):
        docks[name] = viewer.window.add_plugin_dock_widget("napari-omicsimage", name, tabify=True)
    docks["Gene inspector"] = viewer.window.add_plugin_dock_widget("napari-omicsimage", "Gene inspector")
    train_widget = docks["3 Train / evaluate"][1]
    train_widget.show_training(result.trained, None)
    train_widget.summary.setText(
        f"demo model: small CNN, {len(result.trained.history)} epochs on {result.adata.n_obs - len(result.held_out)} "
        f"cells; held-out accuracy {result.held_out_accuracy:.3f} on {len(result.held_out)} cells")
    docks["5 Saliency"][0].raise_()
    _share_dock_height(viewer, docks["5 Saliency"][0], docks["Gene inspector"][0], 0.62)
    viewer.layers.selection.active = session.layer("images")
    session.go_to_sample(opening_sample(result))
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()  # let the canvas take its size in the resized window, then fit the view to it
    session.fit_view()
    if run:
        napari.run()
    return viewer, docks


def _named_failures(summary: dict, samples) -> dict:
    """The attribution summary with its completeness failures named by sample, not by row."""
    if "completeness_failures" in summary:
        summary["completeness_failures"] = [samples[i] for i in summary["completeness_failures"]]
    return summary
