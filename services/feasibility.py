"""Will a task fit on this machine now, and when will a queued task start?

Pure: the machine is read through an injected `sample()` at most once per interval (never
per task), and every function takes the readings and the time it needs as arguments.

- `ResourceMonitor` keeps the latest `Readings`.
- `check()` says whether a task's predicted needs fit the headroom left by the readings
  and by the tasks dispatched since (which the sample cannot show yet), and if not, the
  waiting reason: `"memory"` or `"cpu"`.
- `estimate_start()` is the ETA: the queue position, the predicted durations ahead and
  the workers of the type, simulated.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

MB = 1024 * 1024
MEMORY_THRESHOLD = 80.0  # percent of memory in use above which non-critical work waits
# Cores of CPU measured busy that a task may still overlap: the suite's own processes and
# sampling noise must not keep a one-core task off an otherwise idle one-core machine.
CPU_SLACK = 0.1


@dataclass(frozen=True, slots=True)
class Readings:
    cpu_free_cores: float  # cores not busy over the last sampling interval
    mem_available_mb: float  # memory that can be given to new processes without swapping
    mem_percent: float  # memory in use, percent of the total
    mem_total_mb: float = 0.0  # 0: unknown (then pressure is judged on mem_percent alone)
    cpu_cores: int = 0  # 0: unknown

    def as_dict(self) -> dict:
        return asdict(self)


def sample_machine() -> Readings:
    """psutil's view of the machine. CPU is the busy share since the previous call, so the
    very first call after start-up reads as idle (psutil returns 0.0)."""
    import psutil

    cores = os.cpu_count() or 1
    busy = psutil.cpu_percent(None)
    mem = psutil.virtual_memory()
    return Readings(cpu_free_cores=cores * (1.0 - busy / 100.0),
                    mem_available_mb=mem.available / MB, mem_percent=mem.percent,
                    mem_total_mb=mem.total / MB, cpu_cores=cores)


class ResourceMonitor:
    """The latest readings, refreshed through `sample()` at most every `interval` seconds.

    `now` comes from the caller (a monotonic clock is best); a clock that went backwards
    also refreshes."""

    def __init__(self, sample: Callable[[], Readings] = sample_machine, interval: float = 1.0):
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


def check(task_needs: Mapping[str, float], readings: Readings,
          committed: Mapping[str, float] | None = None, priority: str = "medium",
          memory_threshold: float = MEMORY_THRESHOLD) -> str | None:
    """None if the task fits now, else why it waits: "memory" or "cpu" (memory first).

    `task_needs`: predicted `cpu` (cores, e.g. 0.5) and `memory_mb` (peak).
    `committed`: the same for tasks dispatched since the readings were taken.

    - memory, every priority: its memory must fit in what is available, less committed.
    - memory pressure, all but critical: memory in use, plus committed, plus its own,
      must stay at or below `memory_threshold` percent of the total (with the total
      unknown: the measured percent alone). Critical work may still run under pressure.
    - cpu, every priority: its cores must fit in the free cores, less committed, plus
      `CPU_SLACK`; a need larger than the whole machine counts as the whole machine.
    """
    committed = committed or {}
    need_mem = max(0.0, float(task_needs.get("memory_mb", 0.0) or 0.0))
    need_cpu = max(0.0, float(task_needs.get("cpu", 0.0) or 0.0))
    held_mem = max(0.0, float(committed.get("memory_mb", 0.0) or 0.0))
    held_cpu = max(0.0, float(committed.get("cpu", 0.0) or 0.0))
    if need_mem > readings.mem_available_mb - held_mem:
        return "memory"
    if priority != "critical":
        if readings.mem_total_mb > 0:
            used = readings.mem_total_mb * readings.mem_percent / 100.0
            percent = 100.0 * (used + held_mem + need_mem) / readings.mem_total_mb
        else:
            percent = readings.mem_percent
        if percent > memory_threshold:
            return "memory"
    if readings.cpu_cores > 0:
        need_cpu = min(need_cpu, float(readings.cpu_cores))
    if need_cpu > readings.cpu_free_cores - held_cpu + CPU_SLACK:
        return "cpu"
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
