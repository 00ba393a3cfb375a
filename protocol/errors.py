"""Typed exceptions of the client library: a shallow tree, each carrying `.code`."""

from __future__ import annotations


class CortexError(Exception):
    """Base of every error the client library raises; `.code` is a stable string."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None, details: dict | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.details = details or {}


class BadRequest(CortexError):
    code = "bad_request"


class Unavailable(CortexError):
    code = "unavailable"


class Timeout(CortexError):
    code = "timeout"


class NotFound(CortexError):
    code = "not_found"


class QueueFull(CortexError):
    code = "queue_full"


class Rejected(CortexError):
    code = "rejected"


class BudgetExceeded(CortexError):
    code = "budget_exceeded"


class TaskFailed(CortexError):
    """Raised by `wait(..., raise_on_failure=True)` for a task that did not complete."""

    code = "task_failed"


_BY_CODE = {cls.code: cls for cls in
            (BadRequest, Unavailable, Timeout, NotFound, QueueFull, Rejected, BudgetExceeded)}


def from_reply(body: dict) -> CortexError:
    """Turn an ERROR body into the matching exception (unknown codes stay CortexError)."""
    code = str(body.get("code", "internal"))
    message = str(body.get("message", code))
    cls = _BY_CODE.get(code, CortexError)
    return cls(message, code=code, details=body)
