"""`omicsimage render`: the CLI contract other issues build on."""

import numpy as np
import pandas as pd
import pytest

from napari_omicsimage.cli import main
from napari_omicsimage.layouts import load_layout


def test_render_writes_the_contracted_outputs(tmp_path, medulloblastoma_paths, capsys):
    expression, labels = medulloblastoma_paths
    out = tmp_path / "out"
    rc = main(["render", str(expression), "--labels", str(labels), "--label-column", "subgroup",
               "--method", "fotomics", "--size", "20", "--n-top-genes", "300", "--out", str(out)])
    assert rc == 0
    images = np.load(out / "images.npy")
    assert images.shape == (50, 1, 20, 20) and images.dtype == np.float32
    samples = pd.read_csv(out / "samples.csv", dtype=str)
    assert list(samples.columns) == ["sample", "label"] and len(samples) == 50
    assert samples.iloc[0].tolist() == ["GSM2261538", "SHH"]
    pixels = pd.read_csv(out / "pixel_genes.csv")
    assert {"channel", "row", "col", "genes"} <= set(pixels.columns)
    assert pixels["n_genes"].sum() == 300
    layout = load_layout(out / "layout.npz")
    assert layout.pixel_map_.n_genes == 300
    printed = capsys.readouterr()
    assert "genes detected in rows" in printed.err


def test_render_refuses_to_overwrite_then_overwrites_on_request(tmp_path, toy_adata):
    toy_adata.write_h5ad(tmp_path / "toy.h5ad")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["render", str(tmp_path / "toy.h5ad"), "--label-column", "label", "--method", "grid",
            "--out", str(out)]
    assert main(args) == 2
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(args + ["--overwrite"]) == 2  # a folder this tool did not write is never touched
    assert (out / "precious.txt").read_text() == "keep me" and not (out / "images.npy").exists()
    (out / "precious.txt").unlink()
    assert main(args) == 0  # an empty folder is fine
    (out / "precious.txt").write_text("keep me")
    assert main(args + ["--overwrite"]) == 0  # replaces only what the first run wrote
    assert (out / "images.npy").exists() and (out / "precious.txt").read_text() == "keep me"


def test_render_bundled_sample_with_grid_in_chromosome_order(tmp_path, capsys):
    out = tmp_path / "pbmc"
    assert main(["render", "pbmc68k_reduced", "--method", "grid", "--order", "chromosome",
                 "--n-top-genes", "0", "--out", str(out)]) == 0
    assert np.load(out / "images.npy").shape == (700, 1, 28, 28)
    assert "not in the annotation" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "grid", "--extractor", "pca"], "--extractor applies to --method deepinsight only"),
        (["--label-column", "nope"], "no label column 'nope'"),
        (["--n-top-genes", "-5"], "--n-top-genes must be"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(tmp_path, toy_adata, capsys, extra, message):
    toy_adata.write_h5ad(tmp_path / "toy.h5ad")
    rc = main(["render", str(tmp_path / "toy.h5ad"), "--out", str(tmp_path / "o")] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert message in err[-1] and err[-1].startswith("omicsimage render: error:")
    assert not (tmp_path / "o").exists()


def test_missing_input_file(tmp_path, capsys):
    assert main(["render", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
