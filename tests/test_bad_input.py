"""Bad input gets one clear line (exit 2) or is read correctly with a note — never a traceback, never a
silent change of meaning (issue 10, parts 2 and 3; docs/bad-input.md lists what each case gets)."""

import gzip
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from napari_omicsimage import cli, render
from napari_omicsimage.cli import main
from napari_omicsimage.errors import OmicsInputError
from napari_omicsimage.io import read_expression
from napari_omicsimage.layouts import METHODS, GridLayout, make_layout
from napari_omicsimage.pipeline import imagify
from napari_omicsimage.preprocess import PreprocessConfig, Preprocessor, decide_scale

N_SAMPLES, N_GENES = 8, 20


@pytest.fixture
def counts():
    """8 samples × 20 genes of small integer counts (samples in rows; genes are the longer axis)."""
    rng = np.random.default_rng(3)
    return pd.DataFrame(rng.poisson(4, (N_SAMPLES, N_GENES)),
                        index=[f"s{i}" for i in range(N_SAMPLES)], columns=[f"G{i}" for i in range(N_GENES)])


def cli_error(capsys, args) -> str:
    """Run the CLI, assert it failed with exactly one error line and no traceback; return that line."""
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def cli_ok(capsys, args) -> str:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err
    return captured.err


def render_args(path, tmp_path, *extra):
    return ["render", path, "--method", "grid", "--out", tmp_path / "out", *extra]


def rendered_samples(tmp_path) -> list[str]:
    return pd.read_csv(tmp_path / "out" / "samples.csv", dtype=str)["sample"].tolist()


# ================================================================ reading files
def test_plain_file_named_gz(tmp_path, capsys, counts):
    path = tmp_path / "x.csv.gz"
    counts.to_csv(path, compression=None)
    line = cli_error(capsys, render_args(path, tmp_path))
    assert "x.csv.gz" in line and "not gzip-compressed" in line and "rename it to x.csv" in line


def test_truncated_gzip(tmp_path, capsys, counts):
    big = pd.concat([counts] * 200, axis=1)
    big.columns = [f"G{i}" for i in range(big.shape[1])]
    data = gzip.compress(big.to_csv().encode())
    path = tmp_path / "x.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    line = cli_error(capsys, render_args(path, tmp_path))
    assert "x.csv.gz" in line and "truncated" in line


def test_h5ad_that_is_not_hdf5(tmp_path, capsys, counts):
    path = tmp_path / "x.h5ad"
    counts.to_csv(path)
    line = cli_error(capsys, render_args(path, tmp_path))
    assert "x.h5ad is not an HDF5 file" in line and "text" in line


def test_truncated_h5ad(tmp_path, capsys, toy_adata):
    whole = tmp_path / "whole.h5ad"
    toy_adata.write_h5ad(whole)
    path = tmp_path / "x.h5ad"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    line = cli_error(capsys, render_args(path, tmp_path))
    assert "x.h5ad" in line and "truncated or damaged" in line


@pytest.mark.parametrize("name, sep, word", [("x.csv", "\t", "tab"), ("x.csv", ";", "semicolon"),
                                             ("x.tsv", ",", "comma"), ("x.txt", ",", "comma")])
def test_separator_is_sniffed_and_named(tmp_path, capsys, counts, name, sep, word):
    path = tmp_path / name
    counts.to_csv(path, sep=sep)
    err = cli_ok(capsys, render_args(path, tmp_path))
    assert f"{name} is {word}-separated" in err or f"{name}: read as {word}-separated" in err
    assert rendered_samples(tmp_path) == list(counts.index)
    np.testing.assert_array_equal(read_expression(path).X, counts.to_numpy(np.float32))


def test_r_style_header_without_corner_cell_is_sniffed(tmp_path, counts):
    path = tmp_path / "x.csv"  # R's write.table: the header has one field fewer than the rows
    lines = ["\t".join(counts.columns)] + ["\t".join([i, *map(str, row)]) for i, row in
                                           zip(counts.index, counts.to_numpy())]
    path.write_text("\n".join(lines) + "\n")
    adata = read_expression(path)
    assert adata.shape == (N_SAMPLES, N_GENES)
    assert "tab-separated" in adata.uns["omicsimage"]["reading"][0]


def test_wide_table_with_lines_longer_than_the_sniffed_block(tmp_path):
    rng = np.random.default_rng(0)
    wide = pd.DataFrame(rng.random((3, 12000)).round(4), index=["s0", "s1", "s2"],
                        columns=[f"ENSG{i:011d}" for i in range(12000)])
    path = tmp_path / "x.csv"
    wide.to_csv(path, sep="\t")
    assert len(path.read_text().splitlines()[0]) > 1 << 16
    adata = read_expression(path)
    assert adata.shape == (3, 12000)
    assert "tab-separated" in adata.uns["omicsimage"]["reading"][0]


def test_gzip_without_gz_suffix_is_read_with_a_note(tmp_path, capsys, counts):
    path = tmp_path / "x.csv"
    path.write_bytes(gzip.compress(counts.to_csv().encode()))
    err = cli_ok(capsys, render_args(path, tmp_path))
    assert "x.csv is gzip-compressed" in err
    np.testing.assert_array_equal(read_expression(path).X, counts.to_numpy(np.float32))


def test_latin1_file_is_read_with_a_note(tmp_path, capsys, counts):
    counts.index = [f"patient_é{i}" for i in range(N_SAMPLES)]
    path = tmp_path / "x.csv"
    counts.to_csv(path, encoding="latin-1")
    err = cli_ok(capsys, render_args(path, tmp_path))
    assert "x.csv is not UTF-8" in err and "Latin-1" in err
    assert rendered_samples(tmp_path) == list(counts.index)  # the accents survive


def test_latin1_byte_after_the_sniffed_start_is_still_read(tmp_path, counts):
    big = pd.concat([counts] * 600, ignore_index=True)
    big.index = [f"s{i}" for i in range(len(big) - 1)] + ["último"]
    path = tmp_path / "x.csv"
    big.to_csv(path, encoding="latin-1")
    assert path.stat().st_size > 1 << 16  # the odd byte lies beyond what is sniffed
    adata = read_expression(path, orientation="samples-in-rows")
    assert adata.obs_names[-1] == "último"
    assert any("not UTF-8" in note for note in adata.uns["omicsimage"]["reading"])


def _write_10x(folder, compressed: dict, legacy: bool = False):
    counts = sp.random(6, 4, density=0.6, format="coo", random_state=0) * 10  # genes × cells
    folder.mkdir()
    names = {"matrix": "matrix.mtx", "genes": "genes.tsv" if legacy else "features.tsv",
             "barcodes": "barcodes.tsv"}

    def opener(key):
        path = folder / (names[key] + (".gz" if compressed[key] else ""))
        return gzip.open(path, "wb") if compressed[key] else open(path, "wb")

    with opener("matrix") as handle:
        scipy.io.mmwrite(handle, counts.astype(np.float32))
    with opener("genes") as handle:
        handle.write("".join(f"ENSG0{i}\tGENE{i}" + ("" if legacy else "\tGene Expression") + "\n"
                             for i in range(6)).encode())
    with opener("barcodes") as handle:
        handle.write("".join(f"CELL{i}-1\n" for i in range(4)).encode())
    return counts.toarray().T


@pytest.mark.parametrize("compressed, legacy", [
    ({"matrix": False, "genes": False, "barcodes": False}, False),  # v3 folder after gunzip
    ({"matrix": False, "genes": False, "barcodes": False}, True),  # v2 (genes.tsv)
    ({"matrix": True, "genes": False, "barcodes": True}, False),  # mixed
    ({"matrix": True, "genes": True, "barcodes": True}, False),  # as Cell Ranger writes it
])
def test_10x_folder_plain_or_gzipped(tmp_path, compressed, legacy):
    expected = _write_10x(tmp_path / "filtered", compressed, legacy)
    adata = read_expression(tmp_path / "filtered")
    assert list(adata.var_names) == [f"GENE{i}" for i in range(6)]
    assert list(adata.obs_names) == [f"CELL{i}-1" for i in range(4)]
    np.testing.assert_allclose(adata.X.toarray(), expected, rtol=1e-6)
    assert adata.uns["omicsimage"]["orientation"] == "10x files store cells in rows"


def test_10x_folder_missing_a_file(tmp_path, capsys):
    _write_10x(tmp_path / "filtered", {"matrix": False, "genes": False, "barcodes": False})
    (tmp_path / "filtered" / "barcodes.tsv").unlink()
    line = cli_error(capsys, render_args(tmp_path / "filtered", tmp_path))
    assert "filtered" in line and "barcodes.tsv" in line


def test_10x_files_that_do_not_belong_together(tmp_path, capsys):
    _write_10x(tmp_path / "filtered", {"matrix": False, "genes": False, "barcodes": False})
    with open(tmp_path / "filtered" / "barcodes.tsv", "a") as handle:
        handle.write("EXTRA-1\n")
    line = cli_error(capsys, render_args(tmp_path / "filtered", tmp_path))
    assert "6 genes × 4 cells" in line and "5 barcodes" in line and "do not belong together" in line


def test_table_that_no_separator_splits(tmp_path, capsys):
    path = tmp_path / "x.csv"
    path.write_text("gene|s1|s2\nTP53|1|2\nEGFR|3|4\n")
    line = cli_error(capsys, render_args(path, tmp_path))
    assert "x.csv holds no expression values" in line and "read as comma-separated" in line


# ====================================================================== labels
@pytest.mark.parametrize("missing", ["NA", "NaN", "nan", "", "N/A", "NULL"])
def test_na_labels_are_missing_not_a_class(tmp_path, capsys, counts, missing):
    data = tmp_path / "x.csv"
    counts.to_csv(data)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"sample": counts.index, "kind": ["a", "b"] * 3 + [missing, "a"]}).to_csv(labels, index=False)
    line = cli_error(capsys, ["train", data, "--labels", labels, "--out", tmp_path / "m.pt"])
    assert "1 sample(s) have no label in 'kind'" in line and "s6" in line
    with pytest.raises(OmicsInputError, match="no label"):
        read_expression(data, labels=labels)


def test_na_labels_in_h5ad_obs_are_missing(tmp_path, toy_adata):
    toy_adata.obs["label"] = toy_adata.obs["label"].astype(str)
    toy_adata.obs.iloc[3, 0] = "NA"
    toy_adata.write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(OmicsInputError, match=r"1 sample\(s\) have no label.*s3"):
        read_expression(tmp_path / "x.h5ad", label_column="label")


@pytest.fixture
def duplicate_columns(tmp_path, counts):
    data = tmp_path / "x.csv"
    counts.to_csv(data)
    labels = tmp_path / "labels.csv"
    rows = "".join(f"{s},{'ab'[i % 2]},{'cd'[i % 2]}\n" for i, s in enumerate(counts.index))
    labels.write_text("sample,label,label\n" + rows)
    return data, labels


def test_labels_with_two_columns_of_one_name_are_refused(tmp_path, capsys, duplicate_columns):
    data, labels = duplicate_columns
    line = cli_error(capsys, render_args(data, tmp_path, "--labels", labels))
    assert "labels.csv" in line and "2 columns named 'label'" in line and "#3" in line
    line = cli_error(capsys, render_args(data, tmp_path, "--labels", labels, "--label-column", "label"))
    assert "2 columns named 'label'" in line


@pytest.mark.parametrize("position, expected", [("#2", ["a", "b"]), ("#3", ["c", "d"])])
def test_label_column_by_position(tmp_path, capsys, duplicate_columns, position, expected):
    data, labels = duplicate_columns
    cli_ok(capsys, render_args(data, tmp_path, "--labels", labels, "--label-column", position,
                               "--sample-column", "#1"))
    written = pd.read_csv(tmp_path / "out" / "samples.csv", dtype=str)["label"].tolist()
    assert written == expected * (N_SAMPLES // 2)
    adata = read_expression(data, labels=labels, label_column=position)
    assert adata.uns["omicsimage"]["label_column"] == "label"


def test_label_column_position_out_of_range(tmp_path, capsys, duplicate_columns):
    data, labels = duplicate_columns
    line = cli_error(capsys, render_args(data, tmp_path, "--labels", labels, "--label-column", "#7"))
    assert "labels.csv has 3 columns" in line and "#7" in line


# ====================================================== scale & preprocessing
@pytest.mark.parametrize("seed", range(5))
def test_small_integer_counts_are_counts_and_get_normalised(seed):
    rng = np.random.default_rng(seed)
    x = rng.poisson(3, (30, 40)).astype(np.float32)
    assert x.max() <= 50  # the case the old rule (max ≤ 50 → log-scale) got wrong
    adata = ad.AnnData(x)
    decision = decide_scale(adata)
    assert not decision.log_scale and "non-negative integers" in decision.reason
    prep = Preprocessor(n_top_genes=None).fit(adata)
    assert prep.log_scale_ is False
    assert "counts: normalize_total + log1p" in prep.notes_[0]


def test_negative_value_in_count_like_data_is_reported(tmp_path, capsys, counts):
    counts.iloc[2, 3] = -1
    path = tmp_path / "x.csv"
    counts.to_csv(path)
    err = cli_ok(capsys, render_args(path, tmp_path))
    assert "already log-scale" in err and "1 value(s) are negative" in err and "not counts" in err


def test_scale_decision_is_always_printed(tmp_path, capsys, counts, toy_adata):
    path = tmp_path / "x.csv"
    counts.to_csv(path)
    assert "x.csv: values read as counts" in cli_ok(capsys, render_args(path, tmp_path))
    toy_adata.write_h5ad(tmp_path / "toy.h5ad")
    err = cli_ok(capsys, ["render", tmp_path / "toy.h5ad", "--method", "grid", "--out", tmp_path / "o2"])
    assert "values read as already log-scale" in err and "non-integer values" in err
    err = cli_ok(capsys, ["render", tmp_path / "toy.h5ad", "--method", "grid", "--counts", "--out",
                          tmp_path / "o3"])
    assert "values read as counts: normalize_total + log1p (set by the user)" in err
    result = imagify(read_expression(path), "grid")
    assert any(note.startswith("values read as counts") for note in result.notes)


def _qc_data(seed=0):
    """30 samples × 40 genes; the first 5 samples detect only 3 genes."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(5, (30, 40)).astype(np.float32) + 1
    x[:5, 3:] = 0
    x[:5, :3] = 500  # would dominate the fitted ranges if they were used
    return ad.AnnData(x, obs=pd.DataFrame(index=[f"c{i}" for i in range(30)]),
                      var=pd.DataFrame(index=[f"g{i}" for i in range(40)]))


def test_min_genes_leaves_low_quality_training_samples_out_of_the_fit():
    adata = _qc_data()
    prep = Preprocessor(PreprocessConfig(min_genes=10, n_top_genes=None)).fit(adata)
    assert prep.qc_passed_.tolist() == [False] * 5 + [True] * 25
    reference = Preprocessor(PreprocessConfig(n_top_genes=None)).fit(adata[5:].copy())
    np.testing.assert_array_equal(prep.max_, reference.max_)
    unfiltered = Preprocessor(PreprocessConfig(n_top_genes=None)).fit(adata)
    assert not np.array_equal(unfiltered.max_, prep.max_)  # the filter changes what is learned
    assert any("5 of 30 training samples" in note for note in prep.notes_)
    assert prep.transform(adata).shape == (30, 40)  # every sample is still transformed


def test_min_genes_in_imagify_images_every_sample():
    result = imagify(_qc_data(), "grid", preprocess=PreprocessConfig(min_genes=10, n_top_genes=None))
    assert result.images.shape[0] == 30
    assert any("left out of the fit" in note for note in result.notes)


def test_min_genes_removing_almost_everything_is_explained():
    with pytest.raises(OmicsInputError, match="lower min_genes"):
        Preprocessor(PreprocessConfig(min_genes=1000)).fit(_qc_data())


def test_min_genes_leaves_samples_out_of_training(torch_one_thread):
    from napari_omicsimage.training import TrainConfig, train

    adata = _qc_data()
    adata.obs["label"] = pd.Categorical(["a", "b"] * 15)
    trained = train(adata, "label", {"method": "grid"},
                    TrainConfig(epochs=1, batch_size=25, preprocess=PreprocessConfig(min_genes=10)))
    assert trained.preprocessor.qc_passed_.sum() == 25
    batches = trained.history[0]["batch_losses"]
    assert len(batches) == 1  # 25 training samples in batches of 25: the 5 QC failures were left out
    assert len(trained.predict(adata)) == 30  # but every sample is predicted


# ============================================================== layout options
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [0, -3])
def test_size_zero_or_negative_is_refused_for_every_method(method, size):
    with pytest.raises(OmicsInputError, match="at least 2×2 pixels"):
        make_layout(method, size=size)


def test_size_zero_in_the_cli(tmp_path, capsys, counts):
    path = tmp_path / "x.csv"
    counts.to_csv(path)
    line = cli_error(capsys, ["render", path, "--method", "deepinsight", "--size", "0", "--out", tmp_path / "o"])
    assert "at least 2×2 pixels, got 0×0" in line


@pytest.mark.parametrize("method", ["deepinsight", "fotomics", "grid", "rgb-embedding"])
def test_absurd_size_is_refused_with_the_figure(tmp_path, capsys, counts, method):
    path = tmp_path / "x.csv"
    counts.to_csv(path)
    line = cli_error(capsys, ["render", path, "--method", method, "--size", "100000", "--out", tmp_path / "o"])
    channels = 3 if method == "rgb-embedding" else 1
    assert f"{N_SAMPLES} images of {channels}×100000×100000 pixels need" in line
    assert "GiB" in line and "smaller --size" in line
    assert not (tmp_path / "o").exists()


def test_memory_check_compares_bytes_with_what_is_available(monkeypatch):
    monkeypatch.setattr(render, "available_memory", lambda: 2**30)
    render.check_image_memory(100, 3, (64, 64))  # 4.7 MiB: fine
    with pytest.raises(OmicsInputError, match=r"100 images of 3×1024×1024 pixels need 1\.2 GiB.*1\.0 GiB"):
        render.check_image_memory(100, 3, (1024, 1024))
    layout = GridLayout(size=2048).fit(np.random.default_rng(0).random((4, 10)))
    with pytest.raises(OmicsInputError, match="need"):  # the renderer checks before allocating
        layout.transform(np.zeros((100, 10), np.float32))


def test_grid_with_a_single_gene(tmp_path, capsys):
    path = tmp_path / "x.csv"
    pd.DataFrame({"G0": np.arange(6.0)}, index=[f"s{i}" for i in range(6)]).to_csv(path)
    line = cli_error(capsys, ["render", path, "--samples-in-rows", "--method", "grid", "--out", tmp_path / "o"])
    assert "a grid needs at least 2 genes, got 1" in line
    with pytest.raises(OmicsInputError, match="at least 2 genes"):
        GridLayout().fit(np.arange(6.0)[:, None])


# ======================================================================== CLI
def test_single_sample(tmp_path, capsys, counts):
    path = tmp_path / "x.csv"
    counts.iloc[:1].to_csv(path)
    line = cli_error(capsys, ["render", path, "--samples-in-rows", "--out", tmp_path / "o"])
    assert "needs at least two samples, got 1" in line
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"sample": ["s0"], "kind": ["a"]}).to_csv(labels, index=False)
    line = cli_error(capsys, ["train", path, "--samples-in-rows", "--labels", labels, "--out", tmp_path / "m.pt"])
    assert "needs at least two samples" in line


def test_interrupt_during_start_up_is_one_line(monkeypatch, capsys):
    def interrupted_while_importing():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted_while_importing)
    assert main(["render", "x.csv", "--out", "o"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "omicsimage render: interrupted"


def test_cli_module_imports_nothing_heavy_before_main():
    """What loads before main() cannot be guarded against Ctrl-C, so it must stay small."""
    code = ("import sys, napari_omicsimage.cli; "
            "print(sorted(m for m in ('numpy', 'pandas', 'scanpy', 'anndata', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    import napari_omicsimage.io as io

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(io, "read_expression", exhausted)
    line = cli_error(capsys, ["render", "/data/x.csv", "--out", "/tmp/never"])
    assert "ran out of memory" in line and "--size" in line


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "/data/x.csv"),
                                   OSError(28, "No space left on device", "/data/out")])
def test_any_os_error_becomes_one_line(monkeypatch, capsys, error):
    import napari_omicsimage.io as io

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(io, "read_expression", failing)
    line = cli_error(capsys, ["render", "/data/x.csv", "--out", "/tmp/never"])
    assert line.startswith("omicsimage render: error: ")
    assert error.filename in line and error.strerror in line


# ============================================================ labels (issue 17)
@pytest.fixture
def pdata_export(tmp_path, counts):
    """A phenotype table as Bioconductor writes pData(eset): row names, then pData's own 'sample' column."""
    data = tmp_path / "x.csv"
    counts.to_csv(data)
    labels = tmp_path / "pheno.csv"
    rows = "".join(f"{s},{i + 1},{'ab'[i % 2]},{'b' + str(i % 3)},{'yes' if i < 4 else 'no'}\n"
                   for i, s in enumerate(counts.index))
    labels.write_text("sample,sample,outcome,batch,cancer\n" + rows)
    return data, labels


@pytest.mark.parametrize("extra", [[], ["--sample-column", "#1"], ["--sample-column", "sample"]])
def test_bioconductor_pdata_export_picks_the_id_column_that_matches(tmp_path, capsys, pdata_export, extra):
    data, labels = pdata_export
    err = cli_ok(capsys, render_args(data, tmp_path, "--labels", labels, "--label-column", "outcome", *extra))
    written = pd.read_csv(tmp_path / "out" / "samples.csv", dtype=str)["label"].tolist()
    assert written == ["a", "b"] * (N_SAMPLES // 2)
    if not extra or extra[1] == "sample":
        assert "2 columns named 'sample' (#1 and #2): sample ids read from #1" in err
    adata = read_expression(data, labels=labels, label_column="outcome")
    assert list(adata.obs["sample"]) == [str(i + 1) for i in range(N_SAMPLES)]  # pData's own column kept


def test_two_id_columns_that_both_or_neither_match_are_refused(tmp_path, capsys, pdata_export):
    data, labels = pdata_export
    text = labels.read_text().splitlines()
    both = tmp_path / "both.csv"
    both.write_text("\n".join([text[0]] + [f"{r.split(',')[0]},{r}" for r in text[1:]]).replace(
        "sample,sample,outcome", "sample,sample,sample,outcome", 1) + "\n")
    line = cli_error(capsys, render_args(data, tmp_path, "--labels", both, "--label-column", "outcome"))
    assert "3 columns named 'sample'" in line and "each holds the expression's sample names" in line
    assert "--sample-column #1" in line
    neither = tmp_path / "neither.csv"
    neither.write_text("\n".join([text[0]] + ["x" + r for r in text[1:]]) + "\n")
    line = cli_error(capsys, render_args(data, tmp_path, "--labels", neither, "--label-column", "outcome"))
    assert "none holds the expression's sample names" in line


def test_a_label_column_with_one_sample_per_class_is_refused(tmp_path, capsys, pdata_export):
    data, labels = pdata_export
    line = cli_error(capsys, ["train", data, "--labels", labels, "--sample-column", "#1", "--label-column", "#2",
                              "--out", tmp_path / "m.pt"])
    assert "gives each of the 8 samples a label of its own" in line and "--label-column" in line
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("shape", [(8, 20), (12, 50), (40, 7)])
def test_an_all_constant_matrix_is_refused(shape):
    with pytest.raises(OmicsInputError, match=r"every value of the training samples is the same \(5\)"):
        Preprocessor(n_top_genes=None).fit(ad.AnnData(np.full(shape, 5, np.float32)))


def test_one_varying_gene_explains_normalisation_and_names_each_minimum(tmp_path, capsys):
    path = tmp_path / "x.csv"
    pd.DataFrame({"G0": np.arange(1.0, 7.0)}, index=[f"s{i}" for i in range(6)]).to_csv(path)
    line = cli_error(capsys, ["render", path, "--samples-in-rows", "--method", "deepinsight", "--out", tmp_path / "o"])
    assert "after per-sample normalisation" in line and "deepinsight 3" in line and "grid 2" in line


def test_devices_beyond_the_cpu_cores_are_capped_with_a_note(capsys):
    """--devices 99 on a CPU machine: as many gloo processes as cores this process may use, said in a note."""
    import os

    from napari_omicsimage.streaming.ddp import available_devices

    cores = len(os.sched_getaffinity(0))
    assert available_devices(99, "cpu") == cores
    assert f"--devices 99, but this machine has {cores} CPU core(s): using {cores}" in capsys.readouterr().err
    assert available_devices(1, "cpu") == 1 and capsys.readouterr().err == ""
    with pytest.raises(OmicsInputError, match="at least 1"):
        available_devices(0, "cpu")


@pytest.mark.parametrize("orientation", ["genes_in_rows", "samples_in_rows"])
def test_an_empty_gene_name_is_refused_not_read_as_nan(tmp_path, orientation):
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(6)]
    genes[3] = ""
    frame = pd.DataFrame(rng.integers(0, 50, (6, 8)), index=genes, columns=[f"s{j}" for j in range(8)])
    path = tmp_path / "expr.csv"
    (frame if orientation == "genes_in_rows" else frame.T).to_csv(path)
    where = r"first column\): 1 row\(s\)" if orientation == "genes_in_rows" else r"header row\): 1 column\(s\)"
    with pytest.raises(OmicsInputError, match=where + r" have no name .* 4 of 6"):
        read_expression(path)
