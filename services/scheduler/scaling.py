"""Surge and autoscaling: when to ask the pool for one more worker of a type.

For a waiting critical task with no idle worker (surge), unless a busy worker frees
sooner than a new one starts (`worker_start`, learned from how long the pool took); and
when the predicted backlog per worker passes `scale_backlog` seconds, at most every
SCALE_COOLDOWN per type. Never past the machine's headroom (feasibility on one more
worker's needs). Each decision is an event with the numbers behind it; the extra workers
retire when idle (the pool's `idle_exit`).
"""

from __future__ import annotations

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.settings import SchedulerSettings
from cortex.services.scheduler.clock import Now
from cortex.services.scheduler.eta import Estimates
from cortex.services.scheduler.feasibility import check, task_share
from cortex.services.scheduler.holds import MachineHolds
from cortex.services.scheduler.queue import TaskQueue
from cortex.services.scheduler.workers import WorkerRegistry, WorkerState

SCALE_COOLDOWN = 2.0  # seconds between scale requests for one type (hysteresis)
WORKER_RSS_MB = 50.0  # a worker's memory before any has reported its own
MAX_SURGE = 8  # workers asked for at once


class Scaler:
    def __init__(self, settings: SchedulerSettings, queue: TaskQueue,
                 registry: WorkerRegistry, estimates: Estimates, holds: MachineHolds,
                 counters: dict):
        self.settings = settings
        self.queue = queue
        self.registry = registry
        self.estimates = estimates
        self.holds = holds
        self.counters = counters
        self.cooldown: dict[str, float] = {}  # type -> no new scale request before (mono)
        self.surged: dict[str, int] = {}  # type -> critical tasks queued at the last request
        self.declined: dict[str, int] = {}  # type -> critical queued when surge last declined
        self.requested: dict[str, float] = {}  # type -> oldest unanswered request (mono)
        self.worker_start_s = settings.worker_start  # learned: request -> registration
        self.worker_rss_mb = WORKER_RSS_MB  # learned from the workers' reports
        self.prefetched: dict[str, int] = {}  # type -> tasks in prefetch slots (prefetch.py)

    def registered(self, types, now: float) -> None:
        """A worker registered: if we asked for one of its type, learn how long it took."""
        for t in types:
            asked = self.requested.pop(t, None)
            if asked is not None and 0 <= now - asked < 60:
                self.worker_start_s = 0.7 * self.worker_start_s + 0.3 * (now - asked)

    def learn_rss(self, rss_mb: float) -> None:
        if rss_mb > 0:
            self.worker_rss_mb = 0.99 * self.worker_rss_mb + 0.01 * rss_mb

    def type_needs(self, task_type: str) -> dict:
        """What one more worker of a type would take from the machine: its interpreter
        (the workers' measured RSS) plus what one of its tasks holds."""
        needs = {"cpu": 0.0, "memory_mb": self.worker_rss_mb}
        predictor = self.estimates.predictor
        if predictor is not None:
            share = task_share(predictor.predict(task_type, "medium", "", 0).as_dict(),
                               self.holds.monitor.interval)
            needs = {"cpu": share["cpu"], "memory_mb": needs["memory_mb"] + share["memory_mb"]}
        return needs

    def scale(self, fx: Effects, now: Now) -> None:
        for task_type, counts in self.queue.counts.items():
            depth = sum(counts) + self.prefetched.get(task_type, 0)  # not started either
            critical = counts[0] > 0
            if not critical:
                self.surged[task_type] = 0
                self.declined.pop(task_type, None)
            # Critical work skips the cooldown once per new critical task (never waits).
            fresh = critical and counts[0] > self.surged.get(task_type, 0)
            if depth <= 0 or (now.mono < self.cooldown.get(task_type, 0.0) and not fresh):
                continue
            workers = self.registry.serving(task_type)
            if any(w.state is WorkerState.IDLE for w in workers):
                continue
            self._consider(fx, task_type, counts, depth, fresh, workers, now)

    def _consider(self, fx: Effects, task_type: str, counts: list[int], depth: int,
                  fresh: bool, workers: list, now: Now) -> None:
        mean = self.estimates.mean_duration(task_type)
        backlog = depth * mean / max(len(workers), 1)
        reason = {"queued": depth, "critical_queued": counts[0], "workers": len(workers),
                  "predicted_task_s": round(mean, 4), "backlog_s": round(backlog, 3),
                  "threshold_s": self.settings.scale_backlog}
        surge = False
        if fresh:
            free_in = self.estimates.next_free(workers, now.mono)
            reason |= {"worker_free_in_s": round(free_in, 4),
                       "worker_start_s": round(self.worker_start_s, 4)}
            surge = free_in >= self.worker_start_s
            if not surge and self.declined.get(task_type) != counts[0]:
                self.declined[task_type] = counts[0]
                fx.emit("scheduler.surge_declined", {
                    "type": task_type, "why": "a busy worker frees sooner than a new "
                    "one starts", **reason})
        if not surge and backlog <= self.settings.scale_backlog:
            return
        needs = self.type_needs(task_type)
        readings, held = self.holds.readings(now.mono)
        blocked = check(needs, readings, held, "critical" if surge else "medium",
                        self.settings.memory_threshold)
        self.cooldown[task_type] = now.mono + SCALE_COOLDOWN
        self.surged[task_type] = counts[0]
        if blocked is not None:
            self.counters["scale_blocked"] += 1
            fx.emit("scheduler.scale_blocked", {
                "type": task_type, "why": f"no {blocked} headroom for another worker",
                "needs": needs, "readings": readings.as_dict(), **reason})
            return
        add = min(max(1, counts[0]) if surge else 1, MAX_SURGE)
        self.counters["surges" if surge else "scale_ups"] += 1
        reason = {"why": "critical task waiting" if surge else "backlog", **reason,
                  "needs": needs}
        fx.sends.append((b"pool", wire.NOTIFY, b"", {"op": "pool.scale", "type": task_type,
                                                      "add": add, "reason": reason}))
        fx.emit("scheduler.scale", {"type": task_type, "add": add, **reason})
        self.requested.setdefault(task_type, now.mono)
