"""The napari manifest is valid, points at importable code, and ships in the wheel that napari discovers."""

import importlib
import os
import subprocess
import sys
import venv
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from npe2 import PluginManifest

ROOT = Path(__file__).resolve().parents[1]


def manifest() -> PluginManifest:
    return PluginManifest.from_file(resources.files("napari_omicsimage") / "napari.yaml")


def test_manifest_validates_and_every_command_imports():
    mf = manifest()
    assert mf.name == "napari-omicsimage"
    PluginManifest.model_validate(mf.model_dump())  # the checks `npe2 validate` runs
    for command in mf.contributions.commands:
        module, _, attribute = command.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), command.python_name


def test_manifest_contributes_reader_writers_sample_and_widgets():
    contributions = manifest().contributions
    patterns = {p for reader in contributions.readers for p in reader.filename_patterns}
    assert {"*.h5ad", "*.csv", "*.tsv", "*.json"} <= patterns
    written = {(tuple(w.layer_types), tuple(w.filename_extensions)) for w in contributions.writers}
    assert (("shapes",), (".json",)) in written and (("shapes",), (".csv",)) in written
    assert (("labels",), (".json",)) in written and (("image",), (".csv",)) in written
    assert [s.key for s in contributions.sample_data] == ["pbmc68k_reduced"]
    titles = {w.display_name for w in contributions.widgets}
    assert {"1 Data", "2 Imagify", "3 Train / evaluate", "4 Load model", "5 Saliency", "Gene inspector",
            "Annotate regions", "Histology to expression"} == titles


def test_entry_point_names_the_manifest():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="napari.manifest") if e.name == "napari-omicsimage"]
    assert entry.value == "napari_omicsimage:napari.yaml"


@pytest.mark.slow
def test_built_wheel_carries_the_manifest_and_napari_discovers_it(tmp_path):
    """``python -m build`` → wheel + sdist; installed into a fresh venv, npe2 finds the plugin there."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert "napari_omicsimage/napari.yaml" in names
    entry_points_txt = next(n for n in names if n.endswith("entry_points.txt"))
    assert "napari_omicsimage:napari.yaml" in zipfile.ZipFile(wheel).read(entry_points_txt).decode()
    import tarfile

    with tarfile.open(sdist) as archive:
        assert any(n.endswith("src/napari_omicsimage/napari.yaml") for n in archive.getnames())

    # A fresh environment that sees the installed dependencies but none of this checkout.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True)
    probe = (
        "import napari_omicsimage, npe2, sys\n"
        "pm = npe2.PluginManager.instance(); pm.discover()\n"
        "mf = pm.get_manifest('napari-omicsimage')\n"
        "print(napari_omicsimage.__file__)\n"
        "print(len(mf.contributions.widgets), mf.contributions.sample_data[0].key)\n"
    )
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=clean_env).stdout.split("\n")
    assert str(env_dir) in out[0], f"imported from {out[0]}, not the fresh environment"
    assert out[1] == "8 pbmc68k_reduced"
