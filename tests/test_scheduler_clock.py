"""Pure unit tests of the scheduler's two clocks (services/scheduler/clock.py): with a fake
clock whose wall time jumps a day ahead or back while the monotonic time runs on, no
decision changes. Timeouts, silence, ETAs, admission, retry backoff, the dispatch grace,
long polls and aging all run on the monotonic clock; the wall clock only stamps times."""

from __future__ import annotations

import pytest

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.clock import Marks, Now
from cortex.services.scheduler.tasks import State

from .test_scheduling import (
    BACKOFF_BASE,
    HB,
    Sim,
    answer,
    events,
    kills,
    replay,
    runs,
)

DAY_AND_AN_HOUR = 25 * 3600.0


def jump(sim: Sim, seconds: float) -> None:
    """The wall clock is set `seconds` ahead (or back); the monotonic one does not move."""
    sim.now = Now(sim.now.wall + seconds, sim.now.mono)


def running_task(sim: Sim, **fields):
    task = sim.add(**fields)
    sim.ready("w1")
    sim.started("w1", task)
    assert task.state is State.RUNNING
    return task


@pytest.mark.parametrize("seconds", [DAY_AND_AN_HOUR, -DAY_AND_AN_HOUR], ids=["ahead", "back"])
def test_a_wall_clock_jump_times_out_nothing(seconds):
    sim = Sim()
    task = running_task(sim, timeout=300.0)
    jump(sim, seconds)
    for _ in range(10):  # its heartbeats keep coming, on time
        sim.now += 1.0
        sim.heartbeat("w1", task)
        fx = sim.tick(0.0)
        assert kills(fx) == [] and events(fx, "task.timeout") == []
    assert task.state is State.RUNNING
    sim.now += 290.0  # its timeout is up on the monotonic clock: 300 s since dispatch
    sim.heartbeat("w1", task)
    assert events(sim.tick(0.2), "task.timeout")


@pytest.mark.parametrize("seconds", [DAY_AND_AN_HOUR, -DAY_AND_AN_HOUR], ids=["ahead", "back"])
def test_a_wall_clock_jump_loses_no_silent_worker_and_spares_a_live_one(seconds):
    sim = Sim()
    task = running_task(sim)
    jump(sim, seconds)
    assert kills(sim.tick(3 * HB)) == []  # silent exactly three heartbeats: not yet
    assert kills(sim.tick(0.2))[0]["reason"] == "silent"
    assert task.state is State.QUEUED


def test_submits_are_admitted_after_the_wall_clock_went_back_a_day():
    """Running tasks' dispatch times lay in the future of the wall clock: the ETA of the
    next task must not be a day away (issue: `estimated start in 93649 s`)."""
    sim = Sim(max_wait=60.0)
    sim.state.estimates.avg_duration["echo"] = 1.0
    running_task(sim)
    jump(sim, -DAY_AND_AN_HOUR)
    kind, body = answer(sim.submit())
    assert kind == wire.REPLY, body
    assert 0 <= body["eta"] - sim.now.wall <= 1.0  # when the running task ends
    assert body["times"]["created"] == sim.now.wall  # stamped with the wall clock


def test_submits_are_admitted_after_the_wall_clock_went_ahead_a_day():
    sim = Sim(max_wait=60.0)
    running_task(sim)
    jump(sim, DAY_AND_AN_HOUR)
    kind, body = answer(sim.submit(deadline=sim.now.wall + 30.0))
    assert kind == wire.REPLY, body
    assert body["eta"] - sim.now.wall <= 30.0


def test_the_deadline_is_a_wall_time_and_is_judged_against_the_wall_clock():
    sim = Sim()
    running_task(sim)
    jump(sim, DAY_AND_AN_HOUR)
    kind, body = answer(sim.submit(deadline=sim.now.wall - 10.0))  # already past
    assert kind == wire.ERROR and body["code"] == "rejected"


@pytest.mark.parametrize("seconds", [DAY_AND_AN_HOUR, -DAY_AND_AN_HOUR], ids=["ahead", "back"])
def test_the_retry_backoff_runs_on_the_monotonic_clock(seconds):
    sim = Sim()
    task = running_task(sim, retries=3)
    sim.gone("w1")
    jump(sim, seconds)
    sim.ready("w2")
    assert runs(sim.tick(BACKOFF_BASE - 0.01)) == []
    assert runs(sim.tick(0.01))[0][1]["id"] == task.id


def test_a_ready_right_after_a_dispatch_is_within_the_grace_whatever_the_wall_clock():
    sim = Sim()
    task = sim.add()
    sim.ready("w1")
    jump(sim, DAY_AND_AN_HOUR)
    sim.ready("w1")  # crossed our task.run on the way
    assert task.state is State.DISPATCHED and task.attempt == 1


@pytest.mark.parametrize("seconds", [DAY_AND_AN_HOUR, -DAY_AND_AN_HOUR], ids=["ahead", "back"])
def test_a_long_poll_is_held_its_full_time(seconds):
    sim = Sim()
    task = sim.add()
    sim.wait(task, 30)
    jump(sim, seconds)
    assert [s for s in sim.tick(29.0).sends if s[0] == b"waiter"] == []
    assert answer(sim.tick(1.1), b"waiter")[1]["id"] == task.id


def test_aging_counts_monotonic_waiting_not_wall_time():
    sim = Sim(aging=30.0)
    low = sim.add(priority="low", description="low")
    jump(sim, DAY_AND_AN_HOUR)  # a day "later" by the wall clock: no aging from that
    sim.now += 1.0
    high = sim.add(priority="medium", description="medium")
    assert [t["id"] for _, t in runs(sim.ready("w1"))] == [high.id]
    assert low.state is State.QUEUED


def test_a_duration_reported_across_a_wall_clock_jump_is_the_monotonic_one():
    sim = Sim()
    task = sim.add()
    sim.ready("w1")
    sim.now += 2.0
    started = sim.now.wall
    jump(sim, DAY_AND_AN_HOUR)  # during the run: the worker's wall clock jumps too
    sim.now += 1.0
    fx = sim.finish("w1", task, started_at=started, finished_at=sim.now.wall)
    [(_, data, _, _)] = events(fx, "task.completed")
    assert data["duration"] == pytest.approx(3.0)  # at most the time since dispatch
    assert data["queued"] == 0.0


def test_after_a_restart_the_monotonic_clocks_start_at_the_recovery():
    sim = Sim()
    task = running_task(sim, timeout=60.0)
    queued = sim.add()
    sim.now += 50.0
    fresh = replay(sim.records)
    fresh.monitor = sim.state.monitor
    later = Now(sim.now.wall + 5.0, 1.0)  # another boot: its monotonic clock starts over
    fresh.restore(later)
    flight = fresh.tasks[task.id]
    assert fresh.marks[task.id] == Marks(created=1.0, dispatched=1.0, recovered=True)
    assert fresh.marks[queued.id] == Marks(created=1.0)
    assert flight.times["recovered"] == later.wall
    fx = Effects()
    fresh.task_heartbeat(fx, "w1", {"id": task.id, "attempt": 1, "types": ["echo"]},
                         later + 59.0)
    fresh.tick(fx, later + 59.0, HB)
    assert flight.state is State.RUNNING  # 59 s since recovery: not timed out
    fx = Effects()
    fresh.tick(fx, later + 60.5, HB)
    assert flight.state is State.QUEUED and flight.error["category"] == "timeout"
