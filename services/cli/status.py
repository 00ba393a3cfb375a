"""`cortex status`: the suite at a glance, a health check by its exit code, and
`--watch`, the same view redrawn in place (for a server reached over SSH)."""

from __future__ import annotations

import time
from pathlib import Path

from cortex.protocol import locate
from cortex.protocol.vocabulary import PRIORITIES
from cortex.services.control import SERVICES, Suite, SuiteError

from .argtypes import seconds
from .reach import ask_all, home_of, not_running
from .registry import JSON, Exit, arg, command
from .render import (
    emit,
    emit_json,
    emit_json_line,
    human_duration,
    local_stamp,
    number,
    short,
    stamp,
    table,
)
from .terminal import Screen

# A helper program (not a bus service) that was never started is switched off, not down.
NEVER_STARTED = "STOPPED"


@command("status",
         arg("--watch", action="store_true",
             help="redraw the status in place every --interval seconds until Ctrl-C"),
         arg("--interval", type=seconds, default=1.0, metavar="S",
             help="seconds between redraws with --watch (default 1)"),
         JSON)
def cmd_status(args):
    """Show the suite at a glance: services, workers, queue, tasks, budget, events.

    Each service's supervisor state, pid, uptime and whether it answers on the bus;
    workers idle/busy per task type; queue depth per priority; task counters (rejections
    included); the global token budget; the event router's counters (and PostgreSQL lag
    when configured).

    A health check by its exit code: 0 when every service is running and answers, 7 when
    any is not (its `health` line says which), 3 when no suite runs in the home.

    --watch redraws it in place every --interval seconds (on a terminal; elsewhere each
    view follows the last), through restarts and outages, until Ctrl-C (exit 0). With
    --json it prints one JSON document per line instead.
    """
    home = home_of(args)
    if args.watch:
        return watch(home, args.interval, args.json)
    report = gather(home)
    if not report["running"]:
        if args.json:
            emit_json(report)
        raise not_running(home)
    if args.json:
        emit_json(report)
    else:
        emit(render_status(report))
    return Exit.OK if report["healthy"] else Exit.UNAVAILABLE


def gather(home: Path) -> dict:
    """The status report of the suite in `home` ({"running": False} without one)."""
    suite = Suite(home)
    try:
        processes = suite.processes()
    except SuiteError:
        return {"home": str(home), "running": False, "healthy": False,
                "problems": ["no suite is running"]}
    report = status_report(home, suite, processes, ask_all(home))
    report["problems"] = problems(report)
    report["healthy"] = not report["problems"]
    return report


# A process's first second (supervisord's startsecs) is STARTING, and a service started
# or restarted answers on the bus within it: a service that answers is up, and a helper
# starting is not down (a crash loop shows as BACKOFF, then FATAL).
STARTING = "STARTING"


def problems(report: dict) -> list[str]:
    """What makes the suite unhealthy: a service not running or not answering, a helper
    program that ran and is no longer running."""
    found = []
    for name in SERVICES:
        service = report["services"].get(name)
        if service is None:
            found.append(f"{name} is not configured in supervisord")
        elif service["state"] != "RUNNING" and not (service["state"] == STARTING
                                                    and service["alive"]):
            found.append(f"{name} is {service['state']}")
        elif not service["alive"]:
            found.append(f"{name} is not answering on the bus")
        elif service.get("halted"):
            found.append(service["halted"].get("message", f"{name} halted"))
    for group, crash in ((report.get("pool") or {}).get("crashing") or {}).items():
        found.append(f"worker group {group} is crash-looping ({crash.get('failed_starts')} "
                     f"failed starts in a row, exit {crash.get('code')})")
    for name, helper in (report.get("helpers") or {}).items():
        # Never started, or exited cleanly at once (the dashboard does when its settings
        # switch it off): off by choice, not down.
        switched_off = (helper["state"] == NEVER_STARTED and not helper.get("started")) or \
            (helper["state"] == "EXITED" and helper.get("exit_code") == 0)
        if helper["state"] not in ("RUNNING", STARTING) and not switched_off:
            found.append(f"{name} is {helper['state']}")
    return found


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
            "started": bool(info.get("start")), "exit_code": info.get("exitstatus"),
            "alive": body is not None, "description": info.get("description"),
            "halted": (body or {}).get("halted"),
        }
    sched = answers.get("scheduler") or {}
    ledger = answers.get("ledger") or {}
    budgets = ledger.get("budgets") or []
    events = answers.get("events")
    pool = answers.get("pool")
    broker = answers.get("broker")
    return {
        "home": str(home), "running": True,
        "supervisord": {"pid": suite.supervisord_pid()},
        "services": services,
        "helpers": helpers,
        "workers": sched.get("workers"),
        "queue": sched.get("queue"),
        "tasks": sched.get("states"),
        "waiting": sched.get("waiting"),
        "queued_by_reason": sched.get("queued_by_reason"),
        "memory_pressure": sched.get("memory_pressure"),
        "backoff": sched.get("backoff"),
        "providers": sched.get("providers"),  # each model provider's window (limits.py)
        "counters": sched.get("counters"),
        "budget": next((b for b in budgets if b.get("scope") == "global"), None),
        "budgets": budgets if answers.get("ledger") is not None else None,
        "events": None if events is None else {
            k: v for k, v in events.items() if k != "postgres"} | {
            "postgres": events.get("postgres")},
        "pool": None if pool is None else {
            "workers": len(pool.get("workers", [])),
            "extra": sum(1 for w in pool.get("workers", []) if w.get("extra")),
            "spawned": pool.get("spawned"), "groups": pool.get("groups"),
            "crashing": pool.get("crashing") or {}},
        "broker": None if broker is None else {
            "peers": len(broker.get("peers", [])), **(broker.get("stats") or {})},
        "endpoints": endpoint_report(home, broker),
    }


def endpoint_report(home: Path, broker: dict | None) -> dict:
    """Each endpoint, its transport, and whether it is encrypted (tcp with the suite's
    key pair: CurveZMQ; tcp without: plaintext, which insecure_tcp allowed)."""
    curve = locate.suite_key_path(home).exists()
    refused = ((broker or {}).get("connections") or {}).get("handshake_failed")
    report = {}
    for name, endpoint in locate.endpoints(home).items():
        tcp = locate.is_tcp(endpoint)
        report[name] = {"endpoint": endpoint, "transport": "tcp" if tcp else "ipc",
                        "encrypted": (curve if tcp else None),
                        **({"handshakes_refused": refused}
                           if name == "bus" and tcp and refused is not None else {})}
    return report


def render_status(r: dict) -> str:
    out = [f"suite {r['home']} (supervisord pid {r['supervisord']['pid']})"]
    if r.get("problems"):
        out.append("health     NOT OK: " + "; ".join(r["problems"]))
    else:
        out.append("health     ok: every service running and answering")
    out.append("")
    out.append(table(["SERVICE", "STATE", "PID", "UPTIME", "BUS"], [
        [name, s["state"], s["pid"], human_duration(s["uptime"]) if s["uptime"] else "-",
         "alive" if s["alive"] else "NOT ANSWERING"]
        for name, s in r["services"].items()] + [
        [name, s["state"], s["pid"], human_duration(s["uptime"]) if s["uptime"] else "-",
         "(helper)"] for name, s in (r.get("helpers") or {}).items()]))
    out.append("")
    for group, crash in ((r.get("pool") or {}).get("crashing") or {}).items():
        out.append(f"crashing   worker group {group}: {crash.get('failed_starts')} failed "
                   f"starts in a row; last error (exit {crash.get('code')}):")
        out += ["    " + line for line in str(crash.get("error", "")).splitlines()]
    out += _scheduler_lines(r)
    out += _budget_lines(r)
    out += _event_lines(r)
    out += _endpoint_lines(r)
    if r["broker"] is not None:
        b = r["broker"]
        out.append(f"bus        {b.get('peers')} peers, routed {number(b.get('routed'))}, "
                   f"unroutable {number(b.get('unroutable'))}, malformed "
                   f"{number(b.get('malformed'))}, lost peers {number(b.get('lost_peers'))}")
    return "\n".join(out)


def _endpoint_lines(r: dict) -> list[str]:
    out = []
    for name, e in (r.get("endpoints") or {}).items():
        if e["transport"] == "ipc":
            how = "ipc (this machine only)"
        elif e["encrypted"]:
            how = "tcp, encrypted (CurveZMQ, admitted keys only: cortex keys list)"
        else:
            how = "tcp, NOT ENCRYPTED (insecure_tcp: anyone who reaches the port)"
        if e.get("handshakes_refused"):
            how += f", {number(e['handshakes_refused'])} handshakes refused"
        out.append(f"endpoint   {name:<12} {short(e['endpoint'], 60)}  {how}")
    return out


def _scheduler_lines(r: dict) -> list[str]:
    out = []
    unknown = "(scheduler not answering)"
    workers = r["workers"]
    if workers is None:
        out.append(f"workers    {unknown}")
    elif not workers:
        out.append("workers    none registered")
    else:
        extra = (r.get("pool") or {}).get("extra")
        out.append("workers    " + "; ".join(
            f"{short(t, 40)} {w['idle']} idle/{w['busy']} busy"
            for t, w in sorted(workers.items()))
            + (f"  (+{extra} surge/autoscaled, retire when idle)" if extra else ""))
    queue = r["queue"]
    if queue is None:
        out.append(f"queue      {unknown}")
    else:
        by_reason = r.get("queued_by_reason")
        if by_reason is None:  # a scheduler that does not say: its announced waits only
            by_reason = {**(r.get("waiting") or {}), "backoff": r.get("backoff")}
        waits = ", ".join(f"{short(why, 30)} {n}" for why, n in by_reason.items() if n)
        extra = f"  (waiting for: {waits or 'nothing'})"
        out.append("queue      " + "  ".join(f"{p} {number(queue.get(p, 0))}"
                                             for p in PRIORITIES) + extra)
        if r.get("memory_pressure"):
            out.append("memory     PRESSURE: memory use above the threshold; new non-critical "
                       "work waits")
    if r["tasks"] is not None:
        out.append("tasks      " + (", ".join(f"{short(s, 20)} {number(n)}" for s, n in sorted(
            r["tasks"].items())) or "none"))
    if r["counters"] is not None:
        out.append("counters   " + ", ".join(f"{short(k, 30)} {number(v)}"
                                             for k, v in r["counters"].items()))
    return out


def _budget_lines(r: dict) -> list[str]:
    budget = r["budget"]
    if r["budgets"] is None:
        return ["budget     (ledger not answering)"]
    if budget is None:
        return []
    line = (f"global limit {number(budget.get('limit'))}, reserved "
            f"{number(budget.get('reserved'))}, leased {number(budget.get('leased', 0))}, "
            f"committed {number(budget.get('committed'))}"
            f", available {number(budget.get('available'))}")
    if budget.get("overrun"):
        line += f", overrun {number(budget['overrun'])}"
    if budget.get("resets_at"):
        line += f", resets {local_stamp(budget['resets_at'])}"
    more = len(r["budgets"]) - 1
    return ["budget     " + line + (f"  (+{more} sub-budgets: cortex budget)" if more > 0
                                    else "")]


def _event_lines(r: dict) -> list[str]:
    ev = r["events"]
    if ev is None:
        return ["events     (event router not answering)"]
    out = []
    line = (f"written {number(ev.get('written'))}, received {number(ev.get('received'))}, "
            f"duplicates {number(ev.get('duplicates'))}, gaps {number(ev.get('gaps'))}, "
            f"malformed {number(ev.get('malformed'))}")
    if ev.get("unwritable"):
        line += f", UNWRITABLE: {short(ev['unwritable'], 80)}"
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
        out.append(f"metrics    {short(ev['metrics_url'], 100)} (Prometheus)")
    pg = ev.get("postgres")
    if pg:
        line = (f"lag {number(pg.get('lag'))}, inserted {number(pg.get('inserted'))}, "
                f"spooled {number(pg.get('spooled'))}, quarantined "
                f"{number(pg.get('quarantined'))}, "
                f"{'connected' if pg.get('connected') else 'NOT CONNECTED'}")
        if pg.get("last_error"):
            line += f" (last error: {short(pg['last_error'], 80)})"
        out.append("postgres   " + line)
    return out


def watch(home: Path, interval: float, as_json: bool) -> int:
    """Redraw until Ctrl-C; a frame that takes long (a service not answering) delays the
    next one rather than piling them up."""
    try:
        with Screen() as screen:
            while True:
                began = time.monotonic()
                report = gather(home)
                if as_json:
                    emit_json_line(report | {"at": time.time()})
                else:
                    head = (f"cortex status  {stamp(time.time())}  every "
                            f"{human_duration(interval)}, Ctrl-C to stop")
                    body = render_status(report) if report["running"] else (
                        f"no suite is running in {home} (waiting for `cortex up`)")
                    screen.draw(head + "\n" + body)
                time.sleep(max(0.0, interval - (time.monotonic() - began)))
    except KeyboardInterrupt:
        return Exit.OK
