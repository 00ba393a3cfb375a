"""Why a queued task waits, and the queued tasks held out of the dispatch queue.

`WaitingRoom.set()` is the one place a task's waiting reason (`task.waiting`, with its
`waiting_detail`) changes. The reasons:

- worker: in the dispatch queue, for a free worker of its type.
- reserving: a worker is held for it while the ledger reserves its tokens.
- tokens: the ledger refused the reservation. Detail, as the ledger's refusal says: the
  scope that blocked, its limit, what was left, what was asked.
- cpu / memory: it would not fit the machine now. Detail: the figures compared.
- backoff: its last attempt was lost; it waits out the retry delay.
- rate_limit: its model provider's limits (limits.py) would be passed. Detail: the limit
  that holds it (`check`), the provider, the seconds until it fits and when (`eta`).

A `task.waiting` event is written when a task starts waiting for tokens, cpu or memory,
and again only when what blocks it changes (another reason, scope, limit or check): never
on a retry that meets the same obstacle. Figures that move on their own (tokens left,
cores free) ride along in the event and stay current in `waiting_detail`. A task that is
dispatched or ends starts afresh.

Held tasks stay out of the dispatch queue until their retry is due: backoff when its delay
is over; cpu or memory every BLOCKED_RETRY (a local check); tokens on a capped backoff of
their own (each try is a ledger request, and a refusal a ledger event), sooner when the
ledger was given back at least the tokens the task lacked, or when the blocking window
resets. A task whose retry is due goes back to the front of the queue keeping its reason
until it is dispatched.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from heapq import heappop, heappush

from cortex.protocol.backoff import delay as backoff_delay
from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.tasks import Task

BLOCKED_RETRY = 0.5  # seconds between tries of a task that did not fit (and the least for tokens)
TOKENS_RETRY_CAP = 5.0  # the longest a task refused tokens waits before asking again


class Reason(StrEnum):
    WORKER = "worker"
    RESERVING = "reserving"
    TOKENS = "tokens"
    CPU = "cpu"
    MEMORY = "memory"
    BACKOFF = "backoff"
    RATE_LIMIT = "rate_limit"


ANNOUNCED = frozenset({Reason.TOKENS, Reason.CPU, Reason.MEMORY, Reason.RATE_LIMIT})


def what_blocks(reason: Reason, detail: dict | None) -> tuple:
    """The part of a wait that, when it changes, is worth a new event."""
    detail = detail or {}
    if reason is Reason.TOKENS:
        return reason, detail.get("scope"), detail.get("limit"), detail.get("requested")
    return reason, detail.get("check")


@dataclass(slots=True)
class _Held:
    task: Task
    reason: Reason
    due: float  # monotonic: when it goes back to the queue
    tried: float  # monotonic: when it was held
    shortfall: int | None = None  # tokens: what the ledger lacked (None: not said)
    returned_mark: int = 0  # tokens: the ledger's returns counted when it was refused


class WaitingRoom:
    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()
        self.held: dict[str, _Held] = {}
        self._timers: list[tuple[float, int, str]] = []  # (due, seq, task id); lazy removal
        self._seq = 0
        self._announced: dict[str, tuple] = {}  # task id -> what_blocks() last written
        self._refusals: dict[str, int] = {}  # task id -> token refusals in a row
        self._returned = 0  # tokens the ledger confirmed given back, all told
        self._recheck = False

    def set(self, fx: Effects, task: Task, reason: Reason | None,
            detail: dict | None = None) -> None:
        """Set why `task` waits (None: it does not: dispatched or ended)."""
        if reason is None:
            self._announced.pop(task.id, None)
            self._refusals.pop(task.id, None)
            task.waiting = task.waiting_detail = None
            return
        task.waiting = reason.value
        task.waiting_detail = detail
        if reason in ANNOUNCED:
            blocks = what_blocks(reason, detail)
            if self._announced.get(task.id) != blocks:
                self._announced[task.id] = blocks
                fx.emit("task.waiting", {"reason": reason.value, "attempt": task.attempt,
                                         "detail": detail}, task.id)

    def hold(self, fx: Effects, task: Task, reason: Reason, now: float,
             detail: dict | None = None, delay: float = BLOCKED_RETRY) -> float:
        """Keep a popped queued task out of the queue until its retry is due (`delay`: the
        backoff's, or until the provider's window lets it in); returns the seconds it waits."""
        self.set(fx, task, reason, detail)
        held = _Held(task, reason, now + delay, now)
        if reason is Reason.TOKENS:
            tries = self._refusals[task.id] = self._refusals.get(task.id, 0) + 1
            held.due = now + backoff_delay(tries, BLOCKED_RETRY, TOKENS_RETRY_CAP, rng=self.rng)
            resets_in = (detail or {}).get("resets_in_s")
            if isinstance(resets_in, int | float) and resets_in >= 0:
                held.due = min(held.due, now + resets_in)
            asked, left = (detail or {}).get("requested"), (detail or {}).get("available")
            if isinstance(asked, int) and isinstance(left, int):
                held.shortfall = max(0, asked - left)
            held.returned_mark = self._returned
        elif reason not in (Reason.BACKOFF, Reason.RATE_LIMIT):
            held.due = now + BLOCKED_RETRY
        self._put(held)
        return held.due - now

    def release(self, task: Task) -> None:
        """It leaves the room other than by its retry (cancelled)."""
        self.held.pop(task.id, None)

    def retry_now(self, task_ids, now: float) -> None:
        """What held these tasks may be gone: their retry is due at `now`."""
        for task_id in task_ids:
            held = self.held.get(task_id)
            if held is not None and held.due > now:
                held.due = now
                self._put(held)

    def tokens_returned(self, amount: int) -> None:
        """The ledger confirmed giving `amount` tokens back (a release, or the unused rest
        of a commit): tasks that lacked no more than what came back may try sooner."""
        if amount > 0:
            self._returned += amount
            self._recheck = True

    def due(self, fx: Effects, now: float) -> list[Task]:
        """The held tasks whose retry is due, out of the room, in due order."""
        if self._recheck:
            self._recheck = False
            for held in list(self.held.values()):
                back = self._returned - held.returned_mark  # given back since its refusal
                if held.reason is Reason.TOKENS and back > 0 and back >= (held.shortfall or 0):
                    soonest = held.tried + BLOCKED_RETRY
                    if soonest < held.due:
                        held.due = soonest
                        self._put(held)
        ready = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            due, _, task_id = heappop(timers)
            held = self.held.get(task_id)
            if held is None or held.due != due:
                continue  # released, or re-timed: another timer stands for it
            del self.held[task_id]
            if held.reason is Reason.BACKOFF:
                self.set(fx, held.task, Reason.WORKER)
            ready.append(held.task)
        return ready

    def next_due(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def _put(self, held: _Held) -> None:
        self.held[held.task.id] = held
        self._seq += 1
        heappush(self._timers, (held.due, self._seq, held.task.id))
