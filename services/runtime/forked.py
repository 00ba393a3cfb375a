"""A file written by a forked copy of this process, so a large snapshot never stops the
service's loop.

Built in the loop, the scheduler's snapshot (its task table, up to `retention` finished
tasks) took 25-120 ms on this kind of machine: no message read, no worker fed meanwhile,
every 5 s under load. `os.fork()` gives a child the state as it was at that instant
(copy on write); the child turns it into bytes, writes them to a temp file beside the
target, fsyncs and exits, while the parent goes on. The parent alone puts the file in
place, once it has reaped a child that succeeded (`ForkedWrite.poll`), so a child that
dies, is killed or outlives its parent leaves at most a temp file, which
`durable.remove_temp_files()` clears at the next start.

The child touches nothing the parent shares: no socket, no lock, no log handler; its
signal handlers and the runtime's wake-up fd are reset, every inherited descriptor is
closed (no flock on the journal outlives the parent through it), and it ends with
`os._exit`, so no destructor or atexit hook runs. On Linux it also dies with its parent.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
from collections.abc import Callable
from pathlib import Path

from cortex.services.runtime import lineage
from cortex.services.runtime.durable import FILE_MODE, TEMP_SUFFIX


def temp_path(target: Path, pid: int) -> Path:
    """Where the child `pid` writes: a temp name `remove_temp_files(target)` matches."""
    return target.with_name(f".{target.name}.forked-{pid}{TEMP_SUFFIX}")


class ForkedWrite:
    """At most one child at a time writing `target`'s next content."""

    def __init__(self, target: Path):
        self.target = target
        self.pid: int | None = None
        self.tag = None  # what the caller needs back when the child is done

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, produce: Callable[[], bytes], tag=None) -> None:
        """Fork; the child writes `produce()` to its temp file. Raises OSError when the
        fork fails (the caller writes in place instead)."""
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _child(produce, temp_path(self.target, os.getpid()), parent)
        self.pid, self.tag = pid, tag

    def poll(self, block: bool = False) -> tuple[Path | None, object] | None:
        """None while the child runs; else (its temp file, or None if it failed, and the
        tag given to start). The child is reaped either way."""
        if self.pid is None:
            return None
        try:
            done, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: its outcome is unknown
            done, status = self.pid, -1
        if done == 0:
            return None
        pid, tag = self.pid, self.tag
        self.pid = self.tag = None
        tmp = temp_path(self.target, pid)
        if status != -1 and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return tmp, tag
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None, tag

    def cancel(self) -> None:
        """Kill the running child (by its pid), reap it, remove what it wrote."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        found = self.poll(block=True)
        if found is not None and found[0] is not None:
            with contextlib.suppress(OSError):
                found[0].unlink()


def _child(produce: Callable[[], bytes], tmp: Path, parent: int) -> None:
    code = 1
    try:
        gc.disable()  # short-lived: a collection would only copy the pages it shares
        lineage.arm_in_child(parent, signal.SIGKILL)
        signal.set_wakeup_fd(-1)  # else a signal's byte could land in our file
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        os.closerange(3, _max_fd())
        data = produce()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        code = 0
    except BaseException:  # noqa: BLE001 - whatever happens, the child only exits
        code = 1
    finally:
        os._exit(code)


def _max_fd() -> int:
    try:
        return min(os.sysconf("SC_OPEN_MAX"), 1 << 20)
    except (OSError, ValueError):
        return 4096
