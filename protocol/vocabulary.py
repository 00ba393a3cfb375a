"""The words every part of Cortex shares: task priorities, task states and the categories
of a task's error. Defined once here; the scheduler's state table, the client, the CLI,
the metrics and the load test all take them from this module."""

from __future__ import annotations

PRIORITIES = ("critical", "high", "medium", "low")  # most urgent first
PRIORITY_RANK = {p: i for i, p in enumerate(PRIORITIES)}

TASK_STATES = ("queued", "dispatched", "running", "completed", "failed", "cancelled", "dead")
FINAL_STATES = frozenset({"completed", "failed", "cancelled", "dead"})  # dead: retries spent

ERROR_CATEGORIES = ("timeout", "worker_lost", "handler_error", "budget_exceeded", "cancelled",
                    "rejected")

# A budget window: None (never resets), "daily" (UTC midnight) or "rolling:<seconds>"
# (whole seconds, counted from when the window was set). The ledger applies it; settings,
# the CLI and the wire all read it with window_seconds(), so they cannot disagree.
DAY = 86_400
MAX_WINDOW_SECONDS = 9_999_999_999


def window_seconds(window: object) -> int | None:
    """Seconds per budget window (None: never resets); ValueError for anything else."""
    if window is None:
        return None
    if window == "daily":
        return DAY
    if isinstance(window, str) and window.startswith("rolling:"):
        digits = window[len("rolling:"):]
        if digits.isascii() and digits.isdigit() and not digits.startswith("0"):
            seconds = int(digits)
            if seconds <= MAX_WINDOW_SECONDS:
                return seconds
    raise ValueError('window must be none, "daily" or "rolling:<whole seconds>"')
