"""Token ledger state: budgets, reservations, extensions, commits, releases and windows.

Pure logic (no sockets, files, threads or clocks of its own) for the ledger process, which
decodes requests, calls a ``LedgerState`` method, journals ``Outcome.journal`` (when it is not
None) *before* replying with ``Outcome.reply``, and publishes ``Outcome.events``.

Budgets
    One per scope: ``global`` (always exists), ``type:<task_type>`` and ``agent:<agent>``
    (optional). A limit of None means unlimited. A window of None never resets, ``daily``
    resets at UTC midnight, ``rolling:<N>`` every N seconds counted from when the window was
    set (creation or a window change). A reset zeroes ``committed`` and ``overrun``; open
    reservations stay, they belong to running tasks.

Invariant, checked per budget at every instant::

    committed - overrun + reserved + leased <= limit

``overrun`` is the part of ``committed`` that was used beyond a reservation: it happened, so it
is counted (and it counts against later grants), but it was never granted, so the invariant
leaves it out. ``leased`` is held by the scheduler's leases and not yet any task's (leases.py;
0 here). A grant needs ``committed + reserved + leased + amount <= limit`` in every scope it
touches, and a commit or release can only shrink the left-hand side, so no
operation breaks the invariant. One deliberate exception: ``set_budget`` may lower a limit
below current usage. That budget is then ``over_limit``: every reservation or extension that
touches it is refused, so its usage only falls (commits, releases, resets) until the
invariant holds again.

Scopes of a reservation
    A reservation counts against the scopes that exist when it is granted (global, then
    type:T and agent:A if those budgets exist); its extensions, commit and release touch those
    same scopes. A budget created later starts empty and only sees new reservations. A commit
    with no reservation charges global plus the type/agent scopes named in the commit.

Idempotency
    Everything is keyed by (task_id, attempt): a repeated reserve returns the original grant,
    extensions are keyed by (task_id, attempt, seq), and commit / release return their first
    outcome. Replies are rebuilt from what is remembered, so repeats get the same answer and
    never count twice. Refusals and bad requests change nothing and are not remembered:
    asking again is decided afresh (the scheduler retries a refused reservation when budget
    frees up).

Memory
    Open reservations are kept until settled. Settled attempts (committed or released) are
    remembered in settlement order, at most ``max_finished`` of them (default 100,000, an
    OrderedDict); older ones are forgotten, so a replay arriving more than 100,000 settlements
    late would be taken as a new request.

Time and replay
    Every method takes ``now`` (Unix seconds). A clock that steps back is clamped to the
    latest seen, so windows never run backwards. Window boundaries are pure functions of time
    (origin + k * period), so resets are not journaled: each journal record carries its
    effective ``now`` and a log sequence number ``lsn``, and ``apply_journal`` first applies
    the resets due at that time, then the record. Replaying the journal since a snapshot
    therefore reproduces the state exactly; records already in the snapshot are skipped. A
    reset applied by ``tick`` just before a crash is applied again after the restart and its
    ``ledger.window_reset`` event sent again (events are at least once).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from cortex.protocol.vocabulary import DAY, window_seconds  # noqa: F401 - DAY: ours too

MAX_AMOUNT = 2**63 - 1
MAX_ATTEMPT = 2**31 - 1
MAX_NAME = 256  # task ids, task types and agent names: a bound, so the wire can't bloat state
MAX_FINISHED = 100_000
SNAPSHOT_VERSION = 1


@dataclass
class Outcome:
    ok: bool  # granted / applied
    code: str | None  # None when ok; else "budget_exceeded", "bad_request" or "not_found"
    reply: dict  # JSON-able reply body for the client
    events: list[tuple[str, dict]] = field(default_factory=list)  # (name, data) to publish
    journal: dict | None = None  # journal before replying; None when nothing changed


# -- validation of wire values ------------------------------------------------------------


def _is_int(x: object, lo: int, hi: int) -> bool:
    # type() rather than isinstance(): bool is an int subclass and True is not an amount.
    return type(x) is int and lo <= x <= hi


def _is_name(x: object) -> bool:
    return isinstance(x, str) and 0 < len(x) <= MAX_NAME


def _check_key(task_id: object, attempt: object) -> str | None:
    if not _is_name(task_id):
        return f"task_id must be a non-empty string of at most {MAX_NAME} characters"
    if not _is_int(attempt, 1, MAX_ATTEMPT):
        return f"attempt must be an int in [1, {MAX_ATTEMPT}]"
    return None


def _check_amount(name: str, x: object) -> str | None:
    return None if _is_int(x, 0, MAX_AMOUNT) else f"{name} must be an int in [0, 2**63-1]"


def _check_names(task_type: object, agent: object) -> str | None:
    for name, x in (("task_type", task_type), ("agent", agent)):
        if x is not None and not _is_name(x):
            return f"{name} must be null or a non-empty string of at most {MAX_NAME} characters"
    return None


def _check_budget(scope: object, limit: object, window: object) -> str | None:
    kind, _, name = scope.partition(":") if isinstance(scope, str) else ("", "", "")
    if not (scope == "global" or (kind in ("type", "agent") and _is_name(name))):
        return 'scope must be "global", "type:<task_type>" or "agent:<agent>"'
    if limit is not None and not _is_int(limit, 0, MAX_AMOUNT):
        return "limit must be null (unlimited) or an int in [0, 2**63-1]"
    try:
        window_seconds(window)
    except ValueError as e:
        return str(e)
    return None


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat()


def _bad(message: str, events: list | None = None) -> Outcome:
    return Outcome(False, "bad_request", {"error": "bad_request", "message": message}, events or [])


# -- budgets and attempts -----------------------------------------------------------------


@dataclass
class _Budget:
    scope: str
    limit: int | None
    window: str | None
    origin: float | None = None  # window boundaries are origin + k * period
    window_start: float | None = None
    reserved: int = 0
    committed: int = 0
    overrun: int = 0
    leased: int = 0  # held in leases, not yet carved into tasks' reservations

    @classmethod
    def new(cls, scope: str, limit: int | None, window: str | None, now: float) -> _Budget:
        b = cls(scope, limit, None)
        b.set_window(window, now)
        return b

    def set_window(self, window: str | None, now: float) -> None:
        # Daily windows align to UTC midnight (Unix time has no leap seconds, so that is a
        # multiple of 86400); rolling ones start now. Counters are kept: reconfiguring a
        # window never forgives usage.
        period = window_seconds(window)
        self.window = window
        self.origin = None if period is None else (0.0 if window == "daily" else now)
        self.window_start = None
        if period is not None:
            self.window_start = self.origin + (now - self.origin) // period * period

    @property
    def next_reset(self) -> float | None:
        period = window_seconds(self.window)
        return None if period is None else self.window_start + period

    def roll(self, now: float) -> bool:
        """Reset if a window boundary has passed. Computed from origin, not from the last
        reset, so rolling once or many times to the same `now` gives the same floats."""
        nxt = self.next_reset
        if nxt is None or now < nxt:
            return False
        period = window_seconds(self.window)
        self.window_start = self.origin + (now - self.origin) // period * period
        self.committed = self.overrun = 0
        return True

    @property
    def held(self) -> int:
        return self.committed + self.reserved + self.leased

    def blocks(self, amount: int) -> bool:
        return self.limit is not None and self.held + amount > self.limit

    def numbers(self) -> dict:
        available = None if self.limit is None else max(0, self.limit - self.held)
        return {"limit": self.limit, "reserved": self.reserved, "leased": self.leased,
                "committed": self.committed, "overrun": self.overrun, "available": available}

    def over_limit(self) -> bool:
        return self.limit is not None and self.held > self.limit

    def to_json(self) -> dict:
        nxt = self.next_reset
        return {**self.numbers(), "window": self.window, "origin": self.origin,
                "window_start": self.window_start, "next_reset": nxt, "resets_at": _iso(nxt)}

    @classmethod
    def from_json(cls, scope: str, d: dict) -> _Budget:
        return cls(scope, d["limit"], d["window"], d["origin"], d["window_start"],
                   d["reserved"], d["committed"], d["overrun"], d.get("leased", 0))


@dataclass
class _Attempt:
    """What the ledger remembers of one (task_id, attempt): enough to rebuild every reply."""

    task_id: str
    attempt: int
    scopes: list[str]
    granted: int | None = None  # first reservation; None when committed without one
    extends: dict[int, int] = field(default_factory=dict)  # seq -> amount, in grant order
    released: bool = False
    used: int | None = None

    @property
    def total(self) -> int:
        return (self.granted or 0) + sum(self.extends.values())

    @property
    def is_open(self) -> bool:
        return self.granted is not None and not self.released and self.used is None

    @property
    def holding(self) -> int:
        return self.total if self.is_open else 0

    @property
    def state(self) -> str:
        if self.used is not None:
            return "committed"
        return "released" if self.released else "reserved"

    def commit_reply(self) -> dict:
        # A commit settles what was held then: nothing if released first (a late report).
        held = 0 if self.released or self.granted is None else self.total
        return {"task_id": self.task_id, "attempt": self.attempt, "committed": self.used,
                "reserved": held, "released": max(0, held - self.used),
                "overrun": max(0, self.used - held)}

    def to_json(self) -> dict:
        return {"task_id": self.task_id, "attempt": self.attempt, "state": self.state,
                "scopes": self.scopes, "holding": self.holding, "granted": self.granted,
                "extends": {str(k): v for k, v in self.extends.items()},
                "released": self.released, "used": self.used}

    @classmethod
    def from_json(cls, d: dict) -> _Attempt:
        return cls(d["task_id"], d["attempt"], list(d["scopes"]), d["granted"],
                   {int(k): v for k, v in d["extends"].items()}, d["released"], d["used"])


# -- the ledger ---------------------------------------------------------------------------


class LedgerState:
    def __init__(self, budgets: dict[str, dict] | None = None, now: float | None = None,
                 *, max_finished: int = MAX_FINISHED):
        now = time.time() if now is None else float(now)
        self.clock = now  # latest `now` seen; time never runs backwards here
        self.lsn = 0  # sequence number of the last journal record applied
        self.max_finished = max_finished
        self._budgets: dict[str, _Budget] = {}
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._finished: OrderedDict[tuple[str, int], None] = OrderedDict()  # settle order
        self._by_task: dict[str, set[int]] = {}
        # Configuration errors are the operator's, so they raise instead of replying.
        for scope, spec in {"global": {}, **(budgets or {})}.items():
            limit, window = spec.get("limit"), spec.get("window")
            if err := _check_budget(scope, limit, window):
                raise ValueError(f"budget {scope!r}: {err}")
            self._budgets[scope] = _Budget.new(scope, limit, window, now)

    # -- operations ----------------------------------------------------------------------

    def reserve(self, task_id, attempt, amount, task_type=None, agent=None, *, now) -> Outcome:
        """Reserve `amount` in every applicable scope, or refuse naming the scope that blocked.
        One reservation per (task_id, attempt): a repeat returns the original grant."""
        err = (_check_key(task_id, attempt) or _check_amount("amount", amount)
               or _check_names(task_type, agent))
        if err:
            return _bad(err)
        now, events = self._advance(now)
        rec = self._attempts.get((task_id, attempt))
        if rec is not None:
            if rec.granted is None:
                return _bad(f"attempt {attempt} of {task_id} is already committed; "
                            "reserve for a new attempt", events)
            return Outcome(True, None, self._reserve_reply(rec), events)
        scopes = self._scopes_for(task_type, agent)
        if refused := self._refuse("reserve", task_id, attempt, amount, scopes, now):
            refused.events[:0] = events
            return refused
        record = {"op": "reserve", "task_id": task_id, "attempt": attempt, "amount": amount,
                  "scopes": scopes}
        self._journal(record, now)
        rec = self._attempts[(task_id, attempt)]
        events.append(("ledger.reserved", self._event(record, scopes, task_type=task_type,
                                                      agent=agent)))
        return Outcome(True, None, self._reserve_reply(rec), events, record)

    def extend(self, task_id, attempt, amount, now, seq: int = 1) -> Outcome:
        """Grow an open reservation by `amount`. `seq` numbers the extensions of one attempt
        (1, 2, ...): a repeated seq returns its first answer, a new seq asks for more."""
        err = _check_key(task_id, attempt) or _check_amount("amount", amount)
        if err or not _is_int(seq, 1, MAX_ATTEMPT):
            return _bad(err or f"seq must be an int in [1, {MAX_ATTEMPT}]")
        now, events = self._advance(now)
        rec = self._attempts.get((task_id, attempt))
        if rec is not None and seq in rec.extends:
            return Outcome(True, None, self._extend_reply(rec, seq), events)
        if rec is None or not rec.is_open:
            return self._not_found(f"no open reservation for task {task_id} attempt {attempt}",
                                   events)
        if refused := self._refuse("extend", task_id, attempt, amount, rec.scopes, now, seq=seq):
            refused.events[:0] = events
            return refused
        record = {"op": "extend", "task_id": task_id, "attempt": attempt, "seq": seq,
                  "amount": amount}
        self._journal(record, now)
        events.append(("ledger.extended", self._event(record, rec.scopes, reserved=rec.total)))
        return Outcome(True, None, self._extend_reply(rec, seq), events, record)

    def commit(self, task_id, attempt, used, now, task_type=None, agent=None) -> Outcome:
        """Commit actual use and release the rest. task_type/agent only matter when there is
        no reservation (they pick the scopes to charge besides global)."""
        err = (_check_key(task_id, attempt) or _check_amount("used", used)
               or _check_names(task_type, agent))
        if err:
            return _bad(err)
        now, events = self._advance(now)
        rec = self._attempts.get((task_id, attempt))
        if rec is not None and rec.used is not None:
            return Outcome(True, None, rec.commit_reply(), events)
        scopes = rec.scopes if rec else self._scopes_for(task_type, agent)
        held = rec.holding if rec else 0
        record = {"op": "commit", "task_id": task_id, "attempt": attempt, "used": used,
                  "reserved": held, "scopes": scopes}
        self._journal(record, now)
        rec = self._attempts[(task_id, attempt)]
        reply = rec.commit_reply()
        events.append(("ledger.committed", self._event(record, scopes, **reply)))
        if reply["overrun"]:
            events.append(("ledger.overrun", self._event(record, scopes, excess=reply["overrun"])))
        return Outcome(True, None, reply, events, record)

    def release(self, task_id, attempt, now) -> Outcome:
        """Give a reservation back (task failed, cancelled or lost before reporting)."""
        if err := _check_key(task_id, attempt):
            return _bad(err)
        now, events = self._advance(now)
        rec = self._attempts.get((task_id, attempt))
        if rec is None:
            return self._not_found(f"no reservation for task {task_id} attempt {attempt}", events)
        if not rec.is_open:  # released already, or committed: a no-op with the same answer
            return Outcome(True, None, self._release_reply(rec), events)
        record = {"op": "release", "task_id": task_id, "attempt": attempt, "amount": rec.total}
        self._journal(record, now)
        events.append(("ledger.released", self._event(record, rec.scopes)))
        return Outcome(True, None, self._release_reply(rec), events, record)

    def set_budget(self, scope, limit, window, now) -> Outcome:
        """Create or change a budget. A limit may be set below current usage: the budget is then
        over_limit and refuses every reservation touching it until usage drops below it."""
        if err := _check_budget(scope, limit, window):
            return _bad(err)
        now, events = self._advance(now)
        b = self._budgets.get(scope)
        if b is None or (b.limit, b.window) != (limit, window):
            record = {"op": "set_budget", "scope": scope, "limit": limit, "window": window}
            previous = None if b is None else {"limit": b.limit, "window": b.window}
            self._journal(record, now)
            b = self._budgets[scope]
            events.append(("ledger.budget_set", self._event(
                record, [scope], previous=previous, over_limit=b.over_limit())))
        else:
            record = None  # nothing changes: nothing to journal
        reply = {"scope": scope, **b.numbers(), "window": b.window, "resets_at": _iso(b.next_reset),
                 "over_limit": b.over_limit()}
        if reply["over_limit"]:
            reply["note"] = "limit is below current usage: reservations are refused until it drops"
        return Outcome(True, None, reply, events, record)

    def tick(self, now: float) -> list[tuple[str, dict]]:
        """Apply the window resets due at `now`; returns their events (not journaled: replay
        recomputes them from time)."""
        return self._advance(now)[1]

    # -- journal, snapshot, views --------------------------------------------------------

    def apply_journal(self, record: dict) -> None:
        """Replay one record produced by the methods above. Records already reflected in this
        state (lsn <= self.lsn) are skipped; a gap means a lost record and raises."""
        if record["lsn"] <= self.lsn:
            return
        if record["lsn"] != self.lsn + 1:
            raise ValueError(f"journal gap: at lsn {self.lsn}, got record {record['lsn']}")
        self._apply(record)

    def snapshot(self) -> dict:
        open_ = [r.to_json() for k, r in self._attempts.items() if k not in self._finished]
        return {
            "version": SNAPSHOT_VERSION, "clock": self.clock, "lsn": self.lsn,
            "budgets": {s: b.to_json() for s, b in self._budgets.items()},
            "reservations": open_,
            "max_finished": self.max_finished,
            # Settled attempts, oldest first: the memory that keeps replays harmless.
            "finished": [self._attempts[k].to_json() for k in self._finished],
        }

    @classmethod
    def from_snapshot(cls, data: dict) -> LedgerState:
        if data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported ledger snapshot version {data.get('version')!r}")
        state = cls(None, data["clock"], max_finished=data["max_finished"])
        state.lsn = data["lsn"]
        state._budgets = {s: _Budget.from_json(s, d) for s, d in data["budgets"].items()}
        for d in data["reservations"]:
            state._add(_Attempt.from_json(d))
        for d in data["finished"]:
            rec = _Attempt.from_json(d)
            state._add(rec)
            state._finished[(rec.task_id, rec.attempt)] = None
        return state

    def status(self, now: float) -> list[dict]:
        """Per budget, as of `now` (pending resets shown as done, without applying them)."""
        now = max(self.clock, float(now))
        rows = []
        for scope in sorted(self._budgets, key=lambda s: (s != "global", s)):
            b = replace(self._budgets[scope])
            b.roll(now)
            rows.append({"scope": scope, **b.numbers(), "window": b.window,
                         "resets_at": _iso(b.next_reset), "over_limit": b.over_limit()})
        return rows

    def reservation(self, task_id: str) -> dict | None:
        """Reservation and use of the latest attempt of a task we remember, for its status."""
        attempts = self._by_task.get(task_id)
        if not attempts:
            return None
        rec = self._attempts[(task_id, max(attempts))]
        overrun = rec.commit_reply()["overrun"] if rec.used is not None else 0
        return {"task_id": task_id, "attempt": rec.attempt, "state": rec.state,
                "reserved": rec.holding, "granted": rec.total, "used": rec.used,
                "overrun": overrun, "scopes": rec.scopes}

    # -- internals -----------------------------------------------------------------------

    def _advance(self, now: float) -> tuple[float, list[tuple[str, dict]]]:
        now = max(self.clock, float(now))
        self.clock = now
        return now, self._roll(now)

    def _roll(self, now: float) -> list[tuple[str, dict]]:
        events = []
        for b in self._budgets.values():
            before = b.committed, b.overrun
            if b.roll(now):
                events.append(("ledger.window_reset", {
                    "scope": b.scope, "window": b.window, "now": now,
                    "window_start": b.window_start, "next_reset": b.next_reset,
                    "committed_before": before[0], "overrun_before": before[1],
                    "budgets": {b.scope: b.numbers()}}))
        return events

    def _journal(self, record: dict, now: float) -> None:
        record["lsn"] = self.lsn + 1
        record["now"] = now
        self._apply(record)

    def _apply(self, r: dict) -> None:
        # The one place state changes (besides time-driven resets), for live calls and replay.
        self._roll(r["now"])  # live: already rolled; replay: reproduces the resets due then
        self.clock = max(self.clock, r["now"])
        self.lsn = r["lsn"]
        op = r["op"]
        if op == "set_budget":
            b = self._budgets.get(r["scope"])
            if b is None:
                self._budgets[r["scope"]] = _Budget.new(r["scope"], r["limit"], r["window"],
                                                        r["now"])
            else:
                b.limit = r["limit"]
                if b.window != r["window"]:
                    b.set_window(r["window"], r["now"])
            return
        if self._apply_extra(r):
            return
        key = (r["task_id"], r["attempt"])
        rec = self._attempts.get(key)
        if op == "reserve":
            rec = self._add(_Attempt(*key, list(r["scopes"]), r["amount"]))
            self._charge(rec.scopes, reserved=r["amount"])
        elif op == "extend":
            rec.extends[r["seq"]] = r["amount"]
            self._charge(rec.scopes, reserved=r["amount"])
        elif op == "release":
            self._charge(rec.scopes, reserved=-rec.holding)
            rec.released = True
            self._settle(key)
        elif op == "commit":
            if rec is None:
                rec = self._add(_Attempt(*key, list(r["scopes"])))
            held, used = rec.holding, r["used"]
            self._charge(rec.scopes, reserved=-held, committed=used, overrun=max(0, used - held))
            rec.used = used
            self._settle(key)
        else:
            raise ValueError(f"unknown journal op {op!r}")

    def _apply_extra(self, r: dict) -> bool:
        return False  # a subclass's own journal ops (leases.py)

    def _charge(self, scopes: list[str], reserved=0, committed=0, overrun=0,
                leased=0) -> None:
        for s in scopes:
            b = self._budgets[s]
            b.reserved += reserved
            b.committed += committed
            b.overrun += overrun
            b.leased += leased

    def _add(self, rec: _Attempt) -> _Attempt:
        self._attempts[(rec.task_id, rec.attempt)] = rec
        self._by_task.setdefault(rec.task_id, set()).add(rec.attempt)
        return rec

    def _settle(self, key: tuple[str, int]) -> None:
        self._finished[key] = None
        self._finished.move_to_end(key)  # a late commit after release refreshes its age
        while len(self._finished) > self.max_finished:
            (task_id, attempt), _ = self._finished.popitem(last=False)
            del self._attempts[(task_id, attempt)]
            self._by_task[task_id].discard(attempt)
            if not self._by_task[task_id]:
                del self._by_task[task_id]

    def _scopes_for(self, task_type: str | None, agent: str | None) -> list[str]:
        wanted = ["global", f"type:{task_type}" if task_type else None,
                  f"agent:{agent}" if agent else None]
        return [s for s in wanted if s in self._budgets]

    def _refuse(self, op, task_id, attempt, amount, scopes, now, **extra) -> Outcome | None:
        """A budget_exceeded outcome naming the first scope that can't fit `amount`, or None."""
        b = next((self._budgets[s] for s in scopes if self._budgets[s].blocks(amount)), None)
        if b is None:
            return None
        available = b.numbers()["available"]
        reply = {"granted": False, "task_id": task_id, "attempt": attempt, **extra,
                 "reason": f"{b.scope} has {available} of {b.limit} tokens available, "
                           f"{amount} requested",
                 "scope": b.scope, "requested": amount, "available": available,
                 "limit": b.limit, "next_reset": b.next_reset}  # the ETA of a token wait
        numbers = {s: self._budgets[s].numbers() for s in scopes}
        event = {"op": op, **reply, "now": now, "budgets": numbers}
        return Outcome(False, "budget_exceeded", reply, [("ledger.refused", event)])

    def _not_found(self, message: str, events: list) -> Outcome:
        return Outcome(False, "not_found", {"error": "not_found", "message": message}, events)

    def _event(self, record: dict, scopes: list[str], **extra) -> dict:
        # The record (op, task, amounts, lsn, now) plus every touched scope's numbers after
        # the change, so the event log alone lets one re-check the invariant step by step.
        return {**record, **extra, "budgets": {s: self._budgets[s].numbers() for s in scopes}}

    @staticmethod
    def _reserve_reply(rec: _Attempt) -> dict:
        return {"granted": True, "task_id": rec.task_id, "attempt": rec.attempt,
                "reserved": rec.granted, "scopes": rec.scopes}

    @staticmethod
    def _extend_reply(rec: _Attempt, seq: int) -> dict:
        total = rec.granted
        for s, amount in rec.extends.items():  # grant order: total held right after `seq`
            total += amount
            if s == seq:
                break
        return {"granted": True, "task_id": rec.task_id, "attempt": rec.attempt, "seq": seq,
                "extended": rec.extends[seq], "reserved": total}

    @staticmethod
    def _release_reply(rec: _Attempt) -> dict:
        # Released first: the amount given back; committed first: release was a no-op.
        released = rec.total if rec.released else 0
        return {"task_id": rec.task_id, "attempt": rec.attempt, "released": released,
                "state": "released" if rec.released else "committed"}
