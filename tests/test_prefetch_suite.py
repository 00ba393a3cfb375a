"""Prefetch on a real suite: one pooled worker busy with a long task holds the next one;
a critical task still starts before a prefetched low one; a worker killed with -9, or
the suite taken down and up, loses no prefetched task and spends none of its attempts;
`prefetch = 0` gives a busy worker nothing."""

from __future__ import annotations

import os
import signal
import time

import pytest

from cortex.protocol import Client
from cortex.services.cli.tasks import render_task

from .conftest import jsonl_events_of, module_suite, suite_config, wait_for

LONG = 60  # seconds to wait for anything on this shared machine


def one_worker_config(prefetch: int = 1) -> str:
    """One pooled worker and no surge (a surge worker would take the critical task). No
    pause of the slots after a critical task: the tests that follow the critical one
    count on the slot at once (the pause is the pure tests' business)."""
    return suite_config(1, ("echo", "sleep"), pool="max = 1\n",
                        scheduler=f"prefetch = {prefetch}\nprefetch_pause = 0\n")


def one_worker(suites, prefetch: int = 1):
    return suites.start(config=one_worker_config(prefetch))


@pytest.fixture(scope="module")
def prefetching():
    """Shared by the tests that end with every task of theirs finished and only their
    own worker killed (the pool replaces it)."""
    yield from module_suite(one_worker_config())


def running_long(c: Client, seconds: float, **fields) -> dict:
    """A sleep task that the one worker is running."""
    task = c.submit("sleep", "long", payload={"seconds": seconds}, timeout=300, **fields)
    wait_for(lambda: c.status(task["id"])["state"] == "running", LONG, "the long task runs")
    return task


def prefetched(c: Client, task: dict) -> dict:
    return wait_for(lambda: (s := c.status(task["id"]))["prefetched"] and s, LONG,
                    "the task prefetched")


def events_of(home, task_id: str) -> list[dict]:
    return [e for e in jsonl_events_of(home) if e.get("task") == task_id]


def test_a_critical_task_starts_before_a_prefetched_low_one(prefetching):
    suite = prefetching
    with Client(suite.home, timeout=LONG) as c:
        wait_for(lambda: len(c.workers()) == 1, LONG, "the worker")
        long_ = running_long(c, 8.0)
        low = c.submit("sleep", "low", priority="low", payload={"seconds": 0.05})
        held = prefetched(c, low)
        assert held["state"] == "dispatched" and held["worker"] == c.workers()[0]["name"]
        assert "prefetched" in render_task(held, None, time.time())  # cortex task show
        critical = c.submit("echo", "urgent", priority="critical", payload="now")
        # The low task comes back to the queue; the critical one waits there too, for
        # the first worker to free up (never in a slot, behind another task).
        wait_for(lambda: c.status(low["id"])["state"] == "queued", LONG, "the recall")
        assert c.status(long_["id"])["state"] == "running"  # all this while it ran
        assert c.status(critical["id"])["state"] == "queued"
        done_critical = c.wait(critical["id"], timeout=LONG)
        done_low = c.wait(low["id"], timeout=LONG)
        assert c.wait(long_["id"], timeout=LONG)["state"] == "completed"
    assert done_critical["state"] == done_low["state"] == "completed"
    assert done_critical["times"]["started"] < done_low["times"]["started"]
    assert done_low["attempt"] == 1
    # Its end is its last event (a turn's events travel together, up to 10 ms late).
    wait_for(lambda: {"task.recalled", "task.completed"} <= {
        e["type"] for e in events_of(suite.home, low["id"])}, LONG,
             "the recall and the end in the event log")
    started = [e for e in events_of(suite.home, low["id"]) if e["type"] == "task.started"]
    assert len(started) == 1  # it ran once


def test_a_queue_drained_through_the_slot_runs_each_task_once_from_one_dispatch(
        prefetching):
    """Each refill of the slot rides on the reply to the worker's finish: were one lost,
    the worker, idle, would give it back and it would be dispatched twice."""
    with Client(prefetching.home, timeout=LONG) as c:
        wait_for(lambda: len(c.workers()) == 1, LONG, "the worker")
        tasks = c.submit_many([{"type": "echo", "description": f"drain {i}", "payload": i}
                               for i in range(30)])
        done = [c.wait(t["id"], timeout=LONG) for t in tasks]
    assert [d["result"] for d in done] == list(range(30))
    assert all(d["state"] == "completed" and d["attempt"] == 1 for d in done)
    ids = {t["id"] for t in tasks}
    wait_for(lambda: sum(e["type"] == "task.completed" and e.get("task") in ids
                         for e in jsonl_events_of(prefetching.home)) == 30, LONG,
             "the completions in the event log")
    dispatched = [e["task"] for e in jsonl_events_of(prefetching.home)
                  if e["type"] == "task.dispatched" and e.get("task") in ids]
    assert sorted(dispatched) == sorted(ids)  # once each
    assert any(e["type"] == "task.dispatched" and e.get("task") in ids
               and e["data"].get("prefetched") for e in jsonl_events_of(prefetching.home))


def test_a_worker_killed_holding_a_prefetched_task_loses_no_attempt_of_it(prefetching):
    suite = prefetching
    with Client(suite.home, timeout=LONG) as c:
        wait_for(lambda: len(c.workers()) == 1, LONG, "the worker")
        long_ = running_long(c, 120.0, retries=0)
        held = prefetched(c, c.submit("echo", "held", payload="x"))
        [victim] = c.workers()
        os.kill(victim["pid"], signal.SIGKILL)
        done = c.wait(held["id"], timeout=LONG)
        assert c.wait(long_["id"], timeout=LONG)["state"] == "failed"  # it ran: lost
    assert done["state"] == "completed" and done["attempt"] == 1 and done["result"] == "x"
    assert done["worker"] != victim["name"]
    wait_for(lambda: [e["type"] for e in events_of(suite.home, held["id"])
                      if e["type"] == "task.completed"], LONG, "its completion logged")
    kinds = [e["type"] for e in events_of(suite.home, held["id"])]
    assert kinds.count("task.completed") == 1 and "task.retry" not in kinds


def test_down_and_up_with_a_prefetched_task_loses_nothing(suites):
    suite = one_worker(suites)
    with Client(suite.home, timeout=LONG) as c:
        wait_for(lambda: len(c.workers()) == 1, LONG, "the worker")
        long_ = running_long(c, 1.0)
        held = prefetched(c, c.submit("echo", "held", payload="y"))
    suite.stop()
    suite.start(attached=True, timeout=LONG)
    suites.seen(suite)
    with Client(suite.home, timeout=LONG) as c:
        done = c.wait(held["id"], timeout=LONG)
        first = c.wait(long_["id"], timeout=LONG)
    assert done["state"] == "completed" and done["attempt"] == 1 and done["result"] == "y"
    assert first["state"] == "completed"


def test_prefetch_zero_leaves_the_next_task_queued_while_the_worker_is_busy(suites):
    suite = one_worker(suites, prefetch=0)
    with Client(suite.home, timeout=LONG) as c:
        wait_for(lambda: len(c.workers()) == 1, LONG, "the worker")
        long_ = running_long(c, 1.5)
        nxt = c.submit("echo", "next", payload="z")
        waiting = c.status(nxt["id"])
        running = c.status(long_["id"])
        done = c.wait(nxt["id"], timeout=LONG)
    if running["state"] == "running":  # asked while the long task still ran
        assert waiting["state"] == "queued" and not waiting["prefetched"]
    assert done["state"] == "completed" and done["attempt"] == 1
