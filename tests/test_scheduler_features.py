"""Unit tests of what the scheduler offers the client and the CLI: `task.list` filters and
counts, `task.submit` with `wait`, rate-limited `task.progress` events, and `model.train`
saying whether it started and why not (trainer.py, with a stand-in training child)."""

from __future__ import annotations

import sys
import time

import pytest

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.prediction.predictor import Predictor
from cortex.services.scheduler.progress import PROGRESS_EVERY
from cortex.services.scheduler.tasks import State
from cortex.services.scheduler.trainer import Trainer

from .test_scheduling import CLIENT, Sim, answer, error_code, events

# --- task.list ----------------------------------------------------------------------------


def listing_sim() -> tuple[Sim, list]:
    sim = Sim()
    tasks = []
    for i, (task_type, agent) in enumerate([("echo", "a"), ("sleep", "a"), ("echo", "b"),
                                            ("echo", "a"), ("sleep", "b")]):
        sim.now += 0.01
        tasks.append(sim.add(type=task_type, agent=agent, description=f"n{i}"))
    sim.cancel(tasks[3])
    return sim, tasks


def ids(listed: dict) -> list[str]:
    return [t["id"] for t in listed["tasks"]]


def test_task_list_filters_by_type_and_agent_exactly():
    sim, tasks = listing_sim()
    listed = sim.state.list_tasks({"type": "echo", "agent": "a"})
    assert ids(listed) == [tasks[0].id, tasks[3].id]
    assert (listed["total"], listed["truncated"]) == (2, False)
    assert ids(sim.state.list_tasks({"type": "ech"})) == []  # exact, not a prefix
    assert ids(sim.state.list_tasks({"agent": "b", "state": "queued"})) == [tasks[2].id,
                                                                           tasks[4].id]


def test_task_list_total_counts_every_match_and_says_when_it_truncated():
    sim, tasks = listing_sim()
    listed = sim.state.list_tasks({"limit": 2})
    assert ids(listed) == [tasks[3].id, tasks[4].id]  # the latest two, oldest first
    assert (listed["total"], listed["truncated"]) == (5, True)


def test_task_list_newest_first():
    sim, tasks = listing_sim()
    assert ids(sim.state.list_tasks({"newest": True})) == [t.id for t in reversed(tasks)]
    assert ids(sim.state.list_tasks({"newest": True, "limit": 2})) == [tasks[4].id,
                                                                      tasks[3].id]


@pytest.mark.parametrize("body", [{"newest": 1}, {"newest": "yes"}, {"type": 5},
                                  {"agent": ""}, {"type": "t" * 65}])
def test_task_list_refuses_bad_filters(body):
    sim, _ = listing_sim()
    assert error_code(sim.state.list_tasks, body) == "bad_request"


# --- task.submit with wait ----------------------------------------------------------------


def test_submit_with_wait_replies_when_the_task_ends():
    sim = Sim()
    fx = sim.submit(wait=30)
    assert [s for s in fx.sends if s[0] == CLIENT] == []  # held
    task = next(iter(sim.state.tasks.values()))
    sim.ready("w1")
    fx = sim.finish("w1", task)
    kind, body = answer(fx)
    assert kind == wire.REPLY and body["id"] == task.id and body["final"] is True
    assert body["state"] == "completed"


def test_submit_with_wait_replies_with_the_task_when_the_wait_is_up():
    sim = Sim()
    sim.submit(wait=2)
    assert [s for s in sim.tick(1.9).sends if s[0] == CLIENT] == []
    kind, body = answer(sim.tick(0.2))
    assert kind == wire.REPLY and body["final"] is False and body["state"] == "queued"


def test_submit_with_wait_that_is_refused_is_refused_at_once():
    sim = Sim(max_queue_per_type=0)
    kind, body = answer(sim.submit(wait=30))
    assert kind == wire.ERROR and body["code"] == "queue_full"


def test_a_resent_submit_with_wait_waits_again_and_gets_one_reply():
    sim = Sim()
    body = {"idempotency_key": "k", "type": "echo", "wait": 30}
    sim.turn(sim.state.submit, CLIENT, b"c1", body, sim.now)
    sim.turn(sim.state.submit, CLIENT, b"c1", body, sim.now)  # the client re-sent it
    task = next(iter(sim.state.tasks.values()))
    assert len(sim.state.tasks) == 1 and sim.state.counters["duplicates"] == 1
    sim.ready("w1")
    fx = sim.finish("w1", task)
    assert [c for p, _, c, _ in fx.sends if p == CLIENT] == [b"c1"]


def test_a_resent_submit_with_wait_for_a_finished_task_replies_at_once():
    sim = Sim()
    task = sim.add(idempotency_key="done")
    sim.ready("w1")
    sim.finish("w1", task)
    kind, body = answer(sim.turn(sim.state.submit, CLIENT, b"c2",
                                 {"idempotency_key": "done", "type": "echo", "wait": 30},
                                 sim.now))
    assert kind == wire.REPLY and body["state"] == "completed"


@pytest.mark.parametrize("wait", [-1, 61, "5", float("nan"), True])
def test_submit_refuses_a_bad_wait(wait):
    sim = Sim()
    body = {"idempotency_key": "k", "type": "echo", "wait": wait}
    assert error_code(sim.state.submit, Effects(), CLIENT, b"c", body, sim.now) == \
        "bad_request"
    assert sim.state.tasks == {}


# --- task.progress ------------------------------------------------------------------------


def progress(sim: Sim, task, fraction: float, message: str = "") -> Effects:
    return sim.turn(sim.state.task_progress, "w1", {"id": task.id, "attempt": task.attempt,
                                                    "fraction": fraction,
                                                    "message": message}, sim.now)


def started(sim: Sim):
    task = sim.add()
    sim.ready("w1")
    sim.started("w1", task)
    return task


def test_progress_becomes_an_event_with_fraction_message_and_attempt():
    sim = Sim()
    task = started(sim)
    fx = progress(sim, task, 0.25, "a quarter")
    assert events(fx, "task.progress") == [("task.progress", {
        "fraction": 0.25, "message": "a quarter", "attempt": 1}, task.id, "w1")]
    assert (task.summary()["progress"], task.summary()["message"]) == (0.25, "a quarter")


def test_progress_events_are_rate_limited_but_the_latest_value_is_kept():
    sim = Sim()
    task = started(sim)
    written = events(progress(sim, task, 0.1), "task.progress")
    for i in range(2, 10):  # nine reports within a tenth of a second
        sim.now += 0.01
        written += events(progress(sim, task, i / 10, f"step {i}"), "task.progress")
        assert task.progress == i / 10  # the status always has the latest
    assert len(written) == 1
    fx = sim.tick(PROGRESS_EVERY)  # its turn: the latest value is written
    assert [e[1]["fraction"] for e in events(fx, "task.progress")] == [0.9]
    assert events(sim.tick(PROGRESS_EVERY), "task.progress") == []  # nothing new: nothing


def test_over_a_long_run_at_most_one_progress_event_per_interval():
    sim = Sim()
    task = started(sim)
    written = []
    for i in range(1000):  # a report every 10 ms for 10 s
        sim.now += 0.01
        written += events(progress(sim, task, i / 1000), "task.progress")
        written += events(sim.tick(0.0), "task.progress")
    assert 10 / PROGRESS_EVERY - 1 <= len(written) <= 10 / PROGRESS_EVERY + 1


def test_the_last_progress_before_the_end_is_written_before_the_end():
    sim = Sim()
    task = started(sim)
    progress(sim, task, 0.5)
    sim.now += 0.1
    progress(sim, task, 0.99, "almost")  # kept back by the rate limit
    fx = sim.finish("w1", task)
    kinds = [e[0] for e in fx.events if e[0] in ("task.progress", "task.completed")]
    assert kinds == ["task.progress", "task.completed"]
    assert events(fx, "task.progress")[0][1]["fraction"] == 0.99


@pytest.mark.parametrize("end", ["cancel", "lost"])
def test_a_kept_progress_is_written_when_the_attempt_ends_otherwise(end):
    sim = Sim()
    task = started(sim)
    progress(sim, task, 0.5)
    sim.now += 0.1
    progress(sim, task, 0.6)
    fx = sim.cancel(task) if end == "cancel" else sim.gone("w1")
    assert [e[1]["fraction"] for e in events(fx, "task.progress")] == [0.6]
    if end == "lost":  # the next attempt starts from nothing
        assert (task.attempt, task.progress, task.message) == (2, 0.0, "")


def test_progress_from_another_worker_or_attempt_is_ignored():
    sim = Sim()
    task = started(sim)
    fx = sim.turn(sim.state.task_progress, "w2", {"id": task.id, "attempt": 1,
                                                  "fraction": 0.5}, sim.now)
    assert events(fx, "task.progress") == [] and task.progress == 0.0


@pytest.mark.parametrize("body", [{"fraction": 1.5}, {"fraction": -0.1},
                                  {"fraction": "half"}, {"fraction": 0.5, "message": 5},
                                  {"fraction": 0.5, "message": "m" * 501}])
def test_bad_progress_is_refused_and_changes_nothing(body):
    sim = Sim()
    task = started(sim)
    with pytest.raises(wire.ProtocolError):
        sim.state.task_progress(Effects(), "w1", {"id": task.id, "attempt": 1, **body},
                                sim.now)
    assert (task.progress, task.message) == (0.0, "")


def test_progress_as_a_request_from_an_external_worker():
    sim = Sim()
    task = started(sim)
    fx = Effects()
    got = sim.state.progress_request(fx, {"id": task.id, "fraction": 0.3}, sim.now)
    assert got is task and task.progress == 0.3 and events(fx, "task.progress")
    sim.finish("w1", task)
    fx = Effects()
    sim.state.progress_request(fx, {"id": task.id, "fraction": 0.9}, sim.now)
    assert task.progress == 0.3 and fx.events == []  # over: nothing changes
    assert task.state is State.COMPLETED


# --- model.train --------------------------------------------------------------------------

CHILD = """import json, sys, time
rows = int(sys.argv[1])
time.sleep(float(sys.argv[3]))  # reading its history
if rows < 0:
    print("Traceback: something broke", file=sys.stderr)
    sys.exit(2)
print(json.dumps({"rows": rows, "min_samples": 50}), flush=True)
if rows < 50:
    print(json.dumps({"trained": False, "reason": f"{rows} valid rows < min_samples 50"}))
    sys.exit(1)
time.sleep(float(sys.argv[2]))
print(json.dumps({"trained": True}))
"""


def trainer_for(tmp_path, rows: int, fit_seconds: float = 0.0, read_seconds: float = 0.0,
                answer_within: float = 60.0) -> Trainer:
    return Trainer(tmp_path, Predictor(tmp_path / "models"),
                   command=[sys.executable, "-c", CHILD, str(rows), str(fit_seconds),
                            str(read_seconds)], answer_within=answer_within)


def poll_until_replied(trainer: Trainer, fx: Effects, what: str) -> dict:
    deadline = time.monotonic() + 60
    while not fx.sends:
        trainer.poll(fx, time.monotonic())
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer: {what}")
        time.sleep(0.02)  # polling a child process with a deadline
    [(peer, kind, corr, body)] = fx.sends
    assert (peer, kind, corr) == (CLIENT, wire.REPLY, b"c1")
    return body


def finish(trainer: Trainer, fx: Effects) -> None:
    deadline = time.monotonic() + 60
    while trainer.busy:
        trainer.poll(fx, time.monotonic())
        assert time.monotonic() < deadline, "the training child did not end"
        time.sleep(0.02)


def test_model_train_says_it_started(tmp_path):
    trainer = trainer_for(tmp_path, rows=80, fit_seconds=0.5)
    fx = Effects()
    trainer.request(fx, CLIENT, b"c1", time.monotonic())
    body = poll_until_replied(trainer, fx, "started")
    assert (body["started"], body["reason"], body["rows"]) == (True, None, 80)
    assert body["training"] is True
    again = Effects()
    trainer.request(again, CLIENT, b"c2", time.monotonic())  # one at a time
    [(_, _, _, busy)] = again.sends
    assert busy["started"] is False and "already running" in busy["reason"]
    resent = Effects()
    trainer.request(resent, CLIENT, b"c1", time.monotonic())  # a copy of the first
    assert resent.sends[0][3]["started"] is True
    finish(trainer, fx)


def test_model_train_says_why_not_with_too_few_rows(tmp_path):
    trainer = trainer_for(tmp_path, rows=12)
    fx = Effects()
    trainer.request(fx, CLIENT, b"c1", time.monotonic())
    body = poll_until_replied(trainer, fx, "too few rows")
    assert body["started"] is False and body["reason"] == "12 valid rows < min_samples 50"
    finish(trainer, fx)
    assert trainer.status()["last_failure"]["reason"] == "12 valid rows < min_samples 50"
    assert [e[0] for e in fx.events] == ["model.training_failed"]


def test_model_train_gives_the_childs_error_output_when_it_dies(tmp_path):
    trainer = trainer_for(tmp_path, rows=-1)
    fx = Effects()
    trainer.request(fx, CLIENT, b"c1", time.monotonic())
    body = poll_until_replied(trainer, fx, "the child died")
    assert body["started"] is False and "something broke" in body["reason"]
    failure = trainer.status()["last_failure"]
    assert failure["exit_code"] == 2 and "something broke" in failure["reason"]
    assert not trainer.busy


def test_model_train_is_answered_in_time_while_the_child_still_reads(tmp_path):
    trainer = trainer_for(tmp_path, rows=80, read_seconds=30, answer_within=0.3)
    fx = Effects()
    trainer.request(fx, CLIENT, b"c1", time.monotonic())
    body = poll_until_replied(trainer, fx, "started, rows unknown yet")
    assert (body["started"], body["reason"], body["rows"]) == (True, None, None)
    trainer.stop()


def test_a_stopped_trainer_leaves_no_child(tmp_path):
    trainer = trainer_for(tmp_path, rows=80, fit_seconds=60)
    fx = Effects()
    trainer.request(fx, CLIENT, b"c1", time.monotonic())
    poll_until_replied(trainer, fx, "started")
    child = trainer.child
    trainer.stop()
    assert child.poll() is not None and trainer.child is None
