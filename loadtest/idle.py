"""What an idle suite costs, window by window after its last task, by process.

    python -m cortex.loadtest.idle
    python -m cortex.loadtest.idle --windows 6 --window 5 --after 8

Starts a fresh suite (`--workers` pooled workers), runs the peer benchmark's warm-up on
it (`--tasks` tasks of `--task-seconds` each from `--clients` closed-loop clients, so that
every worker has worked), then reads the CPU of every process of the suite over
`--windows` consecutive windows of `--window` seconds, the first starting `--after`
seconds after the last task ended. The peer benchmark's idle probe is the first window of
the defaults (3 s from half a second after the work).

CPU is read from /proc/PID/task/*/schedstat (nanoseconds of every thread) where the
system has it, else from the process's CPU times (10 ms ticks), plus what the suite's
processes reaped meanwhile (a snapshot child, a training child; in ticks). Reported per
window as a share of one core: the suite, and each role (services by name, the workers
summed, the model trainer apart). Measures, never asserts.
"""

from __future__ import annotations

import argparse
import sys
import time

from .count import drive
from .cpu import cpu_by_role
from .harness import Target


def warm_up(home: str, tasks: int, clients: int, seconds: float) -> int:
    """`tasks` sleep tasks from `clients` threads, each its own Client; how many failed."""
    return drive(home, tasks, clients, "submit-wait", task_type="sleep",
                 payload={"seconds": seconds})


def measure(target: Target, windows: int, window: float) -> list[dict]:
    rows = []
    for _ in range(windows):
        by_role = cpu_by_role(target.roles(), window)
        rows.append({"suite": sum(by_role.values()) / window,
                     "by_role": {k: v / window for k, v in sorted(by_role.items())}})
    return rows


def markdown(rows: list[dict], after: float, window: float) -> str:
    roles = sorted({r for row in rows for r in row["by_role"]})
    lines = ["| after the work | suite | " + " | ".join(roles) + " |",
             "| --- | --- | " + " | ".join("---" for _ in roles) + " |"]
    for i, row in enumerate(rows):
        start = after + i * window
        cells = [f"{100 * row['by_role'].get(r, 0.0):.2f}" for r in roles]
        lines.append(f"| {start:.1f}-{start + window:.1f} s | **{100 * row['suite']:.2f}** | "
                     + " | ".join(cells) + " |")
    return ("% of one core, by window\n\n" + "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cortex.loadtest.idle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=20)
    p.add_argument("--tasks", type=int, default=200, help="warm-up tasks")
    p.add_argument("--clients", type=int, default=100, help="warm-up clients (threads)")
    p.add_argument("--task-seconds", type=float, default=0.1, help="each warm-up task's sleep")
    p.add_argument("--after", type=float, default=0.5,
                   help="seconds from the last task to the first window")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=float, default=3.0, help="seconds per window")
    args = p.parse_args(argv)
    if min(args.workers, args.tasks, args.clients, args.windows) < 1:
        p.error("--workers, --tasks, --clients and --windows must be at least 1")
    if not (0 <= args.task_seconds <= 60 and 0 <= args.after <= 3600
            and 0.1 <= args.window <= 3600):
        p.error("--task-seconds must be within 0..60, --after within 0..3600, --window "
                "within 0.1..3600")
    with Target(None, workers=args.workers, fsync="group") as target:
        failed = warm_up(str(target.home), args.tasks, args.clients, args.task_seconds)
        time.sleep(args.after)  # the quiet measured starts this long after the work
        rows = measure(target, args.windows, args.window)
    print(f"{args.workers} workers; warm-up {args.tasks} tasks of {args.task_seconds} s from "
          f"{args.clients} clients ({failed} failed)\n")
    print(markdown(rows, args.after, args.window))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
