"""The pool's children: one state table, one transition() that emits its event."""

from __future__ import annotations

import pytest

from cortex.services.pool.children import (
    EDGES,
    EVENTS,
    Child,
    ChildState,
    TransitionError,
    transition,
)


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, dict, str | None]] = []

    def __call__(self, type_, data, task=None, worker=None):
        self.events.append((type_, data, worker))


def child() -> Child:
    return Child("w-default-0-1-1", "default", 0, started=1.0, pid=4242)


def test_a_life_is_one_event_per_state_change():
    c, emit = child(), Recorder()
    transition(c, ChildState.RUNNING, emit, group="default", slot=0, extra=False)
    transition(c, ChildState.STOPPING, emit, reason="timeout", grace=5.0)
    transition(c, ChildState.KILLED, emit, reason="timeout")
    transition(c, ChildState.EXITED, emit, code=-9, reason="timeout", uptime=3.0)
    assert [e[0] for e in emit.events] == ["worker.spawned", "worker.stopping",
                                           "worker.killed", "worker.exited"]
    assert all(worker == c.name and data["pid"] == 4242 for _, data, worker in emit.events)
    assert [data["from"] for _, data, _ in emit.events] == ["new", "running", "stopping",
                                                            "killed"]
    assert emit.events[-1][1]["code"] == -9 and c.state is ChildState.EXITED


@pytest.mark.parametrize("old,new", [(old, new) for old in ChildState for new in ChildState
                                     if new not in EDGES[old]])
def test_every_edge_outside_the_table_is_refused_and_emits_nothing(old, new):
    c, emit = child(), Recorder()
    c.state = old
    with pytest.raises(TransitionError):
        transition(c, new, emit)
    assert c.state is old and emit.events == []


def test_only_the_reap_says_a_child_exited():
    """Every state can reach `exited` only by the edge the reap takes, and `exited` is the
    end: a child is never brought back (a restart is a new child)."""
    assert EDGES[ChildState.EXITED] == frozenset()
    assert EVENTS[ChildState.EXITED] == "worker.exited"
    assert all(ChildState.EXITED in EDGES[s] for s in ChildState
               if s not in (ChildState.NEW, ChildState.EXITED))
    assert ChildState.EXITED not in EDGES[ChildState.NEW]


def test_the_row_shows_the_state():
    c = child()
    transition(c, ChildState.RUNNING, Recorder())
    assert c.row()["state"] == "running" and c.row()["pid"] == 4242
