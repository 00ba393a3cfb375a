"""The scheduler's new operations on one real suite: progress events from a handler,
submit-and-wait in one call, task.list filters, the waiting detail of a task refused
tokens, worker states, and model.train saying why it did not train."""

from __future__ import annotations

import uuid

import pytest

from cortex.protocol import Client, errors

from .conftest import jsonl_events_of, suite_config, wait_for

CONFIG = suite_config(2, tables='[ledger]\nbudget = 100000\n'
                               '[ledger.budgets."agent:poor"]\nlimit = 300\n')


@pytest.fixture(scope="module")
def suite_home():
    from .conftest import SuiteRunner

    runner = SuiteRunner()
    try:
        suite = runner.start(config=CONFIG)
        with Client(suite.home, timeout=30) as c:
            wait_for(lambda: len(c.workers()) == 2, 30, "two workers")
        yield suite.home
    finally:
        problems = runner.stop_all()
        assert not problems, "; ".join(problems)


def submit(c: Client, **fields) -> dict:
    body = {"type": "echo", "idempotency_key": uuid.uuid4().hex}
    return c.call("scheduler", "task.submit", body | fields, timeout=70)


def test_submit_with_wait_gives_the_finished_task_in_one_call(suite_home):
    with Client(suite_home, timeout=30) as c:
        done = submit(c, type="sleep", payload={"seconds": 0.2}, wait=20)
        assert done["final"] is True and done["state"] == "completed"
        assert done["result"] == {"slept": 0.2}
        held = submit(c, type="sleep", payload={"seconds": 5}, wait=0.5)
        assert held["final"] is False and held["state"] in ("dispatched", "running")
        c.cancel(held["id"])


def test_progress_of_a_handler_becomes_rate_limited_events_ending_with_the_last(suite_home):
    with Client(suite_home, timeout=30) as c:
        task = c.submit("simulated_agent", "twenty steps",
                        payload={"seconds": 2.0, "steps": 20})
        done = c.wait(task["id"], timeout=30)
        assert done["state"] == "completed"
        assert (done["progress"], done["message"]) == (1.0, "step 20 of 20")

    def story():
        events = [e for e in jsonl_events_of(suite_home) if e.get("task") == task["id"]]
        return events if any(e["type"] == "task.completed" for e in events) else None

    events = wait_for(story, 30, "the task's events in the log")
    progress = [e for e in events if e["type"] == "task.progress"]
    # 20 reports over ~2 s, at most one event per 0.5 s (and the last one): 2 to 6.
    assert 2 <= len(progress) <= 6, [e["data"] for e in progress]
    assert progress[-1]["data"] == {"fraction": 1.0, "message": "step 20 of 20",
                                    "attempt": 1}
    kinds = [e["type"] for e in events]
    assert kinds.index("task.completed") > kinds.index("task.progress")


def test_task_list_filters_and_counts(suite_home):
    with Client(suite_home, timeout=30, agent="lister") as c:
        for i in range(3):
            c.wait(c.submit("echo", f"list {i}")["id"])
        c.wait(c.submit("sleep", "other type", payload={"seconds": 0})["id"])
        listed = c.call("scheduler", "task.list", {"type": "echo", "agent": "lister",
                                                   "limit": 2, "newest": True})
        assert (listed["total"], listed["truncated"], len(listed["tasks"])) == (3, True, 2)
        assert [t["description"] for t in listed["tasks"]] == ["list 2", "list 1"]
        assert {t["agent"] for t in listed["tasks"]} == {"lister"}


def test_a_task_refused_tokens_shows_which_limit_and_how_much(suite_home):
    with Client(suite_home, timeout=30, agent="poor") as c:
        # More than the limit itself: it could never run, so it is refused at once.
        with pytest.raises(errors.BudgetExceeded, match="agent:poor"):
            c.submit("simulated_agent", "too rich", tokens=1000, payload={"tokens": 1})
        holder = c.submit("simulated_agent", "holds 200", tokens=200,
                          payload={"tokens": 1, "seconds": 60})
        wait_for(lambda: c.status(holder["id"])["state"] == "running", 30, "the holder")
        task = c.submit("simulated_agent", "must wait", tokens=200, payload={"tokens": 1})
        status = wait_for(lambda: (s := c.status(task["id"]))["waiting"] == "tokens" and s,
                          15, "waiting for tokens")
        detail = status["waiting_detail"]
        assert (detail["scope"], detail["limit"], detail["requested"]) == ("agent:poor", 300,
                                                                          200)
        assert detail["available"] == 100 and status["eta"] is None
        c.cancel(task["id"])
        c.cancel(holder["id"])

    def cancelled_in_the_log():
        events = [e for e in jsonl_events_of(suite_home) if e.get("task") == task["id"]]
        return events if any(e["type"] == "task.cancelled" for e in events) else None

    events = wait_for(cancelled_in_the_log, 30, "the task's events in the log")
    waits = [e for e in events if e["type"] == "task.waiting"]
    assert len(waits) == 1 and waits[0]["data"]["detail"]["scope"] == "agent:poor"


def test_workers_report_their_state(suite_home):
    with Client(suite_home, timeout=30) as c:
        rows = c.workers()
        assert {r["state"] for r in rows} <= {"idle", "busy", "claimed"}
        assert all(isinstance(r["silent_s"], float) for r in rows)
        status = c.call("scheduler", "scheduler.status")
        assert set(status["workers"]["echo"]) == {"idle", "busy", "leaving"}


def test_model_train_says_why_it_did_not_train(suite_home):
    with Client(suite_home, timeout=60) as c:
        reply = c.call("scheduler", "model.train", timeout=60)
        assert reply["started"] is False, reply
        assert "valid rows < min_samples" in reply["reason"]
        status = wait_for(lambda: (s := c.call("scheduler", "model.status"))["last_failure"]
                          and not s["training"] and s, 60, "the failure kept")
        assert "min_samples" in status["last_failure"]["reason"]


def test_cortex_tail_shows_a_handlers_progress_live(suite_home):
    import subprocess
    import sys

    tail = subprocess.Popen([sys.executable, "-m", "cortex.services.cli", "--home",
                             str(suite_home), "tail", "--type", "task.progress", "--count", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The tail says it follows once it has subscribed: only then is a live event seen.
        assert "# following events" in tail.stderr.readline()
        with Client(suite_home, timeout=30) as c:
            task = c.submit("simulated_agent", "progress for the tail",
                            payload={"seconds": 1.5, "steps": 15})
            out, err = tail.communicate(timeout=60)
            c.wait(task["id"], timeout=30)
    finally:
        if tail.poll() is None:
            tail.kill()
        tail.wait()
    lines = out.splitlines()
    assert tail.returncode == 0, err
    assert len(lines) == 2 and all("task.progress" in line and task["id"] in line
                                   for line in lines), out
