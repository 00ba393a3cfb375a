"""One task's run on a worker: its handler called, what it took of the machine measured,
and its outcome, never an exception (a handler's failure is the task's, not the
worker's). Used by `Worker` (worker.py), which reports the outcome to the scheduler."""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import time
import traceback

import msgpack

from . import errors, wire

log = logging.getLogger(__name__)


class TaskMemory:
    """How far a task grew this process's RSS, in MB, and the RSS after it.

    On Linux the peak RSS is reset before each task (`/proc/self/clear_refs`, "5") and
    read after it (VmHWM); elsewhere the growth of the lifetime peak (`ru_maxrss`), which
    misses a task that reuses memory an earlier one freed. Reading /proc/self/status
    costs a worker about 11 us warm, a no-op task's largest system call: after a
    handler shorter than SHORT_TASK (which cannot have touched more than a few MB: a
    page fault each 4 KiB) it is read only if the last read is READ_EVERY old, and the
    task reports no growth and the RSS last read."""

    SHORT_TASK = 0.001  # seconds
    READ_EVERY = 1.0  # seconds

    def __init__(self):
        self._status = self._clear = None
        self._read_at = -math.inf  # monotonic time of the last read
        self._current = 0.0
        try:
            self._status = os.open("/proc/self/status", os.O_RDONLY)
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
        except OSError:
            if self._status is not None:
                os.close(self._status)
            self._status = self._clear = None
        self._base = self._current = self._read()[1]

    def _read(self) -> tuple[float, float]:
        """(peak, current) RSS in MB."""
        self._read_at = time.monotonic()
        if self._status is not None:
            try:
                text = os.pread(self._status, 8192, 0)
                return _kb_field(text, b"VmHWM:") / 1024.0, _kb_field(text, b"VmRSS:") / 1024.0
            except (OSError, ValueError):
                pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes / KB
        return peak_mb, peak_mb

    def before_task(self) -> None:
        if self._clear is not None:
            try:
                os.pwrite(self._clear, b"5", 0)
            except OSError:
                self._clear = None
        if self._clear is None:  # no reset: measure from the lifetime peak
            self._base = self._read()[0]

    def after_task(self, ran: float = math.inf) -> tuple[float, float]:
        """(growth, RSS) in MB of a task whose handler ran `ran` seconds."""
        if ran < self.SHORT_TASK and time.monotonic() - self._read_at < self.READ_EVERY:
            return 0.0, self._current
        peak, current = self._read()
        self._current = current
        grew = max(0.0, peak - self._base)
        if self._clear is not None:
            self._base = current  # the next task starts from here
        return grew, current


def _kb_field(text: bytes, key: bytes) -> float:
    at = text.index(key) + len(key)
    return float(text[at:text.index(b"kB", at)])


MAX_TRACEBACK = 16 * 1024  # bytes of a failed handler's traceback sent with its task
# An outcome larger than this cannot go to the scheduler in one message (the rest of the
# message, its id and timings, is far smaller than the room left).
MAX_OUTCOME_BYTES = wire.MAX_MESSAGE_BYTES - 64 * 1024
DETAIL_KINDS = (str, int, float, bool, type(None))


def failure(exc: BaseException) -> dict:
    """The error a failed handler gives its task: the exception's `category` attribute
    (else handler_error), its message, the scalar entries of its `details` dict (a
    provider's retry_after, say) and the full traceback (its last 16 KiB)."""
    category = getattr(exc, "category", None)
    if not (isinstance(category, str) and 0 < len(category) <= 64):
        category = "handler_error"
    text = "".join(traceback.format_exception(exc)).encode()
    if len(text) > MAX_TRACEBACK:
        text = b"...\n" + text[-(MAX_TRACEBACK - 4):]  # the raise is at the end: keep that
    error = {"category": category, "message": f"{type(exc).__name__}: {exc}"[:2000],
             "traceback": text.decode(errors="ignore")}
    details = getattr(exc, "details", None)
    if isinstance(details, dict):
        error.update({k: v[:500] if isinstance(v, str) else v
                      for k, v in list(details.items())[:20]
                      if isinstance(k, str) and k not in error and isinstance(v, DETAIL_KINDS)})
    return error


class BudgetExceeded(errors.BudgetExceeded):
    """Raised inside a handler before a token use would cross the task's reservation."""


class Cancelled(errors.CortexError):
    code = "cancelled"


def run_task(handler, ctx, memory: TaskMemory) -> dict:
    """Call `handler(ctx)` (None: no handler for its type) and return the outcome the
    worker reports: ok and result, or the error; its start and end, the CPU its thread
    spent, tokens used and memory. A result msgpack cannot carry fails the task."""
    memory.before_task()
    # Read by the worker's bus loop when it is time to report a start (no message: a
    # short task's start rides on its task.finished).
    started = ctx.started_at = time.time()
    cpu0 = time.thread_time()
    try:
        if handler is None:
            raise LookupError(f"this worker has no handler for {ctx.type!r}")
        outcome = {"ok": True, "result": handler(ctx)}
    except BudgetExceeded as e:
        outcome = {"ok": False, "error": {"category": "budget_exceeded", "message": str(e)}}
    except Cancelled as e:
        outcome = {"ok": False, "error": {"category": "cancelled", "message": str(e)}}
    except Exception as e:  # a handler's failure is the task's, never the worker's
        log.warning("handler failed on %s: %s", ctx.id, traceback.format_exc())
        outcome = {"ok": False, "error": failure(e)}
    # What the task took of the machine: the predictor's CPU and memory signals.
    finished = time.time()
    grew_mb, rss_mb = memory.after_task(finished - started)
    outcome.update(started_at=started, finished_at=finished,
                   cpu_s=time.thread_time() - cpu0, tokens_used=ctx.tokens_used,
                   rss_mb=rss_mb, mem_mb=grew_mb)
    try:
        size = len(msgpack.packb(outcome))
    except (TypeError, ValueError) as e:  # it goes to the scheduler as msgpack
        outcome.update(ok=False, result=None, error={
            "category": "handler_error", "message": f"result not serialisable: {e}"})
    else:
        if size > MAX_OUTCOME_BYTES:  # the message would be refused: the task fails instead
            outcome.update(ok=False, result=None, error={
                "category": "handler_error",
                "message": f"outcome of {size} bytes exceeds the {MAX_OUTCOME_BYTES}-byte "
                           "limit of a task.finished"})
    return outcome
