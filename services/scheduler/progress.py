"""A handler's progress (`ctx.progress()`) as `task.progress` events, rate-limited.

The latest fraction and message are always kept in the task (its status shows them);
events go out at most once per PROGRESS_EVERY seconds per task. A report that comes
sooner is kept and written when its turn comes, and the last one before the attempt ends
is always written, before the event that ends it.
"""

from __future__ import annotations

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.tasks import Task

PROGRESS_EVERY = 0.5  # seconds between two task.progress events of one task
MAX_MESSAGE = 500


class ProgressEvents:
    def __init__(self):
        self._last: dict[str, float] = {}  # task id -> when its last event went (monotonic)
        self._pending: dict[str, Task] = {}  # task id -> a report not written yet

    def report(self, fx: Effects, task: Task, body: dict, now: float) -> None:
        """A progress report for the task's current attempt (fields checked here)."""
        fraction = wire.field_number(body, "fraction", lo=0, hi=1, required=False,
                                     default=task.progress)
        message = wire.field_str(body, "message", max_len=MAX_MESSAGE, required=False,
                                 default="", allow_empty=True)
        task.progress, task.message = fraction, message
        last = self._last.get(task.id)
        if last is None or now - last >= PROGRESS_EVERY:
            self._write(fx, task, now)
        else:
            self._pending[task.id] = task

    def due(self, fx: Effects, now: float) -> float | None:
        """Write the kept reports whose turn came; returns when the next one's does."""
        soonest = None
        for task_id, task in list(self._pending.items()):
            turn = self._last.get(task_id, now) + PROGRESS_EVERY
            if turn <= now:
                self._write(fx, task, now)
            else:
                soonest = turn if soonest is None else min(soonest, turn)
        return soonest

    def end(self, fx: Effects, task: Task) -> None:
        """The attempt ends: write its last report if it is still kept, then forget it."""
        if self._pending.pop(task.id, None) is not None:
            self._emit(fx, task)
        self._last.pop(task.id, None)

    def _write(self, fx: Effects, task: Task, now: float) -> None:
        self._pending.pop(task.id, None)
        self._last[task.id] = now
        self._emit(fx, task)

    @staticmethod
    def _emit(fx: Effects, task: Task) -> None:
        fx.emit("task.progress", {"fraction": task.progress, "message": task.message,
                                  "attempt": task.attempt}, task.id, task.worker)
