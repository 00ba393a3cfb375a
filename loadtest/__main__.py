"""python -m cortex.loadtest: drive a real Cortex suite with many agents; write a report.

    python -m cortex.loadtest                          # every scenario, own suite
    python -m cortex.loadtest --scenario noop,latency --tasks 5000 --runs 3
    python -m cortex.loadtest --home ~/.cortex --scenario rate --rate 500 --duration 10

Without --home it starts its own suite (supervisord as its child) in a temporary home
under /tmp and stops it afterwards, checking nothing is left behind. Output in --out:
report.json, report.md and PNG charts (with the "plot" extra, i.e. matplotlib).

The mixed scenario runs the synthetic workload of cortex.services.scheduler.prediction (durations
and token use a known function of type and description, plus noise) in two phases: a
training phase (1,000 tasks when --tasks >= 1,200, else 5/6 of --tasks), then it asks
the scheduler to retrain its prediction model (as `cortex model train` does) and waits
until the new model is loaded, then a measurement phase with the remaining tasks. The
prediction accuracy it reports (share of model-predicted completed tasks within +-25 %
of the measured duration and tokens) is over the measurement phase only. A synthetic
duration of d is run as d ms x --mixed-scale (default 10: 3 -> 30 ms, mean ~0.7 s), so
that scheduling jitter is small against what is predicted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from . import charts, report
from .harness import Target
from .scenarios import SCENARIOS, Session
from .soak import duration_arg
from .viewer import DASHBOARD_PAGES, DashboardPage

DEFAULT_ORDER = ("latency", "rate", "noop", "onetype", "utilization", "priority", "mixed", "sweep",
                 "chaos", "events")  # "dashboard" (it needs a browser) only when asked


def at_least(kind, low: float, *, above: bool = False):
    """An argparse type: a number of `kind` no smaller than `low` (greater, if `above`),
    refused with the rule (a zero wait or count would divide by zero or spin)."""
    def parse_number(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value != value or value < low or (above and value == low):  # NaN too
            raise argparse.ArgumentTypeError(
                f"{text!r}: must be {'greater than' if above else 'at least'} {low:g}")
        return value
    return parse_number


POSITIVE_INT = at_least(int, 1)
POSITIVE = at_least(float, 0, above=True)
NON_NEGATIVE = at_least(float, 0)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m cortex.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", help="attach to the suite running for this home (left running)")
    p.add_argument("--postgres-url", default="",
                   help="the suite started for the test copies its events to this PostgreSQL "
                        "(the events scenario then reports PostgreSQL lag)")
    p.add_argument("--scenario", default="all",
                   help=f"comma-separated: {', '.join(SCENARIOS)} or all (default all); "
                        "or soak alone (hours of a trickle of tasks, watched for leaks)")
    p.add_argument("--agents", type=POSITIVE_INT, default=100, help="concurrent agents (100)")
    p.add_argument("--tasks", type=POSITIVE_INT, default=1000, help="tasks per scenario (1000)")
    p.add_argument("--workers", type=POSITIVE_INT, default=20,
                   help="workers of the suite started for the test (20; ignored with --home)")
    p.add_argument("--rate", type=POSITIVE, default=1000.0, help="rate scenario: tasks/s offered")
    p.add_argument("--duration", type=duration_arg, default=0.0,
                   help="seconds (or 30m, 4h): bounds closed-loop scenarios; rate sends rate "
                        "x duration tasks (0: task-count bound only); soak runs this long "
                        "(default 10m)")
    p.add_argument("--sleep-ms", type=NON_NEGATIVE, default=50.0,
                   help="task length of the utilization and priority scenarios (50)")
    p.add_argument("--sweep-agents", default="10,50,100,200",
                   help="agent counts of the sweep (10,50,100,200)")
    p.add_argument("--mixed-scale", type=POSITIVE, default=10.0,
                   help="mixed scenario: a synthetic duration d runs as d ms x this (10: "
                        "30 ms to ~4 s, mean ~0.7 s, so jitter is small against it); "
                        "larger is more accurate and slower")
    p.add_argument("--chaos-base", default="noop", choices=("noop", "utilization", "mixed"),
                   help="the workload run under chaos")
    p.add_argument("--chaos-interval", type=POSITIVE, default=2.0,
                   help="mean seconds between kills in the chaos scenario")
    p.add_argument("--procs", type=at_least(int, -1), default=-1,
                   help="agent processes (threads within each); -1 auto, 0/1 all threads "
                        "in this process")
    p.add_argument("--runs", type=POSITIVE_INT, default=1, help="repeat, report medians (1)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fsync", default="group", choices=("always", "group", "off"),
                   help="journal fsync policy of the suite started for the test (group)")
    p.add_argument("--dashboard-page", choices=DASHBOARD_PAGES, default=None,
                   help="keep a headless page of the suite's dashboard open during the run "
                        "(Debian's chromium; the dashboard scenario compares noop with and "
                        "without one, the events page unless this names another)")
    p.add_argument("--out", default="loadtest-report", help="output directory")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument("--tcp", action="store_true",
                   help="run its own suite on tcp://127.0.0.1 with CurveZMQ keys")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--keep-home", action="store_true", help="keep the temporary home")
    p.add_argument("--idle-seconds", type=POSITIVE, default=3.0,
                   help="seconds of each idle CPU measurement, before and after (3)")
    p.add_argument("--sample-interval", type=POSITIVE, default=0.5)
    p.add_argument("--call-timeout", type=POSITIVE, default=30.0)
    p.add_argument("--wait-timeout", type=POSITIVE, default=120.0)
    p.add_argument("--grace", type=NON_NEGATIVE, default=30.0,
                   help="seconds to let unfinished tasks finish before calling them lost")
    args = p.parse_args(argv)
    names = DEFAULT_ORDER if args.scenario == "all" else tuple(
        s.strip() for s in args.scenario.split(",") if s.strip())
    if "soak" in names and len(names) > 1:
        p.error("soak runs alone")
    bad = [n for n in names if n not in (*SCENARIOS, "soak")]
    if bad:
        p.error(f"unknown scenario(s): {', '.join(bad)}")
    args.scenarios = list(names)
    try:
        args.sweep_agents = [POSITIVE_INT(x.strip())
                             for x in str(args.sweep_agents).split(",") if x.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(f"--sweep-agents: {e}")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through Target: the suite stops


def main(argv=None) -> int:
    args = parse(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    if args.scenarios == ["soak"]:
        from . import soak

        return soak.run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    runs = []
    from .workloads import SYNTHETIC_TYPES

    extra_types = sorted(SYNTHETIC_TYPES) if "mixed" in args.scenarios else ()
    server, configure = None, None
    if "mixed" in args.scenarios and args.home is None:  # the llm and auto shares
        from . import shares
        from .openai_server import OpenAIServer

        server = OpenAIServer().start()

        def configure(home):
            return shares.suite_config(home, server.base_url)
    args._openai_server = server
    try:
        return _runs(args, out, notes, runs, extra_types, configure)
    finally:
        if server is not None:
            server.stop()


def _runs(args, out, notes, runs, extra_types, configure) -> int:
    for i in range(args.runs):
        print(f"== run {i + 1} of {args.runs}", file=sys.stderr)
        target = Target(args.home, workers=args.workers, fsync=args.fsync,
                        extra_types=extra_types, keep_home=args.keep_home,
                        postgres_url=args.postgres_url, configure=configure, tcp=args.tcp)
        with target:
            if not target.owned:
                args.workers = target.workers = _count_workers(target)
            if args.dashboard_page and "dashboard" not in args.scenarios:
                with DashboardPage(target.home, args.dashboard_page) as page:
                    run = Session(args, target, i).run(args.scenarios)
                    run["dashboard_page"] = page.report()
            else:
                run = Session(args, target, i).run(args.scenarios)
        run["leftovers"] = target.leftovers
        runs.append(run)
        if target.leftovers:
            notes.append(f"run {i + 1}: processes left after stop: {target.leftovers}")
    files = []
    if args.no_charts:
        notes.append("charts skipped (--no-charts)")
    elif not charts.available():
        notes.append("charts skipped: matplotlib is missing (pip install 'cortex-agents[plot]')")
    else:
        files = charts.draw(out, runs[0])
        notes.append("charts are drawn from run 1")
    data = report.build(args, runs, notes)
    report.write(out, data, files)
    met = sum(1 for t in data["targets"] if t["met"])
    print(f"report: {out / 'report.md'} ({met} of {len(data['targets'])} targets met)",
          file=sys.stderr)
    return 0


def _count_workers(target) -> int:
    from cortex.protocol import Client

    deadline = time.monotonic() + 10
    with Client(target.home, timeout=5) as c:
        while True:
            n = len(c.call("pool", "pool.status").get("workers", []))
            if n or time.monotonic() > deadline:
                return n
            time.sleep(0.2)  # the pool is still spawning its workers


if __name__ == "__main__":
    sys.exit(main())
