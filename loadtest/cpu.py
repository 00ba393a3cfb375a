"""CPU of the suite's processes, read as finely as the system allows: every thread's
nanoseconds from /proc/PID/task/*/schedstat (Linux), else the process's CPU times in
10 ms ticks; what a process reaped meanwhile (a snapshot or training child) in ticks."""

from __future__ import annotations

import glob
import time

import psutil


def cpu_ns(pid: int) -> int | None:
    """Nanoseconds of CPU of every thread of `pid` (None: gone, or no schedstat)."""
    total, found = 0, False
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return total if found else None


def cpu_seconds(pids) -> dict[int, float]:
    """pid -> seconds of CPU: its own (every thread's nanoseconds where the system keeps
    schedstat, else 10 ms ticks) and what it reaped (children's, in ticks)."""
    out = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        own = cpu_ns(pid)
        out[pid] = (own / 1e9 if own is not None else times.user + times.system) \
            + times.children_user + times.children_system
    return out


def cpu_by_role(roles: dict[int, str], seconds: float) -> dict[str, float]:
    """Seconds of CPU by role over `seconds` from now (a process gone meanwhile is not
    counted)."""
    before = cpu_seconds(roles)
    time.sleep(seconds)
    after = cpu_seconds(roles)
    by_role: dict[str, float] = {}
    for pid, role in roles.items():
        if pid in before and pid in after:
            by_role[role] = by_role.get(role, 0.0) + max(0.0, after[pid] - before[pid])
    return by_role
