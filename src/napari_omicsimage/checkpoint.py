"""One-file model checkpoints that can never run code.

A checkpoint holds the network weights and architecture, the fitted layout,
the gene and class names, the preprocessing parameters, the training
configuration and history, and the package versions it was written with.
Everything is either a tensor or a JSON string, so it loads with
``torch.load(weights_only=True)``: unpickling arbitrary objects (and so
running code hidden in a file) is impossible.

Layout of the file (a ``torch.save`` dict)::

    {"format": "napari-omicsimage-checkpoint", "format_version": 2, "sha256": "<of all the rest>",
     "meta": "<JSON: model, classes, genes, configs, layout meta, versions, ...>",
     "state_dict": {name: tensor},           # network weights
     "layout_arrays": {name: tensor},        # the fitted layout (gene → pixel map)
     "preprocess_min": tensor, "preprocess_max": tensor, "fill_values": tensor}

Writing goes to a temporary file in the target folder that is renamed over
the target at the end, so a crash never leaves a half-written checkpoint.
The SHA-256 of the whole content is stored in the file and verified on every
load, so a file whose bytes changed after writing is reported as damaged
rather than used.

The published RGB method (``rgb-embedding``) has no plain-array state of its
own (its fitted reducers are openTSNE and UMAP objects), so checkpoints store
what is needed to project new samples: the PCA mean and components, the
training samples' PCA scores and their t-SNE and UMAP embeddings, and the
scaling ranges.  On loading, t-SNE is rebuilt exactly (openTSNE
``TSNEEmbedding`` from the stored embedding and affinities recomputed on the
stored scores), so its out-of-sample step is unchanged.  UMAP cannot be
rebuilt from arrays: a reloaded model places a new sample at the
distance-weighted mean UMAP position of its nearest training samples, where
the in-memory model runs UMAP's own ``transform``.  The blue channel (and so
predictions) can therefore differ slightly after reloading.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import CheckpointError, OmicsInputError
from .layouts import RGBEmbedding, layout_from_state
from .models import build_model, resolve_device
from .outputs import write_output_file
from .payload import content_digest, read_payload
from .preprocess import Preprocessor
from .training import TrainConfig, TrainedModel

FORMAT = "napari-omicsimage-checkpoint"
#: 2 added the SHA-256 of the content (version-1 files still load, with a warning)
FORMAT_VERSION = 2


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


def save_checkpoint(trained, path, *, overwrite: bool = False, inputs=()) -> Path:
    """Write ``trained`` (a :class:`~napari_omicsimage.training.TrainedModel`) to ``path`` atomically.

    An existing ``path`` is replaced only with ``overwrite=True``, and only if
    napari-omicsimage wrote it (see :mod:`napari_omicsimage.outputs`).
    """
    if not trained.history:
        raise OmicsInputError("this model finished no training epoch (cancelled before the first one), so "
                              "there is nothing to save; train again and let at least one epoch finish.")
    try:
        layout_meta, layout_arrays = layout_state(trained.layout)
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
        "meta": json.dumps(meta),
        "state_dict": {k: v.detach().cpu().clone() for k, v in trained.model.state_dict().items()},
        "layout_arrays": {k: _to_tensor(v) for k, v in layout_arrays.items()},
        "preprocess_min": _to_tensor(np.asarray(preprocess["min"], dtype=np.float32)),
        "preprocess_max": _to_tensor(np.asarray(preprocess["max"], dtype=np.float32)),
        "fill_values": _to_tensor(np.asarray(
            trained.fill_values if trained.fill_values is not None else np.zeros(len(meta["genes"])),
            dtype=np.float32)),
    }
    write_payload(payload, path, format=FORMAT, overwrite=overwrite, inputs=inputs)
    trained.versions = meta["versions"]
    return Path(path)


# ============================================================ the file format
def write_payload(payload: dict, path, *, format: str, version: int = FORMAT_VERSION, overwrite: bool = False,
                  inputs=()) -> Path:
    """Save ``payload`` (tensors, plain values, dicts/lists of them) as a verified checkpoint file.

    Adds ``format``, ``format_version`` and the SHA-256 of the content; written
    through :func:`napari_omicsimage.outputs.write_output_file` (atomic, and
    never over a file this tool did not write).  Every checkpoint of the
    package (classifiers, histology models) is written here.
    """
    import torch

    body = {**payload, "format": format, "format_version": int(version)}
    body["sha256"] = content_digest(body)

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            torch.save(body, stream)
            stream.flush()
            os.fsync(stream.fileno())

    return write_output_file(path, fill, overwrite=overwrite, inputs=inputs)


def load_checkpoint(path, device=None):
    """Read a checkpoint into a :class:`~napari_omicsimage.training.TrainedModel`.

    ``device``: where the network goes (``None`` → ``"auto"``: cuda, mps, cpu).
    Raises :class:`~napari_omicsimage.errors.CheckpointError` for a missing,
    corrupted, truncated, foreign or unsafe file.
    """
    path = Path(path)
    payload = read_payload(path, format=FORMAT, max_version=FORMAT_VERSION)
    try:
        meta = json.loads(payload["meta"])
        state_dict = payload["state_dict"]
        layout_arrays = {k: v.numpy() for k, v in payload["layout_arrays"].items()}
        preprocessor = Preprocessor.from_state({
            "config": meta["preprocess"]["config"], "log_scale": meta["preprocess"]["log_scale"],
            "genes": meta["genes"], "min": payload["preprocess_min"].numpy(),
            "max": payload["preprocess_max"].numpy()})
        layout = restore_layout(meta["layout"], layout_arrays)
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


# ====================================================== layouts in checkpoints
def layout_state(layout) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a fitted layout; the published RGB method included (see module docs)."""
    if isinstance(layout, RGBEmbedding):
        return _rgb_embedding_state(layout)
    return layout.state()


def restore_layout(meta: dict, arrays: dict[str, np.ndarray]):
    if meta.get("method") == "rgb-embedding":
        return _restore_rgb_embedding(meta, arrays)
    return layout_from_state(meta, arrays)


def _json_plain(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is None or isinstance(v, (bool, int, float, str))}


def _rgb_embedding_state(layout):
    if not hasattr(layout, "pca_"):
        raise OmicsInputError("the rgb-embedding layout is not fitted; train the model before saving it.")
    scores = np.asarray(layout.umap_._raw_data, dtype=np.float64)  # the training samples' PCA scores
    affinities = layout.tsne_.affinities
    meta = {
        "method": "rgb-embedding",
        "params": {"size": list(layout.size), "radius": layout.radius, "n_pcs": layout.n_pcs,
                   "random_state": layout.random_state},
        "genes": [str(g) for g in layout.genes_],
        "tsne": {"perplexities": [float(p) for p in np.atleast_1d(affinities.perplexities)],
                 "gradient_descent": _json_plain(layout.tsne_.gradient_descent_params)},
        "umap_n_neighbors": int(layout.umap_.n_neighbors),
    }
    arrays = {
        "pca_mean": np.asarray(layout.pca_.mean_, dtype=np.float64),
        "pca_components": np.asarray(layout.pca_.components_, dtype=np.float64),
        "train_scores": scores,
        "tsne_embedding": np.asarray(layout.tsne_, dtype=np.float64),
        "umap_embedding": np.asarray(layout.umap_.embedding_, dtype=np.float64),
    }
    for key, (low, high) in layout.ranges_.items():
        arrays[f"range_{key}_low"] = np.asarray(low, dtype=np.float64)
        arrays[f"range_{key}_high"] = np.asarray(high, dtype=np.float64)
    return meta, arrays


class _StoredPCA:
    """The projection of a fitted scikit-learn PCA (no whitening): ``(x − mean) @ componentsᵀ``."""

    def __init__(self, mean, components):
        self.mean_ = np.asarray(mean, dtype=np.float64)
        self.components_ = np.asarray(components, dtype=np.float64)

    def transform(self, x):
        return (np.asarray(x, dtype=np.float64) - self.mean_) @ self.components_.T


class _NeighbourUMAP:
    """Stand-in for a fitted UMAP after reloading: inverse-distance weighted mean
    embedding of the ``n_neighbors`` nearest training samples (UMAP's own
    transform starts from a similar weighted mean, then optimises further)."""

    def __init__(self, train_scores, embedding, n_neighbors: int):
        from sklearn.neighbors import NearestNeighbors

        self.embedding_ = np.asarray(embedding, dtype=np.float64)
        self.n_neighbors = int(min(n_neighbors, len(train_scores)))
        self._raw_data = np.asarray(train_scores, dtype=np.float64)
        self._index = NearestNeighbors(n_neighbors=self.n_neighbors).fit(self._raw_data)

    def transform(self, scores):
        distances, neighbours = self._index.kneighbors(np.asarray(scores, dtype=np.float64))
        weights = 1.0 / np.maximum(distances, 1e-12)
        weights /= weights.sum(axis=1, keepdims=True)
        return np.einsum("nk,nkd->nd", weights, self.embedding_[neighbours])


def _restore_rgb_embedding(meta, arrays):
    from openTSNE import TSNEEmbedding
    from openTSNE.affinity import MultiscaleMixture

    layout = RGBEmbedding(**meta["params"])
    layout.genes_ = np.asarray(meta["genes"], dtype=object)
    layout.pca_ = _StoredPCA(arrays["pca_mean"], arrays["pca_components"])
    scores = np.asarray(arrays["train_scores"], dtype=np.float64)
    random_state = meta["params"].get("random_state")
    perplexities = meta["tsne"]["perplexities"]
    # the affinities openTSNE's TSNE.fit computed, recomputed on the same scores with the same settings
    affinities = MultiscaleMixture(scores, perplexities if len(perplexities) > 1 else perplexities[0],
                                   method="auto", metric="euclidean", n_jobs=1, random_state=random_state)
    params = dict(meta["tsne"]["gradient_descent"])
    params.pop("n_jobs", None)
    layout.tsne_ = TSNEEmbedding(np.asarray(arrays["tsne_embedding"]), affinities, random_state=random_state,
                                 n_jobs=1, **params)
    layout.umap_ = _NeighbourUMAP(scores, arrays["umap_embedding"], meta["umap_n_neighbors"])
    layout.ranges_ = {key: (np.asarray(arrays[f"range_{key}_low"]), np.asarray(arrays[f"range_{key}_high"]))
                      for key in ("tsne", "pca", "umap")}
    layout.restored_from_checkpoint_ = True
    return layout
