"""The machine's readings, through psutil: the I/O half of feasibility.py.

- `MachineSampler` reads the cores and memory and tells the suite's own processes apart,
  so work the suite runs is never counted as someone else's load.
- `fixed_sampler()` gives readings that never change (`CORTEX_FIXED_MACHINE`, as JSON),
  so a test on the real suite is not disturbed by whatever else the machine runs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable

import psutil

from cortex.services.scheduler.feasibility import Readings

MB = 1024 * 1024
FIXED_MACHINE_ENV = "CORTEX_FIXED_MACHINE"  # tests: fixed readings, as JSON


class MachineSampler:
    """psutil's view of the machine, with the suite's own processes told apart.

    `suite_pids()` names the processes whose CPU is the suite's (services, workers); their
    CPU over the interval is subtracted from the machine's busy time, so a busy suite does
    not throttle itself. CPU figures are deltas since the previous call, so the very first
    call reads the machine as idle."""

    def __init__(self, suite_pids: Callable[[], Iterable[int]] = lambda: (),
                 clock: Callable[[], float] = time.monotonic):
        self._psutil = psutil
        self.suite_pids = suite_pids
        self.clock = clock
        self._procs: dict[int, object] = {}
        self._cpu: dict[int, float] = {}  # pid -> CPU seconds at the previous sample
        self._busy: float | None = None  # machine busy CPU seconds at the previous sample
        self._at: float | None = None

    def _machine_busy(self) -> float:
        t = self._psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def __call__(self) -> Readings:
        psutil = self._psutil
        now = self.clock()
        busy = self._machine_busy()
        interval = 0.0 if self._at is None else max(1e-6, now - self._at)
        per_pid: dict[int, tuple[float, float]] = {}
        suite = 0.0
        seen = set()
        for pid in set(self.suite_pids()):
            proc = self._procs.get(pid)
            try:
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss = proc.memory_info().rss / MB
            except psutil.Error:
                self._procs.pop(pid, None)
                continue
            seen.add(pid)
            cpu = times.user + times.system
            before = self._cpu.get(pid)
            cores = (cpu - before) / interval if before is not None and interval else 0.0
            self._cpu[pid] = cpu
            per_pid[pid] = (max(0.0, cores), rss)
            suite += max(0.0, cores)
        for gone in set(self._procs) - seen:
            self._procs.pop(gone, None)
            self._cpu.pop(gone, None)
        cores_total = os.cpu_count() or 1
        machine = 0.0 if self._busy is None or not interval else (busy - self._busy) / interval
        self._busy, self._at = busy, now
        foreign = max(0.0, min(float(cores_total), machine) - suite)
        mem = psutil.virtual_memory()
        return Readings(cpu_free_cores=max(0.0, cores_total - foreign),
                        mem_available_mb=mem.available / MB, mem_percent=mem.percent,
                        mem_total_mb=mem.total / MB, cpu_cores=cores_total,
                        cpu_suite_cores=min(suite, float(cores_total)), interval=interval,
                        per_pid=per_pid)


def sample_machine() -> Readings:
    """One reading of the machine with no suite processes named (a smoke check)."""
    return MachineSampler()()


def fixed_sampler(spec: str) -> Callable[[], Readings]:
    """Readings that never change, from JSON (`CORTEX_FIXED_MACHINE`), so a test on the
    real suite is not disturbed by whatever else the machine runs. Raises ValueError."""
    try:
        raw = json.loads(spec)
    except ValueError as e:
        raise ValueError(f"{FIXED_MACHINE_ENV} is not JSON: {e}") from None
    allowed = {"cpu_free_cores", "mem_available_mb", "mem_percent", "mem_total_mb",
               "cpu_cores"}
    if not isinstance(raw, dict) or set(raw) - allowed or not {
            "cpu_free_cores", "mem_available_mb", "mem_percent"} <= set(raw):
        raise ValueError(f"{FIXED_MACHINE_ENV} must be an object with cpu_free_cores, "
                         f"mem_available_mb, mem_percent (and optionally mem_total_mb, "
                         f"cpu_cores)")
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{FIXED_MACHINE_ENV}: {key} must be a number >= 0")
    fixed = Readings(**raw)
    return lambda: fixed
