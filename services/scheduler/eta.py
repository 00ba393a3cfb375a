"""How long things are expected to take: a type's mean duration, a running task's time
left, a queued task's wait before it starts. All in seconds on the monotonic clock; the
caller adds the wall clock's now where a user reads a time.
"""

from __future__ import annotations

import math

from cortex.services.scheduler.clock import Marks
from cortex.services.scheduler.feasibility import estimate_start
from cortex.services.scheduler.queue import TaskQueue
from cortex.services.scheduler.tasks import PRIORITY_RANK, Task
from cortex.services.scheduler.workers import WorkerRegistry, WorkerState

BUSY, LEAVING = WorkerState.BUSY, WorkerState.LEAVING

DEFAULT_DURATION = 1.0  # seconds a task of a type nothing is known of is expected to take


class Estimates:
    def __init__(self, predictor, queue: TaskQueue, registry: WorkerRegistry,
                 tasks: dict[str, Task], marks: dict[str, Marks]):
        self.predictor = predictor  # prediction.Predictor, or None (then per-type averages)
        self.queue = queue
        self.registry = registry
        self.tasks = tasks
        self.marks = marks
        self.avg_duration: dict[str, float] = {}  # type -> seconds (exponential average)

    def learn(self, task_type: str, duration: float) -> None:
        prev = self.avg_duration.get(task_type)
        self.avg_duration[task_type] = duration if prev is None else 0.9 * prev + 0.1 * duration

    def mean_duration(self, task_type: str) -> float:
        if self.predictor is not None:
            prediction = self.predictor.predict(task_type, "medium", "", 0)
            if prediction.source != "default":
                return prediction.duration
        return self.avg_duration.get(task_type, DEFAULT_DURATION)

    def time_left(self, task: Task, now: float, mean: float | None = None) -> float:
        """Predicted seconds until a dispatched task ends (negative once overdue)."""
        if mean is None:
            mean = self.mean_duration(task.type)
        predicted = task.predicted
        expected = predicted.get("duration", mean) if predicted else mean
        marks = self.marks.get(task.id)
        since = marks.dispatched if marks is not None and marks.dispatched is not None else now
        return since + expected - now

    def wait_before_start(self, task_type: str, priority: str, now: float,
                          ahead: int | None = None) -> float:
        """Seconds until a task of this type and priority would start: the tasks ahead of
        it go, each for its predicted duration, to the type's workers as they free up.

        Asked at every submit, so it costs one pass over the workers and no simulation:
        all the tasks ahead take the type's mean duration (see `start_after`)."""
        rank = PRIORITY_RANK[priority]
        if ahead is None:
            counts = self.queue.counts.get(task_type)
            ahead = sum(counts[: rank + 1]) if counts else 0
        tasks = self.tasks
        free = 0  # workers free now (idle, claimed, or between tasks)
        busy: list[Task] = []
        prefetched = 0  # tasks held by busy workers that start before it (lower: recalled)
        for w in self.registry.workers.values():
            state = w.state
            if state is LEAVING or task_type not in w.types:
                continue
            task = tasks.get(w.task) if state is BUSY and w.task is not None else None
            if task is None:
                free += 1
                if ahead < free:
                    return 0.0  # a worker is left free for it after those ahead
            else:
                busy.append(task)
                held = tasks.get(w.prefetched) if w.prefetched is not None else None
                if held is not None and PRIORITY_RANK[held.priority] <= rank:
                    prefetched += 1
        ahead += prefetched
        if not busy:
            free = max(free, 1)  # none registered yet: the least the pool keeps of a type
        mean = self.mean_duration(task_type)
        free_at = [0.0] * free
        for task in busy:
            left = self.time_left(task, now, mean)
            free_at.append(left if left > 0.0 else 0.0)
        return start_after(free_at, ahead, mean)

    def next_free(self, workers, now: float) -> float:
        """Seconds until the first of these busy workers is expected to free up. A task
        past its predicted duration is assumed to need as long again as it is overdue,
        so a stuck task soon stops looking like it will free its worker."""
        means: dict[str, float] = {}  # one prediction per type, not per worker
        best = float("inf")
        for w in workers:
            task = self.tasks.get(w.task or "")
            if task is None or w.state is not WorkerState.BUSY:
                return 0.0  # claimed or between tasks: about to take work
            if task.type not in means:
                means[task.type] = self.mean_duration(task.type)
            best = min(best, abs(self.time_left(task, now, means[task.type])))
        return best


def start_after(free_at: list[float], ahead: int, duration: float) -> float:
    """When the task after `ahead` others starts, each of them (and each worker's next
    task) taking `duration`, the workers free at `free_at` (seconds from now): what
    feasibility.estimate_start simulates, without simulating each task ahead (asked at
    every submit, with thousands queued in a flood). The starts are the merged series
    free_at[j] + k x duration. From the last worker's free time on, the series
    interleave round by round (each worker's next start there falls within one duration
    of it), so an answer there is in closed form; only one before it (a long task
    running beside short ones, and few tasks ahead) is simulated, over those few."""
    free_at = sorted(free_at)
    workers, last = len(free_at), free_at[-1]
    if last - free_at[0] <= duration:
        rounds, place = divmod(ahead, workers)
        return free_at[place] + rounds * duration
    if duration <= 0:
        return free_at[0]  # the tasks ahead take no time: all start when the first is free
    before = [math.ceil((last - f) / duration) for f in free_at]  # starts before `last`
    if ahead < sum(before):
        return estimate_start(0.0, ahead, duration, workers, free_at)
    phases = sorted(f + n * duration for f, n in zip(free_at, before, strict=True))
    rounds, place = divmod(ahead - sum(before), workers)
    return phases[place] + rounds * duration
