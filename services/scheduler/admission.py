"""Admission: what a `task.submit` must hold, whether it is accepted, and the refusals
remembered by idempotency key.

A non-critical task is refused with `queue_full` when its type has `max_queue_per_type`
queued, and any task with `rejected` when its estimated start is past its deadline or
more than `max_wait` away. A refusal is journaled by key: a re-sent copy of a refused
submit gets the same answer, never a late acceptance (the client already took the refusal
and may have submitted anew).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.settings import SchedulerSettings
from cortex.services.scheduler.clock import Now
from cortex.services.scheduler.tasks import PRIORITIES

MAX_DESCRIPTION = 8192
MAX_PAYLOAD_BYTES = 512 * 1024
MAX_SUBMIT_WAIT = 60.0  # seconds a submit may hold its reply for the task's end
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
        self.remember(request.key, code, reason, request.digest)
        fx.records.append({"k": "rejected", "key": request.key, "code": code, "reason": reason,
                           "digest": request.digest})
        self.counters["rejected"] += 1
        fx.emit("scheduler.rejected", {"type": request.type, "priority": request.priority,
                                       "code": code, "reason": reason})
        fx.error(peer, corr, code, reason)

    def refused(self, key: str) -> tuple[str, str, str] | None:
        """(code, reason, digest) of the refusal of a submit with this key."""
        return self.refusals.get(key)

    def remember(self, key: str, code: str, reason: str, digest: str = "") -> None:
        self.refusals[key] = (code, reason, digest)
        while len(self.refusals) > REFUSALS_KEPT:
            self.refusals.popitem(last=False)
