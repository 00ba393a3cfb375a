"""Pure unit tests of the task model: the transition table edge by edge, ids, summaries."""

from __future__ import annotations

import itertools

import orjson
import pytest

from cortex.services.scheduler import tasks
from cortex.services.scheduler.tasks import (
    EDGES,
    FINAL,
    State,
    Task,
    TransitionError,
    from_summary,
    new_task_id,
    transition,
)

T0 = 1_700_000_000.0


def make_task(state: State = State.QUEUED, **changes) -> Task:
    task = Task(id="t1", type="echo", description="d", priority="medium", tokens=0,
                timeout=30.0, retries=2, agent="a", key="k", times={"created": T0})
    task.state = state
    for key, value in changes.items():
        setattr(task, key, value)
    return task


def move(old: State, new: State) -> None:
    task = make_task(old)
    assert transition(task, new, T0 + 1) is old
    assert task.state is new
    assert task.times[str(new)] == T0 + 1


# --- allowed edges, one test each ---------------------------------------------------------

def test_transition_queued_to_dispatched():
    move(State.QUEUED, State.DISPATCHED)  # an idle worker takes it


def test_transition_queued_to_cancelled():
    move(State.QUEUED, State.CANCELLED)  # cancelled before it ran


def test_transition_queued_to_failed():
    move(State.QUEUED, State.FAILED)  # retried to the queue, then failed for good


def test_transition_dispatched_to_running():
    move(State.DISPATCHED, State.RUNNING)  # the worker says task.started


def test_transition_dispatched_to_queued():
    move(State.DISPATCHED, State.QUEUED)  # the worker rejected it, or it was lost: retry


def test_transition_dispatched_to_completed():
    move(State.DISPATCHED, State.COMPLETED)  # task.started lost, task.finished arrived


def test_transition_dispatched_to_failed():
    move(State.DISPATCHED, State.FAILED)


def test_transition_dispatched_to_cancelled():
    move(State.DISPATCHED, State.CANCELLED)


def test_transition_dispatched_to_dead():
    move(State.DISPATCHED, State.DEAD)  # lost with its retries spent


def test_transition_running_to_completed():
    move(State.RUNNING, State.COMPLETED)


def test_transition_running_to_failed():
    move(State.RUNNING, State.FAILED)


def test_transition_running_to_cancelled():
    move(State.RUNNING, State.CANCELLED)


def test_transition_running_to_queued():
    move(State.RUNNING, State.QUEUED)  # timeout or lost worker: retry with attempt + 1


def test_transition_running_to_dead():
    move(State.RUNNING, State.DEAD)


ALLOWED = {
    (State.QUEUED, State.DISPATCHED), (State.QUEUED, State.CANCELLED),
    (State.QUEUED, State.FAILED),
    (State.DISPATCHED, State.RUNNING), (State.DISPATCHED, State.QUEUED),
    (State.DISPATCHED, State.COMPLETED), (State.DISPATCHED, State.FAILED),
    (State.DISPATCHED, State.CANCELLED), (State.DISPATCHED, State.DEAD),
    (State.RUNNING, State.COMPLETED), (State.RUNNING, State.FAILED),
    (State.RUNNING, State.CANCELLED), (State.RUNNING, State.QUEUED),
    (State.RUNNING, State.DEAD),
}


def test_the_table_has_exactly_the_edges_tested_above():
    table = {(old, new) for old, news in EDGES.items() for new in news}
    assert table == ALLOWED
    assert set(EDGES) == set(State)


# --- forbidden edges ----------------------------------------------------------------------

FORBIDDEN = sorted(set(itertools.product(State, State)) - ALLOWED)


@pytest.mark.parametrize("old,new", FORBIDDEN, ids=[f"{a}_to_{b}" for a, b in FORBIDDEN])
def test_forbidden_transition_raises_and_changes_nothing(old, new):
    task = make_task(old)
    times = dict(task.times)
    with pytest.raises(TransitionError) as info:
        transition(task, new, T0 + 1)
    assert info.value.code == "conflict"
    assert f"{old} -> {new}" in str(info.value)
    assert task.state is old and task.times == times


def test_forbidden_edges_include_every_self_loop_and_the_skip_to_running():
    assert all((s, s) in FORBIDDEN for s in State)
    assert (State.QUEUED, State.RUNNING) in FORBIDDEN
    assert (State.QUEUED, State.DEAD) in FORBIDDEN


@pytest.mark.parametrize("state", sorted(FINAL))
def test_final_state_has_no_exits(state):
    assert EDGES[state] == frozenset()
    task = make_task(state)
    for new in State:
        with pytest.raises(TransitionError):
            transition(task, new, T0)


def test_final_states_are_exactly_those_without_exits():
    assert {s for s, news in EDGES.items() if not news} == FINAL
    assert {State.COMPLETED, State.FAILED, State.CANCELLED, State.DEAD} == FINAL


def test_every_state_can_reach_an_end():
    for start in State:
        seen, todo = set(), [start]
        while todo:
            s = todo.pop()
            seen.add(s)
            todo.extend(EDGES[s] - seen)
        assert seen & FINAL, start


@pytest.mark.parametrize("state", list(State))
def test_final_property_follows_the_state(state):
    assert make_task(state).final is (state in FINAL)


def test_transition_keeps_the_latest_entry_time_per_state():
    task = make_task(State.QUEUED)
    transition(task, State.DISPATCHED, T0 + 1)
    transition(task, State.QUEUED, T0 + 2)
    transition(task, State.DISPATCHED, T0 + 3)
    assert task.times == {"created": T0, "dispatched": T0 + 3, "queued": T0 + 2}


def test_error_categories_and_priorities_are_the_documented_ones():
    assert tasks.PRIORITIES == ("critical", "high", "medium", "low")
    assert [tasks.PRIORITY_RANK[p] for p in tasks.PRIORITIES] == [0, 1, 2, 3]
    assert set(tasks.ERROR_CATEGORIES) == {"timeout", "worker_lost", "handler_error",
                                           "budget_exceeded", "cancelled", "rejected"}


# --- ids ----------------------------------------------------------------------------------

def test_new_task_id_orders_by_time():
    ids = [new_task_id(T0 + i * 0.001) for i in range(0, 5000, 7)]
    assert ids == sorted(ids)


def test_new_task_id_unique_and_ordered_within_one_millisecond():
    ids = [new_task_id(T0) for _ in range(5000)]
    assert len(set(ids)) == 5000
    assert ids == sorted(ids)


def test_new_task_id_later_time_sorts_after_many_ids_of_an_earlier_time():
    early = [new_task_id(T0) for _ in range(100)]
    assert new_task_id(T0 + 0.001) > max(early)


def test_new_task_id_shape():
    task_id = new_task_id(T0)
    assert task_id.startswith("t") and len(task_id) == 1 + 11 + 6 + 4
    assert int(task_id[1:12], 16) == int(T0 * 1000)
    assert task_id.isascii() and task_id.isalnum()


# --- summaries ----------------------------------------------------------------------------

def full_task() -> Task:
    return make_task(State.RUNNING, payload={"x": [1, "ü"]}, deadline=T0 + 60, attempt=2,
                     worker="w1", times={"created": T0, "running": T0 + 1},
                     result=None, error={"category": "timeout", "message": "m"},
                     waiting=None, tokens_used=5, progress=0.5, message="half",
                     reserved=10, eta=T0 + 0.5, settle={"1": {"op": "ledger.release"}})


def test_summary_is_plain_data_with_state_and_final():
    data = full_task().summary()
    assert data["state"] == "running" and type(data["state"]) is str
    assert data["final"] is False
    assert set(data) == set(Task.__dataclass_fields__) | {"final"}


def test_from_summary_round_trip():
    task = full_task()
    back = from_summary(task.summary())
    assert back == task and back.state is State.RUNNING


def test_from_summary_round_trip_through_json():
    task = full_task()
    back = from_summary(orjson.loads(orjson.dumps(task.summary())))
    assert back == task


@pytest.mark.parametrize("state", list(State))
def test_from_summary_restores_every_state(state):
    assert from_summary(make_task(state).summary()).state is state


def test_from_summary_ignores_unknown_keys():
    data = make_task().summary() | {"from_the_future": 1}
    assert from_summary(data) == make_task()


def test_summary_times_are_a_copy():
    task = full_task()
    data = task.summary()
    data["times"]["created"] = 0
    data["state"] = "queued"
    assert task.times["created"] == T0 and task.state is State.RUNNING
