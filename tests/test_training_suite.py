"""Automatic trainings on a live suite: a predictor's retrain that is due waits while
tasks are queued for workers, and while they are submitted (each taken at once), and
starts once none is; the scheduler that then predicts
with the new model (and refuses an auto task for want of a router) has no scikit-learn
mapped; a suite of one type without descriptions
never starts a router training."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cortex.protocol import Client, errors
from cortex.services.scheduler.trainer import LULL_SECONDS

from .conftest import jsonl_events_of, suite_config, wait_for

LONG = {"seconds": 600}  # holds its worker until cancelled


def config() -> str:
    return suite_config(1, ("echo",), scheduler="retrain_every = 50\n",
                        extra='[pool.groups.long]\ncount = 1\ntypes = ["sleep"]\n')


def test_an_automatic_training_waits_until_no_task_is_queued(suites):
    suite = suites.start(config())
    with Client(suite.home, timeout=60) as c:
        long = [c.submit("sleep", payload=LONG)["id"] for _ in range(5)]
        wait_for(lambda: c.status(long[-1])["state"] == "queued" and
                 c.status(long[0])["state"] == "running", 60, "sleep tasks running and queued")
        for start in range(0, 60, 20):
            ids = [t["id"] for t in c.submit_many([{"type": "echo", "payload": i}
                                                    for i in range(start, start + 20)])]
            assert all(c.wait(t, timeout=60)["state"] == "completed" for t in ids)
        due = wait_for(lambda: (s := c.call("scheduler", "model.status"))["waiting_for_lull"]
                       and s, 60, "a retrain due, waiting for the queue to empty")
        assert due["completions_since_training"] >= 50
        assert not due["training"] and not due["loaded"]
        assert c.status(long[-1])["state"] == "queued"  # still queued: it had to wait
        for task in long:
            c.cancel(task)
        status = wait_for(lambda: (s := c.call("scheduler", "model.status"))["loaded"]
                          and not s["training"] and s, 120, "the model trained in the lull")
        assert not status["waiting_for_lull"]
        late = c.submit("echo", payload=1)
        assert c.status(late["id"])["predicted"]["source"] == "model"
        with pytest.raises(errors.CortexError, match="no routing model"):
            c.submit("auto", "route me")  # no router: refused without loading scikit-learn
        pid = c.call("scheduler", "scheduler.status")["pid"]
        routing = status["routing"]
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "/site-packages/numpy" in maps  # it did load what it predicts with
    assert "/site-packages/sklearn" not in maps and "/site-packages/scipy" not in maps
    # One type, no descriptions: nothing to route by, so no router training ever started.
    assert routing["history_can_teach"] is False and routing["typed_since_training"] == 0
    kinds = wait_for(lambda: "model.trained" in (k := {e["type"] for e in jsonl_events_of(
        suite.home)}) and k, 60, "the model.trained event in the log")
    assert not {"router.trained", "router.training_failed"} & kinds


def test_a_steady_load_that_queues_nothing_is_no_lull(suites):
    """Tasks submitted one after another, each taken at once by the free worker: the
    queue stays empty, yet the due retrain waits until the submits stop."""
    suite = suites.start(config())
    with Client(suite.home, timeout=60) as c:
        ids = [t["id"] for t in c.submit_many([{"type": "echo", "payload": i}
                                                for i in range(60)])]
        assert all(c.wait(t, timeout=60)["state"] == "completed" for t in ids)
        wait_for(lambda: c.call("scheduler", "model.status")["waiting_for_lull"], 60,
                 "a retrain due")
        end = time.monotonic() + 2 * LULL_SECONDS
        while time.monotonic() < end:  # twice the lull of a steady load
            assert c.submit_and_wait("echo", payload=0, timeout=30)["state"] == "completed"
            status = c.call("scheduler", "model.status")
            assert status["waiting_for_lull"] and not status["training"], status
            assert c.call("scheduler", "scheduler.status")["queue"]["medium"] == 0
            time.sleep(0.2)  # the load's pace (a task every ~0.2 s), not a wait for anything
        status = wait_for(lambda: (s := c.call("scheduler", "model.status"))["loaded"]
                          and not s["training"] and s, 120, "the model trained once the "
                          "submits stopped")
        assert not status["waiting_for_lull"]
