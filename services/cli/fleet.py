"""The fleet's resources: `cortex workers` and `cortex budget [set]`."""

from __future__ import annotations

import argparse
import time

from cortex.protocol import errors

from .argtypes import limit_value, window_value
from .reach import PING_TIMEOUT, connect
from .registry import JSON, CliError, Exit, arg, command
from .render import emit, emit_json, escape, human_duration, local_stamp, mib, number, table


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
    rows = sorted(merged.values(), key=lambda w: (str(w.get("group") or ""),
                                                  w.get("slot") or 0, str(w["name"])))
    if args.json:
        emit_json(rows)
        return Exit.OK
    now = time.time()
    emit(table(["NAME", "GROUP", "PID", "STATE", "TASK", "DONE", "RSS", "CPU", "UP"],
               [[w["name"], w.get("group"), w.get("pid"),
                 w.get("state") or "unregistered", w.get("task"), w.get("done"),
                 mib(w.get("rss_mb")), human_duration(w.get("cpu_s")),
                 human_duration(now - w["started"]) if w.get("started") else None]
                for w in rows]))
    busy = sum(1 for w in rows if w.get("state") in ("busy", "claimed"))
    emit(f"{len(rows)} workers, {busy} busy" + (f" ({'; '.join(notes)})" if notes else ""))
    return Exit.OK


def limit_text(limit) -> str:
    return "unlimited" if limit is None else number(limit)


@command("budget", JSON)
def cmd_budget(args):
    """Show token budgets: limit, reserved (by tasks), leased (held by the scheduler's
    leases, not yet any task's), committed, overrun, available, window, reset."""
    with connect(args) as client:
        budgets = client.budget()["budgets"]
    if args.json:
        emit_json(budgets)
        return Exit.OK
    emit(table(["SCOPE", "LIMIT", "RESERVED", "LEASED", "COMMITTED", "OVERRUN", "AVAILABLE",
                "WINDOW", "RESETS_AT"],
               [[b["scope"], limit_text(b.get("limit")), number(b.get("reserved")),
                 number(b.get("leased", 0)), number(b.get("committed")), number(b.get("overrun")),
                 number(b.get("available")), b.get("window") or "none",
                 local_stamp(b["resets_at"]) if b.get("resets_at") else "never"]
                for b in budgets]))
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
        emit_json(reply)
        return Exit.OK
    emit(f"{escape(reply.get('scope'))}: limit {limit_text(reply.get('limit'))}, window "
         f"{escape(reply.get('window') or 'none')}, reserved {number(reply.get('reserved'))}, "
         f"leased {number(reply.get('leased', 0))}, "
         f"committed {number(reply.get('committed'))}, available "
         f"{number(reply.get('available'))}")
    if reply.get("note"):
        emit(f"note: {escape(reply['note'])}")
    return Exit.OK
