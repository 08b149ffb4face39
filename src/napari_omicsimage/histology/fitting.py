"""Fitting, saving and loading either kind of histology model: PCA + ridge (:mod:`.models`) or the
fine-tuned network (:mod:`.finetune`), chosen by ``HistologyConfig.model``.

The choice lives here, above both kinds, so neither imports the other.
"""

from __future__ import annotations

import json

from ..checkpoint import write_payload
from ..errors import CheckpointError, OmicsInputError
from ..payload import read_payload
from .features import FeatureExtractor, PatchFeatures
from .finetune import finetuned_from_payload, finetuned_payload, fit_finetuned
from .models import FORMAT, FORMAT_VERSION, HistologyConfig, fit_ridge, model_payload, ridge_from_payload
from .reading import Section


def fit(sections: list[Section], config: HistologyConfig | None = None, *, progress=None,
        features: dict[str, PatchFeatures] | None = None, extractor: FeatureExtractor | None = None):
    """Fit on all spots of ``sections`` (after Shannon selection, when asked for).

    ``features`` (section name → :class:`PatchFeatures`) skips extraction for the ridge model;
    evaluation passes them so each section's patches are featurised once.
    """
    config = (config or HistologyConfig()).validate()
    if not sections:
        raise OmicsInputError("fitting needs at least one section with measured expression.")
    if config.model == "finetune":
        return fit_finetuned(sections, config, progress=progress)
    return fit_ridge(sections, config, progress=progress, features=features, extractor=extractor)


def save_model(model, path, *, overwrite: bool = False, inputs=()):
    """Write the model (ridge or fine-tuned) as one verified checkpoint (atomic; never over a file this tool
    did not write)."""
    payload = finetuned_payload(model) if model.config.model == "finetune" else model_payload(model)
    return write_payload(payload, path, format=FORMAT, version=FORMAT_VERSION, overwrite=overwrite, inputs=inputs)


def load_model(path, *, device=None):
    """A model written by :func:`save_model`: the ridge pipeline is rebuilt from the stored arrays, the
    fine-tuned network from its state dict (on ``device``, default auto)."""
    payload = read_payload(path, format=FORMAT, max_version=FORMAT_VERSION, what="histology model",
                           writer="omicsimage histology fit")
    try:
        meta = json.loads(payload["meta"])
        config = HistologyConfig(**meta["config"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a complete histology model ({type(exc).__name__}: {exc}).") from exc
    if config.model == "finetune":
        return finetuned_from_payload(payload, meta, config, path, device=device)
    return ridge_from_payload(payload, meta, config, path)
