"""Dispatched and running tasks, watched for their timeout and for silence.

On the monotonic clock, by a scan at most every WATCH_INTERVAL (it is O(tasks in
flight)):

- timeout: the attempt has run longer than the task's `timeout` since its dispatch (since
  the recovery, for a task in flight when the scheduler restarted);
- silence: nothing heard of it (its start, a heartbeat, anything from its worker) for
  `lost_after` seconds (three task heartbeats). After a restart, only a report naming
  the task counts until one comes: the worker's other messages do not.
"""

from __future__ import annotations

from cortex.services.scheduler.clock import Marks
from cortex.services.scheduler.tasks import Task
from cortex.services.scheduler.workers import WorkerRegistry

WATCH_INTERVAL = 0.1  # seconds between scans of running tasks for timeouts and silence


class Watch:
    def __init__(self, marks: dict[str, Marks]):
        self.marks = marks
        self.active: dict[str, Task] = {}  # dispatched or running
        self.next_scan = 0.0

    def add(self, task: Task) -> None:
        self.active[task.id] = task

    def discard(self, task_id: str) -> None:
        self.active.pop(task_id, None)

    def scan_due(self, now: float) -> bool:
        """True at most once per WATCH_INTERVAL."""
        if now < self.next_scan:
            return False
        self.next_scan = now + WATCH_INTERVAL
        return True

    def overdue(self, registry: WorkerRegistry, now: float, lost_after: float,
                orders_left: float = 0.0) -> list[tuple[Task, str, float]]:
        """(task, "timeout" | "silent", seconds) for each task past its timeout (seconds
        run) or silent too long (seconds silent). Neither counts from before
        `orders_left`: while a stalled journal sync held our orders back, no worker
        could run, or speak of, what had not reached it."""
        found = []
        for task in self.active.values():
            marks = self.marks.get(task.id)
            since = marks.dispatched if marks is not None and marks.dispatched is not None \
                else now
            since = max(since, orders_left)
            if now - since > task.timeout:
                found.append((task, "timeout", now - since))
                continue
            seen = max(since, marks.heard or since) if marks is not None else since
            worker = registry.get(task.worker or "")
            # A live worker vouches for its task, except for one in flight at a restart
            # that it never named since: its order, or the reply carrying it, may have
            # been lost with the old scheduler.
            if worker is not None and not (marks is not None and marks.recovered
                                           and marks.heard is None):
                seen = max(seen, worker.last_seen)
            if now - seen > lost_after:
                found.append((task, "silent", now - seen))
        return found
