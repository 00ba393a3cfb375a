"""A pooled worker process (started by the pool, never by hand).

    python -m cortex.services.pool.worker --home DIR --group NAME --name NAME

Runs the `Worker` helper of the client library with the handlers configured for its
group's task types. It dies with the pool (parent-death signal set by the pool, or a
thread watching the pool's pid: runtime/lineage.py). A task's processes end with it: each
handler runs with `CORTEX_TASK` set to its task id, inherited by whatever it starts (even
in a new session), and what is still alive when the handler returns is ended.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import resource
import signal
import sys

import zmq

from cortex.protocol import locate
from cortex.protocol.peer import LINGER_MS
from cortex.protocol.worker import Worker
from cortex.services.pool import handlers
from cortex.services.runtime import lineage
from cortex.services.runtime import settings as config
from cortex.services.runtime.entry import exit_now

END_GRACE = 1.0  # seconds a task's leftover processes get between TERM and KILL


def _started_processes(before: int) -> bool:
    """Did anything run in a child process since `before` (children's page faults)?
    A reaped child always adds its faults; one not reaped yet is still our child."""
    if resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt != before:
        return True
    if not hasattr(os, "waitid"):  # macOS: cannot tell cheaply, so look
        return True
    try:  # no children at all raises; WNOWAIT leaves a zombie for its Popen to reap
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def ending_with_task(handler, pool: int, log: logging.Logger):
    """`handler`, run with the task's tag in the environment; whatever it started that is
    still alive when it returns (or raises) is ended: TERM, KILL after END_GRACE."""

    @functools.wraps(handler)
    def run(ctx):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        os.environ[lineage.TASK_TAG] = ctx.id
        try:
            return handler(ctx)
        finally:
            os.environ.pop(lineage.TASK_TAG, None)
            if _started_processes(before):
                left = lineage.tagged_below(lineage.TASK_TAG, ctx.id, pool)
                if left:
                    log.warning("task %s ended: ending what it left running: %s", ctx.id,
                                ", ".join(lineage.describe(left)))
                    lineage.end(left, END_GRACE)

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="cortex-worker", description=__doc__)
    parser.add_argument("--home")
    parser.add_argument("--group", default="default")
    parser.add_argument("--name")
    parser.add_argument("--idle-exit", type=float, default=None,
                        help="retire after this many idle seconds (surge workers)")
    args = parser.parse_args(argv)
    home = locate.find_home(args.home)
    # force: a worker forked from the pool (forking.py) replaces the pool's logging.
    logging.basicConfig(level=os.environ.get("CORTEX_LOG_LEVEL", "WARNING"), stream=sys.stderr,
                        format=f"%(asctime)s worker {args.name}[%(process)d] %(message)s",
                        force=True)
    pool = os.getppid()
    lineage.die_with_parent(pool, signal.SIGKILL)  # armed by the pool too, where it can
    settings = config.load(home)
    group = next(g for g in settings.groups if g.name == args.group)
    log = logging.getLogger("cortex.worker")
    table = {t: ending_with_task(handlers.resolve(settings.handlers[t]), pool, log)
             for t in group.types}
    own_keys = locate.suite_key_path(home)  # on tcp: the suite's own key pair
    worker = Worker(table, home=home, name=args.name,
                    heartbeat=settings.scheduler.task_heartbeat,
                    max_tasks=group.max_tasks or None, max_rss_mb=group.max_rss_mb or None,
                    idle_exit=args.idle_exit,
                    key_file=own_keys if own_keys.exists() else None)
    worker.run()
    # What it sent goes out within the linger; then skip the interpreter's teardown, which
    # would hold up the pool's stop (and so the suite's) for each worker.
    zmq.Context.instance().destroy(linger=LINGER_MS)
    exit_now(0)


if __name__ == "__main__":
    main()
