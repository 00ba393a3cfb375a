"""The task table: every task the scheduler knows, and the only ways one changes that the
journal records.

`add()`, `set()` and `move()` change a task and append the journal record of the change
to the turn's Effects; the process writes the records before it sends any reply (journal
first, then acknowledge). `apply()` replays a record after a crash. Finished tasks are
kept up to `retention`, oldest forgotten first (with their idempotency keys).

Finished tasks keep a bounded size: once a task has been finished `keep_results` seconds,
or when the finished tasks' payloads and results pass `keep_results_mb`, its payload and
result leave memory (and so every later snapshot) and it is marked `trimmed`; its result
stays in the event log (`task.completed` carries it). Trimming happens as tasks are added
and finished, at the timeout scan (so an idle suite lets go too), and again after
recovery, never to the task finishing now (its waiters get the result); it is not
journaled, since it only drops what the log keeps.
"""

from __future__ import annotations

from collections import OrderedDict

import orjson

from cortex.protocol import wire
from cortex.protocol.wire import ProtocolError
from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.clock import Marks, Now
from cortex.services.scheduler.tasks import FINAL, State, Task, transition

LIST_LIMIT = 10_000  # the most tasks one task.list returns
LIST_ROOM = wire.MAX_MESSAGE_BYTES - 64 * 1024  # for the rows of one task.list reply


class TaskTable:
    def __init__(self, retention: int, counters: dict, keep_results: float = 600.0,
                 keep_results_mb: float = 64.0):
        self.retention = retention
        self.keep_results = keep_results
        self.keep_bytes = keep_results_mb * (1 << 20)
        self.held: OrderedDict[str, int] = OrderedDict()  # finished, untrimmed -> bytes
        self.held_bytes = 0
        self.counters = counters
        self.tasks: dict[str, Task] = {}  # in order of creation
        self.keys: dict[str, str] = {}  # idempotency key -> task id
        self.finished: OrderedDict[str, None] = OrderedDict()  # retention order
        self.marks: dict[str, Marks] = {}  # live tasks' monotonic moments (clock.py)

    # -- the journaled changes -----------------------------------------------------------
    def add(self, fx: Effects, task: Task, now: Now) -> None:
        self.tasks[task.id] = task
        self.keys[task.key] = task.id
        self.marks[task.id] = Marks(created=now.mono)
        self.counters["submitted"] += 1
        self.trim(now.wall)
        row = task.summary()
        del row["final"]
        fx.records.append({"k": "new", "task": row})

    def forget_new(self, task: Task) -> None:
        """Take back an add() whose turn failed (its record is dropped with the turn)."""
        if self.tasks.get(task.id) is task:
            del self.tasks[task.id]
        if self.keys.get(task.key) == task.id:
            del self.keys[task.key]
        self.marks.pop(task.id, None)

    def set(self, fx: Effects, task: Task, **changes) -> None:
        for key, value in changes.items():
            setattr(task, key, value)
        fx.records.append({"k": "set", "id": task.id, **changes})

    def move(self, fx: Effects, task: Task, new: State, now: Now, **changes) -> None:
        """Along an allowed edge (tasks.transition), with `changes`, journaled."""
        transition(task, new, now.wall)
        for key, value in changes.items():
            setattr(task, key, value)
        fx.records.append({"k": "set", "id": task.id, "state": str(new), "at": now.wall,
                           **changes})
        if new in FINAL:
            self.counters[str(new)] = self.counters.get(str(new), 0) + 1
            self.marks.pop(task.id, None)
            self.finished[task.id] = None
            self.retain()
            self.trim(now.wall)
            self.hold(task)

    def retain(self) -> None:
        while len(self.finished) > self.retention:
            old, _ = self.finished.popitem(last=False)
            task = self.tasks.pop(old, None)
            if task is not None and self.keys.get(task.key) == old:
                del self.keys[task.key]
            self.held_bytes -= self.held.pop(old, 0)

    def hold(self, task: Task) -> None:
        """Count a finished task's payload and result against `keep_results_mb`."""
        if task.trimmed or task.id in self.held or (task.payload is None
                                                     and task.result is None):
            return
        size = task.size + len(orjson.dumps(task.result, default=str))
        self.held[task.id] = size
        self.held_bytes += size

    def trim(self, now: float) -> int:
        """Drop the payload and result of finished tasks past `keep_results` seconds,
        oldest first, and of as many more as it takes to keep under `keep_results_mb`."""
        trimmed = 0
        while self.held:
            task_id, size = next(iter(self.held.items()))
            task = self.tasks.get(task_id)
            if task is not None and self.held_bytes <= self.keep_bytes and \
                    now - self._finished_at(task) < self.keep_results:
                break
            self.held.popitem(last=False)
            self.held_bytes -= size
            if task is not None:
                task.payload = task.result = None
                task.trimmed = True
                trimmed += 1
        if trimmed:
            self.counters["trimmed"] = self.counters.get("trimmed", 0) + trimmed
        return trimmed

    @staticmethod
    def _finished_at(task: Task) -> float:
        return max((task.times.get(str(s), 0.0) for s in FINAL), default=0.0)

    def recovered(self, now: float) -> None:
        """After a restart: count what finished tasks still hold, then trim."""
        for task_id in self.finished:
            task = self.tasks.get(task_id)
            if task is not None:
                self.hold(task)
        self.trim(now)

    # -- recovery ------------------------------------------------------------------------
    def apply(self, record: dict) -> None:
        """Replay one journal record ("new" or "set")."""
        if record["k"] == "new":
            row = {k: v for k, v in record["task"].items() if k in Task.__dataclass_fields__}
            task = Task(**row)
            task.state = State(task.state)
            self.tasks[task.id] = task
            self.keys[task.key] = task.id
            return
        task = self.tasks.get(record["id"])
        if task is None:
            return  # dropped by retention before the snapshot
        for key, value in record.items():
            if key not in Task.__dataclass_fields__ or key == "id":
                continue  # "k", "at", the journal's "lsn"
            if key == "state":
                task.state = State(value)
                task.times[value] = record["at"]
            else:
                setattr(task, key, value)

    # -- reading -------------------------------------------------------------------------
    def get(self, body: dict) -> Task:
        task_id = wire.field_str(body, "id", max_len=64)
        task = self.tasks.get(task_id)
        if task is None:
            raise ProtocolError("not_found", f"no task {task_id}")
        return task

    def by_key(self, key: str) -> Task | None:
        task_id = self.keys.get(key)
        return None if task_id is None else self.tasks.get(task_id)

    def listing(self, body: dict) -> dict:
        """`task.list`: the tasks matching every filter given (state, type, agent: exact),
        the latest `limit` of them, oldest first (`newest`: newest first). `total` counts
        every match, `truncated` says whether some were left out."""
        state = wire.field_str(body, "state", max_len=16, required=False)
        task_type = wire.field_str(body, "type", max_len=64, required=False)
        agent = wire.field_str(body, "agent", max_len=128, required=False)
        limit = wire.field_int(body, "limit", lo=1, hi=LIST_LIMIT, required=False, default=100)
        newest = body.get("newest", False)
        if not isinstance(newest, bool):
            raise ProtocolError("bad_request", "newest must be true or false")
        if state is not None and state not in State.__members__.values():
            raise ProtocolError("bad_request", f"unknown state {state!r}")
        chosen = [t for t in self.tasks.values()
                  if (state is None or t.state == state)
                  and (task_type is None or t.type == task_type)
                  and (agent is None or t.agent == agent)]
        # The latest `limit`, newest first while they fit one message (descriptions run
        # to 8 KiB: 500 of them would not); the oldest of them are left out past it.
        rows, room = [], LIST_ROOM
        for task in reversed(chosen[-limit:]):
            row = task.summary() | {"payload": None, "result": None}
            room -= len(wire.encode_body(row))
            if room < 0:
                break
            rows.append(row)
        if not newest:
            rows.reverse()
        return {"tasks": rows, "total": len(chosen), "truncated": len(rows) < len(chosen),
                "cut_to_fit": room < 0}
