"""Lazy image stacks and streamed class means (napari at atlas scale; streaming/lazy.py), without Qt."""

import tracemalloc

import anndata as ad
import numpy as np
import pytest

import napari_omicsimage.streaming.lazy as lazy
from napari_omicsimage._hover import ImageSet
from napari_omicsimage.errors import Cancelled, OmicsInputError
from napari_omicsimage.pipeline import imagify
from napari_omicsimage.streaming import open_cells
from napari_omicsimage.streaming.lazy import LazyCells, class_means, imagify_cells, is_lazy
from napari_omicsimage.streaming.synthetic import synthetic_counts_h5ad

GRID = {"order": "input"}
PCA = {"feature_extractor": "pca", "random_state": 0}


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    """1,000 cells × 400 genes of synthetic counts, 5 cell types."""
    path = tmp_path_factory.mktemp("lazy") / "cells.h5ad"
    return synthetic_counts_h5ad(path, 1000, 400, n_types=5, markers=15, density=0.05, seed=4, chunk_cells=300)


def eager_images(result):
    """What the in-memory path renders: the whole preprocessed matrix through the same fitted layout."""
    x = result.preprocessor.transform(ad.read_h5ad(result.cells.adata.filename) if result.cells.adata.isbacked
                                      else result.cells.adata)
    return np.asarray(result.layout.transform(x)), x


@pytest.mark.parametrize("backed", [True, False])
@pytest.mark.parametrize("method,params", [("grid", GRID), ("deepinsight", PCA)])
def test_lazy_stack_is_a_dask_array_equal_to_the_eager_images(counts_file, backed, method, params):
    adata = open_cells(counts_file) if backed else ad.read_h5ad(counts_file)
    result = imagify_cells(adata, method, size=None if method == "grid" else 16, label_column="cell_type",
                           layout_params=params)
    images, expression = result.images, result.expression
    assert is_lazy(images) and is_lazy(expression) and adata.isbacked == backed
    assert images.shape == (1000, 1, *result.layout.pixel_map_.shape)
    assert images.chunks[0][0] == lazy.CHUNK_CELLS and expression.shape == (1000, len(result.genes))
    dense, x = eager_images(result)
    some = [0, 63, 64, 517, 999]
    np.testing.assert_allclose(np.asarray(images[some]), dense[some], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(images[700:760]), dense[700:760], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(images[-1]), dense[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(expression[517]), x[517], rtol=1e-5, atol=1e-6)


def test_small_in_memory_data_give_the_images_of_the_in_memory_pipeline(counts_file):
    """Below the layout subsample size the lazy path fits the same layout on the same cells as imagify()."""
    adata = ad.read_h5ad(counts_file)
    eager = imagify(adata, "grid", label_column="cell_type", layout_params={"order": "cluster"})
    result = imagify_cells(adata, "grid", label_column="cell_type", layout_params={"order": "cluster"})
    np.testing.assert_array_equal(result.genes, eager.genes)
    np.testing.assert_array_equal(result.layout.pixel_map_.gene_pixels, eager.layout.pixel_map_.gene_pixels)
    np.testing.assert_allclose(np.asarray(result.images), eager.images, rtol=1e-5, atol=1e-6)


def test_slicing_one_image_reads_and_renders_only_its_chunk(counts_file, monkeypatch):
    adata = open_cells(counts_file)
    result = imagify_cells(adata, "grid", label_column="cell_type", layout_params=GRID)
    cells = result.cells
    prepared, rendered = [], []
    real_prepare, real_render = lazy.prepare_block, cells.render
    monkeypatch.setattr(lazy, "prepare_block", lambda a, rows, block, p: prepared.append(len(rows)) or
                        real_prepare(a, rows, block, p))
    monkeypatch.setattr(cells, "render", lambda x: rendered.append(x.shape[0]) or real_render(x))
    image = np.asarray(result.images[:, 0][333])  # as napari slices a one-channel stack
    assert image.shape == result.layout.pixel_map_.shape
    assert prepared == [lazy.CHUNK_CELLS] and 1 <= sum(rendered) <= lazy.CHUNK_CELLS  # cells 320-383 at most
    np.asarray(result.images[340])  # same chunk: its preprocessed rows come from the cache
    np.asarray(result.expression[341])
    assert prepared == [lazy.CHUNK_CELLS]
    before = sum(rendered)
    np.asarray(result.images[999])
    assert prepared == [lazy.CHUNK_CELLS, 1000 - 15 * lazy.CHUNK_CELLS]
    assert 1 <= sum(rendered) - before <= 1000 - 15 * lazy.CHUNK_CELLS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_class_means_equal_the_dense_means_of_the_images(tmp_path, seed):
    path = synthetic_counts_h5ad(tmp_path / "c.h5ad", 600, 300, n_types=4, markers=12, seed=seed, chunk_cells=200)
    adata = open_cells(path)
    result = imagify_cells(adata, "rgb-layouts", size=12, label_column="cell_type", layout_params={})
    dense, x = eager_images(result)
    assert result.images.shape == (600, 3, 12, 12)  # three channels: lazily rendered as the eager ones
    np.testing.assert_allclose(np.asarray(result.images[[5, 333]]), dense[[5, 333]], rtol=1e-5, atol=1e-6)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    means = result.class_means
    assert means.classes == sorted(set(labels))
    for k, name in enumerate(means.classes):
        members = labels == name
        assert means.counts[k] == members.sum()
        np.testing.assert_allclose(means.images[k], dense[members].mean(axis=0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(means.expression[k], x[members].mean(axis=0), rtol=1e-4, atol=1e-6)
    # in small blocks (several per class, classes interleaved) the sums are the same
    again = class_means(result.cells, labels, block_rows=37)
    np.testing.assert_allclose(again.images, means.images, rtol=1e-5, atol=1e-7)
    # the image set takes the streamed means instead of averaging the stack
    imageset = ImageSet.from_imagified(result, "cell_type")
    assert imageset.lazy and imageset.class_images is not None
    np.testing.assert_array_equal(imageset.class_images, means.images)


def test_hover_reads_the_sample_under_the_slider_from_the_lazy_stack(counts_file):
    result = imagify_cells(open_cells(counts_file), "grid", label_column="cell_type", layout_params=GRID)
    imageset = ImageSet.from_imagified(result, "cell_type")
    _, x = eager_images(result)
    row, col = np.argwhere(imageset.pixel_map.density()[0] > 0)[3]
    report = imageset.report("images", row, col, sample=421)
    gene = imageset.pixel_map.gene_names_at(0, row, col)[0]
    assert report.genes == [gene] and "sample cell" in report.context
    assert report.table["expression"].iloc[0] == pytest.approx(x[421, list(result.genes).index(gene)], abs=1e-6)
    assert imageset.display_images().shape == (1000, *imageset.shape) and is_lazy(imageset.display_images())


def test_a_lazy_stack_without_its_class_means_is_refused(counts_file):
    result = imagify_cells(open_cells(counts_file), "grid", label_column="cell_type", layout_params=GRID)
    with pytest.raises(ValueError, match="class means"):
        ImageSet(images=result.images, samples=list(result.samples), labels=result.labels.to_numpy(),
                 expression=result.expression, pixel_map=result.layout.pixel_map_, description="")


def test_rgb_embedding_cannot_be_lazy_and_a_cancel_stops_the_pass(counts_file):
    adata = open_cells(counts_file)
    with pytest.raises(OmicsInputError, match="rgb-embedding"):
        imagify_cells(adata, "rgb-embedding", label_column="cell_type")
    stages = []

    def progress(event):
        stages.append(event.stage)
        return event.stage == "class means" and event.done > 0

    with pytest.raises(Cancelled, match="class means"):
        imagify_cells(adata, "grid", label_column="cell_type", layout_params=GRID, progress=progress)
    assert stages[0].startswith("preprocessing") and "class means" in stages
    with pytest.raises(OmicsInputError, match="gene layouts"):
        LazyCells(adata, None, type("NoGenes", (), {"has_gene_map": False})())


def test_no_array_of_cells_by_pixels_is_allocated(tmp_path):
    """20,000 cells at 48×48: the stack would be 184 MB; preprocessing, layout, class means, preview,
    the napari layer data and a few slider positions stay far below it."""
    from napari_omicsimage._widgets._layers import image_layers

    n, side = 20_000, 48
    path = synthetic_counts_h5ad(tmp_path / "big.h5ad", n, 500, n_types=6, markers=15, seed=0, chunk_cells=5000)
    stack_bytes = n * side * side * 4
    # the same path on a few cells first: the modules it imports (torch, pyDeepInsight) are not the cells
    small = synthetic_counts_h5ad(tmp_path / "small.h5ad", 300, 500, n_types=6, markers=15, seed=0)
    image_layers(ImageSet.from_imagified(imagify_cells(open_cells(small), "deepinsight", size=side,
                                                       label_column="cell_type", layout_params=PCA), "cell_type"))
    tracemalloc.start()
    try:
        adata = open_cells(path, label_column="cell_type")
        result = imagify_cells(adata, "deepinsight", size=side, label_column="cell_type", layout_params=PCA,
                               layout_cells=2000)
        imageset = ImageSet.from_imagified(result, "cell_type")
        layers = image_layers(imageset)
        stack = next(data for data, kwargs, _ in layers if kwargs["name"] == "expression images")
        for i in (0, 7_777, n - 1):
            assert np.asarray(stack[i]).shape == (side, side)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stack.shape == (n, side, side) and is_lazy(stack)
    assert peak < stack_bytes / 8, f"peak {peak / 2**20:.0f} MiB against a {stack_bytes / 2**20:.0f} MiB stack"
