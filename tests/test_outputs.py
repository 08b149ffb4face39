"""Nothing the user had is lost: --out checks and --overwrite rules of every command (outputs.py)."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_planted

from napari_omicsimage.cli import main
from napari_omicsimage.errors import OmicsInputError
from napari_omicsimage.outputs import MANIFEST, check_output, write_output_dir, write_output_file

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FAST = ["--method", "grid", "--model", "small", "--epochs", "1", "--batch-size", "16", "--n-top-genes", "0",
        "--device", "cpu"]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def data(tmp_path):
    """A user's folder: an expression table, labels and an unrelated file."""
    folder = tmp_path / "data"
    folder.mkdir()
    adata, _ = make_planted(n_samples=32, n_genes=20, shift=4.0)
    frame = pd.DataFrame(adata.X, index=adata.obs_names, columns=adata.var_names)
    frame.index.name = "sample"
    frame.to_csv(folder / "x.csv")
    pd.DataFrame({"sample": adata.obs_names, "label": adata.obs["label"].astype(str)}).to_csv(
        folder / "labels.csv", index=False)
    (folder / "notes.txt").write_text("three weeks of lab notes")
    return folder


def _inputs(data):
    return [str(data / "x.csv"), "--samples-in-rows", "--labels", str(data / "labels.csv"), "--label-column", "label"]


@pytest.fixture
def model(data, tmp_path):
    path = tmp_path / "models" / "model.pt"
    assert main(["train", *_inputs(data), *FAST, "--out", str(path)]) == 0
    return path


def _refused(capsys, args, match):
    import re

    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ------------------------------------------------------- --out is an input
@pytest.mark.parametrize("command", ["render", "evaluate"])
def test_out_holding_the_inputs_is_refused_and_nothing_is_touched(data, capsys, command):
    before = _snapshot(data)
    extra = FAST if command == "evaluate" else ["--method", "grid"]
    _refused(capsys, [command, *_inputs(data), *extra, "--out", str(data), "--overwrite"], "contains an input")
    assert _snapshot(data) == before


def test_explain_out_holding_its_checkpoint_is_refused(data, model, capsys):
    before = _snapshot(model.parent)
    _refused(capsys, ["explain", str(model), *_inputs(data), "--out", str(model.parent), "--overwrite"],
             "contains an input")
    assert _snapshot(model.parent) == before


@pytest.mark.parametrize("target", ["x.csv", "labels.csv"])
def test_predict_and_train_never_replace_their_inputs(data, model, capsys, target):
    before = _snapshot(data)
    _refused(capsys, ["predict", str(model), str(data / "x.csv"), "--samples-in-rows",
                      "--out", str(data / target), "--overwrite"], "is also an input|not written by")
    _refused(capsys, ["train", *_inputs(data), *FAST, "--out", str(data / target), "--overwrite"],
             "is also an input")
    assert _snapshot(data) == before


def test_predict_never_replaces_the_model(data, model, capsys):
    original = model.read_bytes()
    _refused(capsys, ["predict", str(model), str(data / "x.csv"), "--samples-in-rows", "--out", str(model),
                      "--overwrite"], "is also an input")
    assert model.read_bytes() == original


def test_working_folder_and_its_parents_are_refused(data, tmp_path, monkeypatch, capsys):
    work = data / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        _refused(capsys, ["render", str(data / "x.csv"), "--samples-in-rows", "--method", "grid",
                          "--out", out, "--overwrite"], "working folder")
    assert (work / "keep.txt").read_text() == "mine" and (data / "x.csv").exists()


def test_demo_overwrite_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "thesis.docx").write_text("chapter 3")
    # refused before the demo trains anything: the check comes first
    _refused(capsys, ["demo", "--headless", "--out", str(folder), "--overwrite"], "did not write")
    assert (folder / "thesis.docx").read_text() == "chapter 3"


def test_out_that_is_a_file_is_refused_for_folder_commands(data, capsys):
    _refused(capsys, ["render", str(data / "x.csv"), "--samples-in-rows", "--method", "grid",
                      "--out", str(data / "notes.txt"), "--overwrite"], "is a file, not a folder")
    assert (data / "notes.txt").read_text() == "three weeks of lab notes"


# ------------------------------------------------ overwrite: only our files
def test_overwrite_replaces_only_what_an_earlier_run_wrote(data, tmp_path, capsys):
    out = tmp_path / "render"
    args = ["render", *_inputs(data), "--method", "grid", "--out", str(out)]
    assert main(args) == 0
    written = json.loads((out / MANIFEST).read_text())["files"]
    assert {"images.npy", "samples.csv", "layout.json", "pixel_genes.csv"} <= set(written)
    (out / "my_figure.png").write_bytes(b"\x89PNG by hand")
    capsys.readouterr()
    _refused(capsys, args, "already exists")
    assert main(args + ["--overwrite"]) == 0
    assert (out / "my_figure.png").read_bytes() == b"\x89PNG by hand"
    assert json.loads((out / MANIFEST).read_text())["files"] == written


def test_overwrite_refuses_to_replace_a_user_file_of_the_same_name(tmp_path):
    out = tmp_path / "out"
    write_output_dir(out, lambda tmp: (tmp / "a.csv").write_text("1"))
    (out / "b.csv").write_text("the user's own b.csv")
    with pytest.raises(OmicsInputError, match="b.csv, which napari-omicsimage did not write"):
        write_output_dir(out, lambda tmp: [(tmp / n).write_text("2") for n in ("a.csv", "b.csv")], overwrite=True)
    assert (out / "a.csv").read_text() == "1" and (out / "b.csv").read_text() == "the user's own b.csv"
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "a.csv", "b.csv"]  # no temporary folder left


def test_an_interrupted_run_leaves_the_earlier_result(tmp_path):
    out = tmp_path / "out"
    write_output_dir(out, lambda tmp: (tmp / "a.csv").write_text("1"))

    def crash(tmp):
        (tmp / "a.csv").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_output_dir(out, crash, overwrite=True)
    assert (out / "a.csv").read_text() == "1" and sorted(p.name for p in out.iterdir()) == [MANIFEST, "a.csv"]
    with pytest.raises(KeyboardInterrupt):
        write_output_dir(tmp_path / "new", crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_folder_is_used_and_files_need_the_manifest(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_output_dir(empty, lambda tmp: (tmp / "a.csv").write_text("1"))
    assert (empty / "a.csv").exists()
    table = tmp_path / "table.csv"
    table.write_text("someone else's")
    with pytest.raises(OmicsInputError, match="not written by napari-omicsimage"):
        write_output_file(table, lambda tmp: tmp.write_text("ours"), overwrite=True)
    assert table.read_text() == "someone else's"
    ours = tmp_path / "ours.csv"
    write_output_file(ours, lambda tmp: tmp.write_text("1"))
    write_output_file(ours, lambda tmp: tmp.write_text("2"), overwrite=True)
    assert ours.read_text() == "2"


# ------------------------------------------------- writable before the work
def test_unwritable_out_is_refused_before_any_training(data, tmp_path, monkeypatch, capsys):
    import napari_omicsimage.training as training

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(training, "train", no_training)
    monkeypatch.setattr("napari_omicsimage.outputs._probe_writable",
                        _failing_probe)  # root can write anywhere; see the unprivileged test below
    _refused(capsys, ["train", *_inputs(data), *FAST, "--out", str(tmp_path / "ro" / "m.pt")], "cannot write in")


def _failing_probe(folder, out):
    raise OmicsInputError(f"cannot write in {folder} (Permission denied); choose an --out where you can write.")


def test_a_folder_nobody_can_write_is_refused_before_any_work(data, capsys):
    """A real refusal by the operating system: /sys cannot be written even by root (CI runs as root,
    for whom ordinary permission bits do not apply)."""
    probe_target = Path("/sys/omicsimage-results")
    try:
        import tempfile

        os.close(tempfile.mkstemp(dir="/sys")[0])
        pytest.fail("/sys is writable here; this test needs a place nobody can write")
    except OSError:
        pass
    before = _snapshot(data)
    _refused(capsys, ["render", str(data / "x.csv"), "--samples-in-rows", "--method", "grid",
                      "--out", str(probe_target)], "cannot write in /sys")
    assert _snapshot(data) == before and not probe_target.exists()


def test_check_output_names_every_refusal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.csv").write_text("a")
    with pytest.raises(OmicsInputError, match="is also an input"):
        check_output("in.csv", kind="file", inputs=["in.csv"], overwrite=True)
    with pytest.raises(OmicsInputError, match="working folder"):
        check_output(".", kind="dir")
    (tmp_path / "folder").mkdir()
    with pytest.raises(OmicsInputError, match="is a folder"):
        check_output("folder", kind="file", overwrite=True)
    with pytest.raises(OmicsInputError, match="already exists"):
        check_output("in.csv", kind="file")
    assert check_output("new/deeper/out", kind="dir") == Path("new/deeper/out")
    assert not (tmp_path / "new").exists()  # checking creates nothing


# ------------------------------------------------- the manifest and claims (issue 17)
@pytest.mark.parametrize("entry", ["ABSOLUTE", "../victim.txt", "sub/../../victim.txt"])
def test_a_manifest_entry_outside_out_is_refused_and_nothing_is_deleted(tmp_path, entry):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's thesis")
    out = tmp_path / "out"
    write_output_dir(out, lambda tmp: (tmp / "a.csv").write_text("1"))
    manifest = json.loads((out / MANIFEST).read_text())
    shown = str(victim) if entry == "ABSOLUTE" else entry
    manifest["files"].append(shown)
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OmicsInputError, match=f"lists '{shown}', which is not a file inside"):
        write_output_dir(out, lambda tmp: (tmp / "a.csv").write_text("2"), overwrite=True)
    assert victim.read_text() == "the user's thesis" and (out / "a.csv").read_text() == "1"


def test_a_manifest_entry_outside_out_in_the_cli(data, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's thesis")
    out = tmp_path / "render"
    args = ["render", *_inputs(data), "--method", "grid", "--out", str(out)]
    assert main(args) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].append(str(victim))
    (out / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    _refused(capsys, args + ["--overwrite"], "victim.txt', which is not a file inside")
    assert victim.read_text() == "the user's thesis"


def test_an_unreadable_manifest_is_called_unreadable(tmp_path):
    out = tmp_path / "out"
    write_output_dir(out, lambda tmp: (tmp / "images.npy").write_text("1"))
    (out / MANIFEST).write_text('{"files": ["images.npy"')  # cut short
    with pytest.raises(OmicsInputError, match=f"{MANIFEST} is unreadable"):
        write_output_dir(out, lambda tmp: (tmp / "images.npy").write_text("2"), overwrite=True)
    with pytest.raises(OmicsInputError, match="is unreadable"):
        write_output_file(out / "b.csv", lambda tmp: tmp.write_text("b"))
    assert (out / "images.npy").read_text() == "1" and not (out / "b.csv").exists()


def test_a_second_run_on_one_out_fails_at_once(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "new" / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from napari_omicsimage.outputs import check_output; "
         f"check_output({str(out)!r}, kind='dir'); print('claimed', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "claimed"
        filled = []
        with pytest.raises(OmicsInputError, match=rf"another run \(process {holder.pid}\) is writing to"):
            write_output_dir(out, filled.append)
        assert filled == [] and not out.exists()  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    write_output_dir(out, lambda tmp: (tmp / "a.csv").write_text("1"))  # the dead run's claim is taken over
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # no claim left behind
