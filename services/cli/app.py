"""The `cortex` command: set up a home, run the suite, and look inside it.

    cortex [--home DIR] COMMAND [ARGS]          (`cortex COMMAND --help` for each)

The CLI is a registry: each command is one function registered with `@command`, and its
docstring is its help (first line: the summary in `cortex --help`). Commands talk to the
suite only through the client library, `Suite` (supervisord) and the event-log readers;
all rendering lives here, never in the services.

The home is `--home`, else $CORTEX_HOME, else `./.cortex`. Output is plain aligned text;
`--json` (where output is data) prints JSON instead: one document, or one object a line
for event streams (`tail`, `events query`, `task trace`).

Exit codes (named in `Exit`): 0 ok; 1 a task failed, was cancelled or died (or the demo's
accounting did not match); 2 bad usage; 3 no suite running in the home; 4 timed out
waiting for a task; 5 no such task; 6 the suite refused the request (queue full, deadline,
budget); 7 a service did not answer; 8 bad configuration or home; 9 a conflict (the file
exists, the task already ended); 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import msgpack
import zmq

from cortex.protocol import errors, locate
from cortex.protocol.client import PRIORITIES, Client
from cortex.protocol.peer import make_socket
from cortex.protocol.vocabulary import TASK_STATES
from cortex.services.control import SERVICES, Suite, SuiteError, become_subreaper
from cortex.services.runtime import settings as config
from cortex.services.runtime.eventlog import EventLogError, read_events
from cortex.services.runtime.process import prepare_home

BUS_TIMEOUT = 10.0  # seconds a command waits for a service's answer
PING_TIMEOUT = 2.0  # seconds `status` gives each service before calling it not alive
MAX_INT = (1 << 63) - 1
STATUS_OPS = {"broker": "broker.status", "events": "events.status", "ledger": "ledger.status",
              "scheduler": "scheduler.status", "pool": "pool.status"}


class Exit(IntEnum):
    OK = 0
    FAILED = 1  # a task failed / was cancelled / died; demo accounting mismatch
    USAGE = 2  # bad arguments (argparse's own code too)
    NOT_RUNNING = 3  # no suite running in the home
    TIMEOUT = 4  # the task did not end within --timeout
    NOT_FOUND = 5  # no such task
    REFUSED = 6  # admission or budget refused the request
    UNAVAILABLE = 7  # a service did not answer in time
    CONFIG = 8  # bad configuration or home directory
    CONFLICT = 9  # the thing exists already / the task already ended
    INTERRUPTED = 130  # Ctrl-C (except for `tail`, where it is the normal way out)


# Error codes from the suite -> exit codes (anything else: UNAVAILABLE).
EXIT_BY_CODE = {
    "bad_request": Exit.USAGE, "too_large": Exit.USAGE, "unknown_type": Exit.USAGE,
    "bad_protocol": Exit.USAGE, "not_found": Exit.NOT_FOUND, "queue_full": Exit.REFUSED,
    "rejected": Exit.REFUSED, "budget_exceeded": Exit.REFUSED, "unauthorized": Exit.REFUSED,
    "timeout": Exit.UNAVAILABLE, "unavailable": Exit.UNAVAILABLE, "conflict": Exit.CONFLICT,
}


class CliError(Exception):
    """A failure the user is told about in one line, with its exit code."""

    def __init__(self, exit_code: Exit, message: str):
        super().__init__(message)
        self.exit = exit_code


# -- the registry ----------------------------------------------------------------------


@dataclass
class Command:
    path: tuple[str, ...]
    func: Callable[[argparse.Namespace], int | None]
    arguments: list[tuple[tuple, dict]] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return (self.func.__doc__ or "").strip().splitlines()[0]


COMMANDS: dict[tuple[str, ...], Command] = {}
GROUPS = {  # help of command groups that are not commands themselves
    ("task",): "Tasks: create, list, show, wait for, cancel, trace.",
    ("events",): "The event history: query it.",
}


def arg(*flags, **options) -> tuple[tuple, dict]:
    return flags, options


def command(name: str, *arguments: tuple[tuple, dict]):
    """Register `func` as `cortex <name>`; its docstring is the help."""

    def register(func):
        path = tuple(name.split())
        COMMANDS[path] = Command(path, func, list(arguments))
        return func

    return register


JSON = arg("--json", action="store_true", help="print JSON instead of text")


# -- argument types (each failure is one line: "argument --x: <why>") ---------------------


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= MAX_INT:
        raise argparse.ArgumentTypeError(f"{text} must be an integer from 0 to 2**63-1")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def json_value(text: str):
    """JSON text, or @FILE to read it from a file."""
    source = text
    if text.startswith("@"):
        try:
            source = Path(text[1:]).read_text()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {e.strerror}") from None
    try:
        return json.loads(source)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None


def deadline(text: str) -> float:
    """A unix time, or +SECONDS from now."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a unix time nor +SECONDS") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a unix time or +SECONDS")
    return time.time() + value if text.strip().startswith("+") else value


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def when(text: str) -> float:
    """A unix time, an ISO 8601 date/time (local unless it says otherwise), or a time
    before now: 30s, 15m, 2h, 1d (a leading minus is allowed: --since=-15m)."""
    raw = text.strip()
    if raw[-1:] in DURATION_UNITS:
        try:
            ago = float(raw[:-1].removeprefix("-"))
        except ValueError:
            pass
        else:
            if math.isfinite(ago) and ago >= 0:
                return time.time() - ago * DURATION_UNITS[raw[-1]]
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a unix time, an ISO date/time or N[smhd] ago") from None
    return moment.timestamp()


def limit_value(text: str) -> int | None:
    if text.lower() in ("none", "unlimited"):
        return None
    return non_negative_int(text)


def window_value(text: str) -> str | None:
    if text.lower() in ("", "none", "never"):
        return None
    if text == "daily":
        return text
    if text.startswith("rolling:"):
        try:
            if int(text.split(":", 1)[1]) > 0:
                return text
        except ValueError:
            pass
    raise argparse.ArgumentTypeError("window must be none, daily or rolling:<seconds>")


# -- the parser ------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits with Exit.USAGE."""

    def error(self, message: str):
        self.exit(Exit.USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _home_option(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--home", metavar="DIR", default=default,
                        help="the suite's home (default: $CORTEX_HOME, else ./.cortex)")


def build_parser() -> Parser:
    top = Parser(prog="cortex", description=(__doc__ or "").split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="Exit codes: " + ", ".join(f"{e.value} {e.name}" for e in Exit))
    _home_option(top, None)
    subparsers: dict[tuple[str, ...], argparse._SubParsersAction] = {}
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): top}

    def parser_for(path: tuple[str, ...]) -> argparse.ArgumentParser:
        if path in parsers:
            return parsers[path]
        parent = parser_for(path[:-1])
        if path[:-1] not in subparsers:
            subparsers[path[:-1]] = parent.add_subparsers(
                title="commands", metavar="COMMAND", dest="_".join(("cmd", *path[:-1])),
                parser_class=Parser, required=path[:-1] == () or path[:-1] not in COMMANDS)
        cmd = COMMANDS.get(path)
        doc = (cmd.func.__doc__ or "").strip() if cmd else GROUPS.get(path, " ".join(path))
        parser = subparsers[path[:-1]].add_parser(
            path[-1], help=doc.splitlines()[0], description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        # Leaves take --home too (after the command); SUPPRESS keeps the top one's value.
        _home_option(parser, argparse.SUPPRESS)
        parsers[path] = parser
        return parser

    for path in sorted(COMMANDS):
        parser = parser_for(path)
        cmd = COMMANDS[path]
        for flags, options in cmd.arguments:
            parser.add_argument(*flags, **options)
        parser.set_defaults(_command=cmd)
    return top


# -- rendering -------------------------------------------------------------------------


def table(headers: list[str], rows: Iterable[Iterable]) -> str:
    """Aligned columns; numbers right-aligned, None shown as '-'."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def numeric(v: str) -> bool:
        return v.replace(",", "").replace(".", "", 1).replace("%", "").lstrip("-").isdigit()

    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    for row in cells:
        lines.append("  ".join(v.rjust(w) if numeric(v) else v.ljust(w)
                               for v, w in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def human_duration(secs: float | None) -> str:
    if secs is None:
        return "-"
    secs = max(0.0, float(secs))
    if secs < 1:
        return f"{secs * 1000:.0f}ms" if secs >= 0.001 else f"{secs * 1e6:.0f}us"
    if secs < 60:
        return f"{secs:.1f}s"
    if secs < 3600:
        return f"{int(secs // 60)}m{int(secs % 60):02d}s"
    if secs < 86400:
        return f"{int(secs // 3600)}h{int(secs % 3600 // 60):02d}m"
    return f"{int(secs // 86400)}d{int(secs % 86400 // 3600):02d}h"


def clock(ts) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def stamp(ts) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def number(n) -> str:
    if n is None:
        return "-"
    if isinstance(n, int) and not isinstance(n, bool):
        return f"{n:,}"
    return str(n)


def short(value, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str,
                                                           separators=(",", ":"))
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


TIME_KEYS = ("eta", "at", "started_at", "finished_at", "now", "next_reset", "deadline",
             "window_start")


NOISE_KEYS = frozenset({"lsn", "op"})  # bookkeeping, not what a reader of the line wants


def key_data(data, width: int = 120, known: dict | None = None) -> str:
    """An event's data as `k=v` pairs, the readable part of one line; keys whose value
    `known` already shows (the event's task and worker) are left out."""
    if not isinstance(data, dict):
        return short(data, width)
    parts = []
    known = known or {}
    for key, value in data.items():
        if value is None or value == "" or value == {} or key in NOISE_KEYS:
            continue
        if value in known.values() and key in ("task", "task_id", "worker"):
            continue
        if isinstance(value, float):
            if key in TIME_KEYS and value > 1e9:
                value = clock(value)
            elif abs(value) >= 100:
                value = f"{value:.0f}"
            else:
                value = f"{value:.4g}"
        elif isinstance(value, str):
            value = short(value, 50)
            if " " in value:
                value = json.dumps(value, ensure_ascii=False)
        elif not isinstance(value, int | bool):
            value = short(value, 50)
        parts.append(f"{key}={value}")
    return short(" ".join(parts), width)


def event_line(event: dict, base: float | None = None) -> str:
    """One readable line: time (or offset from `base`), source, type, task, worker, data."""
    ts = event.get("ts")
    if base is not None and isinstance(ts, int | float):
        when_text = f"{f'+{ts - base:.3f}s':>9}"
    else:
        when_text = clock(ts)
    who = []
    if event.get("task") and base is None:
        who.append(str(event["task"]))
    if event.get("worker"):
        who.append(f"worker={event['worker']}")
    known = {"task": event.get("task"), "worker": event.get("worker")}
    rest = " ".join([*who, key_data(event.get("data"), known=known)]).strip()
    return f"{when_text}  {str(event.get('source', '-')):<10} {str(event.get('type')):<22} {rest}"


def print_json(value) -> None:
    print(json.dumps(value, indent=2, default=str, sort_keys=False))


def print_json_line(value) -> None:
    print(json.dumps(value, default=str, separators=(",", ":")), flush=True)


# -- reaching the suite ----------------------------------------------------------------


def home_of(args: argparse.Namespace) -> Path:
    return locate.find_home(getattr(args, "home", None))


def not_running(home: Path) -> CliError:
    return CliError(Exit.NOT_RUNNING,
                    f"no suite is running in {home} (start it with `cortex up`)")


def connect(args: argparse.Namespace, timeout: float = BUS_TIMEOUT) -> Client:
    """A client for the suite in the home, refusing at once when there is plainly none
    (no bus socket) instead of waiting out a timeout."""
    home = home_of(args)
    endpoint = locate.endpoints(home)["bus"]
    if endpoint.startswith("ipc://") and not Path(endpoint[len("ipc://"):]).exists():
        raise not_running(home)
    return Client(home, timeout=timeout)


def ask_all(home: Path, timeout: float = PING_TIMEOUT) -> dict[str, dict | None]:
    """Every service's status body (None for one that did not answer), asked in parallel:
    a down service costs one timeout, not one each."""
    answers: dict[str, dict | None] = dict.fromkeys(STATUS_OPS)

    def ask(service: str, op: str) -> None:
        try:
            with Client(home, timeout=timeout) as client:
                answers[service] = client.call(service, op, timeout=timeout)
        except errors.CortexError:
            answers[service] = None

    threads = [threading.Thread(target=ask, args=item, daemon=True)
               for item in STATUS_OPS.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5.0)
    return answers


def load_settings(home: Path) -> config.Settings:
    locate.endpoints(home)  # fails early (HomeError) when the socket paths are too long
    return config.load(home)


# -- setting up and running ------------------------------------------------------------


@command("init",
         arg("--force", action="store_true", help="overwrite an existing cortex.toml"))
def cmd_init(args):
    """Write the commented default configuration into the home (and create its dirs).

    Writes <home>/cortex.toml with every setting at its default, explained, and creates
    run/, state/, wal/, events/, logs/ and models/. An existing cortex.toml is kept
    unless --force is given.
    """
    home = home_of(args)
    locate.endpoints(home)  # socket paths must fit: say so now, not at `cortex up`
    path = home / "cortex.toml"
    if path.exists() and not args.force:
        raise CliError(Exit.CONFLICT, f"{path} already exists (use --force to overwrite)")
    prepare_home(home)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(config.DEFAULT_CONFIG)
    os.replace(tmp, path)
    print(f"wrote {path}")
    print("next: cortex up")
    return Exit.OK


@command("up",
         arg("--timeout", type=seconds, default=60.0, metavar="S",
             help="seconds to wait for all five services to answer (default 60)"),
         arg("--foreground", action="store_true",
             help="keep supervisord attached to this terminal; Ctrl-C stops the suite"))
def cmd_up(args):
    """Start the suite (supervisord and the five services) and wait until all answer.

    Returns once broker, events, ledger, scheduler and pool all answer on the bus, or
    fails (non-zero, with the services that did not answer) after --timeout seconds.
    Already running: says so and checks that it answers.
    """
    home = home_of(args)
    load_settings(home)  # a bad config would crash-loop every service: refuse it here
    suite = Suite(home)
    if suite.supervisord_pid():
        suite.wait_ready(args.timeout)
        print(f"already running in {home}")
        return Exit.OK
    if args.foreground:
        return run_foreground(suite, args.timeout)
    started = time.monotonic()
    try:
        suite.start(attached=False, timeout=args.timeout)
    except SuiteError as e:
        running = " (supervisord is still running: `cortex down` stops it)" \
            if suite.supervisord_pid() else ""
        raise CliError(Exit.UNAVAILABLE, f"{e}{running}") from e
    print(f"suite up in {home} ({time.monotonic() - started:.1f}s): "
          f"{', '.join(SERVICES)} answering")
    return Exit.OK


def run_foreground(suite: Suite, timeout: float) -> int:
    become_subreaper()
    # SIGINT too: a shell starting us in the background may have set it to "ignore".
    previous = {sig: signal.signal(sig, _raise_interrupt)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        suite.start(attached=True, timeout=timeout)
        print(f"suite up in {suite.home}; Ctrl-C stops it", flush=True)
        suite.proc.wait()
        print(f"supervisord exited with {suite.proc.returncode}", file=sys.stderr)
        return Exit.FAILED
    except KeyboardInterrupt:
        print("stopping…", file=sys.stderr, flush=True)
        return Exit.OK
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        suite.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@command("down",
         arg("--timeout", type=seconds, default=90.0, metavar="S",
             help="seconds before what is left is killed (default 90)"))
def cmd_down(args):
    """Stop the suite; return only when every process of it, workers included, is gone.

    Services stop gracefully (workers finish the task in hand); whatever is still alive
    after --timeout seconds is killed. Nothing running: says so, exit 0.
    """
    home = home_of(args)
    suite = Suite(home)
    pids = suite.pids()
    if not pids:
        suite.stop(timeout=1.0)  # clears stale socket files, if any
        print(f"nothing running in {home}")
        return Exit.OK
    started = time.monotonic()
    suite.stop(timeout=args.timeout)
    left = suite.pids()
    if left:
        raise CliError(Exit.FAILED, f"processes still alive after stop: {left}")
    print(f"suite down in {home} ({len(pids)} processes stopped in "
          f"{time.monotonic() - started:.1f}s)")
    return Exit.OK


# -- status ----------------------------------------------------------------------------


@command("status", JSON)
def cmd_status(args):
    """Show the suite at a glance: services, workers, queue, tasks, budget, events.

    Each service's supervisor state, pid, uptime and whether it answers on the bus;
    workers idle/busy per task type; queue depth per priority; task counters (rejections
    included); the global token budget; the event router's counters (and PostgreSQL lag
    when configured). Works with services down (shown as such); exits 3 when supervisord
    is not running in the home.
    """
    home = home_of(args)
    suite = Suite(home)
    try:
        processes = suite.processes()
    except SuiteError:
        if args.json:
            print_json({"home": str(home), "running": False})
        raise not_running(home) from None
    answers = ask_all(home)
    report = status_report(home, suite, processes, answers)
    if args.json:
        print_json(report)
    else:
        print(render_status(report))
    return Exit.OK


def status_report(home: Path, suite: Suite, processes: list[dict],
                  answers: dict[str, dict | None]) -> dict:
    services, helpers = {}, {}
    for info in processes:
        name = info.get("name")
        running = info.get("statename") == "RUNNING"
        body = answers.get(name)
        # Programs that are not bus services (the supervisor event listener) are listed
        # apart: they have no bus to answer on.
        (services if name in SERVICES else helpers)[name] = {
            "state": info.get("statename"), "pid": info.get("pid") or None,
            "uptime": (info["now"] - info["start"]) if running and info.get("start") else None,
            "alive": body is not None, "description": info.get("description"),
        }
    sched = answers.get("scheduler") or {}
    ledger = answers.get("ledger") or {}
    budgets = ledger.get("budgets") or []
    events = answers.get("events")
    return {
        "home": str(home), "running": True,
        "supervisord": {"pid": suite.supervisord_pid()},
        "services": services,
        "helpers": helpers,
        "workers": sched.get("workers"),
        "queue": sched.get("queue"),
        "tasks": sched.get("states"),
        "waiting": sched.get("waiting"),
        "memory_pressure": sched.get("memory_pressure"),
        "backoff": sched.get("backoff"),
        "counters": sched.get("counters"),
        "budget": next((b for b in budgets if b.get("scope") == "global"), None),
        "budgets": budgets if answers.get("ledger") is not None else None,
        "events": None if events is None else {
            k: v for k, v in events.items() if k != "postgres"} | {
            "postgres": events.get("postgres")},
        "pool": None if answers.get("pool") is None else {
            "workers": len(answers["pool"].get("workers", [])),
            "extra": sum(1 for w in answers["pool"].get("workers", []) if w.get("extra")),
            "spawned": answers["pool"].get("spawned"), "groups": answers["pool"].get("groups")},
        "broker": None if answers.get("broker") is None else {
            "peers": len(answers["broker"].get("peers", [])),
            **(answers["broker"].get("stats") or {})},
    }


def render_status(r: dict) -> str:
    out = [f"suite {r['home']} (supervisord pid {r['supervisord']['pid']})", ""]
    out.append(table(["SERVICE", "STATE", "PID", "UPTIME", "BUS"], [
        [name, s["state"], s["pid"], human_duration(s["uptime"]) if s["uptime"] else "-",
         "alive" if s["alive"] else "NOT ANSWERING"]
        for name, s in r["services"].items()] + [
        [name, s["state"], s["pid"], human_duration(s["uptime"]) if s["uptime"] else "-",
         "(listener)"] for name, s in (r.get("helpers") or {}).items()]))
    out.append("")
    unknown = "(scheduler not answering)"
    workers = r["workers"]
    if workers is None:
        out.append(f"workers    {unknown}")
    elif not workers:
        out.append("workers    none registered")
    else:
        extra = (r.get("pool") or {}).get("extra")
        out.append("workers    " + "; ".join(
            f"{t} {w['idle']} idle/{w['busy']} busy" for t, w in sorted(workers.items()))
            + (f"  (+{extra} surge/autoscaled, retire when idle)" if extra else ""))
    queue = r["queue"]
    if queue is None:
        out.append(f"queue      {unknown}")
    else:
        waits = ", ".join(f"{why} {n}" for why, n in (r.get("waiting") or {}).items())
        extra = f"  (waiting: {waits or 'none'}; in retry backoff {r['backoff']})"
        out.append("queue      " + "  ".join(f"{p} {queue.get(p, 0)}" for p in PRIORITIES)
                   + extra)
        if r.get("memory_pressure"):
            out.append("memory     PRESSURE: memory use above the threshold; new non-critical "
                       "work waits")
    if r["tasks"] is not None:
        out.append("tasks      " + (", ".join(f"{s} {n:,}" for s, n in sorted(
            r["tasks"].items())) or "none"))
    if r["counters"] is not None:
        out.append("counters   " + ", ".join(f"{k} {v:,}" for k, v in r["counters"].items()))
    budget = r["budget"]
    if r["budgets"] is None:
        out.append("budget     (ledger not answering)")
    elif budget is not None:
        line = (f"global limit {number(budget.get('limit'))}, reserved "
                f"{number(budget.get('reserved'))}, committed {number(budget.get('committed'))}"
                f", available {number(budget.get('available'))}")
        if budget.get("overrun"):
            line += f", overrun {number(budget['overrun'])}"
        if budget.get("resets_at"):
            line += f", resets {budget['resets_at']}"
        more = len(r["budgets"]) - 1
        out.append("budget     " + line + (f"  (+{more} sub-budgets: cortex budget)"
                                            if more > 0 else ""))
    ev = r["events"]
    if ev is None:
        out.append("events     (event router not answering)")
    else:
        line = (f"written {number(ev.get('written'))}, received {number(ev.get('received'))}, "
                f"duplicates {number(ev.get('duplicates'))}, gaps {number(ev.get('gaps'))}, "
                f"malformed {number(ev.get('malformed'))}")
        if ev.get("unwritable"):
            line += f", UNWRITABLE: {ev['unwritable']}"
        out.append("events     " + line)
        names = {"queue": "submit→start", "run": "start→end", "total": "end to end"}
        parts = []
        for stage, label in names.items():
            st = (ev.get("latency") or {}).get(stage) or {}
            if st.get("count"):
                parts.append(f"{label} p50/p95/p99 " + "/".join(
                    human_duration(st.get(q)) for q in ("p50", "p95", "p99")))
        if parts:
            out.append("latency    " + "; ".join(parts))
        if ev.get("metrics_url"):
            out.append(f"metrics    {ev['metrics_url']} (Prometheus)")
        pg = ev.get("postgres")
        if pg:
            line = (f"lag {number(pg.get('lag'))}, inserted {number(pg.get('inserted'))}, "
                    f"spooled {number(pg.get('spooled'))}, quarantined "
                    f"{number(pg.get('quarantined'))}, "
                    f"{'connected' if pg.get('connected') else 'NOT CONNECTED'}")
            if pg.get("last_error"):
                line += f" (last error: {short(pg['last_error'], 80)})"
            out.append("postgres   " + line)
    if r["broker"] is not None:
        b = r["broker"]
        out.append(f"bus        {b.get('peers')} peers, routed {number(b.get('routed'))}, "
                   f"unroutable {number(b.get('unroutable'))}, malformed "
                   f"{number(b.get('malformed'))}, lost peers {number(b.get('lost_peers'))}")
    return "\n".join(out)


# -- tasks -----------------------------------------------------------------------------


@command("task create",
         arg("--type", required=True, metavar="T", help="task type (which workers run it)"),
         arg("--description", "-d", required=True, metavar="D", help="what the task is"),
         arg("--priority", "-p", choices=PRIORITIES, default="medium",
             help="critical, high, medium (default) or low"),
         arg("--tokens", type=non_negative_int, default=0, metavar="N",
             help="token budget to reserve before it runs (default 0)"),
         arg("--timeout", type=seconds, metavar="S", help="seconds it may run"),
         arg("--retries", type=non_negative_int, metavar="N",
             help="re-runs after a lost worker or a timeout"),
         arg("--deadline", type=deadline, metavar="T",
             help="SLA: unix time (or +SECONDS) by which it must start"),
         arg("--payload", type=json_value, metavar="JSON",
             help="the task's input, as JSON (or @FILE)"),
         arg("--key", metavar="K", help="idempotency key: the same key twice is one task"),
         arg("--agent", metavar="NAME",
             help="submitting agent, for per-agent budgets (default $CORTEX_AGENT)"),
         JSON)
def cmd_task_create(args):
    """Submit a task and print its id (--json: the whole task).

    The suite may refuse it at admission (queue full, deadline cannot be met): the reason
    is printed and the exit code is 6.
    """
    with connect(args) as client:
        task = client.submit(args.type, args.description, priority=args.priority,
                             tokens=args.tokens, timeout=args.timeout, retries=args.retries,
                             deadline=args.deadline, payload=args.payload,
                             idempotency_key=args.key, agent=args.agent)
    if args.json:
        print_json(task)
    else:
        print(task["id"])
    return Exit.OK


def waiting_text(task: dict, now: float) -> str:
    if task.get("state") != "queued":
        return "-"
    reason = task.get("waiting") or "-"
    eta = task.get("eta")
    if isinstance(eta, int | float):
        reason += " (now)" if eta <= now else f" (eta {human_duration(eta - now)})"
    return reason


@command("task show", arg("id", metavar="ID"), JSON)
def cmd_task_show(args):
    """Show everything about one task: state, waiting reason and ETA, tokens, times, result."""
    with connect(args) as client:
        task = client.status(args.id)
        try:
            ledger = client.call("ledger", "ledger.task", {"task": args.id},
                                 timeout=PING_TIMEOUT).get("reservation")
        except errors.CortexError:
            ledger = None
    if args.json:
        print_json(task | {"ledger": ledger})
    else:
        print(render_task(task, ledger, time.time()))
    return Exit.OK


def render_task(task: dict, ledger: dict | None, now: float) -> str:
    times = task.get("times") or {}
    created = times.get("created")
    rows = [("id", task["id"]), ("type", task.get("type")),
            ("description", short(task.get("description") or "", 200)),
            ("priority", task.get("priority")),
            ("state", f"{task.get('state')} (attempt {task.get('attempt')} of "
                      f"{1 + int(task.get('retries') or 0)})"),
            ("agent", task.get("agent")), ("worker", task.get("worker"))]
    if task.get("state") == "queued":
        rows.append(("waiting", waiting_text(task, now)))
    if task.get("eta") and task.get("state") == "queued":
        rows.append(("eta", f"{stamp(task['eta'])} (in {human_duration(task['eta'] - now)})"))
    if task.get("deadline"):
        rows.append(("deadline", stamp(task["deadline"])))
    tokens = (f"requested {number(task.get('tokens'))}, reserved {number(task.get('reserved'))}"
              f", used {number(task.get('tokens_used'))}")
    if ledger:
        tokens += (f"; ledger: {ledger.get('state')}, granted {number(ledger.get('granted'))}, "
                   f"used {number(ledger.get('used'))}")
        if ledger.get("overrun"):
            tokens += f", OVERRUN {number(ledger['overrun'])}"
    rows.append(("tokens", tokens))
    rows.append(("timeout", human_duration(task.get("timeout"))))
    if task.get("progress") or task.get("message"):
        rows.append(("progress", f"{100 * float(task.get('progress') or 0):.0f}% "
                                 f"{task.get('message') or ''}".rstrip()))
    if created is not None:
        steps = [f"created {stamp(created)}"] + [
            f"{name} +{human_duration(ts - created)}" for name, ts in sorted(
                times.items(), key=lambda kv: kv[1]) if name != "created"]
        rows.append(("times", ", ".join(steps)))
        end = times.get(task.get("state")) if task.get("final") else now
        rows.append(("age", human_duration((end or now) - created)
                     + (" (total)" if task.get("final") else "")))
    if task.get("result") is not None:
        rows.append(("result", short(task["result"], 300)))
    if task.get("error"):
        err = task["error"]
        rows.append(("error", f"{err.get('category')}: {err.get('message')}"))
    if task.get("payload") is not None:
        rows.append(("payload", short(task["payload"], 300)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {'-' if v is None else v}" for k, v in rows)


@command("task list",
         arg("--state", choices=list(TASK_STATES), help="only tasks in this state"),
         arg("--limit", type=positive_int, default=50, metavar="N",
             help="at most N tasks, the newest (default 50)"),
         JSON)
def cmd_task_list(args):
    """List tasks (newest last): id, type, priority, state, attempt, worker, waiting/eta, age."""
    with connect(args) as client:
        tasks = client.list_tasks(state=args.state, limit=args.limit)
    if args.json:
        print_json(tasks)
        return Exit.OK
    if not tasks:
        print("no tasks" + (f" in state {args.state}" if args.state else ""))
        return Exit.OK
    now = time.time()
    print(table(["ID", "TYPE", "PRIORITY", "STATE", "ATTEMPT", "WORKER", "WAITING/ETA", "AGE"],
                [[t["id"], t.get("type"), t.get("priority"), t.get("state"), t.get("attempt"),
                  t.get("worker"), waiting_text(t, now),
                  human_duration(now - (t.get("times") or {}).get("created", now))]
                 for t in tasks]))
    return Exit.OK


@command("task wait",
         arg("id", metavar="ID"),
         arg("--timeout", type=seconds, default=300.0, metavar="S",
             help="seconds to wait (default 300)"),
         JSON)
def cmd_task_wait(args):
    """Wait for a task to end. Exit 0 completed, 1 failed/dead/cancelled, 4 still running."""
    with connect(args) as client:
        try:
            task = client.wait(args.id, timeout=args.timeout)
        except errors.Timeout as e:
            if not e.details.get("id"):
                raise  # the scheduler did not answer, not the task that did not end
            if args.json:
                print_json(e.details)
            raise CliError(Exit.TIMEOUT, f"task {args.id} still {e.details.get('state')} "
                                         f"after {args.timeout:g}s") from None
    if args.json:
        print_json(task)
    else:
        times = task.get("times") or {}
        took = human_duration((times.get(task["state"]) or 0) - (times.get("created") or 0))
        line = f"{task['id']} {task['state']} after {took}"
        if task.get("error"):
            line += f": {task['error'].get('category')}: {task['error'].get('message')}"
        elif task.get("result") is not None:
            line += f": {short(task['result'], 200)}"
        print(line)
    return Exit.OK if task["state"] == "completed" else Exit.FAILED


@command("task cancel", arg("id", metavar="ID"), JSON)
def cmd_task_cancel(args):
    """Cancel a queued or running task (a running one's worker is stopped).

    Exit 0 when the task is now cancelled; 9 when it had already ended otherwise.
    """
    with connect(args) as client:
        task = client.cancel(args.id)
    if args.json:
        print_json(task)
    if task.get("state") != "cancelled":
        raise CliError(Exit.CONFLICT, f"task {args.id} had already ended: {task.get('state')}")
    if not args.json:
        print(f"{args.id} cancelled")
    return Exit.OK


@command("task trace", arg("id", metavar="ID"), JSON)
def cmd_task_trace(args):
    """The whole story of one task from the event log, in time order, one line per event.

    Each line: seconds since the first event, the source, the event type and its key data
    (why it waited, which worker, tokens, retries, the outcome). Read from the JSONL files
    under <home>/events/, so it works with the suite stopped too.
    """
    home = home_of(args)
    events = sorted(read_events(home / "events", task=args.id),
                    key=lambda e: (e.get("ts") or 0, e.get("source") or "", e.get("seq") or 0))
    if not events:
        raise CliError(Exit.NOT_FOUND, f"no events for task {args.id} in {home / 'events'}")
    if args.json:
        for event in events:
            print_json_line(event)
        return Exit.OK
    base = events[0].get("ts") or 0.0
    created = next((e for e in events if e.get("type") == "task.created"), None)
    head = f"task {args.id}"
    if created:
        d = created.get("data") or {}
        head += f" ({d.get('type')}, {d.get('priority')}, {short(d.get('description', ''), 60)})"
    print(f"{head}: {len(events)} events from {stamp(base)} over "
          f"{human_duration((events[-1].get('ts') or base) - base)}")
    for event in events:
        print(event_line(event, base))
    return Exit.OK


# -- events ----------------------------------------------------------------------------


def split_pattern(pattern: str | None) -> tuple[str, str | None]:
    """(prefix to subscribe to, glob to filter with): `task.` is a prefix, `task.*` or
    `*.failed` a glob."""
    if not pattern:
        return "", None
    cut = min((i for i, c in enumerate(pattern) if c in "*?["), default=None)
    if cut is None:
        return pattern, None
    return pattern[:cut], pattern


@command("tail",
         arg("--type", metavar="PATTERN",
             help="only these types: a prefix (task.) or a glob (task.*, *.failed)"),
         arg("--last", type=non_negative_int, default=0, metavar="N",
             help="first print the N most recent events (from the router's buffer)"),
         arg("--count", type=positive_int, metavar="N", help="stop after N live events"),
         JSON)
def cmd_tail(args):
    """Follow events live, one readable line each (--json: one JSON object a line).

    --type takes a prefix (`task.`) or a glob (`task.*`, `*.failed`). --last N first
    prints the N most recent events the router holds, with no gap and no repeat between
    them and the live ones. Ctrl-C stops it (exit 0).
    """
    home = home_of(args)
    prefix, glob = split_pattern(args.type)
    connect(args).close()  # refuses at once when no suite is running
    sub = make_socket(zmq.Context.instance(), zmq.SUB)
    shown = 0
    try:
        # Subscribe before reading the buffer, so nothing falls between the two.
        sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        sub.connect(locate.endpoints(home)["events_live"])
        recent_ids: set = set()
        if args.last:
            body = {"n": args.last}
            if args.type:
                body["type"] = glob or f"{prefix}*"
            with connect(args) as client:
                recent = client.call("events", "events.recent", body)["events"]
            for event in recent:
                show_event(event, args.json)
            recent_ids = {e.get("id") for e in recent}
        if not args.json:
            print(f"# following events in {home} (Ctrl-C to stop)", file=sys.stderr,
                  flush=True)
        while not (args.count and shown >= args.count):
            if not sub.poll(500):
                recent_ids.clear()  # a quiet moment: the buffered ones have all passed
                continue
            _topic, raw = sub.recv_multipart()
            event = msgpack.unpackb(raw, raw=False)
            if event.get("id") in recent_ids:
                continue
            if glob and not fnmatch.fnmatchcase(str(event.get("type", "")), glob):
                continue
            show_event(event, args.json)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        sub.close(linger=0)
    return Exit.OK


def show_event(event: dict, as_json: bool) -> None:
    if as_json:
        print_json_line(event)
    else:
        print(event_line(event), flush=True)


@command("events query",
         arg("--type", metavar="PATTERN", help="type glob, e.g. task.* or ledger.refused"),
         arg("--task", metavar="ID", help="events of this task"),
         arg("--worker", metavar="W", help="events of this worker"),
         arg("--since", type=when, metavar="T",
             help="from this time: unix, ISO 8601, or N[smhd] ago (e.g. 15m)"),
         arg("--until", type=when, metavar="T", help="before this time (same forms)"),
         arg("--text", metavar="S", help="case-insensitive text anywhere in the event"),
         arg("--limit", type=positive_int, default=1000, metavar="N",
             help="at most N events (default 1000)"),
         arg("--from", dest="source", choices=("auto", "postgres", "jsonl"), default="auto",
             help="where to read: PostgreSQL when configured (auto), or JSONL"),
         JSON)
def cmd_events_query(args):
    """Search the event history: PostgreSQL when [events] postgres_url is set, else JSONL.

    Filters combine (all must match). Output is one line per event in time order
    (--json: one JSON object a line).
    """
    home = home_of(args)
    settings = load_settings(home)
    url = settings.events.postgres_url
    if args.source == "postgres" and not url:
        raise CliError(Exit.CONFIG, "no [events] postgres_url configured in cortex.toml")
    filters = {"since": args.since, "until": args.until, "task": args.task,
               "type_pattern": args.type, "worker": args.worker, "text": args.text,
               "limit": args.limit}
    if url and args.source != "jsonl":
        from cortex.services.runtime.pgevents import (
            query_events,  # psycopg only when PostgreSQL is configured
        )

        try:
            events = query_events(url, **filters)
        except Exception as e:  # psycopg's errors: the database is down or refuses us
            raise CliError(Exit.UNAVAILABLE, f"PostgreSQL query failed ({type(e).__name__}: "
                                             f"{short(str(e), 200)}); --from jsonl reads "
                                             "the files instead") from e
    else:
        events = list(read_events(home / "events", **filters))
        events.sort(key=lambda e: (e.get("ts") or 0))
    for event in events:
        show_event(event, args.json)
    if not args.json:
        print(f"# {len(events)} events", file=sys.stderr)
    return Exit.OK


# -- workers and budgets ---------------------------------------------------------------


@command("workers", JSON)
def cmd_workers(args):
    """List worker processes: pool's view (pid, memory, cpu) and the scheduler's (state, task)."""
    with connect(args) as client:
        pool_rows, sched_rows, notes = [], [], []
        try:
            pool_rows = client.call("pool", "pool.status", timeout=PING_TIMEOUT)["workers"]
        except errors.CortexError as e:
            notes.append(f"pool not answering ({e.code})")
        try:
            sched_rows = client.workers()
        except errors.CortexError as e:
            notes.append(f"scheduler not answering ({e.code})")
    if len(notes) == 2:
        raise CliError(Exit.UNAVAILABLE, "; ".join(notes))
    merged: dict[str, dict] = {}
    for row in pool_rows:
        merged[row["name"]] = dict(row)
    for row in sched_rows:
        merged.setdefault(row["name"], {"name": row["name"]}).update(
            {k: v for k, v in row.items() if k not in ("pid",) or v})
    rows = sorted(merged.values(), key=lambda w: (w.get("group") or "", w.get("slot") or 0,
                                                  w["name"]))
    if args.json:
        print_json(rows)
        return Exit.OK
    now = time.time()
    print(table(["NAME", "GROUP", "PID", "STATE", "TASK", "DONE", "RSS_MB", "CPU_S", "UP"],
                [[w["name"], w.get("group"), w.get("pid"),
                  w.get("state") or "unregistered", w.get("task"), w.get("done"),
                  w.get("rss_mb"), w.get("cpu_s"),
                  human_duration(now - w["started"]) if w.get("started") else None]
                 for w in rows]))
    busy = sum(1 for w in rows if w.get("state") in ("busy", "claimed"))
    print(f"{len(rows)} workers, {busy} busy" + (f" ({'; '.join(notes)})" if notes else ""))
    return Exit.OK


@command("budget", JSON)
def cmd_budget(args):
    """Show token budgets: limit, reserved, committed, overrun, available, window, reset."""
    with connect(args) as client:
        budgets = client.budget()["budgets"]
    if args.json:
        print_json(budgets)
        return Exit.OK
    print(table(["SCOPE", "LIMIT", "RESERVED", "COMMITTED", "OVERRUN", "AVAILABLE", "WINDOW",
                 "RESETS_AT"],
                [[b["scope"], "unlimited" if b.get("limit") is None else number(b["limit"]),
                  number(b.get("reserved")), number(b.get("committed")),
                  number(b.get("overrun")), number(b.get("available")),
                  b.get("window") or "none", b.get("resets_at")] for b in budgets]))
    return Exit.OK


@command("budget set",
         arg("scope", metavar="SCOPE", help="global, type:<task type> or agent:<agent>"),
         arg("limit", type=limit_value, metavar="LIMIT", help="tokens, or 'unlimited'"),
         arg("--window", type=window_value, metavar="W", default=argparse.SUPPRESS,
             help="none, daily or rolling:<seconds> (default: keep the current one)"),
         JSON)
def cmd_budget_set(args):
    """Create or change a budget at run time (journaled by the ledger; survives restarts)."""
    with connect(args) as client:
        if hasattr(args, "window"):
            window = args.window
        else:  # keep the budget's window (a new budget gets none)
            current = {b["scope"]: b for b in client.budget()["budgets"]}
            window = (current.get(args.scope) or {}).get("window")
        reply = client.call("ledger", "ledger.set", {"scope": args.scope, "limit": args.limit,
                                                      "window": window})
    if args.json:
        print_json(reply)
        return Exit.OK
    limit = "unlimited" if reply.get("limit") is None else number(reply["limit"])
    print(f"{reply.get('scope')}: limit {limit}, window {reply.get('window') or 'none'}, "
          f"reserved {number(reply.get('reserved'))}, committed {number(reply.get('committed'))}"
          f", available {number(reply.get('available'))}")
    if reply.get("note"):
        print(f"note: {reply['note']}")
    return Exit.OK


@command("model status", JSON)
def cmd_model_status(args):
    """Show the prediction models: trained on what and when, held-out accuracy, fallbacks."""
    with connect(args) as client:
        status = client.call("scheduler", "model.status")
    if args.json:
        print_json(status)
        return Exit.OK
    model = status.get("model")
    if model:
        print(f"model trained {stamp(model.get('trained_at'))} on "
              f"{number(model.get('samples'))} completed tasks "
              f"(types: {', '.join(model.get('types', [])) or '-'})")
        rows = [[target, f"{100 * acc.get('within_25pct', 0):.1f}%", acc.get("mae"),
                 acc.get("r2")] for target, acc in model.get("per_target", {}).items()]
        print(table(["TARGET", "WITHIN_25%", "MAE", "R2"], rows))
    else:
        print(f"no model: {status.get('reason')}")
    averages = status.get("averages", {})
    if averages:
        print(table(["TYPE", "COMPLETIONS", "MEAN_DURATION_S", "MEAN_TOKENS"],
                    [[t, a.get("duration", {}).get("count"),
                      a.get("duration", {}).get("mean"), a.get("tokens", {}).get("mean")]
                     for t, a in sorted(averages.items())]))
    print(f"completions since training: {status.get('completions_since_training')}, "
          f"training now: {'yes' if status.get('training') else 'no'}"
          + (f", last error: {status['last_error']}" if status.get("last_error") else ""))
    return Exit.OK


@command("model train", JSON)
def cmd_model_train(args):
    """Retrain the prediction models now, in the background, from the event log's history."""
    with connect(args) as client:
        reply = client.call("scheduler", "model.train")
    if args.json:
        print_json(reply)
        return Exit.OK
    print("training started in the background; see `cortex model status`" if reply["started"]
          else "a training is already running; see `cortex model status`")
    return Exit.OK


# -- the demo --------------------------------------------------------------------------


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
    token budgets from several agents at once, waits for all of them, and prints a summary:
    outcomes, tokens committed against tokens used, events written, latency percentiles.
    Exit 0 only if every task reached a final state and the token accounting matched.
    """
    home = home_of(args)
    load_settings(home)
    suite = Suite(home)
    started_here = False
    if not suite.supervisord_pid():
        become_subreaper()
        print(f"starting the suite in {home} …", flush=True)
        began = time.monotonic()
        suite.start(attached=True, timeout=60.0)
        started_here = True
        print(f"suite up in {time.monotonic() - began:.1f}s", flush=True)
    try:
        return run_demo(home, args)
    finally:
        if started_here:
            print("stopping the suite …", flush=True)
            suite.stop()
            left = suite.pids()
            print("suite stopped, nothing left running" if not left
                  else f"processes still alive: {left}", flush=True)


def demo_workload(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        priority = rng.choices(PRIORITIES, weights=(5, 20, 50, 25))[0]
        kind = rng.choices(("echo", "sleep", "simulated_agent"), weights=(4, 2, 4))[0]
        if kind == "echo":
            spec = {"payload": {"n": i, "text": f"hello {i}"}, "tokens": 0}
        elif kind == "sleep":
            spec = {"payload": {"seconds": round(rng.uniform(0.01, 0.1), 3)}, "tokens": 0}
        else:
            used = rng.randint(100, 3000)
            spec = {"payload": {"seconds": round(rng.uniform(0.02, 0.2), 3), "tokens": used,
                                "steps": rng.randint(1, 5)},
                    "tokens": used + rng.randint(0, 500)}
        tasks.append({"type": kind, "description": f"demo {kind} #{i}", "priority": priority,
                      **spec})
    return tasks


def run_demo(home: Path, args) -> int:
    workload = demo_workload(args.tasks, args.seed)
    with Client(home, timeout=BUS_TIMEOUT) as client:
        events_before = client.call("events", "events.status").get("written", 0)
    results: list[dict] = []
    problems: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.timeout

    def agent(index: int, share: list[dict]) -> None:
        try:
            with Client(home, timeout=BUS_TIMEOUT, agent=f"demo-agent-{index}") as c:
                ids = [c.submit(t["type"], t["description"], priority=t["priority"],
                                tokens=t["tokens"], payload=t["payload"])["id"] for t in share]
                for task_id in ids:
                    done = c.wait(task_id, timeout=max(0.1, deadline - time.monotonic()))
                    with lock:
                        results.append(done)
        except errors.CortexError as e:
            with lock:
                problems.append(f"agent {index}: {e} [{e.code}]")

    print(f"running {len(workload)} tasks from {args.agents} agents …", flush=True)
    began = time.monotonic()
    threads = [threading.Thread(target=agent, args=(i, workload[i::args.agents]), daemon=True)
               for i in range(args.agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()) + BUS_TIMEOUT)
    elapsed = time.monotonic() - began

    with Client(home, timeout=BUS_TIMEOUT) as client:
        committed, mismatches = settle_tokens(client, results, time.monotonic() + 15.0)
        events_after = client.call("events", "events.status").get("written", 0)

    states: dict[str, int] = {}
    for task in results:
        states[task["state"]] = states.get(task["state"], 0) + 1
    used = sum(t.get("tokens_used") or 0 for t in results)
    starts, ends = [], []
    for task in results:
        times = task.get("times") or {}
        if task["state"] == "completed" and "created" in times:
            if "started" in times:
                starts.append(times["started"] - times["created"])
            ends.append(times["completed"] - times["created"])
    print()
    print(f"tasks      {len(results)} of {len(workload)} finished in {elapsed:.1f}s "
          f"({len(results) / max(elapsed, 1e-9):.0f}/s): "
          + ", ".join(f"{s} {n}" for s, n in sorted(states.items())))
    print(f"tokens     used {used:,} (reported by handlers), committed {committed:,} "
          f"(ledger): {'match' if not mismatches and used == committed else 'MISMATCH'}")
    print(f"events     {events_after - events_before:,} written to JSONL")
    if ends:
        print(f"latency    submit→start p50 {pct(starts, 50)} p95 {pct(starts, 95)}; "
              f"submit→done p50 {pct(ends, 50)} p95 {pct(ends, 95)}")
    for problem in problems + mismatches:
        print(f"problem    {problem}")
    ok = (len(results) == len(workload) and not problems and not mismatches
          and used == committed and all(t.get("final") for t in results))
    print("demo OK" if ok else "demo FAILED")
    return Exit.OK if ok else Exit.FAILED


def settle_tokens(client: Client, tasks: list[dict], deadline: float) -> tuple[int, list[str]]:
    """(tokens the ledger committed for `tasks`, mismatches): every token a task used must
    be committed and nothing may stay reserved. Settling is asynchronous (the scheduler
    tells the ledger after the task ends), so look again until all match or `deadline`."""
    pending = {t["id"]: t for t in tasks if (t.get("tokens") or 0) > 0
               or (t.get("tokens_used") or 0) > 0}
    committed: dict[str, int] = {}
    while True:
        for task_id, task in list(pending.items()):
            rec = client.call("ledger", "ledger.task", {"task": task_id}).get("reservation")
            used = task.get("tokens_used") or 0
            if rec is None:
                if used == 0:
                    del pending[task_id]  # never reserved (e.g. cancelled while queued)
                continue
            if rec.get("reserved") == 0 and (rec.get("used") or 0) == used:
                committed[task_id] = rec.get("used") or 0
                del pending[task_id]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)  # waiting for the scheduler's commits to reach the ledger
    mismatches = []
    for task_id, task in pending.items():
        rec = client.call("ledger", "ledger.task", {"task": task_id}).get("reservation")
        mismatches.append(f"task {task_id}: used {task.get('tokens_used')}, ledger: {rec}")
    return sum(committed.values()), mismatches


def pct(values: list[float], p: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return human_duration(values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return human_duration(cuts[p - 1])


# -- entry point -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Parse, run one command, and turn every expected failure into one line + exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (already printed, one line)
        return int(e.code or 0) if not isinstance(e.code, str) else Exit.USAGE
    cmd: Command | None = getattr(args, "_command", None)
    if cmd is None:
        parser.print_help()
        return Exit.USAGE
    try:
        return int(cmd.func(args) or Exit.OK)
    except CliError as e:
        fail(str(e))
        return e.exit
    except errors.CortexError as e:
        hint = " (see `cortex status`)" if e.code in ("timeout", "unavailable") else ""
        fail(f"{e} [{e.code}]{hint}")
        return EXIT_BY_CODE.get(e.code, Exit.UNAVAILABLE)
    except SuiteError as e:
        fail(str(e))
        return Exit.NOT_RUNNING if "not running" in str(e) else Exit.UNAVAILABLE
    except (config.ConfigError, locate.HomeError) as e:
        fail(str(e))
        return Exit.CONFIG
    except EventLogError as e:
        fail(f"event log: {e}")
        return Exit.FAILED
    except KeyboardInterrupt:
        fail("interrupted")
        return Exit.INTERRUPTED
    except BrokenPipeError:
        # `cortex tail | head`: the reader left; be quiet about it.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return Exit.OK
    except OSError as e:
        fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        return Exit.FAILED


def fail(message: str) -> None:
    print(f"cortex: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
