"""Pure unit tests of the scheduler's worker states (services/scheduler/workers.py): each
allowed edge, one test each, reached the way the scheduler reaches it, with its one event;
every other edge refused; and what `leaving` means: no task for a worker that said it is
leaving, and a task a stopping worker hands back keeps its attempt."""

from __future__ import annotations

import itertools

import pytest

from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.clock import Now
from cortex.services.scheduler.tasks import State
from cortex.services.scheduler.workers import (
    EDGES,
    Worker,
    WorkerRegistry,
    WorkerState,
    WorkerTransitionError,
    transition,
)

from .test_scheduling import HB, Sim, events, ledger_requests, reserve_of, runs

W = WorkerState
WORKER_EVENTS = {"worker.registered", "worker.claimed", "worker.busy", "worker.idle",
                 "worker.leaving", "worker.lost", "worker.left"}


def worker_events(fx: Effects) -> list[tuple[str, dict]]:
    return [(e[0], e[1]) for e in fx.events if e[0] in WORKER_EVENTS]


def state_of(sim: Sim, name: str = "w1") -> str | None:
    worker = sim.state.workers.get(name)
    return None if worker is None else str(worker.state)


def leaving(sim: Sim, name: str = "w1", reason: str = "stopping") -> Effects:
    return sim.turn(sim.state.worker_leaving, name, {"reason": reason}, sim.now)


def claimed(sim: Sim):
    """w1 claimed for a task whose tokens are being reserved; returns (task, corr)."""
    task = sim.add(tokens=10)
    corr, _ = reserve_of(sim.ready("w1"))
    assert state_of(sim) == "claimed"
    return task, corr


def busy(sim: Sim):
    task = sim.add()
    sim.ready("w1")
    assert state_of(sim) == "busy"
    return task


# --- allowed edges, one test each ---------------------------------------------------------

def test_worker_new_to_idle():
    sim = Sim()
    fx = sim.ready("w1", pid=7)
    assert state_of(sim) == "idle"
    assert worker_events(fx) == [("worker.registered",
                                  {"from": "new", "types": ["echo"], "pid": 7})]


def test_worker_new_to_busy():
    sim = Sim()
    task = busy(sim)
    del sim.state.workers["w1"]  # as after our restart
    fx = sim.heartbeat("w1", task, pid=9)
    assert state_of(sim) == "busy" and sim.state.workers["w1"].task == task.id
    assert [(t, d["from"]) for t, d in worker_events(fx)] == [("worker.registered", "new")]


def test_worker_idle_to_claimed():
    sim = Sim()
    sim.ready("w1")
    fx = sim.submit(tokens=10)
    task = next(iter(sim.state.tasks.values()))
    assert state_of(sim) == "claimed" and sim.state.workers["w1"].task == task.id
    assert worker_events(fx) == [("worker.claimed", {"from": "idle"})]


def test_worker_idle_to_busy():
    sim = Sim()
    sim.ready("w1")
    fx = sim.submit()
    assert state_of(sim) == "busy"
    assert worker_events(fx) == [("worker.busy", {"from": "idle"})]


def test_worker_claimed_to_busy():
    sim = Sim()
    task, corr = claimed(sim)
    fx = sim.ledger(corr, granted=True)
    assert state_of(sim) == "busy" and task.state is State.DISPATCHED
    assert worker_events(fx) == [("worker.busy", {"from": "claimed"})]


def test_worker_claimed_to_idle():
    sim = Sim()
    task, corr = claimed(sim)
    fx = sim.ledger(corr, granted=False, reason="no tokens")
    assert state_of(sim) == "idle" and task.waiting == "tokens"
    assert worker_events(fx) == [("worker.idle", {"from": "claimed"})]


def test_worker_busy_to_idle():
    sim = Sim()
    task = busy(sim)
    fx = sim.finish("w1", task)
    assert state_of(sim) == "idle" and sim.state.workers["w1"].done == 1
    assert worker_events(fx) == [("worker.idle", {"from": "busy", "done": 1})]


def to_leaving(start: str) -> None:
    sim = Sim()
    if start == "idle":
        sim.ready("w1")
    elif start == "claimed":
        claimed(sim)
    else:
        busy(sim)
    fx = leaving(sim)
    assert state_of(sim) == "leaving"
    assert worker_events(fx) == [("worker.leaving", {"from": start, "reason": "stopping"})]


def test_worker_idle_to_leaving():
    to_leaving("idle")


def test_worker_claimed_to_leaving():
    to_leaving("claimed")


def test_worker_busy_to_leaving():
    to_leaving("busy")


def test_worker_idle_to_gone():
    sim = Sim()
    sim.ready("w1", pid=5)
    fx = sim.gone("w1")
    assert state_of(sim) is None
    assert worker_events(fx) == [("worker.lost", {"from": "idle", "reason": "exited",
                                                  "pid": 5})]


def test_worker_claimed_to_gone():
    sim = Sim()
    task, corr = claimed(sim)
    fx = sim.gone("w1")
    assert state_of(sim) is None and [e for e, _ in worker_events(fx)] == ["worker.lost"]
    sim.ledger(corr, granted=True)  # the grant comes after: the task waits for a worker
    assert task.state is State.QUEUED and task.reserved == 10


def test_worker_busy_to_gone():
    sim = Sim()
    task = busy(sim)
    fx = sim.gone("w1")
    assert state_of(sim) is None and [e for e, _ in worker_events(fx)] == ["worker.lost"]
    assert task.state is State.QUEUED and task.attempt == 2  # it was running: retried


def test_worker_busy_to_gone_killed_on_timeout():
    sim = Sim()
    task = sim.add(timeout=1.0)
    sim.ready("w1")
    fx = sim.tick(1.2)
    [(event, data)] = worker_events(fx)
    assert (event, data["reason"], data["killed"]) == ("worker.lost", "timeout", True)
    assert task.error["category"] == "timeout"


def test_worker_leaving_to_gone():
    sim = Sim()
    sim.ready("w1")
    leaving(sim)
    fx = sim.gone("w1")
    assert state_of(sim) is None
    assert [(e, d["from"]) for e, d in worker_events(fx)] == [("worker.left", "leaving")]


def test_worker_leaving_to_gone_when_it_goes_silent_without_an_exit_report():
    sim = Sim()  # an external worker's goodbye reaches only the broker
    sim.ready("w1")
    leaving(sim)
    assert state_of(sim) == "leaving"
    assert worker_events(sim.tick(3 * HB)) == []  # three heartbeats: not yet
    fx = sim.tick(0.2)
    assert state_of(sim) is None
    assert [e for e, _ in worker_events(fx)] == ["worker.left"]


# --- the table ----------------------------------------------------------------------------

ALL = list(WorkerState)


@pytest.mark.parametrize("old,new", [(a, b) for a, b in itertools.product(ALL, ALL)
                                     if (a, b) not in EDGES],
                         ids=lambda s: str(s))
def test_worker_edge_not_in_the_table_is_refused(old, new):
    worker = Worker("w", ("echo",), 1, state=old)
    fx = Effects()
    with pytest.raises(WorkerTransitionError):
        transition(fx, worker, new, Now(1.0, 1.0))
    assert worker.state is old and fx.events == []


@pytest.mark.parametrize("edge", sorted(EDGES), ids=lambda e: f"{e[0]}_to_{e[1]}")
def test_every_allowed_edge_is_one_event(edge):
    old, new = edge
    worker = Worker("w", ("echo",), 1, state=old, task="t1")
    fx = Effects()
    transition(fx, worker, new, Now(123.0, 1.0), why="test")
    assert worker.state is new and worker.since == 123.0
    assert fx.events == [(EDGES[edge], {"from": str(old), "why": "test"}, "t1", "w")]


def test_gone_leaves_the_registry_and_cannot_come_back():
    registry = WorkerRegistry()
    fx = Effects()
    worker = registry.register(fx, "w", ("echo",), 1, Now(0.0, 0.0))
    registry.move(fx, worker, W.GONE, Now(0.0, 0.0))
    assert registry.get("w") is None
    with pytest.raises(WorkerTransitionError):
        transition(fx, worker, W.IDLE, Now(0.0, 0.0))


# --- leaving means leaving ----------------------------------------------------------------

def test_a_leaving_worker_never_gets_a_task():
    sim = Sim()
    sim.ready("w1")
    leaving(sim)
    fx = sim.submit()
    assert runs(fx) == [] and ledger_requests(fx) == []
    assert runs(sim.ready("w1")) == []  # a stray ready changes nothing
    assert runs(sim.tick(1.0)) == []
    assert state_of(sim) == "leaving"
    assert [name for name, _ in runs(sim.ready("w2"))] == ["w2"]


def test_a_busy_leaving_worker_finishes_its_task_and_takes_no_other():
    sim = Sim()
    task = busy(sim)
    later = sim.add()
    leaving(sim, reason="recycle")
    fx = sim.finish("w1", task)
    assert task.state is State.COMPLETED and runs(fx) == []
    assert later.state is State.QUEUED and later.attempt == 1
    worker = sim.state.workers["w1"]
    assert (worker.state, worker.task, worker.done) == ("leaving", None, 1)


def test_a_claimed_worker_that_leaves_gives_up_the_task_being_reserved():
    sim = Sim()
    task, corr = claimed(sim)
    leaving(sim)
    assert sim.state.workers["w1"].task is None
    fx = sim.ledger(corr, granted=True)
    assert runs(fx) == [] and task.state is State.QUEUED and task.reserved == 10
    assert [name for name, t in runs(sim.ready("w2"))] == ["w2"]


def test_a_task_a_stopping_worker_hands_back_keeps_its_attempt():
    sim = Sim()
    task = sim.add(retries=0)
    sim.ready("w1")  # task.run on its way while the worker starts stopping
    fx = sim.turn(sim.state.task_rejected, "w1", {"id": task.id, "attempt": 1,
                                                  "reason": "stopping"}, sim.now)
    assert task.state is State.QUEUED and task.attempt == 1 and task.error is None
    assert state_of(sim) == "leaving" and runs(fx) == []
    sim.gone("w1")  # it exits: nothing of the task is lost
    assert task.state is State.QUEUED and task.attempt == 1
    assert [t["attempt"] for _, t in runs(sim.ready("w2"))] == [1]


def test_a_graceful_stop_with_work_in_flight_fails_and_retries_nothing():
    """`cortex down` with 4 tasks running and 6 queued: every worker says it is leaving,
    finishes what it runs and exits. The running ones complete; the queued ones stay
    queued on their first attempt, dispatched to no one; new workers take them later."""
    sim = Sim()
    for i in range(4):
        sim.ready(f"w{i}")
    running = [sim.add(retries=0) for _ in range(4)]
    queued = [sim.add(retries=0) for _ in range(6)]
    for i in range(4):
        assert not runs(leaving(sim, f"w{i}"))
    for i, task in enumerate(running):
        assert runs(sim.finish(f"w{i}", task)) == []
        sim.turn(sim.state.worker_gone, f"w{i}", "exited", sim.now)
    assert all(t.state is State.COMPLETED for t in running)
    assert all((t.state, t.attempt, t.error) == (State.QUEUED, 1, None) for t in queued)
    assert sim.state.counters["retried"] == sim.state.counters["failed"] == 0
    for i in range(6):
        sim.ready(f"new{i}")
    assert all(t.state is State.DISPATCHED and t.attempt == 1 for t in queued)


def test_worker_list_shows_each_state():
    sim = Sim()
    busy(sim)
    sim.ready("w2")
    leaving(sim, "w2")
    rows = {r["name"]: r for r in sim.state.worker_rows(sim.now)}
    assert (rows["w1"]["state"], rows["w2"]["state"]) == ("busy", "leaving")
    assert isinstance(rows["w1"]["state"], str) and rows["w1"]["silent_s"] == 0.0
    assert sim.state.status(sim.now)["workers"] == {"echo": {"idle": 0, "busy": 1,
                                                             "leaving": 1}}
    assert [e for e, _ in worker_events(sim.tick(0.0))] == []  # nothing changes by itself


def test_each_worker_event_names_its_worker():
    sim = Sim()
    task = busy(sim)
    fx = sim.finish("w1", task)
    assert [(e[0], e[3]) for e in fx.events if e[0] in WORKER_EVENTS] == [("worker.idle",
                                                                          "w1")]
    assert events(fx, "task.completed")
