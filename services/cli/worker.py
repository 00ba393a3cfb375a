"""`cortex worker MODULE --concurrency N`: serve the `@agent` functions of MODULE on N
worker processes connected to the suite (protocol/agents.py's runner), until Ctrl-C or
SIGTERM (each process finishes the task in hand first)."""

from __future__ import annotations

import logging
import os
import sys

from cortex.protocol import agents

from .reach import home_of
from .registry import CliError, Exit, arg, command


@command("worker", arg("module", metavar="MODULE",
                       help="dotted module name (from the working directory) or a .py file"),
         arg("--concurrency", "-c", type=int, default=1,
             help="worker processes (default 1, at most 64)"))
def cmd_worker(args):
    """Run the agent functions of MODULE (`@agent("type")` on `def f(ctx, ...)`) in N
    processes: heartbeats, timeouts, token enforcement and restarts as the built-in pool.
    A crashed process is restarted; a failing function's traceback is kept with its task
    (`cortex task show ID`)."""
    if not 1 <= args.concurrency <= 64:
        raise CliError(Exit.USAGE, "--concurrency must be between 1 and 64")
    logging.basicConfig(level=os.environ.get("CORTEX_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s agents[%(process)d] %(message)s")
    try:
        return agents.run(args.module, args.concurrency, home_of(args))
    except (ImportError, ValueError, TypeError) as e:
        raise CliError(Exit.CONFIG, f"cannot serve {args.module}: {e}") from None
