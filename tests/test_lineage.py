"""Finding and ending a task's processes by tag when their pid was used before.

Pids wrap (at 32768 on many machines), so a process started late in a long run often
gets the pid of one seen in an earlier scan. That earlier scan must not make the new
process unkillable (psutil refuses to signal a cached object whose pid was reused).
"""

from __future__ import annotations

import os
import subprocess

import psutil
import pytest

from cortex.services.runtime import lineage

LAST_PID = "/proc/sys/kernel/ns_last_pid"


def _spawn_with_pid(pid: int, env: dict) -> subprocess.Popen | None:
    """A `sleep` with exactly `pid` (set the kernel's last pid, then start it); None when
    another process on the machine took that pid first every time."""
    for _ in range(20):
        with open(LAST_PID, "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(["sleep", "600"], env=env)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


@pytest.mark.skipif(not os.access(LAST_PID, os.W_OK), reason="needs to choose the next pid")
def test_a_tagged_process_on_a_reused_pid_is_found_and_ended():
    first = subprocess.Popen(["sleep", "600"])
    pid = first.pid
    try:
        # A scan while the first holder of the pid lives (psutil caches what it saw).
        assert not lineage.tagged("CORTEX_TEST_REUSE", "yes")
        list(psutil.process_iter())
    finally:
        first.kill()
        first.wait()
    second = _spawn_with_pid(pid, {**os.environ, "CORTEX_TEST_REUSE": "yes"})
    if second is None:
        pytest.skip("the pid was taken by another process each time")
    try:
        found = lineage.tagged("CORTEX_TEST_REUSE", "yes")
        assert [p.pid for p in found] == [pid]
        assert [p.pid for p in lineage.end(found, grace=5.0)] == [pid]
        assert second.wait(timeout=10) is not None  # ended by the signal, not left alive
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
