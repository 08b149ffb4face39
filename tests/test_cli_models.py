"""The model commands: evaluate, train, predict, explain (_cli_models.py)."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_planted

from napari_omicsimage.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FAST = ["--method", "grid", "--model", "small", "--epochs", "2", "--batch-size", "16", "--lr", "3e-3",
        "--n-top-genes", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """Planted-signal data as a samples-in-rows CSV and a labels table."""
    folder = tmp_path_factory.mktemp("cli_data")
    adata, planted = make_planted(n_samples=48, n_genes=40, shift=4.0)
    frame = pd.DataFrame(adata.X, index=adata.obs_names, columns=adata.var_names)
    frame.index.name = "sample"
    frame.to_csv(folder / "expression.csv")
    labels = pd.DataFrame({"sample": adata.obs_names, "label": adata.obs["label"].astype(str)})
    labels.to_csv(folder / "labels.csv", index=False)
    return folder / "expression.csv", folder / "labels.csv", planted


def _input(data_files):
    expression, labels, _ = data_files
    return [str(expression), "--samples-in-rows", "--labels", str(labels), "--label-column", "label"]


def test_evaluate_writes_the_report_and_prints_the_table(data_files, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", *_input(data_files), *FAST, "--folds", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fold 3" in printed and "mean ± sd" in printed and "baseline (LR)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["folds"]) == 3
    for key in ("mean", "sd", "baseline"):
        assert {"accuracy", "balanced_accuracy", "f1_macro", "roc_auc_ovo_macro"} <= set(metrics[key])
    assert metrics["protocol"]["folds"] == 3 and metrics["protocol"]["lr"] == 3e-3
    for name in ("loss_curves.png", "confusion_matrix.png", "roc_curves.png", "metrics.csv"):
        assert (out / name).stat().st_size > 0

    # an existing report is kept unless --overwrite
    before = (out / "metrics.json").read_text()
    assert main(["evaluate", *_input(data_files), *FAST, "--folds", "3", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before
    assert main(["evaluate", *_input(data_files), *FAST, "--folds", "2", "--out", str(out), "--overwrite"]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["folds"]) == 2


@pytest.mark.parametrize(("protocol", "expected"), [(None, (20, 16, 1e-3)), ("paper", (5, 32, 1e-4))])
def test_protocol_sets_epochs_batch_and_lr(data_files, tmp_path, protocol, expected):
    out = tmp_path / "report"
    args = ["evaluate", *_input(data_files), "--method", "grid", "--n-top-genes", "0", "--device", "cpu",
            "--folds", "2", "--out", str(out)]
    if protocol:
        args += ["--protocol", protocol]
    assert main(args) == 0
    recorded = json.loads((out / "metrics.json").read_text())["protocol"]
    assert (recorded["epochs"], recorded["batch_size"], recorded["lr"]) == expected
    # explicit options override the protocol's
    assert main([*args, "--epochs", "1", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["protocol"]["epochs"] == 1


def test_evaluate_too_many_folds_suggests_fewer(data_files, tmp_path, capsys):
    code = main(["evaluate", *_input(data_files), *FAST, "--folds", "20", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "--folds 16" in capsys.readouterr().err  # 48 samples in 3 classes: 16 each
    assert not (tmp_path / "r").exists()


def test_evaluate_compares_two_models_with_wilcoxon(data_files, tmp_path, capsys):
    out = tmp_path / "compare"
    args = ["evaluate", *_input(data_files), *FAST, "--epochs", "1", "--folds", "3", "--compare-model",
            "resnet18", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["comparison"]["model_a"] == "small" and metrics["comparison"]["model_b"] == "resnet18"
    assert len(metrics["compare_model"]["folds"]) == 3
    assert "Wilcoxon small vs resnet18" in capsys.readouterr().out


def test_train_predict_explain(data_files, tmp_path, capsys):
    expression, labels, planted = data_files
    model = tmp_path / "model.pt"
    assert main(["train", *_input(data_files), *FAST, "--epochs", "6", "--out", str(model)]) == 0
    assert model.exists()
    assert main(["train", *_input(data_files), *FAST, "--out", str(model)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err

    predictions = tmp_path / "predictions.csv"
    assert main(["predict", str(model), str(expression), "--samples-in-rows", "--labels", str(labels),
                 "--label-column", "label", "--out", str(predictions)]) == 0
    frame = pd.read_csv(predictions)
    assert list(frame.columns[:3]) == ["sample", "true", "predicted"] and len(frame) == 48
    assert "accuracy on the 48 labelled samples" in capsys.readouterr().out
    assert main(["predict", str(model), str(expression), "--samples-in-rows", "--out", str(predictions)]) == 2

    out = tmp_path / "explained"
    assert main(["explain", str(model), str(expression), "--samples-in-rows", "--labels", str(labels),
                 "--label-column", "label", "--top-genes", "5", "--out", str(out)]) == 0
    summary = json.loads((out / "explain.json").read_text())
    assert summary["method"] == "integrated-gradients" and summary["pixel_method"] == "gradient"
    assert summary["attribution"]["baseline"] == "mean"
    assert summary["attribution"]["completeness_max_relative_error"] <= 0.01
    # labels given: each class is summarised over its correctly predicted samples; this model gets most right
    frame = pd.read_csv(predictions)
    correct = frame[frame["true"] == frame["predicted"]]["true"].value_counts().to_dict()
    assert len(correct) == len(planted) and min(correct.values()) >= 8, correct
    assert {c["class"]: c["n_samples"] for c in summary["classes"]} == correct
    assert summary["classes_without_samples"] == []
    for entry in summary["classes"]:
        table = pd.read_csv(out / entry["gene_table"])
        assert list(table.columns) == ["rank", "gene", "attribution", "contrastive", "pixel_saliency", "channel",
                                       "row", "col", "pixel_genes", "expression"]
        assert len(table) == 40 and table["attribution"].abs().is_monotonic_decreasing
        assert table["rank"].tolist() == list(range(1, 41)) and (table["pixel_saliency"] >= 0).all()
        assert (table["attribution"] < 0).any() or (table["attribution"] > 0).all()  # signed, not magnitudes
    attribution = np.load(out / "gene_attribution.npy")
    assert attribution.shape == (48, 40) and np.load(out / "gene_contrastive.npy").shape == (48, 40)
    assert np.load(out / "baseline.npy").shape == (40,)
    saliency = np.load(out / "saliency.npy")
    assert saliency.shape[0] == 48 and saliency.ndim == 4 and (saliency >= 0).all()
    assert np.load(out / "saliency_max.npy").shape == (48, *saliency.shape[2:])
    assert np.load(out / "class_saliency.npy").shape[0] == len(summary["classes"])
    top = pd.read_csv(out / "sample_top_genes.csv")
    assert len(top) == 48 * 5 and {"sample", "predicted", "gene", "attribution", "pixel_saliency"} <= set(top.columns)

    paper = tmp_path / "paper"
    assert main(["explain", str(model), str(expression), "--samples-in-rows", "--method", "gradient",
                 "--pixel-method", "smoothgrad", "--baseline", "zeros", "--out", str(paper)]) == 0
    summary = json.loads((paper / "explain.json").read_text())
    assert summary["method"] == "gradient" and summary["pixel_method"] == "smoothgrad"
    assert "baseline" not in summary["attribution"] and not (paper / "baseline.npy").exists()


def test_model_commands_give_clear_errors(data_files, tmp_path, capsys):
    expression, _, _ = data_files
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    assert main(["predict", str(broken), str(expression), "--samples-in-rows", "--out", str(tmp_path / "p.csv")]) == 2
    assert "damaged, truncated" in capsys.readouterr().err
    assert main(["train", *_input(data_files), *FAST, "--weights", "imagenet", "--out", str(tmp_path / "m.pt")]) == 2
    assert "no pretrained weights" in capsys.readouterr().err
    assert main(["evaluate", *_input(data_files), *FAST, "--compare-model", "small", "--out",
                 str(tmp_path / "r")]) == 2
    assert "must differ" in capsys.readouterr().err
