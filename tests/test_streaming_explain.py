"""Explaining a backed .h5ad block by block (napari_omicsimage.streaming.explain): the in-memory files, bounded memory."""

import json
import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_omicsimage.checkpoint import load_checkpoint
from napari_omicsimage.cli import main
from napari_omicsimage.explain import explain, write_explanation
from napari_omicsimage.streaming import open_cells
from napari_omicsimage.streaming.explain import explain_streaming, select_cells
from napari_omicsimage.streaming.synthetic import synthetic_counts_h5ad

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FAST = ["--method", "grid", "--model", "small", "--batch-size", "32", "--lr", "3e-3", "--n-top-genes", "100",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def model_and_cells(tmp_path_factory):
    """A small CNN trained (streaming) on 400 cells × 300 genes of 4 cell types, and a second file of 240
    new cells of the same types to explain."""
    folder = tmp_path_factory.mktemp("streaming_explain")
    train_file = synthetic_counts_h5ad(folder / "train.h5ad", 400, 300, n_types=4, markers=15, density=0.06, seed=5)
    cells = synthetic_counts_h5ad(folder / "cells.h5ad", 240, 300, n_types=4, markers=15, density=0.06, seed=5,
                                  cell_seed=9, name_prefix="new")
    model = folder / "model.pt"
    assert main(["train", str(train_file), "--label-column", "cell_type", *FAST, "--epochs", "4", "--backed", "yes",
                 "--out", str(model)]) == 0
    return model, cells


def _assert_same_outputs(a, b, *, atol=0.0):
    """Every file of two explain folders: same names, same text columns, numbers within ``atol``."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".npy"):
            x, y = np.load(a / name), np.load(b / name)
            assert x.shape == y.shape, name
            np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=name)
        elif name.endswith(".csv"):
            x, y = pd.read_csv(a / name), pd.read_csv(b / name)
            assert list(x.columns) == list(y.columns) and len(x) == len(y), name
            text = x.select_dtypes(exclude="number").columns
            assert x[text].equals(y[text]), name
            numbers = x.select_dtypes("number").columns
            np.testing.assert_allclose(x[numbers].to_numpy(float), y[numbers].to_numpy(float), rtol=0, atol=atol,
                                       err_msg=name)
    x, y = json.loads((a / "explain.json").read_text()), json.loads((b / "explain.json").read_text())
    assert x == y


@pytest.mark.parametrize("method, pixel_method", [("integrated-gradients", "gradient"),
                                                  ("gradient-shap", "smoothgrad")])
def test_streamed_explanation_equals_the_in_memory_one(model_and_cells, tmp_path, method, pixel_method):
    """All 240 cells, 4 blocks of 64 (the last one 48) against one in-memory call: every file is the same.

    Tolerance: 1e-5 absolute (attributions are up to ~10). Measured: equal to the bit, since every block starts
    at a multiple of the 32-cell attribution batch, networks run in eval mode, and the seeded noise of
    SmoothGrad / GradientSHAP is drawn per batch; a block that re-drew its noise from the seed, or averaged
    class tables over the wrong cells, differs by far more.
    """
    model, cells = model_and_cells
    trained = load_checkpoint(model, device="cpu")
    options = dict(pixel_method=pixel_method, n_steps=16, n_samples=4, seed=3)
    streamed, memory = tmp_path / "streamed", tmp_path / "memory"
    streamed.mkdir(), memory.mkdir()
    writer = explain_streaming(trained, open_cells(cells), streamed, method, "cell_type", cells_per_class=None,
                               block_rows=64, top_genes=7, **options)
    adata = ad.read_h5ad(cells)
    result = explain(trained, adata, method, "cell_type", **options)
    write_explanation(result, trained.layout, memory, top_genes=7, selection=writer.summary["selection"])
    _assert_same_outputs(streamed, memory, atol=1e-5)
    assert writer.summary["n_samples"] == 240 and np.load(streamed / "saliency.npy").shape[0] == 240
    assert sum(c["n_samples"] for c in writer.summary["classes"]) == int((result.predicted == result.true).sum())
    if method == "integrated-gradients":
        assert writer.summary["attribution"]["completeness_max_relative_error"] <= 0.01


def test_cell_selection_caps_each_predicted_class_with_a_seed(model_and_cells):
    model, cells = model_and_cells
    trained = load_checkpoint(model, device="cpu")
    adata = open_cells(cells)
    rows, selection = select_cells(trained, adata, 25, seed=1)
    predicted = trained.predict(ad.read_h5ad(cells))["predicted"].to_numpy()
    counts = pd.Series(predicted[rows]).value_counts().to_dict()
    totals = pd.Series(predicted).value_counts().to_dict()
    assert counts == {name: min(25, n) for name, n in totals.items()} == {
        k: v for k, v in selection["explained_cells"].items() if v}
    assert selection["predicted_cells"] == {c: totals.get(c, 0) for c in trained.classes}
    assert np.all(np.diff(rows) > 0) and selection["n_explained_cells"] == len(rows)
    again, _ = select_cells(trained, adata, 25, seed=1)
    other, _ = select_cells(trained, adata, 25, seed=2)
    np.testing.assert_array_equal(rows, again)
    assert not np.array_equal(rows, other)
    every, selection = select_cells(trained, adata, "all")
    np.testing.assert_array_equal(every, np.arange(240))
    assert selection["cells_per_class"] == "all"


def test_explain_cli_backed_yes_equals_backed_no_with_a_cell_cap(model_and_cells, tmp_path, capsys):
    model, cells = model_and_cells
    common = ["explain", str(model), str(cells), "--label-column", "cell_type", "--device", "cpu",
              "--cells-per-class", "20", "--steps", "8", "--seed", "4", "--top-genes", "5"]
    assert main([*common, "--backed", "yes", "--out", str(tmp_path / "yes")]) == 0
    captured = capsys.readouterr()
    assert "explained 80/80 cells" in captured.err and "predicted 240/240 cells" in captured.err
    assert "80 of 240 samples (at most 20 per predicted class, seed 4)" in captured.out
    assert main([*common, "--backed", "no", "--out", str(tmp_path / "no")]) == 0
    _assert_same_outputs(tmp_path / "yes", tmp_path / "no", atol=1e-5)
    summary = json.loads((tmp_path / "yes" / "explain.json").read_text())
    assert summary["selection"]["cells_per_class"] == 20 and summary["selection"]["seed"] == 4
    assert set(summary["selection"]["explained_cells"].values()) == {20}  # every type has > 20 cells here
    samples = pd.read_csv(tmp_path / "yes" / "samples.csv")
    assert len(samples) == 80 and samples["predicted"].value_counts().eq(20).all()
    assert len(pd.read_csv(tmp_path / "yes" / "sample_top_genes.csv")) == 80 * 5
    correct = samples[samples["true"] == samples["predicted"]]["true"].value_counts().to_dict()
    assert {c["class"]: c["n_samples"] for c in summary["classes"]} == correct
    # the run is not redone over an earlier one without --overwrite, and is with it
    assert main([*common, "--backed", "yes", "--out", str(tmp_path / "yes")]) == 2
    assert main([*common, "--backed", "yes", "--overwrite", "--out", str(tmp_path / "yes")]) == 0


def test_explain_bad_input_is_a_clear_error(model_and_cells, tmp_path, capsys):
    model, cells = model_and_cells
    common = ["explain", str(model), str(cells), "--device", "cpu", "--backed", "yes"]
    for value in ("0", "many", "-3"):
        assert main([*common, "--cells-per-class", value, "--out", str(tmp_path / "a")]) == 2
        assert "--cells-per-class must be a positive number of cells or 'all'" in capsys.readouterr().err
    # labels the model does not know are refused before any cell is explained
    other = synthetic_counts_h5ad(tmp_path / "other.h5ad", 60, 300, n_types=4, seed=5, label_column="kind")
    handle = ad.read_h5ad(other)
    handle.obs["kind"] = handle.obs["kind"].astype(str).str.replace("type_", "cluster_")
    handle.write_h5ad(other)
    assert main(["explain", str(model), str(other), "--label-column", "kind", "--device", "cpu", "--backed", "yes",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("omicsimage explain: error:")]
    assert len(errors) == 1 and "not among the model's classes" in errors[0]
    assert "predicted" not in err and "explained" not in err  # before the prediction pass
    assert not (tmp_path / "b").exists()
    csv = tmp_path / "cells.csv"
    csv.write_text("sample,gene_00000\ns1,1\n")
    assert main(["explain", str(model), str(csv), "--backed", "yes", "--out", str(tmp_path / "c")]) == 2
    assert "only .h5ad files can be read backed" in capsys.readouterr().err
    assert main(["evaluate", str(cells), "--label-column", "cell_type", *FAST, "--backed", "yes", "--transductive",
                 "--out", str(tmp_path / "d")]) == 2
    assert "--transductive is not available on the streaming path" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def _explain_peak_bytes(trained, path, folder, *, streamed: bool) -> int:
    folder.mkdir()
    tracemalloc.start()
    try:
        if streamed:
            explain_streaming(trained, open_cells(path), folder, "gradient", cells_per_class=None, block_rows=128)
        else:
            result = explain(trained, ad.read_h5ad(path), "gradient")
            write_explanation(result, trained.layout, folder)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streamed_explain_memory_does_not_grow_with_the_cells(model_and_cells, tmp_path):
    """Explain (gradient, every cell) 500 and 2,000 cells, tracing Python/numpy allocations (tracemalloc).

    The per-cell arrays an explanation holds (attribution and contrastive (G), saliency and its maximum
    (C·H·W) and the preprocessed cell, float32) come to ``per_cell`` bytes. Streamed, the larger run may
    peak above the smaller one by less than a quarter of 1,500 cells' worth. In memory (500 and 1,000
    cells, to save time) the peak grows by more than ``per_cell`` per extra cell: the measurement sees
    growth. Measured: streamed +0.1 to +0.5 MB whatever the number of cells (the peak block's pandas and
    h5py buffers vary), in memory about +10 KB per cell. Not traced: torch's own allocator (one block of
    images at a time either way).
    """
    model, _ = model_and_cells
    trained = load_checkpoint(model, device="cpu")
    paths = {n: synthetic_counts_h5ad(tmp_path / f"{n}.h5ad", n, 300, n_types=4, markers=15, density=0.06, seed=5,
                                      cell_seed=n) for n in (64, 500, 1000, 2000)}
    n_genes, c, (h, w) = len(trained.genes), trained.layout.n_channels, trained.layout.pixel_map_.shape
    per_cell = 4 * (3 * n_genes + 2 * c * h * w)
    (tmp_path / "warm").mkdir()  # first calls import and cache things; not what is measured
    explain_streaming(trained, open_cells(paths[64]), tmp_path / "warm", "gradient", cells_per_class=None)
    streamed = {n: _explain_peak_bytes(trained, paths[n], tmp_path / f"s{n}", streamed=True) for n in (500, 2000)}
    memory = {n: _explain_peak_bytes(trained, paths[n], tmp_path / f"m{n}", streamed=False) for n in (500, 1000)}
    growth, memory_growth = streamed[2000] - streamed[500], memory[1000] - memory[500]
    print(f"peak (MB): streamed {streamed[500] / 1e6:.2f} → {streamed[2000] / 1e6:.2f}, in memory "
          f"{memory[500] / 1e6:.2f} → {memory[1000] / 1e6:.2f}; per cell {per_cell} bytes")
    assert memory_growth > 500 * per_cell, (memory_growth, per_cell)
    assert growth < 1500 * per_cell / 4, (growth, per_cell)


def test_streamed_evaluate_fits_every_fold_on_its_training_cells_only(model_and_cells, tmp_path, monkeypatch,
                                                                       capsys):
    """`evaluate --backed yes`: the preprocessing statistics, the layout and the baseline of each fold see
    only that fold's training cells (recorded, and checked against the folds `stratified_folds` makes);
    `--compare-model` runs on the same folds; progress shows folds and tenths of epochs."""
    from napari_omicsimage.evaluation import stratified_folds
    from napari_omicsimage.streaming import cv, run

    _, cells = model_and_cells
    seen = []

    def recorder(name, fn, position):
        def wrapped(*args, **kwargs):
            seen.append((name, np.asarray(args[position])))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(run, "fit_preprocessor", recorder("preprocess", run.fit_preprocessor, 1))
    monkeypatch.setattr(run, "fit_layout_on_subsample", recorder("layout", run.fit_layout_on_subsample, 1))
    monkeypatch.setattr(cv, "transform_rows", recorder("baseline", cv.transform_rows, 1))
    out = tmp_path / "cv"
    assert main(["evaluate", str(cells), "--label-column", "cell_type", *FAST, "--epochs", "1", "--folds", "2",
                 "--backed", "yes", "--layout-cells", "60", "--compare-model", "resnet18", "--out", str(out)]) == 0
    labels = ad.read_h5ad(cells).obs["cell_type"].astype(str).to_numpy()
    folds = stratified_folds(labels, 2, 0)
    # per fold and model: preprocess, layout, (baseline for the first model only)
    assert [name for name, _ in seen] == ["preprocess", "layout", "baseline"] * 2 + ["preprocess", "layout"] * 2
    fold_of_call = [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    for (name, rows), f in zip(seen, fold_of_call):
        train_idx, test_idx = folds[f]
        assert np.isin(rows, train_idx).all() and not np.isin(rows, test_idx).any(), (name, f)
        assert len(rows) == (60 if name == "baseline" else len(train_idx)), (name, len(rows))  # layout: subsamples
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["comparison"]["model_b"] == "resnet18" and len(metrics["compare_model"]["folds"]) == 2
    err = capsys.readouterr().err
    assert "fold 2/2" in err and "batch: fold 1/2, epoch 1/1, batch" in err


def test_streamed_render_writes_the_in_memory_images_block_by_block(model_and_cells, tmp_path, capsys):
    """`render --backed yes` equals `--backed no` file by file when the layout sees every cell; with a smaller
    --layout-cells it says so; its traced peak memory (tracemalloc) rendering 20,000 cells exceeds that of 5,000
    by less than a tenth of the 15,000 extra images (images go to disk; an in-memory stack is 61 MB more)."""
    from napari_omicsimage.streaming.render import render_streaming

    _, cells = model_and_cells
    common = ["render", str(cells), "--label-column", "cell_type", "--method", "grid", "--n-top-genes", "100"]
    for backed in ("yes", "no"):
        assert main([*common, "--backed", backed, "--out", str(tmp_path / backed)]) == 0
    assert "wrote 240 images of shape (1, 10, 10)" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "yes" / "images.npy"), np.load(tmp_path / "no" / "images.npy"))
    for name in ("samples.csv", "pixel_genes.csv"):
        assert pd.read_csv(tmp_path / "yes" / name).equals(pd.read_csv(tmp_path / "no" / name)), name
    yes, no = (json.loads((tmp_path / b / "layout.json").read_text()) for b in ("yes", "no"))
    assert yes["genes"] == no["genes"] and yes["shape"] == no["shape"] == [240, 1, 10, 10]
    assert main([*common, "--backed", "yes", "--layout-cells", "50", "--out", str(tmp_path / "sub")]) == 0
    assert "fitted on a stratified subsample of 50 of the 240 cells" in capsys.readouterr().out

    # sizes above the 4,096-cell read block, so that the blocks are full in both
    peaks, paths = {}, {n: synthetic_counts_h5ad(tmp_path / f"r{n}.h5ad", n, 300, n_types=4, seed=5, cell_seed=n)
                        for n in (5_000, 20_000)}
    for run, n in enumerate((5_000, 5_000, 20_000)):  # the first run warms imports and caches
        tracemalloc.start()
        try:
            render_streaming(open_cells(paths[n]), {"method": "grid", "size": 32}, tmp_path / f"render{run}",
                             layout_cells=200)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    extra = 15_000 * 32 * 32 * 4  # 15,000 more cells' images, float32 (61 MB)
    assert peaks[20_000] - peaks[5_000] < extra / 10, (peaks, extra)


@pytest.mark.parametrize("channels", [3, 1])
def test_top_genes_of_a_block_are_each_samples_own_ranking(channels):
    """sample_top_genes (all samples of a block at once, as the writer uses it) equals each sample's
    Explanation.sample_table, ties included (attributions rounded so that many tie; pixel-mates share
    saliency), with genes left out of some channels and some drawn in none."""
    from types import SimpleNamespace

    from napari_omicsimage.attribution import GeneAttribution
    from napari_omicsimage.explain import Explanation, sample_top_genes
    from napari_omicsimage.render import PixelMap

    rng = np.random.default_rng(channels)
    gene_pixels = rng.integers(0, 6, size=(channels, 60, 2))
    gene_pixels[rng.random((channels, 60)) < 0.2] = -1
    gene_pixels[:, :2] = -1  # two genes drawn nowhere
    layout = SimpleNamespace(has_gene_map=True, pixel_map_=PixelMap(gene_pixels, (6, 6), [f"g{i}" for i in range(60)]),
                             n_channels=channels)
    x = rng.random((40, 60)).astype(np.float32)
    n, shape = 23, (layout.n_channels, *layout.pixel_map_.shape)
    values = np.round(rng.normal(size=(n, 60)), 1).astype(np.float32)
    attribution = GeneAttribution(method="gradient", genes=layout.pixel_map_.genes, values=values,
                                  target=np.zeros(n, dtype=np.int64), baseline="", baseline_values=None,
                                  contrastive=rng.normal(size=(n, 60)).astype(np.float32))
    result = Explanation(method="gradient", pixel_method="gradient", samples=np.array([f"s{i}" for i in range(n)]),
                         classes=["a", "b"], x=x[:n], images=np.zeros((n, *shape), np.float32),
                         proba=rng.dirichlet([1, 1], size=n), saliency=np.round(rng.random((n, *shape)), 1),
                         attribution=attribution)
    expected = []
    for i, sample in enumerate(result.samples):
        table = result.sample_table(layout, i).head(9)
        table.insert(0, "sample", sample)
        table.insert(1, "predicted", result.predicted[i])
        expected.append(table)
    together = sample_top_genes(result, layout, 9, chunk=5)
    pd.testing.assert_frame_equal(together, pd.concat(expected, ignore_index=True))
