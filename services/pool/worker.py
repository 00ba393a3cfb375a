"""A pooled worker process (started by the pool, never by hand).

    python -m cortex.services.pool.worker --home DIR --group NAME --name NAME

Runs the `Worker` helper of the client library with the handlers configured for its
group's task types. It dies with the pool (parent-death signal, set by the pool).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import zmq

from cortex.protocol import locate
from cortex.protocol.peer import LINGER_MS
from cortex.protocol.worker import Worker
from cortex.services.pool import handlers
from cortex.services.runtime import settings as config
from cortex.services.runtime.entry import exit_now


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="cortex-worker", description=__doc__)
    parser.add_argument("--home")
    parser.add_argument("--group", default="default")
    parser.add_argument("--name")
    parser.add_argument("--idle-exit", type=float, default=None,
                        help="retire after this many idle seconds (surge workers)")
    args = parser.parse_args(argv)
    home = locate.find_home(args.home)
    logging.basicConfig(level=os.environ.get("CORTEX_LOG_LEVEL", "WARNING"), stream=sys.stderr,
                        format=f"%(asctime)s worker {args.name}[%(process)d] %(message)s")
    settings = config.load(home)
    group = next(g for g in settings.groups if g.name == args.group)
    table = {t: handlers.resolve(settings.handlers[t]) for t in group.types}
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
