"""The one progress protocol of the package: a callable that takes one :class:`ProgressEvent`.

Every long stage (reading, preprocessing, rendering, training, cross-validation,
prediction, explanation, histology) calls ``progress(event)``; returning ``True``
asks to stop, which ends in :class:`~napari_omicsimage.errors.Cancelled` where
nothing usable is left, or in a result marked cancelled where some is (the
epochs or folds that finished).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ProgressEvent:
    """What a progress callback hears.

    ``stage`` names the work: ``"batch"`` (after every optimiser step; ``loss`` is
    that batch's), ``"epoch"`` (``loss`` is the epoch's mean training loss,
    ``metrics`` holds ``train_accuracy``), ``"fold"`` (cross-validation: a fold
    finished, ``metrics`` holds its test metrics), ``"done"``, or a stage of work
    counted in items (``"render"``, ``"predict"``, ``"preprocessing (…)"``, …: see
    :meth:`count`).  Counters are 0-based; ``n_*`` are totals.
    """

    stage: str
    fold: int | None = None
    n_folds: int | None = None
    epoch: int | None = None
    n_epochs: int | None = None
    batch: int | None = None
    n_batches: int | None = None
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def count(cls, stage: str, done: int, total: int) -> ProgressEvent:
        """``done`` of ``total`` items of ``stage`` finished (``done == 0``: the stage starts)."""
        return cls(stage, batch=int(done) - 1 if done else None, n_batches=int(total) if total else None)

    @property
    def done(self) -> int:
        """Items (batches, cells) finished: ``batch + 1``, 0 before the first."""
        return 0 if self.batch is None else self.batch + 1

    def describe(self) -> str:
        parts = []
        if self.fold is not None:
            parts.append(f"fold {self.fold + 1}/{self.n_folds}")
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch + 1}/{self.n_epochs}")
        if self.batch is not None:
            parts.append(f"batch {self.batch + 1}/{self.n_batches}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        parts += [f"{k} {v:.3f}" for k, v in self.metrics.items() if isinstance(v, (int, float))]
        return f"{self.stage}: " + ", ".join(parts)


Progress = Callable[[ProgressEvent], Any]


def wants_cancel(progress: Progress | None, event: ProgressEvent) -> bool:
    """Tell ``progress`` about ``event``; whether it asked to stop."""
    return bool(progress is not None and progress(event) is True)
