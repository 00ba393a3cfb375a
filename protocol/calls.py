"""The client core: requests in flight on the bus, with no socket in sight (sans-IO).

A `Session` turns a `Request` into a `Call`: the frames to send, a correlation id, a
deadline. The code that owns the socket (the sync and async faces in `client.py`, the
`Worker`) only moves bytes and reads the clock:

    call = session.start(Request("scheduler", "task.status", {"id": task_id}))
    while not call.done:
        frames = call.frames_due(now)       # the first send, or a re-send that is due
        ...send frames; wait up to call.wakeup(now) for a message...
        session.on_message(msg)             # a REPLY or ERROR: settles the call it answers
        session.on_clock(call)              # deadlines: Timeout, or Unavailable
    session.end(call)                       # the value, or raises the typed error

Rules it keeps:
- A call is re-sent with the same correlation id after `resend_after` seconds of silence
  (a request or its reply lost while a service restarts), and after an `unavailable`
  ERROR (the destination is not connected) once a capped, jittered pause has passed
  (`cortex.protocol.backoff`), until its deadline. Safe because submits carry an
  idempotency key and every other operation is idempotent.
- The first reply wins; a reply to a call already settled or forgotten is late and is
  dropped (counted in `late`).
- A submit asked to `follow` its task (`task.submit` with `follow`) is answered twice:
  at once, and when the task ends, under the submit's corr + `+`. The session expects
  that second answer as a held `task.wait` already sent (`followed`, the newest
  MAX_FOLLOWED): a later wait for the task takes it over instead of asking, so a submit
  and a wait cost one request, not two; if the answer does not come (the scheduler
  restarted and forgot the hold), the wait is sent as one `resend_after` later.
- Fail fast: until the bus has answered once (any message from it), a call that hears
  nothing within `connect_timeout` ends with `Unavailable` naming the home: no suite is
  answering there. Once the bus has answered, silence is a restart to ride out until the
  call's own deadline.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
from dataclasses import dataclass

import msgpack

from . import backoff, errors, wire

RESEND_AFTER = 1.0  # seconds of silence before a call is sent again
# Seconds to hear from a bus never heard before: a busy broker answers a HELLO well
# within it, a socket file left by a killed suite never does.
CONNECT_TIMEOUT = 5.0
PAUSE_BASE = 0.05  # the first pause after `unavailable`; doubles up to PAUSE_CAP
PAUSE_CAP = 1.0
FOLLOW_MARGIN = 5.0  # how long past its hold a followed task's answer may take to come
MAX_FOLLOWED = 256  # followed submits whose end is expected (the oldest forgotten first)


@dataclass(frozen=True, slots=True)
class Request:
    """One operation to ask of a service. `timeout`: seconds until the call gives up
    (None: the session's default; math.inf: until answered)."""

    service: str
    op: str
    body: dict | None = None
    timeout: float | None = None
    resend_after: float = RESEND_AFTER


class Call:
    """One request in flight: when to send it (again), when to give up, how it ended."""

    __slots__ = ("corr", "service", "op", "frames", "started", "timeout", "deadline",
                 "connect_by", "resend_after", "next_send", "sends", "pauses", "done", "value",
                 "error", "unavailable", "follow", "until", "body")

    def __init__(self, corr: bytes, request: Request, frames: list, now: float,
                 timeout: float, connect_by: float | None):
        self.corr = corr
        self.service = request.service
        self.op = request.op
        self.frames = frames
        self.started = now
        self.timeout = timeout
        self.deadline = now + timeout
        self.connect_by = connect_by  # None once the bus has answered
        self.resend_after = request.resend_after
        self.next_send = now  # at once
        self.sends = 0
        self.pauses = 0  # `unavailable` answers so far (the backoff's attempt number)
        self.done = False
        self.value = None
        self.error: errors.CortexError | None = None
        self.unavailable: errors.Unavailable | None = None  # why we are pausing
        self.follow = 0.0  # a submit's `follow`: its task's end is answered too
        self.until = now  # a followed wait: when the scheduler's hold is up at the latest
        self.body: dict | None = None  # a followed wait's, its frames made if it is sent

    def frames_due(self, now: float) -> list | None:
        """The frames to send now, if a send is due (then the next is `resend_after` away)."""
        if self.done or now < self.next_send:
            return None
        if self.frames is None:
            self.frames = wire.frames(wire.REQUEST, self.service.encode(), self.corr,
                                      self.body)
        self.sends += 1
        self.next_send = now + self.resend_after
        return self.frames

    def wakeup(self, now: float) -> float:
        """Seconds until this call needs attention again, if no message comes first."""
        due = min(self.next_send, self.deadline)
        if self.connect_by is not None:
            due = min(due, self.connect_by)
        return max(0.0, due - now)

    def settle(self, value=None, error: errors.CortexError | None = None) -> None:
        if not self.done:
            self.done, self.value, self.error = True, value, error

    def on_answer(self, msg: wire.Message, now: float, rng: random.Random | None) -> None:
        """A REPLY or ERROR carrying our correlation id."""
        if self.done:
            return
        try:
            body = msg.decoded()
        except wire.ProtocolError as e:
            self.settle(error=errors.CortexError(
                f"{self.service} sent an unreadable answer to {self.op}: {e}", code=e.code))
            return
        if msg.type == wire.REPLY:
            self.settle(value=body)
            return
        error = errors.from_reply(body)
        if isinstance(error, errors.Unavailable):
            # Not connected (restarting, or not started yet): pause, then try again, as
            # long as the pause ends before the deadline.
            self.pauses += 1
            pause = backoff.delay(self.pauses, PAUSE_BASE, PAUSE_CAP, rng=rng)
            if now + pause < self.deadline:
                self.unavailable = error
                self.next_send = now + pause
                return
        self.settle(error=error)

    def on_clock(self, now: float, home) -> None:
        if self.done:
            return
        if self.connect_by is not None and now >= self.connect_by:
            self.settle(error=errors.Unavailable(
                f"no suite is answering in {home}: nothing heard on the bus within "
                f"{now - self.started:.1f} s (start it with `cortex up`)"))
        elif now >= self.deadline:
            self.settle(error=self.unavailable or errors.Timeout(
                f"{self.service} did not answer {self.op} within {self.timeout:g} s"))

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.value


class Session:
    """A peer's calls in flight, its correlation ids, and whether the bus ever answered.

    `clock` (monotonic seconds) and `rng` (the backoff's jitter) are injected, so the
    tests can drive it with fake ones."""

    def __init__(self, home=None, *, timeout: float = 30.0,
                 connect_timeout: float = CONNECT_TIMEOUT, clock=time.monotonic,
                 rng: random.Random | None = None):
        for value in (timeout, connect_timeout):
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not value > 0:
                raise ValueError(f"timeouts must be positive seconds, not {value!r}")
        self.home = home  # named in the fail-fast error
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.clock = clock
        self.rng = rng
        self.connected = False  # the bus answered at least once
        self.calls: dict[bytes, Call] = {}
        self.followed: dict[str, Call] = {}  # task id -> the wait its submit asked for
        self.late = 0  # answers that matched no call in flight (dropped)
        self.stray = 0  # messages that are no answer at all (dropped)
        salt = os.urandom(12)
        self._corr_prefix = salt[:6]
        self._key_prefix = salt.hex()  # idempotency keys without a syscall each
        self._ids = itertools.count(1)

    def new_key(self) -> str:
        """A fresh idempotency key: random per session, then a counter."""
        return f"{self._key_prefix}-{next(self._ids):x}"

    def start(self, request: Request) -> Call:
        if self.followed and request.op == "task.wait":
            call = self._take_followed(request)
            if call is not None:
                return call
        body = {"op": request.op, **request.body} if request.body else {"op": request.op}
        corr = self._corr_prefix + next(self._ids).to_bytes(6, "big")
        frames = wire.frames(wire.REQUEST, request.service.encode(), corr, body)
        check_size(frames)
        timeout = self.timeout if request.timeout is None else request.timeout
        if not timeout >= 0:  # also refuses NaN
            raise errors.BadRequest(f"timeout must be >= 0 seconds, not {timeout!r}")
        now = self.clock()
        connect_by = None if self.connected else now + min(self.connect_timeout, timeout)
        call = Call(corr, request, frames, now, timeout, connect_by)
        if request.op == "task.submit" and not body.get("wait"):
            follow = body.get("follow")
            if isinstance(follow, int | float) and follow > 0:
                call.follow = follow
        self.calls[corr] = call
        return call

    def _follow(self, submit: Call) -> None:
        """The submit is answered: expect its task's end as the answer to a held
        `task.wait` sent with it (its corr + FOLLOW_SUFFIX)."""
        task = submit.value
        if not isinstance(task, dict) or not isinstance(task.get("id"), str):
            return
        hold, now = submit.follow, self.clock()
        corr = submit.corr + wire.FOLLOW_SUFFIX
        request = Request(submit.service, "task.wait", {"id": task["id"], "hold": hold},
                          timeout=hold + FOLLOW_MARGIN, resend_after=hold + RESEND_AFTER)
        call = Call(corr, request, None, now, request.timeout, None)
        # Sent, in effect, with the submit: asked again only if the answer is late.
        call.sends, call.next_send, call.until = 1, now + request.resend_after, now + hold
        call.body = {"op": "task.wait", **request.body}
        if task.get("final"):
            call.settle(value=task)
        old = self.followed.pop(task["id"], None)  # a submit of the same task again
        if old is not None:
            self.forget(old)
        self.calls[corr] = self.followed[task["id"]] = call
        if len(self.followed) > MAX_FOLLOWED:  # never waited for: stop expecting it
            self.forget(self.followed.pop(next(iter(self.followed))))

    def _take_followed(self, request: Request) -> Call | None:
        """The followed wait a `task.wait` request can stand on, if it is answered no
        later than the request's own hold would be."""
        body = request.body or {}
        call = self.followed.get(body.get("id"))
        if call is None:
            return None
        hold = body.get("hold", 0)
        if not call.done and call.until > self.clock() + (hold if hold > 0 else 0):
            return None  # the caller cannot wait that long: it asks on its own
        del self.followed[body["id"]]
        if self.calls.get(call.corr) is not call:
            return None
        return call

    def heard(self) -> None:
        """Something came from the bus: the suite is there, so silence from now on is a
        restart to ride out, not a reason to give up early."""
        if not self.connected:
            self.connected = True
            for call in self.calls.values():
                call.connect_by = None

    def on_message(self, msg: wire.Message) -> Call | None:
        """A message for the owner: the call it answers (settled, or pausing after
        `unavailable`), or None when it answers nothing in flight (dropped)."""
        if msg.type not in (wire.REPLY, wire.ERROR):
            self.stray += 1
            return None
        call = self.calls.get(msg.corr)
        if call is None or call.done:
            self.late += 1
            return None
        call.on_answer(msg, self.clock(), self.rng)
        if call.follow and call.done and call.error is None:
            self._follow(call)
        return call

    def on_clock(self, call: Call) -> None:
        call.on_clock(self.clock(), self.home)

    def end(self, call: Call):
        """Forget the call; its value, or raise its error."""
        self.forget(call)
        return call.outcome()

    def forget(self, call: Call) -> None:
        if self.calls.get(call.corr) is call:
            del self.calls[call.corr]


def check_size(frames: list) -> None:
    """Refuse here what the broker would refuse: the same count as `wire.parse`."""
    size = sum(len(frame) for frame in frames[2:])
    if size > wire.MAX_MESSAGE_BYTES:
        raise errors.BadRequest(
            f"request of {size} bytes exceeds the {wire.MAX_MESSAGE_BYTES}-byte limit",
            code="too_large")


def exchange(session: Session, request: Request, send, receive):
    """Run one call to its end over a blocking transport: `send(frames)` puts a message
    on the wire, `receive(seconds)` waits at most that long and returns a message for the
    owner or None (nothing came, or only control traffic)."""
    call = session.start(request)  # may be answered already (a followed wait)
    try:
        now = session.clock()
        while not call.done:
            frames = call.frames_due(now)
            if frames is not None:
                send(frames)
            msg = receive(call.wakeup(now))
            if msg is not None:
                session.on_message(msg)
            session.on_clock(call)
            now = session.clock()
        return call.outcome()
    finally:
        session.forget(call)


def drive(plan, perform):
    """Run an operation's plan (a generator yielding Requests, see `operations.py`) with
    `perform(request) -> value`, which raises a CortexError for a failed call."""
    try:
        request = next(plan)
        while True:
            try:
                value = perform(request)
            except errors.CortexError as e:
                request = plan.throw(e)
            else:
                request = plan.send(value)
    except StopIteration as stop:
        return stop.value


async def drive_async(plan, perform):
    """`drive` for coroutines: `await perform(request)`."""
    try:
        request = next(plan)
        while True:
            try:
                value = await perform(request)
            except errors.CortexError as e:
                request = plan.throw(e)
            else:
                request = plan.send(value)
    except StopIteration as stop:
        return stop.value


def decode_event(parts: list) -> dict | None:
    """A live event from the event router's XPUB ([topic, msgpack map]); None if it is
    malformed (a live view skips it; the event log keeps every event)."""
    if len(parts) != 2:
        return None
    try:
        event = msgpack.unpackb(parts[1], raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) else None


def within(seconds: float | None) -> float | None:
    """A caller's timeout checked at the boundary (None: no limit)."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or math.isnan(seconds) or seconds < 0:
        raise errors.BadRequest(f"timeout must be a number of seconds >= 0, not {seconds!r}")
    return float(seconds)
