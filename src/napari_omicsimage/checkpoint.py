"""One-file model checkpoints that can never run code.

A checkpoint holds the network weights and architecture, the fitted layout,
the gene and class names, the preprocessing parameters, the training
configuration and history, and the package versions it was written with.
Everything is either a tensor or a JSON string, so it loads with
``torch.load(weights_only=True)``: unpickling arbitrary objects (and so
running code hidden in a file) is impossible.

Layout of the file (a ``torch.save`` dict)::

    {"format": "napari-omicsimage-checkpoint", "format_version": 1,
     "meta": "<JSON: model, classes, genes, configs, layout meta, versions, ...>",
     "state_dict": {name: tensor},           # network weights
     "layout_arrays": {name: tensor},        # the fitted layout (gene → pixel map)
     "preprocess_min": tensor, "preprocess_max": tensor, "fill_values": tensor}

Writing goes to a temporary file in the target folder that is renamed over
the target at the end, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import CheckpointError, OmicsInputError

FORMAT = "napari-omicsimage-checkpoint"
FORMAT_VERSION = 1


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("napari-omicsimage", "torch", "torchvision", "numpy", "scikit-learn", "scanpy", "anndata"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # pragma: no cover - all are dependencies
            versions[name] = "not installed"
    return versions


def _to_tensor(array):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def save_checkpoint(trained, path) -> Path:
    """Write ``trained`` (a :class:`~napari_omicsimage.training.TrainedModel`) to ``path`` atomically."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise OmicsInputError(f"{path} is a folder; give a file name for the checkpoint, e.g. {path / 'model.pt'}.")
    try:
        layout_meta, layout_arrays = trained.layout.state()
    except OmicsInputError as exc:
        raise OmicsInputError(f"cannot save this model: {exc}") from exc
    preprocess = trained.preprocessor.state()
    meta = {
        "model": trained.config.model,
        "in_channels": int(trained.layout.n_channels),
        "n_classes": len(trained.classes),
        "classes": [str(c) for c in trained.classes],
        "label_column": trained.label_column,
        "genes": [str(g) for g in trained.preprocessor.genes_],
        "preprocess": {"config": preprocess["config"], "log_scale": preprocess["log_scale"]},
        "layout": layout_meta,
        "layout_spec": trained.layout_spec,
        "train_config": trained.config.to_dict(),
        "history": [{k: v for k, v in h.items()} for h in trained.history],
        "cancelled": bool(trained.cancelled),
        "versions": package_versions(),
    }
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": json.dumps(meta),
        "state_dict": {k: v.detach().cpu().clone() for k, v in trained.model.state_dict().items()},
        "layout_arrays": {k: _to_tensor(v) for k, v in layout_arrays.items()},
        "preprocess_min": _to_tensor(np.asarray(preprocess["min"], dtype=np.float32)),
        "preprocess_max": _to_tensor(np.asarray(preprocess["max"], dtype=np.float32)),
        "fill_values": _to_tensor(np.asarray(
            trained.fill_values if trained.fill_values is not None else np.zeros(len(meta["genes"])),
            dtype=np.float32)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    trained.versions = meta["versions"]
    return path


def _read(path: Path) -> dict:
    import pickle
    import zipfile

    import torch

    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses anything but tensors and plain containers; that is the point
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, which could run code when loaded; "
            "refusing to load it. Only load checkpoints written by napari-omicsimage (save_checkpoint / "
            "omicsimage train)."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"{path} is corrupted, truncated or not a PyTorch file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); write it again with "
            "omicsimage train."
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a napari-omicsimage checkpoint (a plain state dict or another "
            "program's file?); use a file written by omicsimage train / save_checkpoint."
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this napari-omicsimage reads up to "
            f"{FORMAT_VERSION}. Upgrade napari-omicsimage."
        )
    return payload


def load_checkpoint(path, device=None):
    """Read a checkpoint into a :class:`~napari_omicsimage.training.TrainedModel`.

    ``device``: where the network goes (``None`` → ``"auto"``: cuda, mps, cpu).
    Raises :class:`~napari_omicsimage.errors.CheckpointError` for a missing,
    corrupted, truncated, foreign or unsafe file.
    """
    from .layouts import layout_from_state
    from .models import build_model, resolve_device
    from .preprocess import Preprocessor
    from .training import TrainConfig, TrainedModel

    path = Path(path)
    payload = _read(path)
    try:
        meta = json.loads(payload["meta"])
        state_dict = payload["state_dict"]
        layout_arrays = {k: v.numpy() for k, v in payload["layout_arrays"].items()}
        preprocessor = Preprocessor.from_state({
            "config": meta["preprocess"]["config"], "log_scale": meta["preprocess"]["log_scale"],
            "genes": meta["genes"], "min": payload["preprocess_min"].numpy(),
            "max": payload["preprocess_max"].numpy()})
        layout = layout_from_state(meta["layout"], layout_arrays)
        config = TrainConfig.from_dict(meta["train_config"])
        fill_values = payload["fill_values"].numpy()
    except (KeyError, TypeError, ValueError, AttributeError, OmicsInputError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path} is an incomplete or damaged napari-omicsimage checkpoint "
                              f"({type(exc).__name__}: {exc}); write it again with omicsimage train.") from exc
    if list(map(str, layout.genes_)) != list(meta["genes"]):
        raise CheckpointError(f"{path}: the stored layout and gene list disagree; the file is damaged.")
    # the architecture is rebuilt from names; weights=None because the stored weights replace them
    model = build_model(meta["model"], meta["in_channels"], meta["n_classes"], weights=None)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the stored weights do not fit a {meta['model']} network "
                              f"({str(exc).splitlines()[0]}); the file is damaged.") from exc
    config.weights = None  # the stored weights already include any pretraining
    model.to(resolve_device(device if device is not None else "auto"))
    model.eval()
    return TrainedModel(model=model, preprocessor=preprocessor, layout=layout, classes=list(meta["classes"]),
                        config=config, history=list(meta.get("history", [])), cancelled=bool(meta.get("cancelled")),
                        label_column=meta.get("label_column"), layout_spec=dict(meta.get("layout_spec", {})),
                        fill_values=fill_values, versions=dict(meta.get("versions", {})))
