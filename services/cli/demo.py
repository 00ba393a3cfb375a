"""`cortex demo`: the load-test package's demo workload, run from the command line."""

from __future__ import annotations

import signal

from .argtypes import positive_int, seconds
from .reach import home_of, load_settings
from .registry import Exit, arg, command
from .render import emit

EXIT_BY_OUTCOME = {"ok": Exit.OK, "failed": Exit.FAILED, "timed out": Exit.TIMEOUT,
                   "interrupted": Exit.INTERRUPTED}


@command("demo",
         arg("--tasks", type=positive_int, default=200, metavar="N",
             help="tasks to run (default 200)"),
         arg("--agents", type=positive_int, default=8, metavar="N",
             help="client agents submitting concurrently (default 8)"),
         arg("--seed", type=int, default=1, help="random seed of the workload"),
         arg("--timeout", type=seconds, default=120.0, metavar="S",
             help="seconds the workload may take (default 120)"))
def cmd_demo(args):
    """Run a small mixed workload end to end and print what happened.

    Starts the suite in the home if it is not running (and stops it afterwards, leaving
    nothing behind), submits echo, sleep and simulated_agent tasks of mixed priorities and
    token budgets from several agents at once, counts results as they arrive, and prints a
    summary: outcomes, tokens committed against tokens used, events written, latency
    percentiles. On a suite that was already running, what the demo submitted and is not
    finished when it is interrupted or times out is cancelled.

    Exit 0 only if every task reached a final state and the token accounting matched;
    4 when --timeout ran out, 130 when interrupted (Ctrl-C or SIGTERM).
    """
    from cortex.loadtest.demo import run_demo  # the load-test package, only when asked

    home = home_of(args)
    load_settings(home)  # a bad config would crash-loop every service: refuse it here
    previous = signal.signal(signal.SIGTERM, _interrupt)  # clean up as for Ctrl-C
    try:
        outcome = run_demo(home, tasks=args.tasks, agents=args.agents, seed=args.seed,
                           timeout=args.timeout, say=emit)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_BY_OUTCOME.get(outcome, Exit.FAILED)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
