"""Admission: what a `task.submit` must hold, whether it is accepted, and the refusals
remembered by idempotency key.

A non-critical task is refused with `queue_full` when its type has `max_queue_per_type`
queued, and any task with `rejected` when its estimated start is past its deadline or
more than `max_wait` away. Tasks that could never run are refused too:
`budget_exceeded` when the tokens asked are above the limit of a budget that applies (the
global one, its type's, its agent's: a copy the scheduler keeps of the ledger's budgets),
whatever the window (a reset empties a window, it never makes it larger); `unknown_type`,
listing the served types, when no pool group serves its type, `[types] external` does not
declare it, no worker of it has been seen, and the scheduler has run for `[types] grace`
seconds (external workers may register after a start).
A refusal is journaled by key: a re-sent copy of a refused submit gets the same answer,
never a late acceptance (the client already took the refusal and may have submitted anew).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.settings import SchedulerSettings
from cortex.services.scheduler.clock import Now
from cortex.services.scheduler.tasks import PRIORITIES

MAX_DESCRIPTION = 8192
MAX_PAYLOAD_BYTES = 512 * 1024
MAX_SUBMIT_WAIT = 60.0  # seconds a submit may hold its reply for the task's end
ROUTED = "auto"  # a type that asks for routing: judged by what it is routed to
REFUSALS_KEPT = 100_000  # refused idempotency keys remembered (oldest forgotten first)


@dataclass(slots=True)
class Request:
    """A checked `task.submit`."""

    key: str
    type: str
    description: str
    priority: str
    tokens: int
    timeout: float
    retries: int
    deadline: float | None  # unix time by which it should start
    agent: str
    payload: object
    size: int  # bytes of the request (the predictor's payload-size feature)
    wait: float  # seconds to hold the reply for the task's end (0: reply at once)
    digest: str = ""  # of its content (clients.content_digest): its key with other content
    # is a `conflict`, not this refusal again


def parse_wait(body: dict) -> float:
    return wire.field_number(body, "wait", lo=0, hi=MAX_SUBMIT_WAIT, required=False,
                             default=0.0)


class Admission:
    def __init__(self, settings: SchedulerSettings, counters: dict):
        self.settings = settings
        self.counters = counters
        # key -> (code, why, digest of the refused content)
        self.refusals: OrderedDict[str, tuple[str, str, str]] = OrderedDict()
        # Who serves what: configured types, those seen from a worker, a live lookup.
        self.configured_types: frozenset[str] = frozenset()
        self.seen_types: set[str] = set()
        self.serving: Callable[[str], bool] = lambda task_type: True
        self.types_grace = 0.0
        self.types_from = 0.0  # monotonic start of the grace
        # scope -> limit of the budgets that never reset (the ledger's, copied)
        self.budgets: dict[str, int] = {}

    def know_types(self, configured, serving: Callable[[str], bool], grace: float,
                   since: float) -> None:
        self.configured_types = frozenset(configured)
        self.serving, self.types_grace, self.types_from = serving, grace, since

    def know_budgets(self, rows) -> None:
        """The ledger's budgets, from its status (`[{scope, limit, ...}]`) or the settings
        (`{scope: {limit, window}}`); a malformed row is left out."""
        items = rows.items() if isinstance(rows, dict) else (
            (r.get("scope"), r) for r in rows if isinstance(r, dict))
        budgets = {}
        for scope, spec in items:
            if not isinstance(spec, dict) or spec.get("window"):
                continue  # a windowed budget resets: its tasks wait for it
            limit = spec.get("limit")
            if isinstance(scope, str) and isinstance(limit, int) and not isinstance(limit, bool):
                budgets[scope] = limit
        self.budgets = budgets

    def never_runs(self, request: Request, now: Now) -> tuple[str, str] | None:
        """(code, reason) for a task that could never run, else None."""
        for scope in ("global", f"type:{request.type}", f"agent:{request.agent}"):
            limit = self.budgets.get(scope)
            if limit is not None and request.tokens > limit:
                return "budget_exceeded", (
                    f"asks {request.tokens} tokens, above the limit of {limit} of budget "
                    f"{scope}, which has no window to reset it (raise it with `cortex "
                    f"budget set {scope} ...`)")
        task_type = request.type
        if task_type == ROUTED or task_type in self.configured_types \
                or task_type in self.seen_types:
            return None
        if self.serving(task_type):
            self.seen_types.add(task_type)
            return None
        if now.mono - self.types_from < self.types_grace:
            return None
        served = sorted(self.configured_types | self.seen_types)
        return "not_served", (f"no worker serves type {task_type!r} (served: "
                                f"{', '.join(served) or 'none'}); declare an external "
                                f"worker's types in [types] external")

    def parse(self, body: dict, peer: bytes) -> Request:
        """The submit's fields, checked (ProtocolError `bad_request` otherwise)."""
        settings = self.settings
        payload = body.get("payload")
        if payload is not None:
            wire.json_safe(payload, "payload", MAX_PAYLOAD_BYTES)
        return Request(
            key=wire.field_str(body, "idempotency_key", max_len=128),
            type=wire.field_str(body, "type", max_len=64),
            description=wire.field_str(body, "description", max_len=MAX_DESCRIPTION,
                                       required=False, default="", allow_empty=True),
            priority=wire.field_choice(body, "priority", PRIORITIES, required=False,
                                       default="medium"),
            tokens=wire.field_int(body, "tokens", required=False, default=0),
            timeout=wire.field_number(body, "timeout", lo=0.001, hi=7 * 86400, required=False,
                                      default=settings.default_timeout),
            retries=wire.field_int(body, "retries", hi=100, required=False,
                                   default=settings.default_retries),
            deadline=wire.field_number(body, "deadline", lo=0, hi=1e11, required=False),
            agent=wire.field_str(body, "agent", max_len=128, required=False,
                                 default=peer.decode(errors="replace")),
            payload=payload,
            size=wire.field_int(body, "_size", required=False, default=0),
            wait=parse_wait(body))

    def judge(self, request: Request, queued: int, wait_s: float, now: Now
              ) -> tuple[str, str] | None:
        """(code, reason) if the task is refused: `queued` tasks of its type wait already,
        and it would start in `wait_s` seconds."""
        settings = self.settings
        never = self.never_runs(request, now)
        if never is not None:
            return never
        if request.priority != "critical" and queued >= settings.max_queue_per_type:
            return "queue_full", (f"queue for {request.type} is full "
                                  f"({settings.max_queue_per_type} tasks)")
        eta = now.wall + wait_s
        if request.deadline is not None and eta > request.deadline:
            return "rejected", (f"estimated start {eta:.3f} is past the deadline "
                                f"{request.deadline:.3f} (in {wait_s:.1f} s)")
        if wait_s > settings.max_wait:
            return "rejected", (f"estimated start in {wait_s:.0f} s exceeds the maximum wait "
                                f"of {settings.max_wait:.0f} s")
        return None

    def refuse(self, fx: Effects, peer: bytes, corr: bytes, request: Request, code: str,
               reason: str) -> None:
        self.record_refusal(fx, request, code, reason)
        fx.error(peer, corr, code, reason)

    def record_refusal(self, fx: Effects, request: Request, code: str, reason: str) -> None:
        """Journal, announce and remember a refusal (the caller answers it); remembered
        last, so a refusal is never kept without its record."""
        fx.records.append({"k": "rejected", "key": request.key, "code": code, "reason": reason,
                           "digest": request.digest})
        fx.emit("scheduler.rejected", {"type": request.type, "priority": request.priority,
                                       "code": code, "reason": reason})
        self.counters["rejected"] += 1
        self.remember(request.key, code, reason, request.digest)

    def refused(self, key: str) -> tuple[str, str, str] | None:
        """(code, reason, digest) of the refusal of a submit with this key."""
        return self.refusals.get(key)

    def remember(self, key: str, code: str, reason: str, digest: str = "") -> None:
        self.refusals[key] = (code, reason, digest)
        while len(self.refusals) > REFUSALS_KEPT:
            self.refusals.popitem(last=False)
