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

import atexit
import hashlib
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
    """Relative paths (POSIX) of the files napari-omicsimage wrote in ``folder``.

    A manifest that cannot be read, or that lists anything but a file inside ``folder`` (an absolute path,
    ``..``, a link leading out), is refused: it could make ``--overwrite`` replace or delete the wrong files.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return set()
    try:
        files = json.loads(path.read_text()).get("files", [])
        if not isinstance(files, list):
            raise ValueError(f"'files' is {type(files).__name__}, not a list")
    except (OSError, ValueError, AttributeError) as exc:
        raise OmicsInputError(f"{path} is unreadable ({exc}); it should list the files napari-omicsimage wrote "
                              f"in {folder}. Move the files you want to keep elsewhere, or choose another "
                              "--out.") from None
    inside = folder.resolve()
    for entry in files:
        name = str(entry)
        bad = (not isinstance(entry, str) or not name or Path(name).is_absolute()
               or ".." in Path(name).parts or inside not in (folder / name).resolve().parents)
        if bad:
            raise OmicsInputError(f"{path} lists {entry!r}, which is not a file inside {folder}; napari-omicsimage "
                                  "never writes such an entry and will not replace or delete it. Remove that "
                                  "entry from the manifest, or choose another --out.")
    return set(files)


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


# ===================================================================== claims
_CLAIMS: set[Path] = set()  # claim files this process holds


def _claim_name(target: Path) -> str:
    return f"{_TMP_PREFIX}claim.{hashlib.sha1(str(target).encode()).hexdigest()[:16]}"


def _claims_of(target: Path) -> list[Path]:
    """Where a claim on ``target`` may lie: the nearest existing folder above it holds it, and a run that
    created folders since looks in every folder above."""
    return [folder / _claim_name(target) for folder in target.parents if folder.is_dir()]


def _holder(claim: Path) -> int | None:
    """The process id written in a claim file, or ``None`` when the file is gone or its process is dead."""
    try:
        pid = int(claim.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:  # alive, owned by someone else
        pass
    return pid


#: set (to its process id) by a run for the processes it starts itself (DDP workers), which then count
#: that run's claims as theirs; any other process, a second run included, is refused
CLAIMING_PROCESS = "OMICSIMAGE_CLAIMING_PID"


def _refuse_if_held(claim: Path, out) -> None:
    pid = _holder(claim)
    if pid is not None and pid != os.getpid() and str(pid) != os.environ.get(CLAIMING_PROCESS):
        raise OmicsInputError(f"another run (process {pid}) is writing to {out}; wait for it to finish, "
                              "or choose another --out.")


def claim_output(out) -> None:
    """Claim ``out`` for this process, atomically, so that a second run on the same ``--out`` fails at once.

    The claim is a file (``.omicsimage-tmp-claim.HASH``, created with ``O_EXCL``) in the nearest existing
    folder above ``out``, holding the process id; it is given back when the result is in place (or the process
    ends). A claim whose process has ended is taken over. Nothing else is created.
    """
    target = _resolved(out)
    places = _claims_of(target)
    if any(claim in _CLAIMS or str(_holder(claim)) == os.environ.get(CLAIMING_PROCESS) for claim in places):
        return  # held by this process, or by the run that started it
    for claim in places:
        _refuse_if_held(claim, out)
    claim = places[0]
    for _ in range(3):
        try:
            handle = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _refuse_if_held(claim, out)
            claim.unlink(missing_ok=True)  # left by a run that ended without giving it back
            continue
        with os.fdopen(handle, "w") as stream:
            stream.write(str(os.getpid()))
        if not _CLAIMS:
            atexit.register(release_claims)
        _CLAIMS.add(claim)
        return
    raise OmicsInputError(f"could not claim {out} (runs keep starting on it); choose another --out.")


def release_output(out) -> None:
    """Give back the claim :func:`claim_output` made (nothing when this process holds none)."""
    for claim in _claims_of(_resolved(out)):
        if claim in _CLAIMS:
            _CLAIMS.discard(claim)
            claim.unlink(missing_ok=True)


def release_claims() -> None:
    for claim in list(_CLAIMS):
        _CLAIMS.discard(claim)
        claim.unlink(missing_ok=True)


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
            read_manifest(target)  # an unreadable or unsafe manifest is refused before any work
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
    if kind == "file" and target.parent.is_dir():
        read_manifest(target.parent)  # it gets this file added at the end
    claim_output(out)
    return out


# ==================================================================== writers
def write_output_file(out, fill: Callable[[Path], None], *, overwrite: bool = False,
                      inputs: Iterable = ()) -> Path:
    """Write one file: ``fill(tmp_path)`` writes it beside ``out``; then it is renamed over ``out``.

    The folder's manifest records the file, so a later ``overwrite=True`` may
    replace it.
    """
    out = check_output(out, kind="file", inputs=inputs, overwrite=overwrite)
    try:
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
    finally:
        release_output(out)
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
    try:
        _fill_output_dir(out, fill)
    finally:
        release_output(out)
    return out


def _fill_output_dir(out: Path, fill: Callable[[Path], None]) -> None:
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
            return
        previous = read_manifest(out)
        clashes = [f for f in new_files if (out / f).exists() and f not in previous]
        if clashes:
            raise OmicsInputError(f"{out} holds {clashes[0]}, which napari-omicsimage did not write; refusing "
                                  "to replace it. Move it away or choose another --out.")
        for name in new_files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, out / name)
        for name in sorted(previous - set(new_files)):
            stale = out / name  # read_manifest vouches that it lies inside out
            if stale.is_file():
                stale.unlink()
        _write_manifest(out, new_files)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder, nothing else


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
