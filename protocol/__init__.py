"""Cortex bus protocol and client library (spec: protocol/README.md and wire.py).

The names below are loaded on first use: a process that needs only the wire format or
the `Worker` helper (a pooled worker, a service) is spared the clients' asyncio and
everything it brings in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the submodule that defines it
_LAZY = {
    "PRIORITIES": "client", "AsyncClient": "client", "Client": "client",
    "BadRequest": "errors", "BudgetExceeded": "errors", "CortexError": "errors",
    "NotFound": "errors", "QueueFull": "errors", "Rejected": "errors",
    "TaskFailed": "errors", "Timeout": "errors", "Unavailable": "errors",
    "TaskContext": "worker", "Worker": "worker",
}

__all__ = [
    "PRIORITIES", "AsyncClient", "Client", "BadRequest", "BudgetExceeded", "CortexError",
    "NotFound", "QueueFull", "Rejected", "TaskFailed", "Timeout", "Unavailable", "TaskContext",
    "Worker",
]

if TYPE_CHECKING:
    from .client import PRIORITIES, AsyncClient, Client
    from .errors import (
        BadRequest,
        BudgetExceeded,
        CortexError,
        NotFound,
        QueueFull,
        Rejected,
        TaskFailed,
        Timeout,
        Unavailable,
    )
    from .worker import TaskContext, Worker


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
