"""Pure unit tests of the waiting machine (services/scheduler/waiting.py): one
`task.waiting` event per change of what blocks a task, never one per retry; the detail
(which limit, how much is left, how much is asked; the figures of a cpu or memory check)
in the event and in the task's status; and the retry timing of held tasks."""

from __future__ import annotations

import pytest

from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.feasibility import Readings, ResourceMonitor
from cortex.services.scheduler.tasks import State, Task
from cortex.services.scheduler.waiting import (
    BLOCKED_RETRY,
    TOKENS_RETRY_CAP,
    Reason,
    WaitingRoom,
)

from .test_scheduling import (
    FixedPredictor,
    Midpoint,
    Sim,
    events,
    ledger_requests,
    refuse,
    reserve_of,
    runs,
)


def make_task(task_id: str = "t1") -> Task:
    return Task(id=task_id, type="echo", description="", priority="medium", tokens=50,
                timeout=30.0, retries=0, agent="a", key=task_id, times={"created": 0.0})


def run_refusing(sim: Sim, seconds: float, **refusal) -> int:
    """Let `seconds` pass in tenths, the ledger refusing every reservation asked for;
    returns how many were asked."""
    asked, seen = 0, 0
    for _ in range(round(seconds * 10)):
        sim.tick(0.1)
        while seen < len(sim.effects):  # answering makes turns of its own
            seen += 1
            for corr, _ in ledger_requests(sim.effects[seen - 1], "ledger.reserve"):
                refuse(sim, corr, **refusal)
                asked += 1
    return asked


# --- once per change ----------------------------------------------------------------------

def test_a_task_refused_tokens_again_and_again_is_announced_once():
    sim = Sim()
    task = sim.add(tokens=50)
    sim.ready("w1")
    asked = run_refusing(sim, 60.0, available=5)  # a minute
    all_waits = [e for fx in sim.effects for e in events(fx, "task.waiting")]
    assert len(all_waits) == 1
    assert all_waits[0][1] == {"reason": "tokens", "attempt": 1, "detail": {
        "message": "global has 5 of 1000 tokens available, 50 requested", "scope": "global",
        "limit": 1000, "available": 5, "requested": 50}}
    # Asked again on a backoff capped at TOKENS_RETRY_CAP: 0.5, 1, 2, 4, then every 5 s.
    assert 10 <= asked <= 4 + 60 / TOKENS_RETRY_CAP + 1
    assert task.waiting == "tokens" and task.state is State.QUEUED


def test_a_hundred_tasks_without_tokens_for_a_minute_write_a_hundred_waiting_events():
    sim = Sim()
    for i in range(10):
        sim.ready(f"w{i}")
    tasks = [sim.add(tokens=500, description=f"t{i}") for i in range(100)]
    asked = run_refusing(sim, 60.0, available=0, requested=500)
    waits = [e for fx in sim.effects for e in events(fx, "task.waiting")]
    assert len(waits) == 100 and {e[2] for e in waits} == {t.id for t in tasks}
    assert all(t.waiting == "tokens" for t in tasks)
    # Each task asks the ledger at most 16 times a minute (0.5, 1, 2, 4 s, then every 5 s):
    # bounded, whatever the number of retries.
    assert 100 <= asked <= 100 * 16, asked


def test_retries_of_a_refused_reservation_hold_no_worker_and_write_no_worker_event():
    sim = Sim()
    task = sim.add(tokens=50)
    sim.ready("w1")
    turns = len(sim.effects)
    run_refusing(sim, 30.0, available=5)
    worker_events = [e for fx in sim.effects[turns:] for e in fx.events
                     if e[0].startswith("worker.")]
    assert [e[0] for e in worker_events] == ["worker.idle"]  # after the first refusal only
    assert sim.state.workers["w1"].state == "idle" and task.waiting == "tokens"
    other = sim.add()  # the idle worker is free for other work meanwhile
    assert other.state is State.DISPATCHED


def test_with_no_worker_free_a_token_retry_waits_in_the_queue_for_one():
    sim = Sim()
    task = sim.add(tokens=50)
    refuse(sim, reserve_of(sim.ready("w1"))[0])
    busy = sim.add()  # w1 takes it
    assert busy.worker == "w1"
    assert ledger_requests(sim.tick(1.0), "ledger.reserve") == []  # no worker, no ask
    assert sim.state.queue.depth("echo") == 1 and task.waiting == "tokens"
    fx = sim.finish("w1", busy)  # a worker frees: it claims it and asks
    assert reserve_of(fx)[1]["task"] == task.id


def test_another_limit_is_a_new_event_but_tokens_left_moving_is_not():
    sim = Sim()
    task = sim.add(tokens=50)
    fx = sim.ready("w1")
    refuse(sim, reserve_of(fx)[0], available=5)
    corr, _ = reserve_of(sim.tick(BLOCKED_RETRY))
    fx = refuse(sim, corr, available=7)  # someone gave some back: still the same limit
    assert events(fx, "task.waiting") == []
    assert task.waiting_detail["available"] == 7  # the status has the latest figure
    corr, _ = reserve_of(sim.tick(1.0))
    fx = sim.ledger(corr, granted=False, scope="agent:client-1", limit=60, available=40,
                    requested=50, reason="agent:client-1 has 40 of 60 tokens available")
    [(_, data, _, _)] = events(fx, "task.waiting")
    assert data["detail"]["scope"] == "agent:client-1" and data["detail"]["limit"] == 60


def test_the_status_carries_the_waiting_detail():
    sim = Sim()
    task = sim.add(tokens=50)
    refuse(sim, reserve_of(sim.ready("w1"))[0], available=5)
    summary = task.summary()
    assert summary["waiting"] == "tokens"
    assert summary["waiting_detail"] == {
        "message": "global has 5 of 1000 tokens available, 50 requested", "scope": "global",
        "limit": 1000, "available": 5, "requested": 50}
    assert sim.state.status(sim.now)["waiting"] == {"tokens": 1}


def test_a_cpu_wait_is_announced_once_however_the_free_cores_move():
    sim = Sim()
    sim.state.predictor = FixedPredictor(heavy=(5.0, 1.0))
    free = iter([0.3 + 0.01 * i for i in range(1000)])  # a little different each reading
    sim.state.monitor = ResourceMonitor(sample=lambda: Readings(
        cpu_free_cores=next(free), mem_available_mb=1e5, mem_percent=10.0, mem_total_mb=1e6,
        cpu_cores=2), interval=0.0)
    task = sim.add(type="heavy")
    sim.ready("w1", ("heavy",))
    for _ in range(20):
        sim.tick(BLOCKED_RETRY)
    waits = [e for fx in sim.effects for e in events(fx, "task.waiting")]
    assert len(waits) == 1 and waits[0][1]["reason"] == "cpu"
    assert waits[0][1]["detail"]["check"] == "cpu"
    assert task.waiting == "cpu" and task.waiting_detail["free_cores"] > 0.3  # the latest


def test_memory_after_cpu_is_a_change():
    sim = Sim()
    sim.state.predictor = FixedPredictor(heavy=(5.0, 1.0, 10.0))
    readings = [Readings(0.3, 1e5, 10.0, 1e6, 2), Readings(2.0, 1e5, 95.0, 1e6, 2)]
    sim.state.monitor = ResourceMonitor(sample=lambda: readings[0], interval=0.0)
    task = sim.add(type="heavy")
    sim.ready("w1", ("heavy",))
    readings.pop(0)
    sim.tick(BLOCKED_RETRY)
    waits = [e[1] for fx in sim.effects for e in events(fx, "task.waiting")]
    assert [(w["reason"], w["detail"]["check"]) for w in waits] == [
        ("cpu", "cpu"), ("memory", "memory_pressure")]
    assert task.waiting == "memory"


def test_a_new_attempt_is_a_new_story():
    sim = Sim()
    task = sim.add(tokens=50)
    refuse(sim, reserve_of(sim.ready("w1"))[0], available=5)
    corr, _ = reserve_of(sim.tick(BLOCKED_RETRY))
    runs(sim.ledger(corr, granted=True))
    assert task.state is State.DISPATCHED and task.waiting is None
    assert task.waiting_detail is None
    sim.gone("w1")  # lost: back to the queue, attempt 2
    assert task.waiting == "backoff"
    sim.ready("w2")
    corr, _ = reserve_of(sim.tick(1.0))
    fx = refuse(sim, corr, available=5)
    [(_, data, _, _)] = events(fx, "task.waiting")
    assert data["attempt"] == 2


def test_quiet_reasons_write_no_event():
    room = WaitingRoom(Midpoint())
    task = make_task()
    fx = Effects()
    for reason in (Reason.WORKER, Reason.RESERVING, Reason.BACKOFF, Reason.WORKER):
        room.set(fx, task, reason)
        assert task.waiting == reason.value
    room.set(fx, task, None)
    assert task.waiting is None and fx.events == []


# --- retry timing -------------------------------------------------------------------------

def test_held_tasks_come_back_when_due_in_due_order():
    room = WaitingRoom(Midpoint())
    fx = Effects()
    a, b, c = make_task("a"), make_task("b"), make_task("c")
    room.hold(fx, a, Reason.BACKOFF, 10.0, delay=2.0)
    room.hold(fx, b, Reason.CPU, 10.0, {"check": "cpu"})
    room.hold(fx, c, Reason.TOKENS, 10.0, {"scope": "global", "requested": 5, "available": 0})
    assert room.due(fx, 10.4) == []
    assert room.due(fx, 10.5) == [b, c]  # BLOCKED_RETRY; the first token retry
    assert room.due(fx, 11.9) == []
    assert room.due(fx, 12.0) == [a] and a.waiting == "worker"  # backoff over: queued
    assert b.waiting == "cpu" and c.waiting == "tokens"  # they keep saying why
    assert room.next_due() is None and room.held == {}


def test_a_released_task_does_not_come_back():
    room = WaitingRoom(Midpoint())
    fx = Effects()
    task = make_task()
    room.hold(fx, task, Reason.BACKOFF, 0.0, delay=1.0)
    room.release(task)
    assert room.due(fx, 5.0) == []


def test_a_token_wait_ends_no_later_than_the_window_reset():
    room = WaitingRoom(Midpoint())
    fx = Effects()
    task = make_task()
    for _ in range(6):  # the backoff is at its cap
        room.hold(fx, task, Reason.TOKENS, 0.0, {"scope": "global"})
        room.due(fx, 100.0)
    waited = room.hold(fx, task, Reason.TOKENS, 0.0, {"scope": "global", "resets_in_s": 1.5})
    assert waited == pytest.approx(1.5)


def test_token_retries_are_jittered():
    import random

    waits = set()
    for seed in range(20):
        room = WaitingRoom(random.Random(seed))
        waits.add(round(room.hold(Effects(), make_task(), Reason.TOKENS, 0.0), 6))
    assert len(waits) > 10 and all(0.4 <= w <= 0.6 for w in waits)


def test_the_eta_of_a_token_wait_is_the_window_reset_or_unknown():
    sim = Sim()
    task = sim.add(tokens=50)
    corr, _ = reserve_of(sim.ready("w1"))
    refuse(sim, corr)
    sim.state.refresh_eta(task, sim.now)
    assert task.eta is None  # nothing gives tokens back at a known time
    corr, _ = reserve_of(sim.tick(BLOCKED_RETRY))
    reset = sim.now.wall + 3.0
    sim.ledger(corr, granted=False, scope="type:echo", limit=100, available=0,
               requested=50, next_reset=reset)
    sim.state.refresh_eta(task, sim.now)
    assert task.eta == reset and task.waiting_detail["resets_at"] == reset
