"""Long polls: replies held until a task ends or the hold is up (`task.wait`, and
`task.submit` with `wait`). The reply is the task either way; its `final` says which.

A re-sent request (same peer and correlation id) replaces its earlier hold rather than
adding one, so one request gets one reply.
"""

from __future__ import annotations

from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.tasks import Task


class Waiters:
    def __init__(self):
        self.by_task: dict[str, dict[tuple[bytes, bytes], float]] = {}  # id -> who -> until

    def hold(self, task_id: str, peer: bytes, corr: bytes, until: float) -> None:
        """Reply to (peer, corr) when the task ends, or at `until` (monotonic)."""
        self.by_task.setdefault(task_id, {})[(peer, corr)] = until

    def wake(self, fx: Effects, task: Task) -> None:
        """The task ended: answer everyone waiting for it."""
        for peer, corr in self.by_task.pop(task.id, ()):
            fx.reply(peer, corr, task.answer())

    def expire(self, fx: Effects, tasks: dict[str, Task], now: float) -> float | None:
        """Answer the holds that are up; returns when the next one is (None: none)."""
        soonest = None
        for task_id, holds in list(self.by_task.items()):
            task = tasks.get(task_id)
            for who, until in list(holds.items()):
                if until > now:
                    soonest = until if soonest is None else min(soonest, until)
                    continue
                del holds[who]
                if task is not None:
                    fx.reply(who[0], who[1], task.answer())
            if not holds:
                del self.by_task[task_id]
        return soonest
