"""The one exception type users see for bad input.

Every check in the package raises :class:`OmicsInputError` with a message that
names the problem *and* what to do about it, so the CLI can print it as one
line and the napari widgets can show it in a notification.
"""


class OmicsInputError(ValueError):
    """Input data, options or files that the pipeline cannot use as given."""


class CheckpointError(OmicsInputError):
    """A model checkpoint that is corrupted, truncated, foreign or incompatible."""


class Cancelled(OmicsInputError):
    """Work stopped because its progress callback asked to (see :mod:`napari_omicsimage.progress`) before
    anything usable finished (no epoch, no fold, no file): there is no result to use.

    The only cancellation exception of the package.  It is an :class:`OmicsInputError` so the CLI
    reports it as one line like any refusal; a widget tells it from a failure with ``isinstance``.
    """
