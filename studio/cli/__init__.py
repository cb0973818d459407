"""The `studio` command: the only place that prints and maps errors to exit codes."""

from studio.cli.main import main

__all__ = ["main"]
