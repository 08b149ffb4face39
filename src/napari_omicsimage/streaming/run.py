"""Streaming training, prediction and cross-validation over a backed AnnData.

The same steps as :func:`napari_omicsimage.training.train` and
:meth:`~napari_omicsimage.training.TrainedModel.predict`, with every pass over
the cells done block by block: the memory is one block of cells, the fitted
statistics (arrays of length genes), the layout's subsample and the network —
it does not grow with the number of cells, except for per-cell outputs
(labels, predictions).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata as ad
import numpy as np

from ..errors import Cancelled, OmicsInputError
from ..io import check_labels
from ..models import MAX_MISSING_FRACTION, build_model, resolve_device
from ..outputs import write_output_file
from ..preprocess import Preprocessor
from ..progress import ProgressEvent
from ..training import TrainConfig, TrainedModel, class_indices, recalibrate_batchnorm, train_loop
from .cells import block_anndata, iter_row_blocks
from .fit import DEFAULT_LAYOUT_CELLS, fit_layout_on_subsample, fit_preprocessor, training_rows
from .loader import DEFAULT_CACHE_GB, CellBatches, StreamingBatches, cache_cells

log = logging.getLogger(__name__)


@dataclass
class StreamingOptions:
    """What the streaming path adds to :class:`~napari_omicsimage.training.TrainConfig`."""

    #: cells the gene layout is fitted on (stratified subsample of the training cells)
    layout_cells: int = DEFAULT_LAYOUT_CELLS
    #: stop training after this many optimiser steps in all (None: run every epoch)
    max_steps: int | None = None
    #: contiguous cells per shuffled block, blocks read together (see loader.CellBatches)
    block_cells: int = 256
    fetch_blocks: int = 16
    #: GB the preprocessed training cells may take in memory (0: always stream from the file)
    cache_gb: float = DEFAULT_CACHE_GB


@dataclass
class StageTimer:
    """Seconds per named stage, logged as ``stage NAME: S s`` (benchmarks/bench_scale.py reads them)."""

    seconds: dict = field(default_factory=dict)

    def run(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - started, 3)
        log.info("stage %s: %.2f s", name, self.seconds[name])
        return result


def label_codes(adata: ad.AnnData, label_column: str) -> tuple[list[str], np.ndarray]:
    check_labels(adata, label_column)
    labels = adata.obs[label_column].astype(str).to_numpy()
    classes = sorted(set(labels))
    return classes, class_indices(labels, classes)


def fit_inputs(adata: ad.AnnData, rows: np.ndarray, y: np.ndarray, layout_spec: dict, config: TrainConfig,
               options: StreamingOptions, timer: StageTimer | None = None):
    """``(preprocessor, layout, subsample_rows)`` fitted on the cells ``rows`` (the layout on those passing QC)."""
    timer = timer or StageTimer()
    preprocessor = timer.run("preprocess", fit_preprocessor, adata, rows, config.preprocess)
    layout, subsample = timer.run("layout", fit_layout_on_subsample, adata, training_rows(preprocessor, rows),
                                  preprocessor, layout_spec,
                                  labels=y, layout_cells=options.layout_cells, seed=int(config.seed))
    return preprocessor, layout, subsample


def fit_network_streaming(adata, rows, y, n_classes: int, preprocessor: Preprocessor, layout, subsample,
                          config: TrainConfig, options: StreamingOptions, *, device, progress=None,
                          rank: int = 0, world_size: int = 1, wrap=None, fold=None, n_folds=None,
                          timer: StageTimer | None = None, cache=None):
    """Train a fresh network on block-shuffled batches; returns ``(model, history, cancelled)``.

    ``rows`` are the cells the preprocessor was fitted on; those failing its QC
    are left out (:func:`.fit.training_rows`).  The preprocessed training cells
    are held in memory when they fit ``options.cache_gb`` (or ``cache``, a
    :class:`.loader.CellCache` of them, is given).

    ``wrap`` (e.g. ``DistributedDataParallel``) wraps the network after it is
    on ``device``; ``config.batch_size`` is then the global batch and each of
    the ``world_size`` ranks takes ``batch_size / world_size`` cells a step.
    """
    import torch

    if int(config.batch_size) % world_size:
        raise OmicsInputError(f"batch size {config.batch_size} does not split over {world_size} processes; "
                              f"use a multiple of {world_size}.")
    timer = timer or StageTimer()
    rows = training_rows(preprocessor, rows)
    if cache is None and options.cache_gb > 0:
        cache = timer.run("cache", cache_cells, adata, rows, preprocessor, options.cache_gb)
    torch.manual_seed(int(config.seed))
    model = build_model(config.model, layout.n_channels, n_classes, weights=config.weights).to(device)
    trained = wrap(model) if wrap is not None else model
    dataset = CellBatches(adata, rows, y, preprocessor, int(config.batch_size) // world_size,
                          block_cells=options.block_cells, fetch_blocks=options.fetch_blocks,
                          seed=int(config.seed), rank=rank, world_size=world_size, cache=cache)
    source = StreamingBatches(dataset, layout, device, subsample)
    history, cancelled = timer.run("train", train_loop, trained, source, replace(config, recalibrate_batchnorm=False),
                                   progress=progress, fold=fold, n_folds=n_folds, max_steps=options.max_steps)
    if config.recalibrate_batchnorm and history:  # on the layout's subsample: bounded, and timed apart
        use_amp = bool(config.mixed_precision and device.type == "cuda")
        timer.run("calibrate", recalibrate_batchnorm, model, source, mixed_precision=use_amp)
    model.eval()
    timer.seconds["train_steps"] = sum(len(h["batch_losses"]) for h in history)
    log.info("stage train_steps: %d steps", timer.seconds["train_steps"])
    return model, history, cancelled


def train_streaming(adata: ad.AnnData, label_column: str, layout_spec: dict, config: TrainConfig | None = None,
                    options: StreamingOptions | None = None, progress=None) -> TrainedModel:
    """:func:`napari_omicsimage.training.train` for a backed (or any) AnnData, in bounded memory."""
    config = (config or TrainConfig()).validate()
    options = options or StreamingOptions()
    timer = StageTimer()
    classes, y = label_codes(adata, label_column)
    rows = np.arange(adata.n_obs)
    preprocessor, layout, subsample = fit_inputs(adata, rows, y, layout_spec, config, options, timer)
    device = resolve_device(config.device)
    model, history, cancelled = fit_network_streaming(
        adata, rows, y, len(classes), preprocessor, layout, subsample, config, options, device=device,
        progress=progress, timer=timer)
    if cancelled and not history:
        raise Cancelled("training was cancelled before its first epoch finished, so there is no model "
                                "to predict with or save; train again and let at least one epoch finish.")
    trained = TrainedModel(model=model, preprocessor=preprocessor, layout=layout, classes=classes, config=config,
                           history=history, cancelled=cancelled, label_column=label_column,
                           layout_spec=dict(layout_spec), fill_values=preprocessor.scaled_mean_)
    trained.stage_seconds = timer.seconds
    if progress is not None:
        progress(ProgressEvent("done", epoch=len(history) - 1 if history else None, n_epochs=int(config.epochs),
                               loss=history[-1]["loss"] if history else None,
                               metrics={"cancelled": float(cancelled)}))
    return trained


def iter_predictions(trained: TrainedModel, adata: ad.AnnData, rows: np.ndarray | None = None, *,
                     label_column: str | None = None, max_missing_fraction: float = MAX_MISSING_FRACTION):
    """Prediction tables block by block (as ``TrainedModel.predict``, plus ``true`` with ``label_column``)."""
    rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
    truth = adata.obs[label_column].astype(str).to_numpy() if label_column is not None else None
    for part, block in iter_row_blocks(adata, rows):
        frame = trained.predict(block_anndata(adata, part, block), max_missing_fraction=max_missing_fraction)
        if truth is not None:
            frame.insert(1, "true", truth[part])
        yield part, frame


@dataclass
class PredictionSummary:
    n_cells: int
    counts: dict
    n_missing_genes: int
    accuracy: float | None = None


def predict_streaming(trained: TrainedModel, adata: ad.AnnData, out: str | Path, *, label_column: str | None = None,
                      max_missing_fraction: float = MAX_MISSING_FRACTION, overwrite: bool = False,
                      inputs=(), progress=None) -> PredictionSummary:
    """Predict every cell and write the table to ``out`` (CSV) as it goes.

    Rows are appended block by block to a temporary file beside ``out``,
    which replaces ``out`` only when complete
    (:func:`napari_omicsimage.outputs.write_output_file`).  Memory: one block
    of cells.
    """
    counts: dict = {}
    tally = {"done": 0, "right": 0, "missing": 0}

    def fill(tmp: Path) -> None:
        with open(tmp, "w", newline="") as stream:
            for part, frame in iter_predictions(trained, adata, label_column=label_column,
                                                max_missing_fraction=max_missing_fraction):
                frame.to_csv(stream, index=False, header=tally["done"] == 0)
                for name, k in frame["predicted"].value_counts().items():
                    counts[name] = counts.get(name, 0) + int(k)
                if label_column is not None:
                    tally["right"] += int((frame["predicted"] == frame["true"]).sum())
                tally["missing"] = frame.attrs.get("n_missing_genes", 0)
                tally["done"] += len(part)
                if progress is not None and progress(ProgressEvent("batch", batch=tally["done"] - 1,
                                                                   n_batches=adata.n_obs)) is True:
                    raise Cancelled("prediction was cancelled; nothing was written.")

    write_output_file(out, fill, overwrite=overwrite, inputs=inputs)
    n_done, n_right, n_missing = tally["done"], tally["right"], tally["missing"]
    accuracy = n_right / n_done if label_column is not None and n_done else None
    return PredictionSummary(n_done, counts, n_missing, accuracy)


def predict_proba_rows(trained: TrainedModel, adata: ad.AnnData, rows: np.ndarray) -> np.ndarray:
    """Class probabilities of the cells ``rows`` (sorted), block by block."""
    columns = [f"prob_{c}" for c in trained.classes]
    parts = [frame[columns].to_numpy() for _, frame in iter_predictions(trained, adata, rows)]
    return np.concatenate(parts) if parts else np.zeros((0, len(columns)))
