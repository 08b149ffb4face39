"""CLI command ``omicsimage demo`` (issue: napari experience)."""


def register(sub) -> None:
    """Add the demo command to the ``omicsimage`` parser."""
