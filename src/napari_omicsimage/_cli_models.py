"""CLI commands for models: evaluate, train, predict, explain (issue: models)."""


def register(sub) -> None:
    """Add the model commands to the ``omicsimage`` parser."""
