"""Reading data in every supported shape, and a clear error for every bad input."""

import gzip

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from napari_omicsimage.errors import OmicsInputError
from napari_omicsimage.io import load_sample_data, read_expression


def write_table(path, frame, sep=","):
    frame.to_csv(path, sep=sep)
    return path


@pytest.fixture
def small_frame():
    rng = np.random.default_rng(1)
    genes = ["TP53", "EGFR", "MYC", "CD274", "IL6"]
    samples = ["p1", "p2", "p3", "p4"]
    return pd.DataFrame(rng.uniform(0, 10, (4, 5)), index=samples, columns=genes)


def test_samples_in_rows_detected_from_gene_like_columns(tmp_path, small_frame):
    path = write_table(tmp_path / "x.csv", small_frame)
    adata = read_expression(path)
    assert adata.shape == (4, 5)
    assert list(adata.var_names) == list(small_frame.columns)
    assert "columns" in adata.uns["omicsimage"]["orientation"]


def test_genes_in_rows_tsv_gz_detected_by_labels(tmp_path, small_frame):
    path = tmp_path / "x.tsv.gz"
    small_frame.T.to_csv(path, sep="\t")
    labels = pd.DataFrame({"sample": ["p1", "p2", "p3", "p4"], "kind": ["a", "b", "a", "b"]})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    adata = read_expression(path, labels=tmp_path / "labels.csv", label_column="kind")
    assert adata.shape == (4, 5)
    assert list(adata.obs["kind"]) == ["a", "b", "a", "b"]
    assert "rows" in adata.uns["omicsimage"]["orientation"]
    assert "label sample ids" in adata.uns["omicsimage"]["orientation"]


def test_orientation_override_wins(tmp_path, small_frame):
    path = write_table(tmp_path / "x.csv", small_frame)
    adata = read_expression(path, orientation="genes-in-rows")
    assert adata.shape == (5, 4)  # the user said so, even if it looks odd
    assert "set by the user" in adata.uns["omicsimage"]["orientation"]


def test_sample_ids_keep_leading_zeros(tmp_path):
    frame = pd.DataFrame({"01005": [1.0, 2.0, 3.0], "01010": [2.0, 3.0, 4.0]},
                         index=["1000_at", "1001_at", "1002_at"])
    frame.index.name = "probe"
    path = write_table(tmp_path / "probes.csv", frame)
    adata = read_expression(path)
    assert list(adata.obs_names) == ["01005", "01010"]


def test_real_medulloblastoma_genes_in_rows(medulloblastoma_paths):
    expression, labels = medulloblastoma_paths
    adata = read_expression(expression, labels=labels, label_column="subgroup")
    assert adata.shape == (50, 21641)
    assert adata.obs["subgroup"].value_counts().to_dict() == {"Group4": 21, "SHH": 14, "Group3": 11, "WNT": 4}


def test_h5ad_roundtrip_with_obs_labels(tmp_path, toy_adata):
    toy_adata.write_h5ad(tmp_path / "toy.h5ad")
    adata = read_expression(tmp_path / "toy.h5ad", label_column="label")
    assert adata.shape == toy_adata.shape
    np.testing.assert_allclose(adata.X, toy_adata.X)


def test_10x_mtx_folder(tmp_path):
    counts = sp.random(6, 4, density=0.6, format="coo", random_state=0) * 10  # genes × cells in 10x
    folder = tmp_path / "filtered"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, counts.astype(np.float32))
    with gzip.open(folder / "features.tsv.gz", "wt") as handle:
        for i in range(6):
            handle.write(f"ENSG0000000000{i}\tGENE{i}\tGene Expression\n")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as handle:
        for i in range(4):
            handle.write(f"CELL{i}-1\n")
    adata = read_expression(folder)
    assert adata.shape == (4, 6)
    assert adata.var_names[0] == "GENE0"


def test_bundled_sample_is_log_scale_with_labels():
    adata = load_sample_data()
    assert adata.shape == (700, 765)
    assert adata.obs["bulk_labels"].nunique() == 10
    assert adata.X.min() >= 0  # log-normalised raw values, not the z-scored X
    assert adata.uns["omicsimage"]["log_scale"] is True


# ------------------------------------------------------------ bad inputs
def test_non_numeric_cell_names_the_cell(tmp_path, small_frame):
    frame = small_frame.astype(object)
    frame.loc["p2", "MYC"] = "n/a?"
    path = write_table(tmp_path / "x.csv", frame)
    with pytest.raises(OmicsInputError, match=r"'MYC' is not numeric.*'p2'"):
        read_expression(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_is_refused(tmp_path, small_frame, bad):
    small_frame.loc["p3", "EGFR"] = bad
    path = write_table(tmp_path / "x.csv", small_frame)
    with pytest.raises(OmicsInputError, match=r"NaN or infinite.*'p3'.*'EGFR'"):
        read_expression(path)


def test_duplicate_gene_names(tmp_path, small_frame):
    frame = small_frame.copy()
    frame.columns = ["TP53", "EGFR", "TP53", "CD274", "IL6"]
    path = write_table(tmp_path / "x.csv", frame)
    with pytest.raises(OmicsInputError, match="duplicate names.*TP53"):
        read_expression(path)


def test_duplicate_sample_names(tmp_path, small_frame):
    frame = small_frame.copy()
    frame.index = ["p1", "p1", "p3", "p4"]
    path = write_table(tmp_path / "x.csv", frame)
    with pytest.raises(OmicsInputError, match="duplicate sample names.*p1"):
        read_expression(path)


def test_samples_without_label(tmp_path, small_frame):
    path = write_table(tmp_path / "x.csv", small_frame)
    labels = pd.DataFrame({"sample": ["p1", "p2", "p3"], "kind": ["a", "b", "a"]})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(OmicsInputError, match=r"1 sample\(s\) have no label.*p4"):
        read_expression(path, labels=tmp_path / "labels.csv", label_column="kind")


def test_labels_for_unknown_samples(tmp_path, small_frame):
    path = write_table(tmp_path / "x.csv", small_frame)
    labels = pd.DataFrame({"sample": ["p1", "p2", "p3", "p4", "ghost"], "kind": list("ababa")})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(OmicsInputError, match="not in the expression data.*ghost"):
        read_expression(path, labels=tmp_path / "labels.csv", label_column="kind",
                        orientation="samples-in-rows")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(OmicsInputError, match="empty"):
        read_expression(path)


def test_header_only_file(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("gene,s1,s2\n")
    with pytest.raises(OmicsInputError, match="no expression values"):
        read_expression(path)


def test_single_class(tmp_path, small_frame):
    path = write_table(tmp_path / "x.csv", small_frame)
    labels = pd.DataFrame({"sample": ["p1", "p2", "p3", "p4"], "kind": ["a"] * 4})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(OmicsInputError, match="single class"):
        read_expression(path, labels=tmp_path / "labels.csv", label_column="kind")


def test_unknown_label_column_lists_choices(tmp_path, toy_adata):
    toy_adata.write_h5ad(tmp_path / "toy.h5ad")
    with pytest.raises(OmicsInputError, match="no label column 'cell_type'.*'label'"):
        read_expression(tmp_path / "toy.h5ad", label_column="cell_type")


def test_unsupported_extension_and_missing_file(tmp_path):
    (tmp_path / "x.xlsx").write_text("nope")
    with pytest.raises(OmicsInputError, match="unsupported file type"):
        read_expression(tmp_path / "x.xlsx")
    with pytest.raises(OmicsInputError, match="no such file"):
        read_expression(tmp_path / "missing.csv")


def test_reading_never_modifies_the_input_file(tmp_path, small_frame):
    path = write_table(tmp_path / "x.csv", small_frame)
    before = path.read_bytes()
    read_expression(path)
    assert path.read_bytes() == before
    assert isinstance(read_expression(path), ad.AnnData)
