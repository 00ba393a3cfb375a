"""The pool's children: their fields, states and the one table of allowed transitions.

    new -> running -> stopping -> killed -> exited
              |           |                  ^
              +-----------+------------------+   (only the reap says a child exited)

Nothing changes a child's state except `transition()`, which checks the edge and emits
the event that reports it, so every state change is one call and one event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ChildState(StrEnum):
    NEW = "new"  # about to be started
    RUNNING = "running"  # started: its process is ours until reaped
    STOPPING = "stopping"  # SIGTERM sent to its process group; SIGKILL due at `kill_at`
    KILLED = "killed"  # SIGKILL sent
    EXITED = "exited"  # reaped


EDGES: dict[ChildState, frozenset[ChildState]] = {
    ChildState.NEW: frozenset({ChildState.RUNNING}),
    ChildState.RUNNING: frozenset({ChildState.STOPPING, ChildState.KILLED, ChildState.EXITED}),
    ChildState.STOPPING: frozenset({ChildState.KILLED, ChildState.EXITED}),
    ChildState.KILLED: frozenset({ChildState.EXITED}),
    ChildState.EXITED: frozenset(),
}

# The event each state's entry emits.
EVENTS: dict[ChildState, str] = {
    ChildState.RUNNING: "worker.spawned",
    ChildState.STOPPING: "worker.stopping",
    ChildState.KILLED: "worker.killed",
    ChildState.EXITED: "worker.exited",
}

# emit(type, data, task=None, worker=None): a service's `emit` or a turn's `Effects.emit`.
Emit = Callable[..., Any]


class TransitionError(Exception):
    code = "conflict"


@dataclass
class Child:
    name: str
    group: str
    slot: int
    started: float
    pid: int = 0
    extra: bool = False  # surge/autoscaled worker: not restarted when it exits
    proc: Any = None  # psutil.Process, to read its RSS and CPU
    kill_at: float | None = None  # monotonic time for SIGKILL after a TERM
    reason: str = ""  # why it was asked to stop (empty: it was not)
    state: ChildState = ChildState.NEW

    def row(self) -> dict:
        return {"name": self.name, "group": self.group, "slot": self.slot, "pid": self.pid,
                "started": self.started, "extra": self.extra, "state": str(self.state)}


def transition(child: Child, new: ChildState, emit: Emit, **data) -> ChildState:
    """Move `child` along an allowed edge and emit the event for it; returns the old state."""
    old = child.state
    if new not in EDGES[old]:
        raise TransitionError(f"worker {child.name}: {old} -> {new} is not allowed")
    child.state = new
    emit(EVENTS[new], {"pid": child.pid, "from": str(old), **data}, worker=child.name)
    return old
