"""One :class:`OmicsSession` per napari viewer: the state every widget shares.

Widgets are thin: they collect options, run core functions (in worker
threads) and hand the results to the session, which owns the data, the
imagified result, the model, predictions and saliency, keeps the napari layers
in step with them, and answers "which genes are under this pixel?".

The session holds the viewer weakly (napari checks that closed viewers are
garbage-collected) and is itself kept in a per-viewer weak registry.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import numpy as np
import pandas as pd
from psygnal import Signal

from .._hover import ImageSet, PixelReport, SaliencyView
from .._regions import Regions, region_names
from ..errors import OmicsInputError
from ..preprocess import PreprocessConfig
from . import _layers as L

#: layer roles whose hover text names genes
HOVER_ROLES = ("images", "class-means", "density", "saliency", "attribution", "pixel-genes")

_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_session(viewer) -> OmicsSession:
    """The session of ``viewer``, created on first use."""
    session = _SESSIONS.get(viewer)
    if session is None:
        session = OmicsSession(viewer)
        _SESSIONS[viewer] = session
    return session


def session_for_current_viewer() -> OmicsSession | None:
    """The current viewer's session (reader and sample data use it so hover works without widgets)."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # noqa: BLE001 - no Qt application / no viewer: nothing to attach to
        return None
    return get_session(viewer) if viewer is not None else None


@dataclass
class DataPayload:
    """What a reader or sample-data layer brings along so the session can adopt it."""

    adata: object
    label_column: str | None
    source: str
    imagified: object
    layout_spec: dict
    #: the file read, so a labels table chosen later can be joined by reading it again
    path: str | None = None


class OmicsSession:
    """Shared state of the omicsimage widgets of one viewer."""

    data_changed = Signal()
    images_changed = Signal()
    model_changed = Signal()
    saliency_changed = Signal()
    sample_changed = Signal(int)
    #: the pixel report under the cursor (or None), for the gene inspector
    hovered = Signal(object)

    def __init__(self, viewer):
        self._viewer = weakref.ref(viewer)
        self.adata = None
        self.label_column: str | None = None
        self.source = ""
        self.source_path: str | None = None
        self.preprocess = PreprocessConfig()
        self.layout_spec: dict | None = None
        self.imagified = None
        self.imageset: ImageSet | None = None
        self.trained = None
        self.training_result = None
        self._last_hover_key = None
        self._finish_adoption_pending = False
        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        viewer.dims.events.current_step.connect(self._on_step)
        viewer.cursor.events.position.connect(self._on_cursor)
        viewer.layers.selection.events.active.connect(self._on_active_layer)
        # napari hides layer tooltips by default; the gene names are the point of hovering here
        viewer.tooltip.visible = True
        for layer in list(viewer.layers):
            self._on_layer_inserted(_Inserted(layer))

    @property
    def viewer(self):
        viewer = self._viewer()
        if viewer is None:
            raise RuntimeError("the napari viewer of this session was closed")
        return viewer

    # ----------------------------------------------------------------- data
    def set_data(self, adata, label_column: str | None, source: str = "", path: str | None = None) -> None:
        """New expression data: forget images, model and saliency made from the old data."""
        self.adata = adata
        self.label_column = label_column
        self.source = source
        self.source_path = path
        self.imagified = None
        self.trained = None
        self.training_result = None
        self.remove_stale_regions()
        self.data_changed.emit()

    def remove_stale_regions(self) -> None:
        """New data: drawn or painted regions belong to the old layout; remove them (and their armed tool)."""
        viewer = self._viewer()
        if viewer is not None:
            self._remove_layers(lambda layer: L.role_of(layer) == "regions")

    def set_label_column(self, label_column: str | None) -> None:
        if label_column is not None:
            from ..io import check_labels

            check_labels(self.adata, label_column)
        self.label_column = label_column
        self.data_changed.emit()

    def require_data(self):
        if self.adata is None:
            raise OmicsInputError("no data loaded: open a file or the sample data in the Data widget first.")
        return self.adata

    def require_in_memory(self, what: str, command: str):
        """The data, refusing a backed file: ``what`` (training, prediction) runs on it from the CLI, which
        streams the cells; the napari widgets hold the samples in memory for it."""
        adata = self.require_data()
        if adata.isbacked:
            raise OmicsInputError(
                f"{what} on a backed file ({adata.n_obs:,} cells on disk) runs from the command line, which "
                f"streams the cells: {command}. To do it here, open a smaller file in memory (Data widget, "
                "'.h5ad: in memory').")
        return adata

    def require_labels(self) -> str:
        self.require_data()
        if self.label_column is None:
            raise OmicsInputError("no label column chosen: pick the column holding the classes in the Data widget.")
        return self.label_column

    # --------------------------------------------------------------- images
    def set_imagified(self, result, layout_spec: dict, prepared: tuple | None = None) -> None:
        """Show a fresh :func:`~napari_omicsimage.pipeline.imagify` (or
        :func:`~napari_omicsimage.streaming.lazy.imagify_cells`) result; ``prepared`` is
        ``(imageset, layers)`` made by :func:`make_layers` in the worker that computed it."""
        self.imagified = result
        self.layout_spec = dict(layout_spec)
        if prepared is not None:
            self.show_imageset(*prepared)
            return
        self.show_imageset(ImageSet.from_imagified(result, self.label_column))

    def show_imageset(self, imageset: ImageSet, layers: list | None = None) -> None:
        """Replace the omicsimage layers by those of ``imageset`` (hand-drawn regions stay).

        ``layers``: the napari layers of ``imageset`` made beforehand by :func:`make_layers` (in a worker
        thread), so that the window only has to add them.
        """
        viewer = self.viewer
        sample = self.current_sample()
        keep_regions = [layer for layer in viewer.layers if L.role_of(layer) == "regions"]
        self._remove_layers(lambda layer: L.role_of(layer) not in (None, "regions"))
        self.imageset = imageset
        for layer in layers if layers is not None else make_layers(imageset):
            viewer.add_layer(layer)
        for layer in keep_regions:
            layer.metadata[L.META_KEY]["imageset"] = imageset
            # keep drawn regions on top of the new images
            viewer.layers.move(viewer.layers.index(layer), len(viewer.layers))
        if 0 < sample < imageset.n_samples:
            self.go_to_sample(sample)  # same data shown anew (e.g. through a model): stay on the sample
        self._after_images_shown()

    def _after_images_shown(self) -> None:
        viewer = self.viewer
        if viewer.dims.ndim >= 3:
            viewer.dims.axis_labels = ("sample", "row", "col")[-viewer.dims.ndim:] \
                if viewer.dims.ndim == 3 else viewer.dims.axis_labels
        images = self.layer("images")
        if images is not None:
            viewer.layers.selection.active = images
        self.fit_view()
        overlay = text_overlay(viewer)
        # top right: the sample image sits top left and the class means below it, so that corner is free
        overlay.visible = True
        overlay.position = "top_right"
        overlay.font_size = 10
        overlay.color = "white"
        if self.imageset is not None:
            self.imageset.current_sample = self.current_sample()
        self._update_caption()
        self.images_changed.emit()

    def fit_view(self, caption_px: int = 64) -> None:
        """Show all images, leaving a band at the top for the caption (three lines, top right).

        The sample image sits at the top left; on a narrow canvas its right part
        would otherwise run under the caption.
        """
        viewer = self.viewer
        viewer.reset_view()
        size = getattr(getattr(viewer, "canvas", None), "size", None)  # (height, width) in screen pixels
        height = int(size[0]) if size is not None and len(size) else 0
        if height > 3 * caption_px:
            camera = _camera(viewer)
            camera.zoom = camera.zoom * (height - caption_px) / height
            center = list(camera.center)
            center[-2] -= caption_px / 2 / camera.zoom  # content moves down by half the band
            camera.center = tuple(center)

    def layer(self, role: str):
        """The viewer's (topmost) layer with this role, or None."""
        viewer = self._viewer()
        if viewer is None:
            return None
        for layer in reversed(list(viewer.layers)):
            if L.role_of(layer) == role:
                return layer
        return None

    def _remove_layers(self, predicate) -> None:
        viewer = self.viewer
        for layer in [layer for layer in viewer.layers if predicate(layer)]:
            viewer.layers.remove(layer)

    def current_sample(self) -> int:
        viewer = self._viewer()
        if viewer is None or self.imageset is None or viewer.dims.ndim < 3:
            return 0
        step = viewer.dims.current_step[0]
        return int(np.clip(step, 0, self.imageset.n_samples - 1))

    def go_to_sample(self, index: int) -> None:
        viewer = self.viewer
        if viewer.dims.ndim >= 3:
            viewer.dims.set_current_step(0, int(index))

    def caption(self) -> str:
        """The canvas caption: the slider's sample, the class whose map is shown, what the colours mean."""
        imageset = self.imageset
        if imageset is None:
            return ""
        lines = [imageset.sample_caption(self.current_sample())]
        view = imageset.saliency
        if view is not None and view.target_class is not None:
            n = len(view.class_members.get(view.target_class, []))
            where = "on its mean image below" if imageset.mosaic is not None else "over the image"
            lines.append(f"class map {view.target_class}: mean of {n} sample(s), {where}")
        if view is not None and self.layer("attribution") is not None and self.layer("attribution").visible:
            lines.append(L.attribution_legend(imageset))
        return "\n".join(lines)

    def _update_caption(self) -> None:
        viewer = self._viewer()
        if viewer is not None and self.imageset is not None:
            text_overlay(viewer).text = self.caption()

    def _on_step(self, event=None) -> None:
        if self.imageset is None:
            return
        self.imageset.current_sample = self.current_sample()
        self._update_caption()
        self.sample_changed.emit(self.current_sample())

    # ---------------------------------------------------------------- model
    def set_trained(self, trained, training_result=None, predictions: pd.DataFrame | None = None,
                    prepared: tuple | None = None) -> None:
        """A trained or loaded model: show the images *it* sees, and its predictions.

        The model comes with its own preprocessing and fitted layout, which may
        differ from the imagified view (training fits them again), so the images
        are re-rendered through the model to keep saliency aligned with them.
        ``predictions`` (indexed by sample) replace the model's own, e.g. the
        out-of-fold predictions of cross-validation.  ``prepared``: ``(imageset,
        layers)`` made by :func:`model_view` in the worker thread that trained or
        loaded the model, so that nothing is computed here, on the Qt main thread.
        """
        self.trained = trained
        self.training_result = training_result
        if prepared is not None:
            self.show_imageset(*prepared)
        elif self.adata is not None:
            self.show_imageset(*model_view(trained, self.adata, self.label_column, predictions))
        self.model_changed.emit()

    def predict(self) -> pd.DataFrame | None:
        if self.trained is None or self.adata is None:
            return None
        return _predictions(self.trained, self.adata)

    def require_model(self):
        if self.trained is None:
            raise OmicsInputError("no model yet: train one (Train widget) or load a checkpoint (Load model widget).")
        return self.trained

    # ------------------------------------------------------------- saliency
    def set_saliency(self, view: SaliencyView) -> None:
        if self.imageset is None:
            raise OmicsInputError("no images shown: imagify the data or load a model first.")
        self.imageset.saliency = view
        self.show_saliency()
        self.saliency_changed.emit()

    def show_saliency(self, target_class: str | None = None) -> None:
        """Show the per-sample maps (follow the slider) or a class's mean maps.

        Two layers over the images: the gene attribution (each pixel the summed
        signed attribution of its genes; visible) and the paper's pixel saliency
        (hidden; switch it on in the layer list).
        """
        imageset = self.imageset
        if imageset is None or imageset.saliency is None:
            raise OmicsInputError("no saliency yet: compute it in the Saliency widget first.")
        if target_class is not None and target_class not in imageset.saliency.per_class:
            raise OmicsInputError(
                f"no saliency map for class {target_class!r}: none of its samples was predicted correctly.")
        imageset.saliency.target_class = target_class
        previous = self.layer("saliency")
        saliency_visible = previous.visible if previous is not None else imageset.saliency.attribution is None
        self._remove_layers(lambda layer: L.role_of(layer) in ("saliency", "attribution", "selected-gene"))
        viewer = self.viewer
        made = [L.saliency_layer(imageset)]
        if imageset.saliency.attribution is not None and imageset.pixel_map is not None:
            made.append(L.attribution_layer(imageset))
        position = viewer.layers.index(self.layer("images")) + 1
        layer = None
        for data, kwargs, kind in made:
            layer = _create_layer(data, kwargs, kind)
            if L.role_of(layer) == "saliency":
                layer.visible = saliency_visible
            if L.role_of(layer) == "attribution":
                show_colorbar(layer)
            viewer.add_layer(layer)
            viewer.layers.move(viewer.layers.index(layer), position)
            position += 1
        viewer.layers.selection.active = layer
        self._update_caption()

    def saliency_context(self) -> tuple[np.ndarray | None, np.ndarray, str]:
        """``(saliency (C,H,W) relative or None, expression (G,), description)`` of what is shown now."""
        if self.imageset is None:
            raise OmicsInputError("no images shown: imagify the data first.")
        return self.imageset.context(self.current_sample())

    def highlight_gene(self, gene: str) -> None:
        """Mark the pixel(s) of one gene (one per channel drawing it) with cyan squares."""
        if self.imageset is None or self.imageset.pixel_map is None:
            return
        self._remove_layers(lambda layer: L.role_of(layer) == "selected-gene")
        data, kwargs, kind = L.selected_gene_layer(self.imageset, gene)
        viewer = self.viewer
        active = viewer.layers.selection.active
        viewer.add_layer(_create_layer(data, kwargs, kind))
        if active is not None and active in viewer.layers:
            viewer.layers.selection.active = active

    # -------------------------------------------------------------- regions
    def add_regions_layer(self, name: str = "regions"):
        """A 2-D Shapes layer (shared by all samples) for drawing regions, in polygon mode."""
        layer = _create_layer(None, L.regions_layer_kwargs(self.imageset, name), "shapes")
        self.viewer.add_layer(layer)
        layer.mode = "add_polygon"
        return layer

    def regions_of(self, layer) -> Regions:
        """Regions drawn on a Shapes layer or painted on a Labels layer."""
        imageset = self.imageset
        if imageset is None:
            raise OmicsInputError("no images shown: imagify the data first, then draw regions on them.")
        kind = type(layer).__name__.lower()
        if kind == "shapes":
            names = region_names(layer.features, len(layer.data))
            return Regions.from_shapes(layer.data, layer.shape_type, imageset.shape, names)
        if kind == "labels":
            data = np.asarray(layer.data)
            if data.ndim == 3 and data.shape[1:] == imageset.shape:
                # painted on a per-sample stack: use the slice of the current sample
                data = data[self.current_sample()]
            return Regions(imageset.shape, [], data)
        raise OmicsInputError(f"layer {layer.name!r} is a {kind} layer; draw regions on Shapes or Labels layers.")

    def region_table(self, layer) -> pd.DataFrame:
        """Genes inside each region of ``layer``, ranked by the gene attribution shown now (else pixel saliency)."""
        imageset = self.imageset
        if imageset is None or imageset.pixel_map is None:
            raise OmicsInputError(
                "these images have no gene map (the published RGB method places samples, not genes): "
                "imagify with deepinsight, fotomics, rgb-layouts or grid to annotate genes.")
        return imageset.region_table(self.regions_of(layer).masks(), self.current_sample())

    # ---------------------------------------------------------------- hover
    def report_at(self, layer, position, world: bool = True) -> PixelReport | None:
        """Genes under ``position`` on ``layer`` (world coordinates by default)."""
        role = L.role_of(layer)
        imageset = L.imageset_of(layer)
        if role not in HOVER_ROLES or imageset is None or position is None:
            return None
        position = np.asarray(position, dtype=float)
        data = layer.world_to_data(position) if world else position
        if len(data) < 2:
            return None
        sample = self.current_sample() if imageset is self.imageset else 0
        return imageset.report(role, data[-2], data[-1], sample)

    def report_under(self, position, world: bool = True, layer=None) -> PixelReport | None:
        """Genes of whatever omicsimage image is under ``position``, whichever layer is selected.

        The visible gene-aware layers are asked from the top down (the attribution map over the sample
        image or over a class-mean tile, the sample image, the class-mean mosaic); the first that has a
        pixel there answers.  ``world=False``: ``position`` is in the data coordinates of ``layer``.
        """
        viewer = self._viewer()
        if viewer is None or position is None:
            return None
        position = np.asarray(position, dtype=float)
        if not world and layer is not None:
            position = np.asarray(layer.data_to_world(position), dtype=float)
        for candidate in reversed(list(viewer.layers)):
            if not candidate.visible or L.role_of(candidate) not in HOVER_ROLES:
                continue
            report = self.report_at(candidate, position)
            if report is not None:
                return report
        return None

    def _on_cursor(self, event=None) -> None:
        viewer = self._viewer()
        if viewer is None:
            return
        report = self.report_under(viewer.cursor.position)
        key = None if report is None else (report.row, report.col, report.context)
        if key != self._last_hover_key:
            self._last_hover_key = key
            self.hovered.emit(report)

    def _on_active_layer(self, event=None) -> None:
        self._last_hover_key = None

    # ------------------------------------------------------- layer adoption
    def _on_layer_inserted(self, event) -> None:
        layer = event.value
        role = L.role_of(layer)
        # every layer, so that hover names the genes under the cursor whichever layer is selected
        install_gene_status(layer, self)
        if role is None:
            return
        payload = layer.metadata[L.META_KEY].get("payload")
        if isinstance(payload, DataPayload) and L.imageset_of(layer) is not self.imageset:
            self._adopt(layer, payload)
        if role == "images" and self._finish_adoption_pending and L.imageset_of(layer) is self.imageset:
            self._finish_adoption_pending = False
            self._after_images_shown()

    def _adopt(self, layer, payload: DataPayload) -> None:
        """Take over data brought by the reader or sample data (their layers are already added)."""
        new = L.imageset_of(layer)
        # regions drawn on the old layout go too: they would sit over different genes
        self._remove_layers(lambda other: L.role_of(other) is not None and L.imageset_of(other) is not new)
        self.adata = payload.adata
        self.label_column = payload.label_column
        self.source = payload.source
        self.source_path = payload.path
        self.trained = None
        self.training_result = None
        self.imagified = payload.imagified
        self.layout_spec = dict(payload.layout_spec)
        self.imageset = new
        layer.metadata[L.META_KEY].pop("payload", None)  # do not keep the AnnData alive twice
        # napari renamed the layer ("class means [1]") while the old one was still there
        base = re.sub(r" \[\d+\]$", "", layer.name)
        if base != layer.name and base not in [other.name for other in self.viewer.layers]:
            layer.name = base
        self.data_changed.emit()
        # the other layers of the new data are still being inserted: finish once they are in
        self._finish_adoption_pending = True


def text_overlay(viewer):
    """The canvas text overlay (``viewer.canvas.overlays.text`` since napari 0.9, ``text_overlay`` before)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    return overlays.text if overlays is not None else viewer.text_overlay


def show_colorbar(layer, position: str = "bottom_right") -> None:
    """napari's colour bar overlay for ``layer`` (image layers; napari ≥ 0.6), bottom right of the canvas."""
    colorbar = getattr(layer, "colorbar", None)
    if colorbar is None:
        return
    colorbar.visible = True
    colorbar.position = position


def _camera(viewer):
    scene = getattr(viewer, "scene", None)  # napari 0.9 moved the camera under the scene
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


class _Inserted:
    def __init__(self, layer):
        self.value = layer


def _create_layer(data, kwargs, kind):
    from napari.layers import Layer

    return Layer.create(data, kwargs, kind)


def make_layers(imageset: ImageSet) -> list:
    """The napari layers showing ``imageset`` (not yet in a viewer).

    Layer objects hold no Qt state until a viewer adds them, so a worker
    thread can make them: building five layers (units registry, transforms,
    the first slice of a lazy stack) takes seconds on a slow machine, which
    would otherwise freeze the window when an Imagify run ends.
    """
    return [_create_layer(data, kwargs, kind) for data, kwargs, kind in L.image_layers(imageset)]


def _predictions(trained, adata) -> pd.DataFrame:
    frame = trained.predict(adata)
    return frame.set_index("sample") if "sample" in frame.columns else frame


def model_view(trained, adata, label_column: str | None, predictions: pd.DataFrame | None = None,
               with_layers: bool = True) -> tuple[ImageSet, list | None]:
    """``(imageset, layers)``: ``adata`` preprocessed and rendered through ``trained``, with its predictions.

    The heavy part of showing a model (preprocessing, rendering, predicting, building the layers);
    widgets call it in their worker thread and hand the result to :meth:`OmicsSession.set_trained`.
    """
    x, images = trained.prepare(adata)
    labels = None
    if label_column is not None and label_column in adata.obs:
        labels = adata.obs[label_column].astype(str).to_numpy()
    layout = trained.layout
    imageset = ImageSet(
        images=np.asarray(images, dtype=np.float32), samples=list(adata.obs_names), labels=labels,
        expression=np.asarray(x, dtype=np.float32),
        pixel_map=layout.pixel_map_ if layout.has_gene_map else None,
        description=layout.describe(), layout=layout, label_column=label_column,
        predictions=predictions if predictions is not None else _predictions(trained, adata))
    return imageset, (make_layers(imageset) if with_layers else None)


def install_gene_status(layer, session: OmicsSession) -> None:
    """Make ``layer``'s status bar text and tooltip name the genes under the cursor.

    napari asks the *active* layer for its status (``get_status``) and tooltip
    (``_get_tooltip_text``), from a worker thread.  Image layers have no hook
    for extra text, so we wrap these two methods on our own layers.  For the
    ``gene pixels`` Labels layer the base-class status is used, so its
    ``features`` row is not printed twice.
    """
    if getattr(layer, "_omicsimage_hover", False):
        return
    from napari.layers.base import Layer

    session_ref = weakref.ref(session)
    base_status = (lambda *a, **k: Layer.get_status(layer, *a, **k)) if L.role_of(layer) == "pixel-genes" \
        else layer.get_status
    base_tooltip = layer._get_tooltip_text

    def _report(position, world):
        owner = session_ref()
        if owner is None or position is None:
            return None
        try:
            return owner.report_under(position, world=world, layer=layer)
        except Exception:  # noqa: BLE001 - never break napari's status thread over a hover
            return None

    def get_status(position=None, *, world=False, **kwargs):  # layer types differ in their other keywords
        status = base_status(position, world=world, **kwargs)
        report = _report(position, world)
        if report is not None:
            text = report.status()
            status["coordinates"] = f"{status.get('coords', '')}: {text}"
            status["value"] = text
        return status

    def get_tooltip_text(position, *, world=False, **kwargs):
        report = _report(position, world)
        if report is not None:
            return report.tooltip()
        return base_tooltip(position, world=world, **kwargs)

    layer.get_status = get_status
    layer._get_tooltip_text = get_tooltip_text
    layer._omicsimage_hover = True
