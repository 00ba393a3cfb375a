"""Processes that end with what started them, and the processes of a suite or a task found
wherever they went.

- `die_with_parent()`: a process ends when its parent does. On Linux a parent-death
  signal (`PR_SET_PDEATHSIG`), checked against the parent we expected so a parent that
  died before the signal was armed is not missed; elsewhere a thread watching the
  parent's pid (a second at most).
- `become_subreaper()`: orphaned descendants (a handler's `setsid` child, a daemonizing
  command) are re-parented to us instead of init, so we can find and end them
  (`PR_SET_CHILD_SUBREAPER`, Linux). Elsewhere it returns False and callers fall back on
  the tags below.
- Tags in the environment, inherited by every descendant even across `setsid`: the suite
  (`CORTEX_SUITE`, its home), the worker (`CORTEX_WORKER`) and the task in hand
  (`CORTEX_TASK`). `tagged()` finds live processes by tag.
- `end()`: TERM, then KILL after a grace, for a set of processes and their descendants.

`CORTEX_PORTABLE=1` switches the Linux-only calls off (what macOS has), so the fallbacks
are tested on Linux too (`.ci/run` runs the lifecycle tests a second time so).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

PORTABLE_ENV = "CORTEX_PORTABLE"
SUITE_TAG = "CORTEX_SUITE"
WORKER_TAG = "CORTEX_WORKER"
TASK_TAG = "CORTEX_TASK"
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PARENT_WATCH = 0.5  # seconds between looks at the parent's pid (the portable fallback)


def linux_calls() -> bool:
    """Whether to use the Linux-only process calls (not on other systems, nor when
    CORTEX_PORTABLE=1 asks for the portable fallbacks)."""
    return sys.platform.startswith("linux") and os.environ.get(PORTABLE_ENV, "") in ("", "0")


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Send ourselves `sig` when the process `parent` (our parent now, or it was) dies."""
    if linux_calls() and _prctl(PR_SET_PDEATHSIG, sig):
        if os.getppid() != parent:  # it died before the signal was armed
            os.kill(os.getpid(), sig)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_WATCH)  # a watcher thread: there is nothing to poll on
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def arm_in_child(parent: int, sig: int = signal.SIGKILL) -> None:
    """For `preexec_fn`, between fork and exec: the parent-death signal (Linux), and an
    exit at once if `parent` is already gone. Elsewhere the child arms its own watcher
    (`die_with_parent`)."""
    if linux_calls():
        _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os._exit(1)


def become_subreaper() -> bool:
    """Adopt our orphaned descendants; False where that is not available (or switched off)."""
    return linux_calls() and _prctl(PR_SET_CHILD_SUBREAPER, 1)


def supervisord_parent(home) -> int | None:
    """The supervisord that started this process, if supervisord started it: its pid when
    it is our parent, 0 when it is gone already (we are an orphan of an earlier
    generation), None when we were not started by supervisord."""
    if not os.environ.get("SUPERVISOR_ENABLED"):
        return None
    try:
        recorded = int((home / "run" / "supervisord.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        recorded = None
    parent = os.getppid()
    if recorded is not None and recorded != parent:
        return 0
    return parent


def _has_tag(pid: int, tag: str, value: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{tag}={value}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def tagged_below(tag: str, value: str, adopter: int) -> list[psutil.Process]:
    """Live processes tagged `tag=value` (a task's, a worker's), wherever they went:
    below `adopter` (the pool, a subreaper, adopts what a handler's children orphaned).
    Without the Linux calls orphans go to init: every process is looked at."""
    import psutil  # here: a worker imports this module and rarely calls these
    if not linux_calls():
        return tagged(tag, value)
    try:
        pids = {p.pid for p in psutil.Process(adopter).children(recursive=True)}
    except psutil.Error:
        return tagged(tag, value)
    pids.discard(os.getpid())
    found = []
    for pid in pids:
        if _has_tag(pid, tag, value):
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:
                continue
    return found


def tagged(tag: str, value: str) -> list[psutil.Process]:
    """Live processes (of any parent) whose environment has `tag=value`, not ourselves
    nor our ancestors."""
    import psutil  # here: a worker imports this module and rarely calls these
    mine = {os.getpid()}
    try:
        mine.update(p.pid for p in psutil.Process().parents())
    except psutil.Error:
        pass
    found = []
    # Fresh objects, not process_iter()'s cache: a cached one whose pid was reused reads
    # the new process's environment but refuses to signal it (pids wrap at 32768 here).
    for pid in psutil.pids():
        if pid in mine:
            continue
        try:
            proc = psutil.Process(pid)
            if proc.environ().get(tag) == value and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def with_descendants(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    import psutil  # here: a worker imports this module and rarely calls these
    everything: dict[int, psutil.Process] = {}
    for proc in procs:
        everything[proc.pid] = proc
        try:
            for child in proc.children(recursive=True):
                everything[child.pid] = child
        except psutil.Error:
            continue
    everything.pop(os.getpid(), None)
    return list(everything.values())


def end(procs: Iterable[psutil.Process], grace: float = 1.0) -> list[psutil.Process]:
    """TERM the processes and their descendants, KILL what is left after `grace`
    seconds; returns those that were alive when asked (zombies are not counted)."""
    import psutil  # here: a worker imports this module and rarely calls these
    targets = []
    for proc in with_descendants(procs):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)  # a stopped process must run to see the TERM
            targets.append(proc)
        except psutil.Error:
            continue
    if not targets:
        return []
    _, alive = psutil.wait_procs(targets, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=1.0)
    return targets


def describe(procs: Iterable[psutil.Process]) -> list[str]:
    """`pid (command)` for each, for a message."""
    import psutil  # here: a worker imports this module and rarely calls these
    out = []
    for proc in procs:
        try:
            cmd = " ".join(proc.cmdline())[:80] or proc.name()
        except psutil.Error:
            cmd = "?"
        out.append(f"{proc.pid} ({cmd})")
    return out
