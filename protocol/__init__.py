"""Cortex bus protocol and client library (spec: protocol/README.md and wire.py)."""

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

__all__ = [
    "PRIORITIES", "AsyncClient", "Client", "BadRequest", "BudgetExceeded", "CortexError",
    "NotFound", "QueueFull", "Rejected", "TaskFailed", "Timeout", "Unavailable", "TaskContext",
    "Worker",
]
