"""The verified, code-free file format under every checkpoint of the package: reading and recognising it.

Every file is a ``torch.save`` dict of tensors and plain values with a ``format`` name, a
``format_version`` and the SHA-256 of the rest (:func:`content_digest`); it loads with
``torch.load(weights_only=True)``, so it can never run code.  Writing goes through
:mod:`napari_omicsimage.outputs` and lives in :func:`napari_omicsimage.checkpoint.write_payload`;
this module stays below ``outputs``, which asks :func:`is_checkpoint_file` before replacing a file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import CheckpointError, OmicsInputError

log = logging.getLogger(__name__)


def content_digest(payload: dict) -> str:
    """SHA-256 over every value of ``payload`` but its own ``sha256`` entry, in a fixed order.

    Tensors contribute their dtype, shape and bytes, so any changed weight,
    layout entry or metadata character changes the digest.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()

    def feed(key: str, value) -> None:
        digest.update(key.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
            if tensor.numel():
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(f"dict:{len(value)}\0".encode())
            for k in sorted(value, key=str):
                feed(f"{key}/{k}", value[k])
        elif isinstance(value, (list, tuple)):
            digest.update(f"list:{len(value)}\0".encode())
            for i, item in enumerate(value):
                feed(f"{key}[{i}]", item)
        else:
            digest.update(f"{type(value).__name__}:{value!r}\0".encode())

    for key in sorted(k for k in payload if k != "sha256"):
        feed(key, payload[key])
    return digest.hexdigest()


def is_checkpoint_file(path) -> bool:
    """Whether ``path`` is a file written by :func:`write_payload` (of any napari-omicsimage format)."""
    try:
        read_payload(path, format=None, max_version=10**6)
    except (OmicsInputError, OSError):
        return False
    return True


#: words in torch's weights_only refusal of a pickle that names code (a global) rather than data
_CODE_MARKERS = ("Unsupported global", "GLOBAL", "is not an allowed")


def load_plain_data(path, *, what: str, fix: str, only: str):
    """``torch.load(path, weights_only=True)`` with each failure as one clear :class:`CheckpointError`.

    ``what`` names the file ("checkpoint", "weights file"), ``fix`` says how to
    get a good one, ``only`` which files to trust.  A pickle that names code is
    refused without running it; a file whose bytes are merely broken is called
    damaged.
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such {what}; check the path.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a {what}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not any(marker in str(exc) for marker in _CODE_MARKERS):
            raise CheckpointError(f"{path} is damaged or not a PyTorch file (its data cannot be read as a "
                                  f"{what}); {fix}.") from None
        # weights_only refuses anything but tensors and plain containers; that is the point
        raise CheckpointError(f"{path} holds objects other than tensors and plain values, which could run code "
                              f"when loaded; refusing to load it. {only}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError,
            UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else "unreadable"
        raise CheckpointError(f"{path} is damaged, truncated or not a PyTorch file ({type(exc).__name__}: "
                              f"{first}); {fix}.") from None


def read_payload(path, *, format: str | None, max_version: int,
                 what: str = "checkpoint", writer: str = "omicsimage train") -> dict:
    """Load a checkpoint safely (``weights_only``) and verify its SHA-256.

    ``format=None`` accepts any napari-omicsimage format (used to recognise
    our own files).  Raises :class:`~napari_omicsimage.errors.CheckpointError`
    for a missing, damaged, truncated, foreign, unsafe or too new file.
    """
    path = Path(path)
    payload = load_plain_data(path, what=f"{what} file", fix=f"write it again with {writer}",
                              only=f"Only load {what}s written by napari-omicsimage ({writer}).")
    found = payload.get("format") if isinstance(payload, dict) else None
    ours = isinstance(found, str) and found.startswith("napari-omicsimage")
    if not ours or (format is not None and found != format):
        kind = f"a {found} file" if ours else "a plain state dict or another program's file?"
        raise CheckpointError(f"{path} is a PyTorch file but not a napari-omicsimage {what} ({kind}); use a "
                              f"file written by {writer}.")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise CheckpointError(
            f"{path} has {what} format version {version!r}; this napari-omicsimage reads up to "
            f"{max_version}. Upgrade napari-omicsimage."
        )
    stored = payload.get("sha256")
    if stored is None:
        if version >= 2:
            raise CheckpointError(f"{path} has lost its SHA-256 entry, so it is damaged; write it again with "
                                  f"{writer}.")
        log.warning("%s was written before checkpoints carried a SHA-256; its content cannot be verified", path)
    elif stored != content_digest(payload):
        raise CheckpointError(f"{path} is damaged: its content no longer matches the SHA-256 stored when it was "
                              f"written (bytes changed after writing); write it again with {writer}.")
    return payload
