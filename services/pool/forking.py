"""Workers forked from the pool rather than started anew.

The pool has imported what a worker runs (the `Worker` helper, pyzmq, msgpack, the
built-in handlers); a forked worker shares those pages with the pool and with every other
worker (copy-on-write), where a started one loads its own interpreter and modules. It is
still the pool's own child in its own session: the pool reaps it, kills its process group
and finds what it left by its tag exactly as for a started one. A group's own handler
modules are imported by each worker after the fork, never into the pool.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import traceback
from typing import BinaryIO, NoReturn

from cortex.services.pool import worker
from cortex.services.runtime import lineage

# What the pool's process does on these; a worker starts from the defaults.
RESET_SIGNALS = (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP)


def can_fork() -> bool:
    """Linux only: elsewhere a fork without exec is not safe with every library (and the
    portable mode, which stands for those systems, starts workers anew too)."""
    return lineage.linux_calls()


def fork_worker(argv: list[str], tag: dict[str, str], pool: int) -> tuple[int, BinaryIO]:
    """A worker running `worker.main(argv)` with `tag` in its environment; its pid and
    the read end of its stderr."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _become_worker(argv, tag, pool, write_fd)
    os.close(write_fd)
    return pid, os.fdopen(read_fd, "rb", buffering=0)


def _become_worker(argv: list[str], tag: dict[str, str], pool: int,
                   stderr_fd: int) -> NoReturn:
    code = 1
    try:
        # The pool's objects stay out of the collector's reach: it would write to each
        # one's header, and so copy every page the worker shares with the pool.
        gc.freeze()
        signal.set_wakeup_fd(-1)  # the pool's wake-up socket is not ours
        for sig in RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()
        lineage.arm_in_child(pool, signal.SIGKILL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(stderr_fd, 2)
        _close_from(3)  # the pool's sockets, journal and pipes
        os.environ.update(tag)  # inherited by whatever its handlers start
        worker.main(argv)
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


def _close_from(low: int) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(low, 65536)
        return
    for fd in fds:
        if fd >= low:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory's own descriptor, closed already
