"""Submits in batches (`task.submit_many`): each task checked and admitted on its own, one
reply with one result per task in order, one journal commit for the batch, idempotency
keys honoured; the client splits long lists and returns each task's error in place."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import uuid

import pytest

from cortex.protocol import AsyncClient, Client, errors, wire
from cortex.protocol.calls import Session
from cortex.protocol.catalogue import MAX_SUBMIT_BATCH, SUBMIT_BATCH, Catalogue
from cortex.protocol.operations import Plans
from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.tasks import State

from .conftest import wait_for
from .test_scheduling import CLIENT, NOW0, journal_copy, new_state


def checked(tasks: list) -> list:
    """What the scheduler process hands its state: each task checked, or why not."""
    items = []
    for index, raw in enumerate(tasks):
        try:
            item = SUBMIT_BATCH.item("tasks", index, raw)
        except wire.ProtocolError as e:
            items.append(e)
            continue
        item["_size"] = len(wire.encode_body(raw))
        items.append(item)
    return items


def submit_many(state, tasks: list) -> tuple[Effects, list]:
    fx = Effects()
    state.submit_many(fx, CLIENT, b"batch", checked(tasks), NOW0)
    [(peer, kind, corr, body)] = fx.sends
    assert (peer, kind, corr) == (CLIENT, wire.REPLY, b"batch")
    return fx, body["results"]


def test_a_mixed_batch_admits_the_good_tasks_and_answers_each_bad_one_in_place():
    state = new_state(max_queue_per_type=2)
    fx, results = submit_many(state, [
        {"type": "echo", "idempotency_key": "a"},
        {"type": "echo", "idempotency_key": "b", "priority": "urgent"},  # bad field
        {"type": "echo"},  # no key
        "not a map",
        {"type": "echo", "idempotency_key": "a"},  # the first again: the same task
        {"type": "echo", "idempotency_key": "c", "priority": "low"},
        {"type": "echo", "idempotency_key": "d"},  # the queue holds 2 already
        {"type": "echo", "idempotency_key": "a", "description": "other"},  # conflict
        {"type": "echo", "idempotency_key": "e", "priority": "critical"},  # past a full queue
    ])
    codes = [r.get("code") for r in results]
    assert codes == [None, "bad_request", "bad_request", "bad_request", None, None,
                     "queue_full", "conflict", None]
    assert "tasks[1].priority" in results[1]["message"]
    assert "tasks[2].idempotency_key" in results[2]["message"]
    assert results[4]["id"] == results[0]["id"]
    accepted = {results[i]["id"] for i in (0, 5, 8)}
    assert accepted == set(state.tasks) and len(accepted) == 3
    assert all(results[i]["state"] == "queued" for i in (0, 5, 8))
    assert [state.tasks[results[i]["id"]].key for i in (0, 5, 8)] == ["a", "c", "e"]
    # Journaled in the one turn: three new tasks and the refusal by key.
    kinds = [r["k"] for r in fx.records]
    assert kinds.count("new") == 3 and kinds.count("rejected") == 1
    assert [e[0] for e in fx.events].count("task.created") == 3
    # The refusal is remembered: the same task again gets the same answer.
    _, again = submit_many(state, [{"type": "echo", "idempotency_key": "d"}])
    assert again[0]["code"] == "queue_full"


def test_the_batch_replays_from_its_journal_records_to_the_same_tasks():
    state = new_state()
    fx, results = submit_many(state, [{"type": "echo", "idempotency_key": f"k{i}",
                                       "payload": {"i": i}} for i in range(5)])
    fresh = new_state()
    for record in fx.records:
        fresh.apply(journal_copy(record))
    assert set(fresh.tasks) == {r["id"] for r in results}
    assert all(t.state is State.QUEUED for t in fresh.tasks.values())
    # After the restart a re-sent batch is the same tasks, none doubled.
    _, again = submit_many(fresh, [{"type": "echo", "idempotency_key": f"k{i}",
                                    "payload": {"i": i}} for i in range(5)])
    assert [r["id"] for r in again] == [r["id"] for r in results]
    assert len(fresh.tasks) == 5


def test_a_batch_task_has_the_digest_of_the_same_single_submit():
    """A task sent alone and then in a batch under the same key is the same task."""
    state = new_state()
    body = {"type": "echo", "idempotency_key": "one", "description": "d", "payload": [1]}
    single = Catalogue("scheduler").check(wire.REQUEST, {"op": "task.submit", **body},
                                          "client", "c")[1]
    fx = Effects()
    state.submit(fx, CLIENT, b"s", single, NOW0)
    task_id = fx.sends[0][3]["id"]
    _, results = submit_many(state, [body])
    assert results == [{"id": task_id, "state": "queued"}]


@pytest.mark.parametrize("tasks", [[], [{"type": "echo", "idempotency_key": "k"}] *
                                   (MAX_SUBMIT_BATCH + 1), {"type": "echo"}, "tasks"])
def test_a_malformed_envelope_refuses_the_message(tasks):
    with pytest.raises(wire.ProtocolError) as info:
        Catalogue("scheduler").check(wire.REQUEST, {"op": "task.submit_many", "tasks": tasks},
                                     "client", "c")
    assert info.value.code == "bad_request"


def drive(plan, answer):
    """Run a client plan, answering each request with `answer(request)`; the requests
    and the plan's result."""
    requests = []
    try:
        request = next(plan)
        while True:
            requests.append(request)
            reply = answer(request)
            request = plan.throw(reply) if isinstance(reply, Exception) else plan.send(reply)
    except StopIteration as done:
        return requests, done.value


def echo_ids(request):
    return {"results": [{"id": f"id-{t['idempotency_key']}", "state": "queued"}
                        if t["type"] == "echo" else
                        wire.error_body("not_served", "no worker serves it")
                        for t in request.body["tasks"]]}


def test_the_client_splits_a_long_list_keys_every_task_and_returns_errors_in_place():
    plans = Plans(Session("/tmp/x"), "agent-1")
    tasks = [{"type": "echo", "payload": i} for i in range(2 * MAX_SUBMIT_BATCH + 7)]
    tasks[3] = {"type": "other"}
    tasks[4] |= {"idempotency_key": "mine", "agent": "someone"}
    requests, results = drive(plans.submit_many(tasks), echo_ids)
    assert [len(r.body["tasks"]) for r in requests] == [MAX_SUBMIT_BATCH,
                                                        MAX_SUBMIT_BATCH, 7]
    assert {r.op for r in requests} == {"task.submit_many"}
    sent = [t for r in requests for t in r.body["tasks"]]
    assert [t.get("payload") for t in sent] == [t.get("payload") for t in tasks]
    assert len({t["idempotency_key"] for t in sent}) == len(tasks)
    assert sent[4]["idempotency_key"] == "mine" and sent[4]["agent"] == "someone"
    assert sent[0]["agent"] == "agent-1"
    assert isinstance(results[3], errors.CortexError) and results[3].code == "not_served"
    assert results[4] == {"id": "id-mine", "state": "queued"}
    assert sum(isinstance(r, dict) for r in results) == len(tasks) - 1


def test_the_client_keeps_each_message_under_the_size_limit():
    plans = Plans(Session("/tmp/x"), "a")
    big = "x" * (300 * 1024)
    requests, results = drive(plans.submit_many([{"type": "echo", "payload": big}] * 7),
                              echo_ids)
    assert all(len(wire.encode_body(r.body)) < wire.MAX_MESSAGE_BYTES for r in requests)
    assert sum(len(r.body["tasks"]) for r in requests) == len(results) == 7


def test_a_message_refused_whole_fails_its_tasks_and_the_others_go_on():
    big = "x" * (1100 * 1024)  # more than a message holds: it goes alone
    tasks = [{"type": "echo"}, {"type": "echo", "payload": big}, {"type": "echo"}]

    def refuse_the_big_one(request):
        if len(wire.encode_body(request.body)) > wire.MAX_MESSAGE_BYTES:
            return errors.CortexError("message too large", code="too_large")
        return echo_ids(request)

    requests, results = drive(Plans(Session("/tmp/x"), "a").submit_many(tasks),
                              refuse_the_big_one)
    assert [len(r.body["tasks"]) for r in requests] == [1, 1, 1]
    assert isinstance(results[1], errors.CortexError) and results[1].code == "too_large"
    assert isinstance(results[0], dict) and isinstance(results[2], dict)


def test_an_unreachable_scheduler_is_the_error_of_every_task_not_yet_answered():
    answered = []

    def first_only(request):
        if answered:
            return errors.Timeout("no answer")
        answered.append(request)
        return echo_ids(request)

    tasks = [{"type": "echo"}] * (3 * MAX_SUBMIT_BATCH)
    requests, results = drive(Plans(Session("/tmp/x"), "a").submit_many(tasks), first_only)
    assert len(requests) == 2  # not a third wait for the same silence
    assert all(isinstance(r, dict) for r in results[:MAX_SUBMIT_BATCH])
    assert all(isinstance(r, errors.Timeout) for r in results[MAX_SUBMIT_BATCH:])


@pytest.mark.parametrize("task", [{"description": "no type"}, {"type": "echo", "wait": 5},
                                  "echo"])
def test_the_client_refuses_a_task_it_cannot_send(task):
    with pytest.raises(errors.BadRequest):
        drive(Plans(Session("/tmp/x"), "a").submit_many([task]), echo_ids)


# -- against a live suite -----------------------------------------------------------------


def test_both_faces_submit_a_mixed_batch_to_a_live_suite(shared_suite):
    suite = shared_suite
    tasks = [{"type": "echo", "payload": {"i": i}} for i in range(30)]
    tasks[7] = {"type": "echo", "priority": "urgent"}
    tasks[8] = {"type": "echo", "timeout": -1}
    with Client(suite.home, timeout=60) as c:
        results = c.submit_many(tasks)
        assert [i for i, r in enumerate(results) if isinstance(r, errors.CortexError)] == [7, 8]
        assert all(r.code == "bad_request" for r in results[7:9])
        ids = [r["id"] for r in results if isinstance(r, dict)]
        assert len(set(ids)) == 28
        done = [c.wait(i, timeout=60) for i in ids]
        assert {t["state"] for t in done} == {"completed"}

    async def async_face():
        async with AsyncClient(suite.home, timeout=60) as c:
            key = f"same-{uuid.uuid4().hex}"  # the shared suite's other tests use others
            results = await c.submit_many([{"type": "echo", "idempotency_key": key},
                                           {"type": "echo", "idempotency_key": key}])
            assert results[0]["id"] == results[1]["id"]
            return await c.wait(results[0]["id"], timeout=60)

    assert asyncio.run(async_face())["state"] == "completed"


@pytest.mark.heavy
def test_batches_lose_nothing_and_double_nothing_when_the_scheduler_is_killed(suites):
    """kill -9 of the scheduler while a client sends batches: every task whose id was
    acknowledged exists after the restart, and no key became two tasks."""
    suite = suites.start(config=(
        '[suite]\nfsync = "group"\nheartbeat_interval = 0.5\nsnapshot_interval = 2.0\n'
        '[scheduler]\ntask_heartbeat = 1.0\nmax_queue_per_type = 100000\n'
        '[pool.groups.default]\ncount = 2\ntypes = ["echo"]\n'))
    batches, size = 60, 50
    acknowledged: list[list] = []
    failure: list[BaseException] = []

    def send_batches():
        try:
            with Client(suite.home, timeout=180) as c:
                for b in range(batches):
                    acknowledged.append(c.submit_many(
                        [{"type": "echo", "idempotency_key": f"kill-{b}-{i}",
                          "payload": {"b": b, "i": i}} for i in range(size)]))
        except BaseException as e:  # noqa: BLE001 (reported by the test below)
            failure.append(e)

    sender = threading.Thread(target=send_batches)
    with Client(suite.home, timeout=60) as c:
        old = c.call("scheduler", "scheduler.status")["pid"]
        sender.start()
        wait_for(lambda: len(acknowledged) >= 3 or failure, 120, "three batches answered")
        os.kill(old, signal.SIGKILL)
        answered_before = len(acknowledged)
        sender.join(timeout=600)
        assert answered_before < batches, "the batches were all answered before the kill"
        assert not sender.is_alive() and not failure, failure
        suites.seen(suite)
        assert c.call("scheduler", "scheduler.status")["pid"] != old
        results = [r for batch in acknowledged for r in batch]
        assert len(results) == batches * size
        assert all(isinstance(r, dict) for r in results), \
            [r for r in results if not isinstance(r, dict)][:3]
        ids = [r["id"] for r in results]
        assert len(set(ids)) == len(ids)
        for task_id in ids:  # every acknowledged id is there after the restart
            assert c.status(task_id)["id"] == task_id
        # None doubled: the suite holds these tasks and no others.
        states = c.call("scheduler", "scheduler.status")["states"]
        assert sum(states.values()) == batches * size, states


# -- an exception mid-admission leaves nothing behind ------------------------------------
def queue_push_that_raises_after(state, failing_key: str):
    """The queue's push does its work, then raises for the task with `failing_key`: the
    last moment of an admission."""
    push = state.queue.push

    def push_then_raise(task, *args, **kwargs):
        push(task, *args, **kwargs)
        if task.key == failing_key:
            raise RuntimeError("injected after the queue push")
    return push_then_raise


def agree(state, fx: Effects, accepted_keys: set[str]) -> None:
    """The table, the queue, the journal records and the events all hold the same tasks."""
    assert {t.key for t in state.tasks.values()} == accepted_keys
    assert set(state.table.keys) == accepted_keys
    assert set(state.table.marks) == set(state.tasks)
    assert state.queue.depth("echo") == len(accepted_keys)
    assert {r["task"]["key"] for r in fx.records if r["k"] == "new"} == accepted_keys
    created = [e[2] for e in fx.events if e[0] == "task.created"]
    assert sorted(created) == sorted(state.tasks)
    assert state.counters["submitted"] == len(accepted_keys)


def test_a_batch_task_whose_admission_raises_fails_alone_and_leaves_nothing(monkeypatch):
    state = new_state()
    monkeypatch.setattr(state.queue, "push", queue_push_that_raises_after(state, "b"))
    fx, results = submit_many(state, [{"type": "echo", "idempotency_key": k}
                                      for k in ("a", "b", "c")])
    assert [r.get("code") for r in results] == [None, "internal", None]
    assert "RuntimeError" in results[1]["message"]
    agree(state, fx, {"a", "c"})
    [failure] = [e for e in fx.events if e[0] == "scheduler.internal_error"]
    assert failure[1]["index"] == 1 and "injected" in failure[1]["traceback"]
    # A re-send of the failed task is admitted afresh, never answered as a duplicate.
    monkeypatch.undo()
    fx2, again = submit_many(state, [{"type": "echo", "idempotency_key": "b"}])
    assert again[0].get("code") is None and again[0]["id"] not in {
        results[0]["id"], results[2]["id"]}
    assert [r["k"] for r in fx2.records] == ["new"]
    assert state.counters.get("duplicates", 0) == 0
    assert state.queue.depth("echo") == 3
    # What the queue hands out is exactly the table's tasks, each once.
    popped = []
    while (task := state.queue.pop_for(["echo"], NOW0.mono)) is not None:
        popped.append(task.key)
    assert sorted(popped) == ["a", "b", "c"]


def test_a_single_submit_that_raises_leaves_the_state_as_it_was(monkeypatch):
    state = new_state()
    fx = Effects()
    state.submit(fx, CLIENT, b"s1", checked([{"type": "echo", "idempotency_key": "a"}])[0],
                 NOW0)
    monkeypatch.setattr(state.queue, "push", queue_push_that_raises_after(state, "b"))
    failed = Effects()
    with pytest.raises(RuntimeError):
        state.submit(failed, CLIENT, b"s2",
                     checked([{"type": "echo", "idempotency_key": "b"}])[0], NOW0)
    # The loop drops the failed turn's effects: what stays is the first turn's.
    agree(state, fx, {"a"})


def test_a_record_that_cannot_be_encoded_takes_its_task_back(monkeypatch):
    """The last check of an admission (its records encode) fails that task alone."""
    state = new_state()
    check = Effects.check_encodable

    def refuse_b(fx, mark):
        if any(r.get("task", {}).get("key") == "b" for r in fx.records[mark[2]:]):
            raise TypeError("journal record cannot be encoded: injected")
        check(fx, mark)
    monkeypatch.setattr(Effects, "check_encodable", refuse_b)
    fx, results = submit_many(state, [{"type": "echo", "idempotency_key": k}
                                      for k in ("a", "b", "c")])
    assert [r.get("code") for r in results] == [None, "internal", None]
    agree(state, fx, {"a", "c"})
