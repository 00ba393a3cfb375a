"""Admission that tells the truth, stopping that loses nothing, a client that fails fast
(issue 14, cases 5, 8 and 9), on the real suite."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest

from cortex.protocol import Client, errors

from .conftest import jsonl_events_of, short_home, suite_config, wait_for

AGENTS = ("simulated_agent",)


def test_tasks_that_can_never_run_are_refused_at_submit(suites):
    suite = suites.start(config=suite_config(1, ("echo", "sleep"), tables=(
        '[ledger]\nbudget = 100000\n'
        '[ledger.budgets."agent:small"]\nlimit = 300\n'
        '[ledger.budgets."type:sleep"]\nlimit = 500\nwindow = "rolling:60"\n'
        '[types]\nexternal = ["translate"]\ngrace = 0\n')))
    with Client(suite.home, timeout=60, agent="small") as c:
        with pytest.raises(errors.BudgetExceeded, match="limit of 100000 of budget global"):
            c.submit("echo", "above the global limit", tokens=200_000)
        with pytest.raises(errors.BudgetExceeded, match="agent:small"):
            c.submit("echo", "above the agent's limit", tokens=1000)
        # A windowed limit resets (and may be raised meanwhile): its task waits.
        windowed = c.submit("sleep", "above a windowed limit", tokens=501, agent="roomy")
        assert windowed["state"] == "queued"
        with pytest.raises(errors.CortexError) as refused:
            c.submit("summarize", "no worker serves it")
        assert refused.value.code == "not_served"
        assert "echo, sleep, translate" in str(refused.value)
        # Declared for external workers: accepted, and it waits for one.
        waiting = c.submit("translate", "an external worker will come")
        assert c.status(waiting["id"])["waiting"] == "worker"
        assert c.submit("echo", "within every limit", tokens=300)["state"] == "queued"
    wait_for(lambda: {e["data"]["code"] for e in jsonl_events_of(suite.home)
                      if e["type"] == "scheduler.rejected"} == {"budget_exceeded", "not_served"},
             30, "both refusals in the event log")


def test_a_token_wait_shows_the_limit_what_is_left_and_what_is_asked(suites):
    suite = suites.start(config=suite_config(
        2, AGENTS, tables='[ledger]\nbudget = 1000\nwindow = "rolling:3600"\n'))
    with Client(suite.home, timeout=60) as c:
        holder = c.submit("simulated_agent", "holds 700", tokens=700,
                          payload={"tokens": 1, "seconds": 120})
        wait_for(lambda: c.status(holder["id"])["state"] == "running", 30, "the holder")
        task = c.submit("simulated_agent", "must wait", tokens=500, payload={"tokens": 1})
        wait_for(lambda: c.status(task["id"])["waiting"] == "tokens", 30, "a token wait")
        shown = subprocess.run([sys.executable, "-m", "cortex.services.cli", "--home",
                                str(suite.home), "task", "show", task["id"], "--json"],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        detail = json.loads(shown.stdout)["waiting_detail"]
        assert (detail["scope"], detail["limit"], detail["available"],
                detail["requested"]) == ("global", 1000, 300, 500), detail
        # Its ETA is the window's reset, not "0 us".
        status = c.status(task["id"])
        assert status["eta"] == pytest.approx(detail["resets_at"], abs=1.0)
        assert status["eta"] > time.time() + 3000
        c.cancel(task["id"])
        c.cancel(holder["id"])


@pytest.mark.heavy  # slow: real processes started, killed and restarted
def test_queued_tasks_keep_their_attempt_through_down_and_up(suites):
    suite = suites.start(config=suite_config(1, ("sleep",)))
    with Client(suite.home, timeout=60) as c:
        running = c.submit("sleep", "in hand", payload={"seconds": 2}, retries=0)
        wait_for(lambda: c.status(running["id"])["state"] == "running", 30, "one running")
        queued = [c.submit("sleep", f"queued {i}", payload={"seconds": 0}, retries=0)["id"]
                  for i in range(5)]
    suite.stop()  # graceful: the task in hand finishes, the queued ones stay queued
    suite.start(attached=True, timeout=90)
    with Client(suite.home, timeout=60) as c:
        done = [c.wait(t, timeout=60) for t in queued]
        # retries=0: a lost attempt would have failed them; each ran once, as attempt 1.
        assert [(d["state"], d["attempt"]) for d in done] == [("completed", 1)] * 5, done
        assert c.wait(running["id"], timeout=60)["state"] == "completed"


def test_the_client_fails_fast_when_no_suite_runs():
    home = short_home()
    try:
        # A deadline far above the test's own timeout: only failing fast can pass.
        with pytest.raises(errors.Unavailable), Client(home, timeout=3600) as c:
            c.submit("echo", "nobody home")
        assert not any(home.iterdir())  # a client leaves nothing in a home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.heavy
def test_a_hundred_tasks_without_tokens_for_a_minute_write_bounded_events(suites):
    """Bound: per task, its creation, one waiting event (written when the reason changes,
    not per retry) and one ledger refusal per retry; retries back off 0.5, 1, 2, 4 s, then
    every 5 s (TOKENS_RETRY_CAP), +-20%: at most 18 in a minute. So 100 x (2 + 18) = 2000
    events in 60 s, whatever the wait's length beyond that grows by 100 per 5 s (131 stuck
    tasks wrote 57,800 in 4 minutes before)."""
    suite = suites.start(config=suite_config(
        2, AGENTS, tables='[ledger]\nbudget = 1000\nwindow = "rolling:3600"\n'))
    with Client(suite.home, timeout=60) as c:
        holder = c.submit("simulated_agent", "holds 900", tokens=900,
                          payload={"tokens": 1, "seconds": 300}, timeout=400)
        wait_for(lambda: c.status(holder["id"])["state"] == "running", 30, "the holder")
        ids = {c.submit("simulated_agent", f"starved {i}", tokens=500,
                        payload={"tokens": 1})["id"] for i in range(100)}
        # A minute of waiting, watched: the tasks still wait for tokens throughout.
        end = time.monotonic() + 60
        while time.monotonic() < end:
            time.sleep(5)  # sampling a minute-long wait: nothing to poll for
            assert all(c.status(t)["waiting"] == "tokens" for t in sorted(ids)[:5])
        about = [e for e in jsonl_events_of(suite.home) if e.get("task") in ids]
        kinds = Counter(e["type"] for e in about)
        print(f"events about 100 starved tasks over 60 s: {len(about)} {dict(kinds)}")
        assert len(about) <= 2000, kinds
        assert kinds["task.waiting"] <= 100, kinds
        for t in ids:
            c.cancel(t)
        c.cancel(holder["id"])


@pytest.mark.heavy  # slow: real processes started, killed and restarted
def test_a_waiting_task_whose_limit_drops_below_its_ask_fails_with_the_reason(suites):
    suite = suites.start(config=suite_config(2, AGENTS, tables='[ledger]\nbudget = 1000\n'))
    with Client(suite.home, timeout=60) as c:
        holder = c.submit("simulated_agent", "holds 700", tokens=700,
                          payload={"tokens": 1, "seconds": 120})
        wait_for(lambda: c.status(holder["id"])["state"] == "running", 30, "the holder")
        task = c.submit("simulated_agent", "must wait", tokens=500, payload={"tokens": 1})
        wait_for(lambda: c.status(task["id"])["waiting"] == "tokens", 30, "a token wait")
        c.call("ledger", "ledger.set", {"scope": "global", "limit": 400})
        done = c.wait(task["id"], timeout=60)
        assert (done["state"], done["error"]["category"]) == ("failed", "budget_exceeded"), done
        assert "global" in done["error"]["message"]
        c.cancel(holder["id"])
