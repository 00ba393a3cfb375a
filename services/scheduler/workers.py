"""The workers the scheduler knows: their states, the one table of allowed moves, and the
registry.

    new --> idle <--> claimed
             ^  \\       |
             |   v      v
             +--- busy <-+          any live state --> leaving --> gone
                                    any live state --> gone (exited, lost, killed)

- idle: registered and free; the only state that is given a task.
- claimed: free, but held for one task while the ledger reserves that task's tokens.
- busy: running the task we gave it (or one it told us of after our restart).
- leaving: said `worker.leaving` (stopping or recycling): it finishes the task in hand and
  never gets another.

A busy worker may also hold one prefetched task (`prefetched`, see prefetch.py): not a
state of its own, since it changes nothing about what the worker does now.
- gone: exited, lost or killed; dropped from the registry.

Nothing changes a worker's state except `transition()`, which checks the edge and emits
the edge's event itself: every state change is one call and one event.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.clock import Now


class WorkerState(StrEnum):
    NEW = "new"  # not registered yet: only the first transition leaves it
    IDLE = "idle"
    CLAIMED = "claimed"
    BUSY = "busy"
    LEAVING = "leaving"
    GONE = "gone"


W = WorkerState
LIVE = (W.IDLE, W.CLAIMED, W.BUSY)

# (from, to) -> the event that says so.
EDGES: dict[tuple[WorkerState, WorkerState], str] = {
    (W.NEW, W.IDLE): "worker.registered",
    (W.NEW, W.BUSY): "worker.registered",  # a busy worker re-introduced after our restart
    (W.IDLE, W.CLAIMED): "worker.claimed",
    (W.IDLE, W.BUSY): "worker.busy",
    (W.CLAIMED, W.BUSY): "worker.busy",
    (W.CLAIMED, W.IDLE): "worker.idle",
    (W.BUSY, W.IDLE): "worker.idle",
    **{(s, W.LEAVING): "worker.leaving" for s in LIVE},
    **{(s, W.GONE): "worker.lost" for s in LIVE},
    (W.LEAVING, W.GONE): "worker.left",
}


class WorkerTransitionError(Exception):
    code = "conflict"


@dataclass(slots=True)
class Worker:
    name: str
    types: tuple[str, ...]
    pid: int
    state: WorkerState = W.NEW
    task: str | None = None  # the task it runs (busy, leaving) or is held for (claimed)
    last_seen: float = 0.0  # monotonic: when it last spoke
    since: float = 0.0  # unix time it entered its state
    done: int = 0  # tasks it finished
    prefetched: str | None = None  # the task it holds to start next (prefetch.py)
    recalling: bool = False  # asked to give its prefetched task back (task.recall)

    def row(self, now: Now) -> dict:
        """What `worker.list` shows of it."""
        return {"name": self.name, "types": list(self.types), "pid": self.pid,
                "state": str(self.state), "task": self.task, "prefetched": self.prefetched,
                "done": self.done,
                "since": self.since, "silent_s": round(max(0.0, now.mono - self.last_seen), 3)}


def transition(fx: Effects, worker: Worker, new: WorkerState, now: Now, **data) -> None:
    """Move `worker` along an allowed edge and emit that edge's event with `data`."""
    old = worker.state
    event = EDGES.get((old, new))
    if event is None:
        raise WorkerTransitionError(f"worker {worker.name}: {old} -> {new} is not allowed")
    worker.state = new
    worker.since = now.wall
    fx.emit(event, {"from": str(old), **data}, worker.task, worker.name)


class WorkerRegistry:
    """The live workers by name (gone ones are dropped)."""

    def __init__(self):
        self.workers: dict[str, Worker] = {}

    def get(self, name: str) -> Worker | None:
        return self.workers.get(name)

    def register(self, fx: Effects, name: str, types: tuple[str, ...], pid: int, now: Now,
                 busy: bool = False, task: str | None = None) -> Worker:
        """A worker we did not know: idle, or busy (re-introduced by its heartbeat after
        our restart; `task` when it runs one we know)."""
        worker = self.workers[name] = Worker(name, types, pid, last_seen=now.mono)
        self.move(fx, worker, W.BUSY if busy else W.IDLE, now, task=task, types=list(types),
                  pid=pid)
        return worker

    def move(self, fx: Effects, worker: Worker, new: WorkerState, now: Now,
             task: str | None = None, **data) -> None:
        """transition(); busy and claimed take their `task`, idle drops it, leaving keeps
        only a task it runs, gone leaves the registry."""
        if new in (W.BUSY, W.CLAIMED):
            worker.task = task
        elif new is W.IDLE or (new is W.LEAVING and worker.state is not W.BUSY):
            worker.task = None
        transition(fx, worker, new, now, **data)
        if new is W.GONE:
            self.workers.pop(worker.name, None)

    def idle(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.state is W.IDLE]

    def serving(self, task_type: str) -> list[Worker]:
        """The workers that can still take tasks of a type (leaving ones cannot)."""
        return [w for w in self.workers.values()
                if task_type in w.types and w.state is not W.LEAVING]

    def departed(self, now_mono: float, after: float) -> list[Worker]:
        """Leaving workers with nothing in hand, silent for `after` seconds: gone, though
        no exit was reported (an external worker's goodbye reaches only the broker)."""
        return [w for w in self.workers.values() if w.state is W.LEAVING
                and w.task is None and now_mono - w.last_seen > after]

    def by_type(self) -> dict[str, dict[str, int]]:
        """Per task type: idle, busy (claimed or busy) and leaving workers."""
        table: dict[str, dict[str, int]] = {}
        for w in self.workers.values():
            column = "idle" if w.state is W.IDLE else (
                "leaving" if w.state is W.LEAVING else "busy")
            for t in w.types:
                row = table.setdefault(t, {"idle": 0, "busy": 0, "leaving": 0})
                row[column] += 1
        return table
