"""Will a task fit on this machine now, and when will a queued task start?

Pure: the machine is read through an injected `sample()` (machine.py reads it with
psutil) at most once per interval (never per task), and every function takes the
readings and the time it needs as arguments.

- `Readings`: what one sample saw: the machine's cores and memory, how much of the CPU
  the suite itself used (its services and workers), and the CPU and RSS of each of the
  suite's processes, so that work the suite runs is never counted as someone else's load.
- `ResourceMonitor` keeps the latest `Readings`.
- `task_share()` is what one task holds from its dispatch to its end: its predicted CPU
  seconds spread over its predicted duration (but never less than one sampling interval,
  so a 40 us no-op holds 0.00004 cores, not a whole core), and its predicted memory growth.
- `blocker()` says whether a task's needs fit the headroom the readings leave after what
  the tasks already running hold, and if not, the waiting reason (`"memory"` or `"cpu"`)
  with the figures it compared; `check()` gives the reason alone.
- `estimate_start()` is the ETA: the queue position, the predicted durations ahead and
  the workers of the type, simulated.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

MEMORY_THRESHOLD = 80.0  # percent of memory in use above which non-critical work waits
# Cores of CPU measured busy that a task may still overlap: sampling noise must not keep
# a one-core task off an otherwise idle one-core machine.
CPU_SLACK = 0.1


@dataclass(frozen=True, slots=True)
class Readings:
    cpu_free_cores: float  # cores not busy with load from outside the suite
    mem_available_mb: float  # memory that can be given to new processes without swapping
    mem_percent: float  # memory in use, percent of the total
    mem_total_mb: float = 0.0  # 0: unknown (then pressure is judged on mem_percent alone)
    cpu_cores: int = 0  # 0: unknown
    cpu_suite_cores: float = 0.0  # of the busy cores, those the suite's own processes used
    interval: float = 0.0  # seconds the CPU figures cover (0: unknown)
    # pid -> (cores used over the interval, RSS in MB now), for the suite's processes
    per_pid: Mapping[int, tuple[float, float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The figures an event explains a decision with (the per-process table left out)."""
        return {"cpu_free_cores": round(self.cpu_free_cores, 3),
                "mem_available_mb": round(self.mem_available_mb, 1),
                "mem_percent": self.mem_percent, "mem_total_mb": round(self.mem_total_mb, 1),
                "cpu_cores": self.cpu_cores, "cpu_suite_cores": round(self.cpu_suite_cores, 3)}


class ResourceMonitor:
    """The latest readings, refreshed through `sample()` at most every `interval` seconds.

    `now` comes from the caller (a monotonic clock is best); a clock that went backwards
    also refreshes."""

    def __init__(self, sample: Callable[[], Readings], interval: float = 1.0):
        self.sample = sample
        self.interval = interval
        self.latest: Readings | None = None
        self.sampled_at: float | None = None
        self.samples = 0  # how many times the machine was read

    def readings(self, now: float) -> Readings:
        at = self.sampled_at
        if at is None or now - at >= self.interval or now < at:
            self.latest = self.sample()
            self.sampled_at = now
            self.samples += 1
        return self.latest


def task_share(predicted: Mapping | None, interval: float) -> dict:
    """What a task holds of the machine from its dispatch to its end.

    CPU: its predicted CPU seconds over its predicted duration, the duration counted as
    at least `interval` (the readings cannot see anything shorter, and work that short
    does not keep a core from anyone). Memory: its predicted growth of its worker's RSS.
    Nothing predicted yet (source "default"): nothing held, never a guess."""
    pred = predicted or {}
    if pred.get("source", "default") == "default":
        return {"cpu": 0.0, "memory_mb": 0.0}
    cpu_s = max(0.0, float(pred.get("cpu_s", 0.0) or 0.0))
    duration = max(float(pred.get("duration", 0.0) or 0.0), interval, 1e-6)
    return {"cpu": cpu_s / duration,
            "memory_mb": max(0.0, float(pred.get("memory_mb", 0.0) or 0.0))}


def check(task_needs: Mapping[str, float], readings: Readings,
          held: Mapping[str, float] | None = None, priority: str = "medium",
          memory_threshold: float = MEMORY_THRESHOLD) -> str | None:
    """None if the task fits now, else why it waits: "memory" or "cpu" (see blocker())."""
    found = blocker(task_needs, readings, held, priority, memory_threshold)
    return None if found is None else found[0]


def blocker(task_needs: Mapping[str, float], readings: Readings,
            held: Mapping[str, float] | None = None, priority: str = "medium",
            memory_threshold: float = MEMORY_THRESHOLD) -> tuple[str, dict] | None:
    """None if the task fits now, else (reason, the figures compared): memory first.

    `task_needs`: its `cpu` (cores) and `memory_mb` (growth), as `task_share()` gives.
    `held`: the same, summed over the tasks running now, less what the readings already
    show of them. The detail's `check` names the test that failed:

    - "memory_available", every priority: its memory must fit in what is available, less
      held.
    - "memory_pressure", all but critical: memory in use, plus held, plus its own, must
      stay at or below `memory_threshold` percent of the total (with the total unknown:
      the measured percent alone). Critical work may still run under pressure.
    - "cpu", every priority: its cores must fit in the cores free of outside load, less
      held, plus `CPU_SLACK`; a need larger than the whole machine counts as the machine.
    """
    held = held or {}
    need_mem = max(0.0, float(task_needs.get("memory_mb", 0.0) or 0.0))
    need_cpu = max(0.0, float(task_needs.get("cpu", 0.0) or 0.0))
    held_mem = max(0.0, float(held.get("memory_mb", 0.0) or 0.0))
    held_cpu = max(0.0, float(held.get("cpu", 0.0) or 0.0))
    if need_mem > readings.mem_available_mb - held_mem:
        return "memory", {"check": "memory_available", "need_mb": round(need_mem, 1),
                          "available_mb": round(readings.mem_available_mb, 1),
                          "held_mb": round(held_mem, 1)}
    if priority != "critical":
        if readings.mem_total_mb > 0:
            used = readings.mem_total_mb * readings.mem_percent / 100.0
            percent = 100.0 * (used + held_mem + need_mem) / readings.mem_total_mb
        else:
            percent = readings.mem_percent
        if percent > memory_threshold:
            return "memory", {"check": "memory_pressure", "percent": round(percent, 2),
                              "threshold": memory_threshold, "need_mb": round(need_mem, 1),
                              "held_mb": round(held_mem, 1)}
    if readings.cpu_cores > 0:
        need_cpu = min(need_cpu, float(readings.cpu_cores))
    if need_cpu > readings.cpu_free_cores - held_cpu + CPU_SLACK:
        return "cpu", {"check": "cpu", "need_cores": round(need_cpu, 4),
                       "free_cores": round(readings.cpu_free_cores, 3),
                       "held_cores": round(held_cpu, 4), "slack_cores": CPU_SLACK}
    return None


def estimate_start(now: float, position_ahead: int,
                   predicted_durations_ahead: Sequence[float] | float, workers_of_type: int,
                   busy_remaining: Sequence[float] = ()) -> float:
    """When a queued task is expected to start (same time base as `now`).

    Simulated: each busy worker frees at `now` + the remaining time of its current task
    (`busy_remaining`, negative counts as 0), the others are free at `now`; the
    `position_ahead` tasks ahead of it go in queue order, each to the worker free first,
    and occupy it for its predicted duration; the task starts when the first worker is
    free after that. So an idle worker and nothing ahead gives `now`, and with equal
    durations d, w workers and n ahead (all idle) it is `now + (n // w) * d`.

    `predicted_durations_ahead`: one duration per task ahead, in queue order, or one
    duration for all; a list shorter than `position_ahead` is continued with its mean.
    `workers_of_type`: workers that can take it (idle or busy); none registered yet counts
    as one, the least the pool keeps of a type. O(position_ahead x log workers).
    """
    if position_ahead < 0:
        raise ValueError("position_ahead must be >= 0")
    if isinstance(predicted_durations_ahead, int | float):
        durations: Sequence[float] = ()
        fill = float(predicted_durations_ahead)
    else:
        durations = predicted_durations_ahead
        if position_ahead > len(durations) == 0:
            raise ValueError("no predicted duration for the tasks ahead")
        fill = sum(durations) / len(durations) if durations else 0.0
    busy = [now + max(0.0, float(r)) for r in busy_remaining]
    workers = max(workers_of_type, len(busy), 1)
    free = [now] * (workers - len(busy)) + busy
    heapq.heapify(free)
    for i in range(position_ahead):
        d = durations[i] if i < len(durations) else fill
        heapq.heapreplace(free, free[0] + max(0.0, float(d)))
    return free[0]
