"""The operation catalogue: every operation on the bus, who serves it, who may send it,
and what its fields are. One readable page of what the bus can do.

A service dispatches through `Catalogue.check()`: the operation must exist for that
service and message type, the sender's role (stamped by the broker, never claimed by the
sender) must be one the operation allows, and every field must have its type and range,
before any handler sees the body. Unknown fields are dropped; defaults are filled in.

Roles: `client` (agents, the CLI, the dashboard), `worker` (takes tasks), `service` (a
process the suite started, proven by the suite's secret), `broker` (the broker's own
messages). Field kinds are small classes below; each `check(value)` returns the value or
raises `ProtocolError("bad_request")` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import orjson

from . import wire
from .vocabulary import PRIORITIES, TASK_STATES

ANY = frozenset({"client", "worker", "service"})
CLIENTS = frozenset({"client", "service"})  # operators and agents: not a pooled worker's job
WORKER = frozenset({"worker"})
SERVICE = frozenset({"service"})
BROKER = frozenset({"broker"})
MAX_DEPTH = 32  # JSON nesting the journal and the event log accept
MAX_PAYLOAD = 512 * 1024
MAX_TEXT = 8192


def _bad(name: str, why: str) -> wire.ProtocolError:
    return wire.ProtocolError("bad_request", f"field {name!r} {why}")


class Kind:
    """A field's type and range."""

    def check(self, name: str, value):
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Str(Kind):
    max_len: int = 4096
    empty: bool = False

    def check(self, name, value):
        if not isinstance(value, str):
            raise _bad(name, "must be a string")
        if not value and not self.empty:
            raise _bad(name, "must not be empty")
        if len(value) > self.max_len:
            raise _bad(name, f"is longer than {self.max_len} characters")
        if "\x00" in value:
            raise _bad(name, "contains a NUL character")
        return value

    def describe(self):
        return f"str ≤{self.max_len}"


@dataclass(frozen=True)
class Name(Kind):
    """A peer, task or worker name: short printable ASCII (a routing id)."""

    def check(self, name, value):
        if not wire.valid_name(value):
            raise _bad(name, f"must be 1-{wire.MAX_NAME_BYTES} printable ASCII characters "
                             "without spaces")
        return value

    def describe(self):
        return "name"


@dataclass(frozen=True)
class Int(Kind):
    lo: int = 0
    hi: int = wire.MAX_INT

    def check(self, name, value):
        if type(value) is not int:  # bool is an int subclass and is not a number here
            raise _bad(name, "must be an integer")
        if not self.lo <= value <= self.hi:
            raise _bad(name, f"must be between {self.lo} and {self.hi}")
        return value

    def describe(self):
        return f"int {self.lo}..{self.hi}"


@dataclass(frozen=True)
class Num(Kind):
    lo: float = 0.0
    hi: float = 1e11

    def check(self, name, value):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _bad(name, "must be a number")
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise _bad(name, f"must be a finite number between {self.lo} and {self.hi}")
        return float(value)

    def describe(self):
        return f"number {self.lo:g}..{self.hi:g}"


@dataclass(frozen=True)
class Bool(Kind):
    def check(self, name, value):
        if type(value) is not bool:
            raise _bad(name, "must be true or false")
        return value

    def describe(self):
        return "bool"


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple

    def check(self, name, value):
        if not isinstance(value, str) or value not in self.choices:
            raise _bad(name, f"must be one of {', '.join(self.choices)}")
        return value

    def describe(self):
        return "|".join(self.choices)


@dataclass(frozen=True)
class Json(Kind):
    """Plain JSON data (a payload, a result): encodable, at most `limit` bytes and
    `MAX_DEPTH` deep, so the journal and the event log can always hold it."""

    limit: int = MAX_PAYLOAD

    def check(self, name, value):
        depth = _depth(value)
        if depth > MAX_DEPTH:
            raise _bad(name, f"is nested deeper than {MAX_DEPTH}")
        if depth < 0:
            raise _bad(name, "holds a number that is not finite (NaN or infinity)")
        try:
            size = len(orjson.dumps(value))
        except (TypeError, orjson.JSONEncodeError) as e:
            raise _bad(name, f"must be plain JSON data ({e})") from None
        if size > self.limit:
            raise wire.ProtocolError("too_large", f"field {name!r} of {size} bytes exceeds "
                                                  f"{self.limit}")
        return value

    def describe(self):
        return f"JSON ≤{self.limit // 1024} KiB"


@dataclass(frozen=True)
class ListOf(Kind):
    item: Kind
    max_items: int = 100
    min_items: int = 0

    def check(self, name, value):
        if not isinstance(value, list):
            raise _bad(name, "must be a list")
        if not self.min_items <= len(value) <= self.max_items:
            raise _bad(name, f"must hold {self.min_items} to {self.max_items} items")
        return [self.item.check(f"{name}[{i}]", v) for i, v in enumerate(value)]

    def describe(self):
        return f"[{self.item.describe()}] ≤{self.max_items}"


@dataclass(frozen=True)
class Map(Kind):
    """A nested map checked against its own fields."""

    fields: tuple

    def check(self, name, value):
        if not isinstance(value, dict):
            raise _bad(name, "must be a map")
        return check_fields(self.fields, value, prefix=f"{name}.")

    def describe(self):
        return "{" + ", ".join(f.name for f in self.fields) + "}"


@dataclass(frozen=True)
class Batch(Kind):
    """A list of maps, each checked on its own by the handler (`item()`): one bad item
    is that item's error, not the whole message's."""

    fields: tuple
    max_items: int

    def check(self, name, value):
        if not isinstance(value, list):
            raise _bad(name, "must be a list")
        if not 1 <= len(value) <= self.max_items:
            raise _bad(name, f"must hold 1 to {self.max_items} items")
        return value

    def item(self, name: str, index: int, value) -> dict:
        """Item `index` checked (ProtocolError naming it otherwise)."""
        if not isinstance(value, dict):
            raise _bad(f"{name}[{index}]", "must be a map")
        return check_fields(self.fields, value, prefix=f"{name}[{index}].")

    def describe(self):
        return f"[{{{', '.join(f.name for f in self.fields)}}}] 1..{self.max_items}"


def _depth(value, level: int = 0) -> int:
    """How deep `value` nests (past MAX_DEPTH: MAX_DEPTH + 1), or -1 if it holds a
    non-finite float (JSON has none: orjson would write null)."""
    if level > MAX_DEPTH:
        return level
    if isinstance(value, float):
        return level if math.isfinite(value) else -1
    children = value.values() if isinstance(value, dict) else value \
        if isinstance(value, list) else None
    if children is None:
        return level
    deepest = level + 1
    for child in children:
        d = _depth(child, level + 1)
        if d < 0 or d > MAX_DEPTH:
            return d
        deepest = max(deepest, d)
    return deepest


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    required: bool = False
    default: object = None


def F(name: str, kind: Kind, required: bool = False, default=None) -> Field:  # noqa: N802
    return Field(name, kind, required, default)


def check_fields(fields: tuple[Field, ...], body: dict, prefix: str = "") -> dict:
    """The checked body: each known field checked (or its default), unknown ones dropped."""
    out = {}
    for f in fields:
        value = body.get(f.name)
        if value is None:
            if f.required:
                raise wire.ProtocolError("bad_request", f"missing field {prefix + f.name!r}")
            out[f.name] = f.default
            continue
        out[f.name] = f.kind.check(prefix + f.name, value)
    return out


@dataclass(frozen=True)
class Operation:
    name: str
    service: str  # who serves it (its bus name); "worker" for messages to any worker
    type: bytes  # wire.REQUEST or wire.NOTIFY
    roles: frozenset  # who may send it
    fields: tuple = ()
    doc: str = ""
    senders: frozenset = field(default_factory=frozenset)  # names it must come from, if any


# -- shared field kinds ------------------------------------------------------------------
TASK_ID = Str(64)
ATTEMPT = Int(1, 2**31 - 1)
AMOUNT = Int(0, wire.MAX_INT)
TYPE = Str(64)
AGENT = Str(128)
TYPES = ListOf(TYPE, max_items=64, min_items=1)
# What a task.submit holds (task.submit_many: each of its tasks).
SUBMIT_FIELDS = (
    F("type", TYPE, True), F("idempotency_key", Str(128), True),
    F("description", Str(MAX_TEXT, empty=True), default=""),
    F("priority", Choice(PRIORITIES), default="medium"), F("tokens", AMOUNT, default=0),
    F("timeout", Num(0.001, 7 * 86400)), F("retries", Int(0, 100)),
    F("deadline", Num(0, 1e11)), F("payload", Json()), F("agent", AGENT))
MAX_SUBMIT_BATCH = 200  # tasks per task.submit_many (the message stays within 1 MiB too)
SUBMIT_BATCH = Batch(SUBMIT_FIELDS, MAX_SUBMIT_BATCH)
LEASE_ID = Str(64)
MAX_LEDGER_BATCH = 500  # assigns or settle orders per message
ASSIGN_BATCH = Batch((F("task", TASK_ID, True), F("attempt", ATTEMPT, True),
                      F("amount", AMOUNT, True), F("lease", LEASE_ID, True), F("type", TYPE),
                      F("agent", AGENT)), MAX_LEDGER_BATCH)
SETTLE_BATCH = Batch((F("op", Choice(("ledger.commit", "ledger.release")), True),
                      F("task", TASK_ID, True), F("attempt", ATTEMPT, True),
                      F("used", AMOUNT, default=0), F("type", TYPE), F("agent", AGENT),
                      F("lease", LEASE_ID), F("amount", AMOUNT, default=0)),
                     MAX_LEDGER_BATCH)
ERROR = Map((F("category", Str(32)), F("message", Str(MAX_TEXT, empty=True)),
             F("traceback", Str(16384, empty=True))))

OPERATIONS = [
    # -- scheduler: agents and operators --------------------------------------------------
    Operation("task.submit", "scheduler", wire.REQUEST, ANY, (
        *SUBMIT_FIELDS, F("wait", Num(0, 60), default=0.0),
        F("follow", Num(0, 60), default=0.0)),
        ("the task; same key again: the same task (different content: `conflict`). With "
         "`wait`: the task when it ends or `wait` is up, as `task.wait`. With `follow` "
         "(and no `wait`): the task now, and again when it ends or `follow` is up, as a "
         "held `task.wait` answered under this request's corr + `+` (none if the corr is "
         "64 bytes). Type `auto`: the "
         "scheduler chooses it from the description (`routing` in the task). Errors: "
         "`queue_full`, `rejected` (with the estimated start; for `auto`, with the "
         "candidate types)")),
    Operation("task.submit_many", "scheduler", wire.REQUEST, ANY, (
        F("tasks", SUBMIT_BATCH, True),),
        ("many submits in one message, one journal commit: `{results}`, one per task in "
         "order, the task (`id`, `state`) or that task's error (`code`, `message`); one "
         "bad task refuses only itself. Each task is checked and admitted as `task.submit` "
         "(without `wait`), its idempotency key honoured")),
    Operation("task.status", "scheduler", wire.REQUEST, ANY, (F("id", TASK_ID, True),),
              ("the task: `state`, `waiting` and `waiting_detail`, `eta`, `progress`, "
               "`message`; `trimmed`: finished a while ago, its payload and result dropped "
               "(the result is in its `task.completed` event)")),
    Operation("task.wait", "scheduler", wire.REQUEST, ANY, (
        F("id", TASK_ID, True), F("hold", Num(0, 60), default=0.0)),
        "the task when it ends or when `hold` is up (`final` tells which)"),
    Operation("task.cancel", "scheduler", wire.REQUEST, ANY, (F("id", TASK_ID, True),),
              "cancel a task; the task"),
    Operation("task.list", "scheduler", wire.REQUEST, ANY, (
        F("state", Choice(TASK_STATES)), F("type", TYPE), F("agent", AGENT),
        F("limit", Int(1, 10_000), default=100), F("newest", Bool(), default=False)),
        ("`{tasks, total, truncated, cut_to_fit}`: the latest `limit` matches that fit one "
         "message (`cut_to_fit`: some did not), oldest first "
         "(`newest`: newest first)")),
    Operation("task.progress", "scheduler", wire.REQUEST, ANY, (
        F("id", TASK_ID, True), F("fraction", Num(0, 1), True),
        F("message", Str(500, empty=True), default="")),
        "the task; a `task.progress` event at most every 0.5 s per task"),
    Operation("worker.list", "scheduler", wire.REQUEST, ANY, (),
              "workers (`state`: idle, claimed, busy, leaving)"),
    Operation("scheduler.status", "scheduler", wire.REQUEST, ANY, (),
              ("queues, states, waiting reasons, counters, `providers` (their windows), "
               "`ledger_orders` (requests to the ledger not yet answered)")),
    Operation("model.status", "scheduler", wire.REQUEST, ANY, (),
              ("models (trained on what, when, held-out accuracy), `training`, "
               "`last_failure`; `routing`: the router's held-out accuracy and confusion")),
    Operation("route.explain", "scheduler", wire.REQUEST, ANY, (
        F("description", Str(MAX_TEXT), True), F("words", Int(1, 20), default=5)),
        ("how a description would be routed: `type`, `confidence`, `runner_up`, `top`, "
         "and per top type the `words` that weighed most (error `unavailable`: no router)")),
    Operation("line.open", "scheduler", wire.REQUEST, frozenset({"client"}), (),
              "a token (`{token}`, good once) to say HELLO with on the scheduler's direct "
              "line (`run/work.sock`); error `no_line` where there is none (a tcp bus, or "
              "`CORTEX_PORTABLE=1` and systems without epoll or `SEQPACKET` sockets): the "
              "client then stays on the bus for good"),
    Operation("model.train", "scheduler", wire.REQUEST, CLIENTS, (),
              "retrain now, in a child (`{started, reason}`: why it did not start)"),
    # -- scheduler: workers ----------------------------------------------------------------
    Operation("task.finished", "scheduler", wire.REQUEST, WORKER, (
        F("id", TASK_ID, True), F("attempt", ATTEMPT, True), F("ok", Bool(), True),
        F("result", Json()), F("error", ERROR), F("tokens_used", AMOUNT, default=0),
        F("started_at", Num(0, 1e11)), F("finished_at", Num(0, 1e11)),
        F("cpu_s", Num(0, 1e7), default=0.0), F("rss_mb", Num(0, 1e7), default=0.0),
        F("mem_mb", Num(0, 1e7), default=0.0), F("fold", Bool(), default=False),
        F("direct", Bool(), default=False)),
        "a task's end; re-sent until acknowledged (`fold`: the reply may carry the "
        "worker's next prefetched task as `run`)"),
    Operation("worker.ready", "scheduler", wire.NOTIFY, WORKER, (
        F("types", TYPES, True), F("pid", Int(0, 2**31 - 1), default=0),
        F("done", Int(0, wire.MAX_INT), default=0), F("direct", Bool(), default=False)),
        "idle and able to take a task (`direct`: it can take the direct line, see worker.direct)"),
    Operation("worker.leaving", "scheduler", wire.NOTIFY, WORKER, (
        F("reason", Str(64), default="stopping"),), "stop dispatching to me"),
    Operation("task.started", "scheduler", wire.NOTIFY, WORKER, (
        F("id", TASK_ID, True), F("attempt", ATTEMPT, True), F("at", Num(0, 1e11))),
        "a task still running after a moment"),
    Operation("task.heartbeat", "scheduler", wire.NOTIFY, WORKER, (
        F("id", TASK_ID, True), F("attempt", ATTEMPT, True), F("types", TYPES),
        F("tokens_used", AMOUNT, default=0), F("pid", Int(0, 2**31 - 1), default=0),
        F("direct", Bool(), default=False)), "while a handler runs"),
    Operation("task.rejected", "scheduler", wire.NOTIFY, WORKER, (
        F("id", TASK_ID, True), F("attempt", ATTEMPT, True),
        F("reason", Choice(("stopping", "busy", "sync")), True)),
        "could not take it (`sync`: a prefetched task given back after a scheduler restart)"),
    Operation("task.recalled", "scheduler", wire.NOTIFY, WORKER, (
        F("id", TASK_ID, True), F("attempt", ATTEMPT, True), F("recalled", Bool(), True)),
        "the answer to a task.recall: given back (`recalled`), or it had started"),
    Operation("task.progress", "scheduler", wire.NOTIFY, WORKER, (
        F("id", TASK_ID, True), F("attempt", ATTEMPT, True), F("fraction", Num(0, 1), True),
        F("message", Str(500, empty=True), default="")), "a handler's ctx.progress()"),
    # -- scheduler: other services ---------------------------------------------------------
    Operation("worker.exited", "scheduler", wire.NOTIFY, SERVICE, (
        F("name", Name(), True), F("pid", Int(0, 2**31 - 1), default=0),
        F("code", Int(-255, 255), default=0),
        F("group", Str(64, empty=True), default=""),
        F("types", ListOf(TYPE, max_items=64), default=[]),
        F("crashing", Str(2000, empty=True), default="")),
        "the pool reaped a worker (`crashing`: its group's last error, when it crash-loops)",
        senders=frozenset({"pool"})),
    Operation("ledger.budgets", "scheduler", wire.NOTIFY, SERVICE, (
        F("budgets", Json(), True),),
        "the ledger's budgets, sent as one is set (admission refuses what no limit allows)",
        senders=frozenset({"ledger"})),
    Operation("peer.lost", "scheduler", wire.NOTIFY, BROKER, (
        F("name", Name(), True), F("role", Choice(("client", "worker", "service",
                                                   "unknown")), True)),
        "a peer went silent", senders=frozenset({"broker"})),
    # -- workers (any worker's own ops, sent by the scheduler) -----------------------------
    Operation("task.run", "worker", wire.NOTIFY, SERVICE, (
        F("task", Map((F("id", TASK_ID, True), F("attempt", ATTEMPT, True),
                       F("type", TYPE, True), F("description", Str(MAX_TEXT, empty=True)),
                       F("priority", Choice(PRIORITIES)), F("payload", Json()),
                       F("tokens", AMOUNT, default=0), F("timeout", Num(0, 7 * 86400)),
                       F("lease", LEASE_ID))),
          True), F("prefetch", Bool(), default=False)),
        "run this task (`prefetch`: when the one in hand ends; the highest priority first)",
        senders=frozenset({"scheduler"})),
    Operation("task.recall", "worker", wire.NOTIFY, SERVICE, (
        F("id", TASK_ID, True), F("attempt", ATTEMPT, True)),
        "give this prefetched task back unless started (answered by task.recalled)",
        senders=frozenset({"scheduler"})),
    Operation("task.cancel", "worker", wire.NOTIFY, SERVICE, (
        F("id", TASK_ID, True), F("attempt", ATTEMPT, True)), "stop this task",
        senders=frozenset({"scheduler"})),
    Operation("worker.direct", "worker", wire.NOTIFY, SERVICE, (
        F("token", Str(64), True),),
        "say HELLO with this token on the scheduler's direct line (`run/work.sock`)",
        senders=frozenset({"scheduler"})),
    Operation("worker.sync", "worker", wire.NOTIFY, SERVICE, (),
              "after a scheduler restart: what do you run?",
              senders=frozenset({"scheduler"})),
    # -- ledger ------------------------------------------------------------------------------
    Operation("ledger.reserve", "ledger", wire.REQUEST, CLIENTS, (
        F("task", TASK_ID, True), F("attempt", ATTEMPT, default=1), F("amount", AMOUNT, True),
        F("type", TYPE), F("agent", AGENT), F("worker", Name())),
        "`{granted, ...}` (a refusal names the scope that blocked)"),
    Operation("ledger.extend", "ledger", wire.REQUEST, ANY, (
        F("task", TASK_ID, True), F("attempt", ATTEMPT, default=1), F("amount", AMOUNT, True),
        F("seq", Int(1, 2**31 - 1), default=1), F("lease", LEASE_ID),
        F("carved", AMOUNT, default=0)),
        "`{granted, reserved}` (`lease`, `carved`: the task's tokens came from that lease, "
        "assigned first if the scheduler's assign is still behind)"),
    Operation("ledger.commit", "ledger", wire.REQUEST, CLIENTS, (
        F("task", TASK_ID, True), F("attempt", ATTEMPT, default=1), F("used", AMOUNT, True),
        F("type", TYPE), F("agent", AGENT)), "committed, released, overrun"),
    Operation("ledger.release", "ledger", wire.REQUEST, CLIENTS, (
        F("task", TASK_ID, True), F("attempt", ATTEMPT, default=1)), "released"),
    # The scheduler's leases (services/ledger/leases.py): tokens held ahead of its tasks.
    Operation("ledger.lease", "ledger", wire.REQUEST, SERVICE, (
        F("lease", LEASE_ID, True), F("amount", AMOUNT, True), F("type", TYPE),
        F("agent", AGENT)),
        "`{granted, lease, amount, scopes}`: a block of tokens under the scheduler's id "
        "(a repeated id: the first answer; refused past half of what a scope has left)",
        senders=frozenset({"scheduler"})),
    Operation("ledger.assign", "ledger", wire.REQUEST, SERVICE, (
        F("items", ASSIGN_BATCH, True),),
        "`{results}`: parts of leases become (task, attempt) reservations, one result each",
        senders=frozenset({"scheduler"})),
    Operation("ledger.settle", "ledger", wire.REQUEST, SERVICE, (
        F("orders", SETTLE_BATCH, True), F("items", ASSIGN_BATCH)),
        "`{results, assigned}`: commit / release orders in one message (one naming a lease "
        "assigns first if that is still due), after the `items` to assign, if any",
        senders=frozenset({"scheduler"})),
    Operation("ledger.return", "ledger", wire.REQUEST, SERVICE, (
        F("lease", LEASE_ID, True),),
        "`{returned}`: a lease's unassigned rest released, the lease closed for good",
        senders=frozenset({"scheduler"})),
    Operation("ledger.set", "ledger", wire.REQUEST, CLIENTS, (
        F("scope", Str(300), True), F("limit", AMOUNT), F("window", Str(32))),
        "set a budget: scope global, type:X or agent:X (no `limit`: unlimited)"),
    Operation("ledger.status", "ledger", wire.REQUEST, ANY, (), "budgets"),
    Operation("ledger.task", "ledger", wire.REQUEST, ANY, (F("task", TASK_ID, True),),
              "a task's reservation"),
    # -- event router ----------------------------------------------------------------------
    Operation("events.recent", "events", wire.REQUEST, ANY, (
        F("n", Int(1, 10_000), default=100), F("type", Str(200)), F("before", Int())),
        ("`{events, more, before}`: the last events from the ring buffer (before position "
         "`before`), oldest first, as many as fit one message; `more`: older ones remain, "
         "asked with `before`")),
    Operation("events.status", "events", wire.REQUEST, ANY, (), "counters, PostgreSQL"),
    Operation("events.metrics", "events", wire.REQUEST, ANY, (
        F("buckets", Bool(), default=False),), "latency summaries (`buckets`: histograms)"),
    Operation("events.query", "events", wire.REQUEST, ANY, (
        F("task", Str(200)), F("type", Str(200)), F("worker", Str(200)), F("text", Str(200)),
        F("since", Num(0, 1e11)), F("until", Num(0, 1e11)),
        F("limit", Int(1, 5000), default=1000), F("newest", Bool(), default=False),
        F("after", Str(300))),
        ("`{events, more, cursor, source}`: a page of the log's events (PostgreSQL when "
         "configured) matching the filters, in time order (`newest`: newest first), at "
         "most `limit` and as many as fit one message; `more`: ask again with `after` = "
         "`cursor` for the next page (`partial`: the read hit its time bound)")),
    # -- pool --------------------------------------------------------------------------------
    Operation("pool.status", "pool", wire.REQUEST, ANY, (), "worker processes"),
    Operation("pool.kill", "pool", wire.NOTIFY, SERVICE, (
        F("worker", Name(), True), F("pid", Int(0, 2**31 - 1), default=0),
        F("reason", Str(200), default="requested"), F("grace", Num(0, 600), default=5.0)),
        "TERM a worker's processes, KILL after the grace", senders=frozenset({"scheduler"})),
    Operation("pool.scale", "pool", wire.NOTIFY, SERVICE, (
        F("type", TYPE, True), F("add", Int(1, 100), True), F("reason", Json(16384))),
        "start extra workers", senders=frozenset({"scheduler"})),
    Operation("peer.lost", "pool", wire.NOTIFY, BROKER, (
        F("name", Name(), True), F("role", Str(16), True)), "a peer went silent",
        senders=frozenset({"broker"})),
    # -- broker ------------------------------------------------------------------------------
    Operation("broker.status", "broker", wire.REQUEST, ANY, (), "peers and counters"),
    Operation("broker.peers", "broker", wire.REQUEST, ANY, (), "peers"),
]

# Replies a service reads back from a peer whose answers it cannot vouch for: their
# bodies are checked too (they must also come from the one that was asked).
REPLIES = {
    "broker.peers": (F("peers", ListOf(Map((F("name", Name(), True),
                                            F("role", Str(16), True))), max_items=1_000_000),
                       default=[]),),
}


class Catalogue:
    """The operations one service serves, looked up by (message type, op)."""

    def __init__(self, service: str, operations=OPERATIONS):
        self.service = service
        self.ops = {(op.type, op.name): op for op in operations if op.service == service}
        if not self.ops:
            raise ValueError(f"no operations for {service!r}")

    def check(self, type_: bytes, body: dict, role: str, sender: str) -> tuple[Operation,
                                                                                dict]:
        """(operation, checked body) or ProtocolError: unknown_type, unauthorized,
        bad_request or too_large."""
        name = body.get("op")
        op = self.ops.get((type_, name)) if isinstance(name, str) else None
        if op is None:
            shown = name if isinstance(name, str) else type(name).__name__
            raise wire.ProtocolError("unknown_type", f"{self.service} has no "
                                     f"{type_.decode()} operation {str(shown)[:64]!r}")
        if role not in op.roles or (op.senders and sender not in op.senders):
            raise wire.ProtocolError("unauthorized", f"a {role} may not send {op.name}")
        return op, check_fields(op.fields, body)


def check_reply(answering: str, body: dict) -> dict:
    """The checked body of a reply to one of `REPLIES`' operations."""
    return check_fields(REPLIES[answering], body)


def table(service: str | None = None) -> list[str]:
    """The catalogue as Markdown table rows (protocol/README.md is made from it)."""
    rows = ["| service | op | type | who may send | fields | what |",
            "| --- | --- | --- | --- | --- | --- |"]
    for op in OPERATIONS:
        if service is not None and op.service != service:
            continue
        fields = ", ".join(f"`{f.name}`{'' if f.required else '?'} ({f.kind.describe()})"
                           for f in op.fields) or "—"
        who = ", ".join(sorted(op.roles))
        if op.senders:
            who += f" ({', '.join(sorted(op.senders))})"
        rows.append(f"| {op.service} | `{op.name}` | {op.type.decode()} | {who} | {fields} | "
                    f"{op.doc} |")
    return rows
