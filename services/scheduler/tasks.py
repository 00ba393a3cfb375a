"""The task model: fields, states and the one table of allowed transitions.

    queued -> dispatched -> running -> completed | failed | cancelled
                 |            |
                 +------------+--> queued again (retry, attempt + 1) or dead (retries spent)

Nothing changes a task's state except `transition()`, which checks the edge.
"""

from __future__ import annotations

import itertools
import operator
import os
from dataclasses import dataclass, field, fields
from enum import StrEnum

from cortex.protocol import wire
from cortex.protocol.vocabulary import (  # noqa: F401 - the scheduler's names for them
    ERROR_CATEGORIES,
    FINAL_STATES,
    PRIORITIES,
    PRIORITY_RANK,
    TASK_STATES,
)


class State(StrEnum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"  # dead letter: retries spent


FINAL = frozenset(State(s) for s in FINAL_STATES)
assert tuple(State) == TASK_STATES  # the enum is the shared vocabulary, spelled out

EDGES: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.DISPATCHED, State.CANCELLED, State.FAILED}),
    State.DISPATCHED: frozenset({State.RUNNING, State.QUEUED, State.COMPLETED, State.FAILED,
                                 State.CANCELLED, State.DEAD}),
    State.RUNNING: frozenset({State.COMPLETED, State.FAILED, State.CANCELLED, State.QUEUED,
                              State.DEAD}),
    State.COMPLETED: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
    State.DEAD: frozenset(),
}


class TransitionError(Exception):
    code = "conflict"


_counter = itertools.count()
_node = os.urandom(2).hex()


def new_task_id(now: float) -> str:
    """Time-ordered ids: milliseconds of the unix time `now`, then a per-process counter,
    then a random node."""
    ms = int(now * 1000)
    return f"t{ms:011x}{next(_counter) & 0xFFFFFF:06x}{_node}"


@dataclass(slots=True)
class Task:
    id: str
    type: str
    description: str
    priority: str
    tokens: int
    timeout: float
    retries: int
    agent: str
    key: str
    payload: object = None
    deadline: float | None = None  # SLA: unix time by which it should start
    state: State = State.QUEUED
    attempt: int = 1
    worker: str | None = None
    times: dict = field(default_factory=dict)  # state -> unix time of the latest entry
    # (durations are measured on the monotonic clock: clock.Marks, kept in memory)
    result: object = None
    error: dict | None = None
    waiting: str | None = None  # why a queued task is not running yet (waiting.py)
    waiting_detail: dict | None = None  # what it waits for, in figures (waiting.py)
    tokens_used: int = 0
    progress: float = 0.0
    message: str = ""
    reserved: int = 0  # tokens currently reserved for this attempt
    lease: str | None = None  # the ledger lease `reserved` was carved from (leases.py)
    eta: float | None = None
    settle: dict = field(default_factory=dict)  # attempt -> ledger order not yet confirmed
    size: int = 0  # bytes of the submit request (the predictor's payload-size feature)
    predicted: dict | None = None  # duration, tokens, memory_mb, cpu, source
    actual: dict | None = None  # the same, measured, once it ran
    routing: dict | None = None  # submitted as "auto": the type chosen and why (routing.py)
    digest: str = ""  # of the submit's content (its key with other content: `conflict`)
    trimmed: bool = False  # finished, payload and result dropped: the result is in the log
    prefetched: bool = False  # dispatched to a busy `worker`, to start when its task ends

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def summary(self) -> dict:
        # Shallow on purpose (asdict deep-copies: it was a sixth of the scheduler's time);
        # the dicts inside are copied one level so callers cannot alter the task.
        data = dict(zip(FIELD_NAMES, _all_fields(self), strict=True))  # one C call
        data["times"] = dict(self.times)
        data["state"] = str(self.state)
        data["final"] = self.final
        return data


    def answer(self) -> dict:
        """The task as a submit, wait or cancel answers it: without its payload when the
        payload and the result together would not fit one message (the submitter has the
        payload; `task.status` still shows all, or says `too_large`)."""
        data = self.summary()
        if self.size > BIG_SUBMIT and self.payload is not None \
                and len(wire.encode_body(data)) > ANSWER_ROOM:
            data["payload"], data["payload_omitted"] = None, True
        return data


BIG_SUBMIT = 256 * 1024  # a submit this small cannot make an answer pass the room
ANSWER_ROOM = wire.MAX_MESSAGE_BYTES - 64 * 1024
FIELD_NAMES = tuple(f.name for f in fields(Task))
_all_fields = operator.attrgetter(*FIELD_NAMES)


def transition(task: Task, new: State, now: float) -> State:
    """Move `task` along an allowed edge; returns the old state."""
    old = task.state
    if new not in EDGES[old]:
        raise TransitionError(f"task {task.id}: {old} -> {new} is not allowed")
    task.state = new
    task.times[str(new)] = now
    return old


def from_summary(data: dict) -> Task:
    fields_ = {k: v for k, v in data.items() if k in Task.__dataclass_fields__}
    task = Task(**fields_)
    task.state = State(task.state)
    return task
