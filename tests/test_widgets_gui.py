"""The real widgets, driven end to end in a napari viewer (Xvfb via pytest-xvfb).

Synthetic data with known gene placement: 64 genes ``G00…G63`` on an 8×8
grid in input order, so gene ``Gk`` sits at pixel ``divmod(k, 8)``; class B
expresses ``G00…G07`` (the top row) higher than class A.
"""

import numpy as np
import pandas as pd
import pytest

import napari_omicsimage._widgets  # noqa: F401  (keeps triton out before napari creates a GL context)
from napari_omicsimage._widgets._common import table_column
from napari_omicsimage._widgets._state import get_session, text_overlay
from napari_omicsimage._widgets.annotate import AnnotateWidget
from napari_omicsimage._widgets.data import DataWidget
from napari_omicsimage._widgets.imagify import ImagifyWidget
from napari_omicsimage._widgets.inspector import GeneInspectorWidget

pytestmark = pytest.mark.gui

GENES = [f"G{k:02d}" for k in range(64)]


@pytest.fixture
def h5ad_path(tmp_path):
    import anndata as ad

    rng = np.random.default_rng(0)
    x = rng.normal(5, 1, size=(60, 64)).astype(np.float32)
    labels = np.array(["A", "B"] * 30)
    x[labels == "B", :8] += 3.0
    adata = ad.AnnData(X=x, obs=pd.DataFrame({"cell_type": pd.Categorical(labels)},
                                             index=[f"cell{i:02d}" for i in range(60)]),
                       var=pd.DataFrame(index=GENES))
    path = tmp_path / "toy.h5ad"
    adata.write_h5ad(path)
    return path


def wait(qtbot, task, timeout=60_000):
    qtbot.waitUntil(lambda: not task.running, timeout=timeout)


def imagified_viewer(make_napari_viewer, qtbot, h5ad_path):
    """Viewer with the Data and Imagify widgets docked and the toy data shown on an 8×8 grid."""
    viewer = make_napari_viewer()
    data = DataWidget(viewer)
    imagify = ImagifyWidget(viewer)
    viewer.window.add_dock_widget(data, name="Data")
    viewer.window.add_dock_widget(imagify, name="Imagify")
    assert data.load_path(h5ad_path)
    wait(qtbot, data.task)
    imagify.method_combo.setCurrentText("grid")
    imagify.order_combo.setCurrentText("input")
    imagify.size_spin.setValue(0)  # automatic: smallest square
    imagify.run()
    wait(qtbot, imagify.task)
    return viewer, data, imagify


def test_data_and_imagify_widgets_build_the_layers(make_napari_viewer, qtbot, h5ad_path):
    viewer, data, imagify = imagified_viewer(make_napari_viewer, qtbot, h5ad_path)
    session = get_session(viewer)
    assert data.label_combo.currentText() == "cell_type"
    assert table_column(data.class_table, "class") == ["A", "B"]
    assert "60 samples × 64 genes" in data.summary.text()
    names = [layer.name for layer in viewer.layers]
    assert names == ["class means", "class names", "expression images", "gene density", "gene pixels"]
    images = session.layer("images")
    assert images.data.shape == (60, 8, 8) and viewer.dims.axis_labels[0] == "sample"
    # the class means mosaic shows class B's high top row
    b_mean = session.imageset.class_images[1, 0]
    assert b_mean[0].mean() > b_mean[1:].mean()
    viewer.dims.set_current_step(0, 7)
    assert "sample 8/60: cell07" in imagify.caption.text() and "cell_type: B" in imagify.caption.text()
    assert text_overlay(viewer).text == imagify.caption.text()
    assert imagify.status.text().startswith("showing: grid")


def test_imagify_size_follows_the_method_default_until_the_user_sets_one(make_napari_viewer):
    imagify = ImagifyWidget(make_napari_viewer())
    assert imagify.method_combo.currentText() == "deepinsight" and imagify.size_spin.value() == 32
    assert imagify.order_combo.currentText() == "cluster"
    imagify.method_combo.setCurrentText("grid")
    assert imagify.layout_spec() == {"method": "grid", "size": None, "order": "cluster"}  # smallest square
    imagify.method_combo.setCurrentText("fotomics")
    assert imagify.layout_spec()["size"] == 32
    imagify.size_spin.setValue(40)  # the user's choice survives method changes
    imagify.method_combo.setCurrentText("rgb-embedding")
    assert imagify.layout_spec()["size"] == 40
    imagify.size_spin.setValue(32)
    imagify.method_combo.setCurrentText("deepinsight")
    imagify.discretization_combo.setCurrentText("lsa")  # one gene per pixel: sized when the genes are known
    assert imagify.layout_spec()["size"] is None and imagify.layout_spec()["discretization"] == "lsa"
    imagify.discretization_combo.setCurrentText("bin")
    assert imagify.layout_spec()["size"] == 32
    imagify.method_combo.setCurrentText("som")
    assert imagify.layout_spec() == {"method": "som", "size": None, "random_state": 0}


def test_csv_with_a_labels_table_chosen_after_opening(make_napari_viewer, qtbot, h5ad_path, tmp_path):
    import anndata as ad

    adata = ad.read_h5ad(h5ad_path)
    expression = tmp_path / "genes_by_samples.csv"
    adata.to_df().T.to_csv(expression)  # genes in rows, as many public tables are
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"sample": adata.obs_names, "batch": ["b1"] * 59 + [""],
                  "cell_type": adata.obs["cell_type"].astype(str)}).to_csv(labels, index=False)
    viewer = make_napari_viewer()
    data = DataWidget(viewer)
    assert data.load_path(expression)
    wait(qtbot, data.task)
    session = get_session(viewer)
    assert session.adata.shape == (60, 64) and session.label_column is None
    assert "genes detected in rows" in data.summary.text() and "no labels chosen" in data.summary.text()
    assert data.set_labels_table(labels)
    wait(qtbot, data.task)
    # "batch" has a missing value, so the class column is the first usable one; both are offered
    assert session.label_column == "cell_type" and data.label_combo.currentText() == "cell_type"
    assert table_column(data.class_table, "samples") == ["30", "30"]
    data.label_combo.setCurrentText("batch")  # one class and a blank: refused with a notification
    assert session.label_column == "cell_type" and data.label_combo.currentText() == "cell_type"


def test_hover_names_the_known_genes_in_status_tooltip_and_inspector(make_napari_viewer, qtbot, h5ad_path):
    viewer, _, _ = imagified_viewer(make_napari_viewer, qtbot, h5ad_path)
    inspector = GeneInspectorWidget(viewer)
    viewer.window.add_dock_widget(inspector, name="Gene inspector")
    session = get_session(viewer)
    images = session.layer("images")
    viewer.dims.set_current_step(0, 3)
    row, col = divmod(21, 8)  # G21
    viewer.layers.selection.active = images
    viewer.mouse_over_canvas = True
    viewer.cursor.position = (3, row, col)
    viewer.update_status_from_cursor()  # what napari's status thread computes
    status = viewer.status
    expression = float(session.imageset.expression[3, 21])  # a lazy (dask) matrix
    assert f"G21 {expression:.2f}" in status["coordinates"] and "cell03 (B)" in status["coordinates"]
    assert viewer.tooltip.visible and "G21" in viewer.tooltip.text
    assert inspector.report.genes == ["G21"] and table_column(inspector.table, "gene") == ["G21"]
    # the Labels layer of pixel ids: napari's own features row and our text both name the gene
    labels = session.layer("pixel-genes")
    assert labels.features.set_index("index").loc[row * 8 + col + 1, "genes"] == "G21"
    viewer.layers.selection.active = labels
    viewer.update_status_from_cursor()
    assert "G21" in viewer.status["coordinates"] and "G21" in viewer.tooltip.text
    # the class-means mosaic names the same gene, with the class mean expression
    mosaic = session.layer("class-means")
    top, left = session.imageset.mosaic.origin(0)
    world = mosaic.data_to_world((top + row, left + col))
    viewer.layers.selection.active = mosaic
    viewer.cursor.position = (3, *world)
    viewer.update_status_from_cursor()
    assert "G21" in viewer.status["coordinates"] and "mean of class A" in viewer.status["coordinates"]


def test_annotated_region_lists_exactly_the_genes_inside(make_napari_viewer, qtbot, h5ad_path, tmp_path):
    viewer, _, _ = imagified_viewer(make_napari_viewer, qtbot, h5ad_path)
    annotate = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(annotate, name="Annotate")
    layer = annotate.new_shapes_layer()
    assert layer.ndim == 2 and annotate.layer_combo.currentText() == layer.name
    layer.add_rectangles(np.array([[1.5, 2.5], [3.5, 5.5]]))  # pixel centres rows 2–3, cols 3–5
    expected = {f"G{r * 8 + c:02d}" for r in (2, 3) for c in (3, 4, 5)}
    assert set(table_column(annotate.table, "gene")) == expected
    assert len(annotate.table_frame) == 6
    layer.add_polygons([np.array([[5.4, -0.5], [7.5, -0.5], [7.5, 1.6]])])  # centres (6,0), (7,0), (7,1)
    regions = annotate.table_frame.groupby("region")["gene"].apply(set).to_dict()
    assert regions == {"region 1": expected, "region 2": {"G48", "G56", "G57"}}
    exported = pd.read_csv(annotate.export_csv(tmp_path / "genes.csv"))
    assert set(exported["gene"]) == expected | {"G48", "G56", "G57"}
    # regions are saved and reloaded (the reader makes the same layer), with the same genes
    saved = annotate.save(tmp_path / "regions.json")
    (reloaded,) = annotate.load(saved)
    annotate.layer_combo.setCurrentText(reloaded.name)
    assert annotate.table_frame.groupby("region")["gene"].apply(set).to_dict() == regions
    viewer.layers.remove(reloaded)
    dropped = viewer.open(str(saved), plugin="napari-omicsimage")
    assert dropped[0].nshapes == 2 and list(dropped[0].features["name"]) == ["region 1", "region 2"]
    # painted regions: every label value is a region
    painted = annotate.new_labels_layer()
    painted.data[0, :2] = 4
    painted.refresh()
    annotate.update_table()
    assert set(table_column(annotate.table, "gene")) == {"G00", "G01"}
    assert set(annotate.table_frame["region"]) == {"label 4"}


def test_dropped_file_and_sample_data_open_with_hover(make_napari_viewer, qtbot, h5ad_path):
    viewer = make_napari_viewer()
    data = DataWidget(viewer)
    layers = viewer.open(str(h5ad_path), plugin="napari-omicsimage")
    session = get_session(viewer)
    assert session.adata is not None and session.adata.n_obs == 60
    assert session.label_column == "cell_type" and data.label_combo.currentText() == "cell_type"
    images = session.layer("images")
    assert images in layers and images.data.shape == (60, 8, 8)
    row, col = np.argwhere(session.imageset.pixel_map.density()[0] > 0)[0]
    gene = session.imageset.pixel_map.gene_names_at(0, row, col)[0]
    assert gene in images.get_status((0, row, col), world=True)["coordinates"]
    sample_layers = viewer.open_sample("napari-omicsimage", "pbmc68k_reduced")
    assert session.imageset.n_samples == 700 and session.label_column == "bulk_labels"
    assert images not in viewer.layers  # the new data replaced the old layers
    assert {layer.name for layer in sample_layers} >= {"expression images", "class means", "gene pixels"}
    assert "700 samples" in data.summary.text()


def test_training_runs_in_a_thread_and_cancels_cleanly(make_napari_viewer, qtbot, h5ad_path):
    from napari_omicsimage._widgets.train import TrainWidget

    viewer, _, _ = imagified_viewer(make_napari_viewer, qtbot, h5ad_path)
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train")
    train.folds_spin.setValue(0)
    train.epochs_spin.setValue(400)
    train.batch_spin.setValue(8)
    train.run()
    try:
        assert train.task.running and train.cancel_button.isEnabled()
        # the event loop keeps running: per-epoch rows arrive while training goes on
        qtbot.waitUntil(lambda: train.metrics_table.rowCount() >= 2, timeout=60_000)
        assert train.task.running and 0 < train.progress.value() < train.progress.maximum()
    finally:
        train.cancel()
        wait(qtbot, train.task)
    trained, cv = train.result
    assert cv is None and trained.cancelled
    assert 2 <= len(trained.history) < 400
    assert train.status.text() == "cancelled" and train.train_button.isEnabled()
    assert get_session(viewer).trained is trained  # the finished epochs are kept and usable
    assert train.figure_canvas is not None


@pytest.mark.slow
def test_train_evaluate_save_load_predict_and_saliency(make_napari_viewer, qtbot, h5ad_path, tmp_path):
    from napari_omicsimage._widgets.load_model import LoadModelWidget
    from napari_omicsimage._widgets.saliency import FOLLOW_SLIDER, SaliencyWidget
    from napari_omicsimage._widgets.train import TrainWidget

    viewer, _, _ = imagified_viewer(make_napari_viewer, qtbot, h5ad_path)
    session = get_session(viewer)
    train = TrainWidget(viewer)
    saliency = SaliencyWidget(viewer)
    annotate = AnnotateWidget(viewer)
    for widget, name in ((train, "Train"), (saliency, "Saliency"), (annotate, "Annotate")):
        viewer.window.add_dock_widget(widget, name=name)
    train.folds_spin.setValue(2)
    train.epochs_spin.setValue(3)
    train.batch_spin.setValue(8)
    train.lr_spin.setValue(0.005)
    train.run()
    wait(qtbot, train.task, timeout=180_000)
    trained, cv = train.result
    assert cv.n_folds_finished == 2 and len(trained.history) == 3
    phases = table_column(train.metrics_table, "phase")
    assert phases.count("fold 1") == 3 and "fold 2 test" in phases and phases.count("final") == 3
    assert "cross-validation (2 folds): accuracy" in train.summary.text()
    # predictions shown beside each sample are the out-of-fold ones
    assert session.imageset.predictions.index.tolist() == cv.predictions["sample"].tolist()
    assert "predicted:" in text_overlay(viewer).text

    checkpoint = train.save(tmp_path / "model.pt")
    assert checkpoint is not None and (tmp_path / "model.pt").exists()
    loader = LoadModelWidget(viewer)
    viewer.window.add_dock_widget(loader, name="Load model")
    assert loader.load(tmp_path / "model.pt") and loader.predict()
    wait(qtbot, loader.task)
    assert len(loader.table_frame) == 60 and "agreement with 'cell_type'" in loader.prediction_summary.text()
    assert set(table_column(loader.table, "correct")) <= {"yes", "no"}

    assert saliency.gene_method_combo.currentText() == "integrated-gradients"  # the default
    saliency.method_combo.setCurrentText("gradient")
    saliency.run()
    wait(qtbot, saliency.task)
    layer = session.layer("saliency")
    assert layer.data.shape == (60, 8, 8) and layer.blending == "additive"
    assert float(layer.data.max()) == pytest.approx(1.0)
    # the gene-attribution layer: summed signed attribution per pixel, symmetric about 0
    attribution = session.layer("attribution")
    assert attribution.visible and attribution.data.shape == (60, 8, 8)
    low, high = attribution.contrast_limits
    assert low == -high and 0 < high < 1.0 and float(np.abs(attribution.data).max()) == 1.0
    assert attribution.colorbar.visible  # napari's colour bar, with the colours explained in the caption
    assert "red: pushes towards its predicted class, blue: against" in text_overlay(viewer).text
    view = session.imageset.saliency
    i = session.current_sample()
    np.testing.assert_allclose(attribution.data[i] * np.abs(session.imageset.attribution_image(
        view.attribution.values[i])).max(), session.imageset.attribution_image(view.attribution.values[i]),
        rtol=1e-5, atol=1e-7)
    assert saliency.target_combo.currentText() == FOLLOW_SLIDER and len(saliency.table_frame) == 64
    assert saliency.table_frame["attribution"].abs().is_monotonic_decreasing
    assert "pixel_saliency" in saliency.table_frame.columns
    top = saliency.table_frame.iloc[0]
    saliency.table.selectRow(0)
    marker = session.layer("selected-gene")
    np.testing.assert_array_equal(marker.data, [[top["row"], top["col"]]])
    # the hover text names the genes with their attribution; a class view shows that class's mean maps
    status = session.layer("images").get_status((0, top["row"], top["col"]), world=True)["coordinates"]
    assert top["gene"] in status and f"{top['attribution']:+.2f}" in status and "saliency" in status
    target = next(iter(view.per_class))
    saliency.target_combo.setCurrentText(target)
    assert session.layer("saliency").data.shape == (8, 8) and session.layer("attribution").data.shape == (8, 8)
    assert saliency.table_frame["shown"].iloc[0] == f"mean of class {target}"
    # the class map lies over the class's mean image (its mosaic tile), with a class caption
    imageset = session.imageset
    top_left = imageset.mosaic.origin(imageset.classes.index(target))
    for role in ("attribution", "saliency"):
        np.testing.assert_allclose(session.layer(role).data_to_world((0, 0)),
                                   session.layer("class-means").data_to_world(top_left))
    assert f"class map {target}" in text_overlay(viewer).text
    assert f"red: pushes towards {target}, blue: against" in text_overlay(viewer).text
    world = session.layer("attribution").data_to_world((top["row"], top["col"]))
    assert session.report_under((0, *world)).context == f"mean of class {target}"
    assert session.report_under((0, top["row"], top["col"])).context.startswith("sample ")
    members = view.class_members[target]
    np.testing.assert_allclose(saliency.table_frame.set_index("gene").loc[list(trained.genes), "attribution"],
                               view.attribution.values[members].mean(axis=0), rtol=1e-5, atol=1e-7)
    # annotation tables are ranked by the gene attribution shown
    regions = annotate.new_shapes_layer()
    regions.add_rectangles(np.array([[-0.5, -0.5], [7.5, 7.5]]))
    ranked = annotate.table_frame["attribution"].abs().to_numpy()
    assert len(ranked) == 64 and np.all(np.diff(ranked) <= 1e-9)


def test_hover_names_the_genes_under_the_cursor_whichever_layer_is_selected(make_napari_viewer, qtbot, h5ad_path,
                                                                           tmp_path):
    viewer, data, _ = imagified_viewer(make_napari_viewer, qtbot, h5ad_path)
    inspector = GeneInspectorWidget(viewer)
    annotate = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(inspector, name="Gene inspector")
    viewer.window.add_dock_widget(annotate, name="Annotate")
    session = get_session(viewer)
    regions = annotate.new_shapes_layer()
    assert viewer.layers.selection.active is regions
    mosaic = session.layer("class-means")
    top, left = session.imageset.mosaic.origin(session.imageset.classes.index("B"))
    row, col = divmod(5, 8)  # G05
    on_tile = mosaic.data_to_world((top + row, left + col))
    viewer.mouse_over_canvas = True
    viewer.dims.set_current_step(0, 2)
    for active in (regions, session.layer("images"), mosaic, session.layer("class-names")):
        viewer.layers.selection.active = active
        viewer.cursor.position = (2, *on_tile)
        viewer.update_status_from_cursor()
        assert "G05" in viewer.status["coordinates"] and "mean of class B" in viewer.status["coordinates"], active
        assert "G05" in viewer.tooltip.text and inspector.report.context == "mean of class B"
        viewer.cursor.position = (2, row, col)
        viewer.update_status_from_cursor()
        assert "G05" in viewer.status["coordinates"] and "sample cell02 (A)" in viewer.status["coordinates"], active
        assert inspector.report.context == "sample cell02 (A)"
    # the exported region table says whose values it holds
    regions.add_rectangles(np.array([[-0.5, -0.5], [0.5, 7.5]]))
    exported = pd.read_csv(annotate.export_csv(tmp_path / "genes.csv"))
    assert set(exported["values of"]) == {"sample cell02 (A)"} and set(exported["gene"]) == set(GENES[:8])
    # new data: regions drawn on the old layout go, with their armed drawing tool
    assert data.load_path(h5ad_path)
    wait(qtbot, data.task)
    assert regions not in viewer.layers and not annotate.region_layers()


def test_widgets_opened_one_by_one_from_the_plugins_menu_share_tabs(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    docks = []
    for name in ("1 Data", "2 Imagify", "5 Saliency", "Gene inspector"):
        dock, _ = viewer.window.add_plugin_dock_widget("napari-omicsimage", name)  # what the Plugins menu calls
        docks.append(dock)
        qtbot.wait(50)
    data, imagify, saliency, inspector = docks
    qtbot.waitUntil(lambda: {imagify, saliency} <= set(window.tabifiedDockWidgets(data)), timeout=5000)
    assert inspector not in window.tabifiedDockWidgets(data)  # the inspector stays beside the tabs
    assert data.width() < 0.45 * window.width()


def test_model_views_are_computed_off_the_main_thread(make_napari_viewer, qtbot, h5ad_path, tmp_path, monkeypatch):
    """Preprocessing, rendering and predicting after training and for a loaded model run in the worker."""
    import threading

    from napari_omicsimage._widgets.load_model import LoadModelWidget
    from napari_omicsimage._widgets.train import TrainWidget
    from napari_omicsimage.training import TrainedModel

    calls = []
    for name in ("prepare", "predict"):
        def record(self, *args, _original=getattr(TrainedModel, name), _name=name, **kwargs):
            calls.append((_name, threading.current_thread()))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(TrainedModel, name, record)
    viewer, _, _ = imagified_viewer(make_napari_viewer, qtbot, h5ad_path)
    session = get_session(viewer)
    train = TrainWidget(viewer)
    loader = LoadModelWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train")
    viewer.window.add_dock_widget(loader, name="Load model")
    train.folds_spin.setValue(0)
    train.epochs_spin.setValue(1)
    train.batch_spin.setValue(8)
    train.run()
    wait(qtbot, train.task, timeout=120_000)
    assert session.trained is train.result[0] and session.imageset.predictions is not None
    after_training = {name for name, _ in calls}
    assert after_training >= {"prepare", "predict"}
    assert loader.load(train.save(tmp_path / "model.pt")) and loader.predict()
    assert loader.task.running and not loader.progress.isHidden()
    wait(qtbot, loader.task)
    assert session.trained is loader.loaded and len(loader.table_frame) == 60
    assert loader.status.text() == "predicted 60 samples"
    assert len(calls) >= 4
    main = threading.main_thread()
    assert [name for name, thread in calls if thread is main] == []
