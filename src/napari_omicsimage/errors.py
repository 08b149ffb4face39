"""The one exception type users see for bad input.

Every check in the package raises :class:`OmicsInputError` with a message that
names the problem *and* what to do about it, so the CLI can print it as one
line and the napari widgets can show it in a notification.
"""


class OmicsInputError(ValueError):
    """Input data, options or files that the pipeline cannot use as given."""


class CheckpointError(OmicsInputError):
    """A model checkpoint that is corrupted, truncated, foreign or incompatible."""


class TrainingCancelled(OmicsInputError):
    """A run cancelled before anything usable finished (no epoch, no fold): there is no result to use."""


class WorkCancelled(OmicsInputError):
    """Long work (reading, imagifying) stopped because its progress callback asked to cancel; nothing is kept."""
