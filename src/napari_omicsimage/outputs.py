"""Writing results without ever losing what the user had.

Every command and widget that writes goes through this module, so one set of
rules holds everywhere:

- ``--out`` is checked *before* any work (:func:`check_output`): it may not be
  an input of the same command (data, labels, model), contain one, be the
  working folder (``.``) or one of its parents, or lie where nothing can be
  written.
- Results are built under a temporary name and moved into place at the end, so
  an interrupted run leaves nothing half-written.
- Each folder this tool writes into gets a manifest, ``.omicsimage-outputs.json``,
  listing the files it wrote there.  ``overwrite=True`` (``--overwrite``)
  replaces *only* files listed there (or napari-omicsimage checkpoints, which
  say so themselves); everything else in the folder is left untouched, and a
  non-empty folder without a manifest is refused.  Nothing is ever deleted
  wholesale.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from .errors import OmicsInputError
from .payload import is_checkpoint_file

MANIFEST = ".omicsimage-outputs.json"
_TMP_PREFIX = ".omicsimage-tmp-"


# ================================================================== manifest
def read_manifest(folder: Path) -> set[str]:
    """Relative paths (POSIX) of the files napari-omicsimage wrote in ``folder``."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text())
        return {str(f) for f in data.get("files", [])}
    except (OSError, ValueError, AttributeError):
        return set()  # an unreadable manifest vouches for nothing


def _write_manifest(folder: Path, files: Iterable[str]) -> None:
    from importlib import metadata

    try:
        version = metadata.version("napari-omicsimage")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        version = "unknown"
    body = {"tool": "napari-omicsimage", "version": version,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "note": "files napari-omicsimage wrote in this folder; --overwrite replaces only these",
            "files": sorted(set(files))}
    handle, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}manifest.", dir=folder)
    with os.fdopen(handle, "w") as stream:
        json.dump(body, stream, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, Path(folder) / MANIFEST)


def _is_own_checkpoint(path: Path) -> bool:
    """A napari-omicsimage checkpoint vouches for itself (it may have been moved here)."""
    return is_checkpoint_file(path)


# ===================================================================== checks
def _resolved(path) -> Path:
    return Path(path).expanduser().resolve()


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, out) -> None:
    """Create and remove a file in ``folder``: the only honest test (``os.access`` lies for root and ACLs)."""
    try:
        handle, probe = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}probe.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OmicsInputError(f"cannot write in {folder} ({exc.strerror or exc}); choose an --out where you "
                              f"can write (was {out}).") from None


def check_output(out, *, kind: str, inputs: Iterable = (), overwrite: bool = False) -> Path:
    """Refuse an ``--out`` that would lose or damage anything, before any work is done.

    ``kind`` is ``"dir"`` (a results folder) or ``"file"``.  ``inputs`` are the
    paths the command reads (``None`` entries and bundled sample-data names are
    ignored).  Returns ``out`` as a :class:`~pathlib.Path`.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', not {kind!r}")
    out = Path(out)
    target = _resolved(out)
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OmicsInputError(f"--out {out} is the working folder or one of its parents; name a new folder "
                              f"for the results, e.g. --out {Path(out) / 'results'}.")
    if target == Path.home().resolve() or target == Path(target.anchor):
        raise OmicsInputError(f"--out {out} is your home folder or the file-system root; name a new folder.")
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = _resolved(given)
        if source == target:
            raise OmicsInputError(f"--out {out} is also an input of this command ({given}); write the results "
                                  "somewhere else.")
        if kind == "dir" and target in source.parents:
            raise OmicsInputError(f"--out {out} contains an input of this command ({given}); write the results "
                                  "to a new folder.")
    if target.exists():
        if kind == "dir":
            if not target.is_dir():
                raise OmicsInputError(f"--out {out} is a file, not a folder; name a folder for the results.")
            contents = [p for p in target.iterdir() if not p.name.startswith(_TMP_PREFIX)]
            if contents and not overwrite:
                raise OmicsInputError(f"{out} already exists; choose another --out or pass --overwrite.")
            if contents and not (target / MANIFEST).is_file():
                raise OmicsInputError(f"{out} holds files that napari-omicsimage did not write (it has no "
                                      f"{MANIFEST}); refusing to touch them even with --overwrite. Choose a new "
                                      "or empty folder.")
            _probe_writable(target, out)
        else:
            if target.is_dir():
                raise OmicsInputError(f"--out {out} is a folder; --out names a file here, e.g. "
                                      f"{Path(out) / 'result'}.")
            if not overwrite:
                raise OmicsInputError(f"{out} already exists; choose another --out or pass --overwrite.")
            if target.name not in read_manifest(target.parent) and not _is_own_checkpoint(target):
                raise OmicsInputError(f"{out} was not written by napari-omicsimage; refusing to replace it even "
                                      "with --overwrite. Choose another --out.")
            _probe_writable(target.parent, out)
    else:
        parent = _nearest_existing(target.parent)
        if not parent.is_dir():
            raise OmicsInputError(f"--out {out}: {parent} is a file, so no folder can be made there.")
        _probe_writable(parent, out)
    return out


# ==================================================================== writers
def write_output_file(out, fill: Callable[[Path], None], *, overwrite: bool = False,
                      inputs: Iterable = ()) -> Path:
    """Write one file: ``fill(tmp_path)`` writes it beside ``out``; then it is renamed over ``out``.

    The folder's manifest records the file, so a later ``overwrite=True`` may
    replace it.
    """
    out = check_output(out, kind="file", inputs=inputs, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{out.name}.", dir=out.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        fill(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are ordinary files
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_manifest(out.parent, read_manifest(out.parent) | {out.name})
    return out


def _files_below(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def write_output_dir(out, fill: Callable[[Path], None], *, overwrite: bool = False,
                     inputs: Iterable = ()) -> Path:
    """Write a results folder: ``fill(tmp_dir)`` writes the files into a temporary folder.

    A new ``out`` is created by renaming the finished temporary folder.  Into an
    existing one (empty, or written before by this tool with ``overwrite=True``)
    the files are moved one by one; files the earlier run wrote that this run
    does not write again are removed; files the user put there are never
    touched, and a run that would replace one is refused before anything moves.
    """
    out = check_output(out, kind="dir", inputs=inputs, overwrite=overwrite)
    existed = out.exists()
    if existed:
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        fill(tmp)
        # a file written with write_output_file inside ``tmp`` (a checkpoint, say) left a manifest there
        (tmp / MANIFEST).unlink(missing_ok=True)
        new_files = _files_below(tmp)
        if not existed:
            _write_manifest(tmp, new_files)
            os.replace(tmp, out)
            return out
        previous = read_manifest(out)
        clashes = [f for f in new_files if (out / f).exists() and f not in previous]
        if clashes:
            raise OmicsInputError(f"{out} holds {clashes[0]}, which napari-omicsimage did not write; refusing "
                                  "to replace it. Move it away or choose another --out.")
        for name in new_files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, out / name)
        for name in sorted(previous - set(new_files)):
            stale = out / name
            if stale.is_file():
                stale.unlink()
        _write_manifest(out, new_files)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder, nothing else
    return out


class NpyRows:
    """A float32 ``.npy`` file of known shape, written block of rows by block of rows (nothing kept in memory).

    For per-sample arrays of streamed commands (``explain``, ``render`` at atlas scale), written inside a
    :func:`write_output_dir` fill; :meth:`close` checks that every row came.
    """

    def __init__(self, path, shape):
        import numpy as np

        self.path, self.shape, self.rows = Path(path), tuple(int(s) for s in shape), 0
        self.stream = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_2_0(self.stream, header)

    def append(self, block) -> None:
        import numpy as np

        block = np.ascontiguousarray(block, dtype="<f4")
        if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.path.name}: rows of shape {block.shape} do not fit {self.shape}")
        block.tofile(self.stream)
        self.rows += len(block)

    def close(self) -> None:
        self.stream.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.rows} of {self.shape[0]} rows written")
