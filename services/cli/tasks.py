"""Tasks: `cortex task create | list | show | wait | cancel`."""

from __future__ import annotations

import time

from cortex.protocol import errors
from cortex.protocol.vocabulary import FINAL_STATES, PRIORITIES, TASK_STATES

from .argtypes import deadline, json_value, name, non_negative_int, positive_int, seconds
from .reach import PING_TIMEOUT, connect
from .registry import JSON, CliError, Exit, arg, command
from .render import (
    emit,
    emit_json,
    escape,
    escape_block,
    fields,
    human_duration,
    key_data,
    number,
    percent,
    short,
    stamp,
    table,
)
from .route import routing_line
from .terminal import ProgressLine

ACTIVE_STATES = tuple(s for s in TASK_STATES if s not in FINAL_STATES)
LIST_PAGE = 1000  # tasks asked for per listing when cancelling in bulk
PROGRESS_HOLD = 0.5  # seconds between progress lines while `task wait` shows one


@command("task create",
         arg("--type", required=True, type=name, metavar="T",
             help="task type (which workers run it); auto: chosen from the description"),
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
         arg("--agent", type=name, metavar="NAME",
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
                             idempotency_key=args.key, agent=args.agent,
                             follow=False)  # we exit: nobody here waits for it
    if args.json:
        emit_json(task)
    else:
        emit(escape(task["id"]))
    return Exit.OK


def waiting_text(task: dict, now: float) -> str:
    if task.get("state") != "queued":
        return "-"
    reason = escape(task.get("waiting") or "-")
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
        emit_json(task | {"ledger": ledger})
    else:
        emit(render_task(task, ledger, time.time()))
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
    if task.get("prefetched"):  # dispatched, not started: it waits for the worker's task
        rows[-1] = ("worker", f"{task.get('worker')} (prefetched: starts when its task ends)")
    if task.get("routing"):
        rows.append(("routing", routing_line(task["routing"])))
    if task.get("state") == "queued":
        rows.append(("waiting", waiting_text(task, now)))
        if task.get("waiting_detail"):
            rows.append(("why", key_data(task["waiting_detail"], width=200)))
    if task.get("eta") and task.get("state") == "queued":
        rows.append(("eta", f"{stamp(task['eta'])} (in {human_duration(task['eta'] - now)})"))
    if task.get("deadline"):
        rows.append(("deadline", stamp(task["deadline"])))
    tokens = (f"requested {number(task.get('tokens'))}, reserved {number(task.get('reserved'))}"
              f", used {number(task.get('tokens_used'))}")
    if ledger:
        tokens += (f"; ledger: {escape(ledger.get('state'))}, granted "
                   f"{number(ledger.get('granted'))}, used {number(ledger.get('used'))}")
        if ledger.get("overrun"):
            tokens += f", OVERRUN {number(ledger['overrun'])}"
    rows.append(("tokens", tokens))
    rows.append(("timeout", human_duration(task.get("timeout"))))
    if task.get("progress") or task.get("message"):
        rows.append(("progress", progress_text(task)))
    if created is not None:
        steps = [f"created {stamp(created, millis=True)}"] + [
            f"{escape(step)} +{human_duration(ts - created)}" for step, ts in sorted(
                times.items(), key=lambda kv: kv[1]) if step != "created"]
        rows.append(("times", ", ".join(steps)))
        end = times.get(task.get("state")) if task.get("final") else now
        rows.append(("age", human_duration((end or now) - created)
                     + (" (total)" if task.get("final") else "")))
    if task.get("result") is not None:
        rows.append(("result", short(task["result"], 300)))
    if task.get("error"):
        err = task["error"]
        rows.append(("error", f"{escape(err.get('category'))}: {short(err.get('message'), 300)}"))
    if task.get("payload") is not None:
        rows.append(("payload", short(task["payload"], 300)))
    trace = (task.get("error") or {}).get("traceback")
    if trace:  # the failed handler's, as the worker caught it
        return fields(rows) + "\ntraceback:\n" + escape_block(str(trace)).rstrip()
    return fields(rows)


def progress_text(task: dict) -> str:
    fraction = task.get("progress")
    text = percent(fraction) if isinstance(fraction, int | float) else "-"
    if task.get("message"):
        text += " " + short(task["message"], 100)
    return text


def matches(task: dict, state: str | None, task_type: str | None, agent: str | None) -> bool:
    """The filters checked here too: a scheduler that ignored one must not widen a list,
    still less a bulk cancel."""
    return ((state is None or task.get("state") == state)
            and (task_type is None or task.get("type") == task_type)
            and (agent is None or task.get("agent") == agent))


def list_body(state, task_type, agent, limit: int, newest: bool = False) -> dict:
    body = {"limit": limit}
    for key, value in (("state", state), ("type", task_type), ("agent", agent)):
        if value is not None:
            body[key] = value
    if newest:
        body["newest"] = True
    return body


FILTERS = (arg("--type", type=name, metavar="T", help="only tasks of this type"),
           arg("--agent", type=name, metavar="NAME", help="only tasks this agent submitted"))


@command("task list",
         arg("--state", choices=list(TASK_STATES), help="only tasks in this state"),
         *FILTERS,
         arg("--limit", type=positive_int, default=50, metavar="N",
             help="at most N tasks (default 50)"),
         arg("--newest", action="store_true", help="newest first (default: newest last)"),
         JSON)
def cmd_task_list(args):
    """List tasks: id, type, priority, state, attempt, worker, waiting/eta, age.

    Filters (--state, --type, --agent) combine. When more tasks match than --limit, the
    newest N are shown and a note on stderr says how many matched.
    """
    with connect(args) as client:
        reply = client.call("scheduler", "task.list", list_body(
            args.state, args.type, args.agent, args.limit, args.newest))
    tasks = [t for t in reply.get("tasks", []) if matches(t, args.state, args.type, args.agent)]
    total = reply.get("total")
    truncated = reply.get("truncated")
    if truncated is None:
        truncated = isinstance(total, int) and total > len(tasks)
    if args.json:
        emit_json(tasks)
    elif not tasks:
        emit("no tasks" + (f" in state {args.state}" if args.state else ""))
    else:
        now = time.time()
        emit(table(["ID", "TYPE", "PRIORITY", "STATE", "ATTEMPT", "WORKER", "WAITING/ETA",
                    "AGE"],
                   [[t["id"], t.get("type"), t.get("priority"), t.get("state"),
                     t.get("attempt"), t.get("worker"), waiting_text(t, now),
                     human_duration(now - (t.get("times") or {}).get("created", now))]
                    for t in tasks]))
    if truncated:
        more = ("the rest did not fit one message: narrow the filters"
                if reply.get("cut_to_fit") else "--limit shows more")
        emit(f"# showing {len(tasks)} of {number(total)} matching tasks ({more})", err=True)
    return Exit.OK


@command("task wait",
         arg("id", metavar="ID"),
         arg("--timeout", type=seconds, default=300.0, metavar="S",
             help="seconds to wait (default 300)"),
         JSON)
def cmd_task_wait(args):
    """Wait for a task to end. Exit 0 completed, 1 failed/dead/cancelled, 4 still running.

    On a terminal, a line on stderr shows the task's state, progress and message while
    it runs.
    """
    line = ProgressLine()
    with connect(args) as client:
        try:
            task = wait_showing(client, args.id, args.timeout, line)
        except errors.Timeout as e:
            if not e.details.get("id"):
                raise  # the scheduler did not answer, not the task that did not end
            if args.json:
                emit_json(e.details)
            raise CliError(Exit.TIMEOUT, f"task {args.id} still {e.details.get('state')} "
                                         f"after {human_duration(args.timeout)}") from None
        finally:
            line.clear()
    if args.json:
        emit_json(task)
    else:
        times = task.get("times") or {}
        took = human_duration((times.get(task["state"]) or 0) - (times.get("created") or 0))
        text = f"{escape(task['id'])} {task['state']} after {took}"
        if task.get("error"):
            text += (f": {escape(task['error'].get('category'))}: "
                     f"{short(task['error'].get('message'), 200)}")
        elif task.get("result") is not None:
            text += f": {short(task['result'], 200)}"
        emit(text)
    return Exit.OK if task["state"] == "completed" else Exit.FAILED


def wait_showing(client, task_id: str, timeout: float, line: ProgressLine) -> dict:
    """The task once it ends; on a terminal, asks every PROGRESS_HOLD seconds to redraw
    the progress line. Raises Timeout (with the task) if it does not end in time."""
    if not line.live:
        return client.wait(task_id, timeout=timeout)
    began = time.monotonic()
    end = began + timeout
    while True:
        hold = max(0.0, min(PROGRESS_HOLD, end - time.monotonic()))
        try:
            task = client.call("scheduler", "task.wait", {"id": task_id, "hold": hold},
                               timeout=hold + 10.0, resend_after=hold + 1.0)
        except errors.Timeout:
            if time.monotonic() >= end:
                raise
            continue  # the scheduler is restarting: keep asking until our deadline
        if task.get("final"):
            return task
        if time.monotonic() >= end:
            raise errors.Timeout(f"task {task_id} still {task.get('state')}", details=task)
        state = task.get("state")
        detail = (waiting_text(task, time.time()) if state == "queued"
                  else progress_text(task))
        line.show(f"{task_id} {state} {detail} "
                  f"[{human_duration(time.monotonic() - began)}]")


@command("task cancel",
         arg("ids", nargs="*", metavar="ID", help="the tasks to cancel"),
         arg("--state", choices=ACTIVE_STATES,
             help="instead of IDs: every task in this state (with --type/--agent)"),
         *FILTERS,
         JSON)
def cmd_task_cancel(args):
    """Cancel tasks: by ID, or every task in a state (a running one's worker is stopped).

        cortex task cancel ID [ID...]
        cortex task cancel --state queued [--type T] [--agent A]

    Exit 0 when every task named is now cancelled; 9 when one had already ended. In bulk,
    exit 0 however many matched (the count is printed); a task that started between the
    listing and its cancel is cancelled while running.
    """
    if bool(args.ids) == bool(args.state):
        raise CliError(Exit.USAGE, "give task IDs or --state (with --type/--agent), not both")
    if args.ids and (args.type or args.agent):
        raise CliError(Exit.USAGE, "--type and --agent filter --state; they go without IDs")
    with connect(args) as client:
        if args.state:
            cancelled, ended = cancel_matching(client, args.state, args.type, args.agent)
        else:
            cancelled, ended = [], []
            for task_id in args.ids:
                task = client.cancel(task_id)
                (cancelled if task.get("state") == "cancelled" else ended).append(task)
    if args.json:
        emit_json({"cancelled": [t["id"] for t in cancelled],
                   "already_ended": [{"id": t["id"], "state": t.get("state")} for t in ended]})
    if args.state:
        what = ", ".join(f"{k} {v}" for k, v in (("state", args.state), ("type", args.type),
                                                   ("agent", args.agent)) if v)
        if not args.json:
            emit(f"cancelled {len(cancelled)} tasks ({what})"
                 + (f"; {len(ended)} ended meanwhile" if ended else ""))
        return Exit.OK
    if not args.json:
        for task in cancelled:
            emit(f"{escape(task['id'])} cancelled")
    if ended:
        raise CliError(Exit.CONFLICT, "; ".join(
            f"task {t['id']} had already ended: {t.get('state')}" for t in ended))
    return Exit.OK


def cancel_matching(client, state: str, task_type: str | None, agent: str | None
                    ) -> tuple[list[dict], list[dict]]:
    """Cancel every task matching, page by page; each task is tried once."""
    tried: set[str] = set()
    cancelled: list[dict] = []
    ended: list[dict] = []
    while True:
        reply = client.call("scheduler", "task.list",
                            list_body(state, task_type, agent, LIST_PAGE))
        listed = reply.get("tasks", [])
        batch = [t for t in listed
                 if matches(t, state, task_type, agent) and t["id"] not in tried]
        for task in batch:
            tried.add(task["id"])
            try:
                done = client.cancel(task["id"])
            except errors.NotFound:
                continue  # gone meanwhile (e.g. trimmed from the table)
            (cancelled if done.get("state") == "cancelled" else ended).append(done)
        more = reply.get("truncated") or len(listed) >= LIST_PAGE
        if not batch or not more:
            return cancelled, ended
