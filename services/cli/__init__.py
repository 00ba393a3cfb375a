"""The `cortex` command (entry point: `main`)."""

from .app import main

__all__ = ["main"]
