"""``omicsimage histology evaluate|fit|predict``: end to end, and one-line errors with nothing written."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import shared_path
from histology_fixtures import make_st_section

from napari_omicsimage.cli import main
from napari_omicsimage.histology import EXPRESSION_SCALE

FAST = ["--features", "handcrafted+fourier", "--device", "cpu"]


@pytest.fixture
def st_folders(tmp_path):
    return [make_st_section(tmp_path / f"S{i}", seed=i) for i in range(3)]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_evaluate_prints_the_per_gene_table_with_baselines(st_folders, capsys, tmp_path):
    out = tmp_path / "genes.csv"
    rc = main(["histology", "evaluate", *map(str, st_folders), *FAST, "--n-genes", "5",
               "--random-baseline", "resnet18", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "held out" in printed and "training mean" in printed and "random resnet18" in printed
    assert "RANDOM initialisation" in printed and "best-predicted genes" in printed
    assert "Pearson r per gene" in printed and "NUC" in printed.split("Pearson r per gene")[1]
    import pandas as pd

    table = pd.read_csv(out)
    assert set(table["held_out"]) == {"S0", "S1", "S2"} and {"gene", "pearson", "mse"} <= set(table.columns)


def test_fit_then_predict_writes_predictions_h5ad(st_folders, tmp_path, capsys):
    model = tmp_path / "model.pt"
    assert main(["histology", "fit", *map(str, st_folders[:2]), *FAST, "--genes", "NUC,EOS",
                 "--out", str(model)]) == 0
    out = tmp_path / "pred.h5ad"
    assert main(["histology", "predict", str(model), str(st_folders[2]), "--out", str(out)]) == 0
    predicted = ad.read_h5ad(out)
    assert predicted.var_names.tolist() == ["NUC", "EOS"] and predicted.n_obs == 64
    assert predicted.obs_names[0] == "1x1" and predicted.obsm["spatial"].shape == (64, 2)
    assert predicted.uns["omicsimage_histology"]["scale"] == EXPRESSION_SCALE
    r = np.corrcoef(predicted.X[:, 0], predicted.layers["measured"][:, 0])[0, 1]
    assert r > 0.3
    # a second run refuses to replace the predictions without --overwrite, and keeps them
    before = out.read_bytes()
    assert main(["histology", "predict", str(model), str(st_folders[2]), "--out", str(out)]) == 2
    assert "already exists" in _error_line(capsys) and out.read_bytes() == before


def test_predict_on_a_bare_slide_tiles_the_tissue(st_folders, tmp_path, capsys):
    model = tmp_path / "model.pt"
    assert main(["histology", "fit", *map(str, st_folders[:2]), *FAST, "--genes", "NUC,EOS",
                 "--out", str(model)]) == 0
    image = st_folders[2] / "he_image.jpg"
    out = tmp_path / "tiles.h5ad"
    assert main(["histology", "predict", str(model), str(image), "--out", str(out)]) == 2
    assert "missing scale" in _error_line(capsys) and not out.exists()
    assert main(["histology", "predict", str(model), str(image), "--um-per-px", "5", "--out", str(out)]) == 0
    predicted = ad.read_h5ad(out)
    assert predicted.obs_names[0].startswith("tile_") and "measured" not in predicted.layers
    assert predicted.uns["omicsimage_histology"]["kind"] == "tiles"


def test_predict_on_the_visium_crop_h5ad_with_image(st_folders, tmp_path):
    folder = shared_path("visium_mouse_brain_crop")
    model = tmp_path / "model.pt"
    assert main(["histology", "fit", *map(str, st_folders[:2]), *FAST, "--n-genes", "4", "--out", str(model)]) == 0
    out = tmp_path / "crop.h5ad"
    assert main(["histology", "predict", str(model), str(folder / "spots.h5ad"), "--image",
                 str(folder / "he_crop.jpg"), "--out", str(out)]) == 0
    assert ad.read_h5ad(out).n_obs == 49


def test_default_imagenet_features_offline_say_how_to_give_weights(st_folders, tmp_path, capsys, monkeypatch):
    import torchvision.models as tvm

    monkeypatch.setattr(tvm.WeightsEnum, "get_state_dict", lambda self, *a, **k: (_ for _ in ()).throw(
        OSError("no network")))
    out = tmp_path / "model.pt"
    assert main(["histology", "fit", *map(str, st_folders[:2]), "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert "--weights /path/to/file.pth" in line and "resnet50" in line and not out.exists()


def _shifted_h5ad(tmp_path):
    folder = shared_path("visium_mouse_brain_crop")
    adata = ad.read_h5ad(folder / "spots.h5ad")
    adata.obsm["spatial"] = adata.obsm["spatial"] + 5000
    adata.write_h5ad(tmp_path / "shifted.h5ad")
    return [str(tmp_path / "shifted.h5ad"), "--image", str(folder / "he_crop.jpg")]


def _unscaled_h5ad(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((100, 100, 3), 200, np.uint8)).save(tmp_path / "img.png")
    adata = ad.AnnData(X=np.ones((2, 3), np.float32))
    adata.obsm["spatial"] = np.array([[50.0, 50.0], [60.0, 60.0]])
    adata.write_h5ad(tmp_path / "noscale.h5ad")
    return [str(tmp_path / "noscale.h5ad"), "--image", str(tmp_path / "img.png")]


def _mismatched_ids(tmp_path):
    import gzip

    import pandas as pd

    folder = make_st_section(tmp_path / "bad_ids", seed=5)
    counts = pd.read_csv(folder / "counts_spots_by_genes.tsv.gz", sep="\t", index_col=0)
    counts.index = ["AAAC-1"] + list(counts.index[1:])
    with gzip.open(folder / "counts_spots_by_genes.tsv.gz", "wt") as stream:
        counts.to_csv(stream, sep="\t")
    return [str(folder)]


def _truncated_image(tmp_path):
    folder = make_st_section(tmp_path / "cut", seed=6)
    data = (folder / "he_image.jpg").read_bytes()
    (folder / "he_image.jpg").write_bytes(data[: len(data) // 3])
    return [str(folder)]


@pytest.mark.parametrize("make, message", [
    (_shifted_h5ad, "outside the"),
    (_unscaled_h5ad, "missing scale"),
    (_mismatched_ids, "have no position"),
    (_truncated_image, "truncated or damaged"),
])
def test_bad_sections_are_one_line_errors_and_nothing_is_written(st_folders, tmp_path, capsys, make, message):
    args = make(tmp_path)
    out = tmp_path / "model.pt"
    rc = main(["histology", "fit", str(st_folders[0]), *args, *FAST, "--out", str(out)])
    assert rc == 2
    line = _error_line(capsys)
    assert line.startswith("omicsimage histology: error:") and message in line
    assert not out.exists() and not list(tmp_path.glob(".omicsimage*"))


def test_output_that_is_an_input_is_refused_before_any_work(st_folders, capsys):
    target = st_folders[0] / "counts_spots_by_genes.tsv.gz"
    before = target.read_bytes()
    rc = main(["histology", "fit", *map(str, st_folders[:2]), *FAST, "--out", str(target), "--overwrite"])
    assert rc == 2 and target.read_bytes() == before
