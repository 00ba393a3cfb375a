"""The scheduler on the real suite: priorities under a flood, surge, admission."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cortex.protocol import Client, QueueFull, Rejected
from cortex.services.runtime.settings import ConfigError, load

from .conftest import jsonl_events_of, module_suite, suite_config, wait_for


def flood_config(count: int = 2, most: int = 5, max_queue: int = 60) -> str:
    """`count` workers that surge up to `most`, a bounded queue per type."""
    return suite_config(count, snapshot_interval=None,
                        scheduler=f"max_queue_per_type = {max_queue}\n",
                        pool=f"max = {most}\nidle_exit = 2.0\n")


@pytest.fixture(scope="module")
def one_worker_flood():
    """One worker, no surge, a queue of 60 per type: shared by the admission tests (what
    they queue runs or is cancelled, and they read the counters as changes)."""
    yield from module_suite(flood_config(count=1, most=1))


LOW_SECONDS = 3.0  # long enough that a new worker starts sooner than a busy one frees


def test_critical_tasks_overtake_a_low_priority_flood_with_surge(suites):
    suite = suites.start(config=flood_config())
    with Client(suite.home, timeout=60) as c:
        wait_for(lambda: len(c.workers()) == 2, 30, "two workers")
        low = [c.submit("sleep", f"flood {i}", priority="low",
                        payload={"seconds": LOW_SECONDS})["id"] for i in range(40)]
        wait_for(lambda: sum(w["state"] == "busy" for w in c.workers()) >= 2, 20, "busy")
        submitted = time.time()
        crit = [c.submit("echo", f"urgent {i}", priority="critical", payload=i)["id"]
                for i in range(3)]
        done = [c.wait(t, timeout=60) for t in crit]
        assert all(t["state"] == "completed" for t in done)
        # Each critical task started before any low-priority task dispatched after it was
        # submitted, and within one low task's duration of its submission.
        first_crit_start = max(t["times"]["started"] for t in done)
        later_low = [c.status(t) for t in low]
        dispatched_after = [t["times"].get("dispatched") for t in later_low
                            if (t["times"].get("dispatched") or 0) > submitted]
        assert all(d >= min(t["times"]["dispatched"] for t in done) for d in dispatched_after)
        for task in done:
            assert task["times"]["started"] - task["times"]["created"] <= LOW_SECONDS
        assert first_crit_start
        assert c.call("scheduler", "scheduler.status")["counters"]["surges"] >= 1
        # The surge worker now runs a low task (3 s): cortex status shows it as extra.
        out = subprocess.run([sys.executable, "-m", "cortex.services.cli", "--home",
                              str(suite.home), "status", "--json"],
                             capture_output=True, text=True, timeout=60)
        assert json.loads(out.stdout)["pool"]["extra"] >= 1, out.stdout[-2000:]
        for t in low:
            c.cancel(t)
    events = jsonl_events_of(suite.home)
    scales = [e for e in events if e["type"] == "scheduler.scale"]
    assert any(e["data"]["why"] == "critical task waiting" for e in scales)
    assert any(e["type"] == "pool.scaled" and e["data"]["started"] >= 1 for e in events)


def test_full_queue_rejects_with_queue_full_but_not_critical(one_worker_flood):
    suite = one_worker_flood
    with Client(suite.home, timeout=30) as c:
        wait_for(lambda: len(c.workers()) == 1, 30, "one worker")
        # An earlier test's tasks have run (the queue is empty) before this one fills it.
        wait_for(lambda: not c.call("scheduler", "scheduler.status")["states"].get("queued"),
                 60, "an empty queue")
        rejected = c.call("scheduler", "scheduler.status")["counters"]["rejected"]
        blocker = c.submit("sleep", "blocker", payload={"seconds": 30})["id"]
        wait_for(lambda: c.workers()[0]["state"] == "busy", 20, "busy")
        for i in range(60):
            c.submit("echo", f"fill {i}", priority="low")
        with pytest.raises(QueueFull) as info:
            c.submit("echo", "one too many", priority="high")
        assert info.value.code == "queue_full"
        assert c.submit("echo", "critical passes", priority="critical")["state"] == "queued"
        assert c.call("scheduler", "scheduler.status")["counters"]["rejected"] == rejected + 1
        c.cancel(blocker)  # else stopping the suite (or the next test) waits for it


def test_deadline_that_cannot_be_met_is_rejected_with_the_estimate(one_worker_flood):
    suite = one_worker_flood
    with Client(suite.home, timeout=30) as c:
        wait_for(lambda: len(c.workers()) == 1, 30, "one worker")
        for i in range(3):  # teach the scheduler that sleep tasks take ~0.5 s
            c.wait(c.submit("sleep", f"learn {i}", payload={"seconds": 0.5})["id"])
        for i in range(20):
            c.submit("sleep", f"queue {i}", payload={"seconds": 0.5})
        with pytest.raises(Rejected) as info:
            c.submit("sleep", "needs to start in 1 s", deadline=time.time() + 1.0)
        assert "estimated start" in str(info.value)
        ok = c.submit("sleep", "relaxed", deadline=time.time() + 3600)
        assert ok["eta"] > time.time()


def test_surge_limit_is_checked_in_config(tmp_path):
    (tmp_path / "cortex.toml").write_text("[pool.groups.default]\ncount = 4\nmax = 2\n")
    with pytest.raises(ConfigError):
        load(tmp_path)


def test_an_agent_flooding_does_not_delay_another_beyond_a_fair_share(suites):
    suite = suites.start(config=flood_config(most=2, max_queue=5000))
    with Client(suite.home, timeout=60, agent="flooder") as a, \
            Client(suite.home, timeout=60, agent="modest") as b:
        wait_for(lambda: len(a.workers()) == 2, 30, "two workers")
        flood = [a.submit("sleep", f"flood {i}", payload={"seconds": 0.02})["id"]
                 for i in range(1000)]
        mine = [b.submit("sleep", f"mine {i}", payload={"seconds": 0.02})["id"]
                for i in range(10)]
        done = [b.wait(t, timeout=120) for t in mine]
        first = min(t["times"]["created"] for t in done)
        last = max(t["times"]["dispatched"] for t in done)
        overtaking = [t for t in (a.status(i) for i in flood)
                      if first < (t["times"].get("dispatched") or 0) < last]
        # Round robin between the two agents: about one flood task per task of ours.
        assert len(overtaking) <= len(mine) + 2, len(overtaking)
        for t in flood:
            a.cancel(t)
