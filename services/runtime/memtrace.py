"""Opt-in memory tracing of a service: what grows, by source line (a leak hunt).

With `CORTEX_TRACEMALLOC=N` in its environment (N frames kept per allocation; any other
non-empty value but "0" means 1), a service starts tracemalloc at start-up. Each SIGUSR2
takes a snapshot and logs the allocations that grew most since the previous one (the
first only sets the baseline); the service's stop does the same. So a soak can signal
every service as its measured part starts and read, at the stop, what grew in it:

    CORTEX_TRACEMALLOC=1 python -m cortex.loadtest --scenario soak --duration 6m

tracemalloc slows a process and swells its memory: for diagnosis, never in a measured run.
"""

from __future__ import annotations

import logging
import os
import signal
import tracemalloc

ENV = "CORTEX_TRACEMALLOC"
TOP = 25  # lines logged per report
_NOT_OURS = (tracemalloc.Filter(False, tracemalloc.__file__),
             tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"))


class MemoryTrace:
    def __init__(self, log: logging.Logger, frames: int = 1):
        self.log, self.frames = log, max(1, frames)
        self.base: tracemalloc.Snapshot | None = None
        if not tracemalloc.is_tracing():
            tracemalloc.start(self.frames)

    def mark(self) -> list[str]:
        """Log (and return) the growth since the previous mark; this one is the next base."""
        snapshot = tracemalloc.take_snapshot().filter_traces(_NOT_OURS)
        traced, peak = tracemalloc.get_traced_memory()
        lines = [f"memory trace: {traced / 2**20:.2f} MiB traced (peak {peak / 2**20:.2f})"]
        if self.base is None:
            lines[0] += "; baseline taken"
        else:
            lines[0] += "; top growth by source since the previous mark:"
            by = "traceback" if self.frames > 1 else "lineno"
            for stat in snapshot.compare_to(self.base, by)[:TOP]:
                if stat.size_diff:
                    where = " <- ".join(f"{frame.filename}:{frame.lineno}"
                                        for frame in stat.traceback)
                    lines.append(f"  {stat.size_diff / 1024:+.1f} KiB {stat.count_diff:+d} "
                                 f"blocks (now {stat.size / 1024:.1f} KiB): {where}")
        self.base = snapshot
        for line in lines:
            self.log.warning("%s", line)
        return lines


def from_environment(log: logging.Logger, environ=os.environ) -> MemoryTrace | None:
    """A MemoryTrace marked on SIGUSR2 if the environment asks for one, else None."""
    value = environ.get(ENV, "").strip()
    if value in ("", "0"):
        return None
    trace = MemoryTrace(log, int(value) if value.isdigit() else 1)
    signal.signal(signal.SIGUSR2, lambda signum, frame: trace.mark())
    return trace
