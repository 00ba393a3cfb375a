"""The suite's processes as the dashboard measures them (psutil)."""

from __future__ import annotations

import psutil


class ProcessSampler:
    """CPU (cores) and memory of the suite's processes, from the pids the services
    reported over the bus (and our own)."""

    def __init__(self):
        self.procs: dict[int, psutil.Process] = {}
        self.last: dict[int, float] = {}
        self.at: float | None = None

    def sample(self, pids: set[int], now: float) -> tuple[float, float]:
        cpu_used = rss = 0.0
        current: dict[int, float] = {}
        for pid in pids:
            try:
                proc = self.procs.get(pid) or self.procs.setdefault(pid, psutil.Process(pid))
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss += proc.memory_info().rss / 2**20
            except psutil.Error:
                self.procs.pop(pid, None)
                continue
            current[pid] = times.user + times.system
            if pid in self.last:
                cpu_used += max(0.0, current[pid] - self.last[pid])
        span = now - self.at if self.at is not None else 0.0
        self.last, self.at = current, now
        for pid in set(self.procs) - set(current):
            del self.procs[pid]
        return (cpu_used / span if span > 0 else 0.0), rss
