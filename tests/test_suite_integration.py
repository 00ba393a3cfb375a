"""The whole suite for real: supervisord, five services, pooled workers, many agents."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter

import pytest

from cortex.protocol import Client
from cortex.services.scheduler.tasks import PRIORITIES

from .conftest import jsonl_events_of as jsonl_events
from .conftest import wait_for


def pool_pids(client) -> set[int]:
    """The pool's regular workers (extra, autoscaled ones come and go by design)."""
    return {w["pid"] for w in client.call("pool", "pool.status")["workers"]
            if not w.get("extra")}


def test_hundred_agents_thousand_tasks_each_completed_once(suites):
    suite = suites.start(workers=20)
    agents, per_agent = 100, 10
    results: dict[str, tuple[dict, dict]] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()
    with Client(suite.home) as c:
        pids_before = wait_for(lambda: len(pool_pids(c)) == 20 and pool_pids(c), 30,
                               "20 workers")

    def agent(n: int) -> None:
        rng = random.Random(n)
        try:
            with Client(suite.home, timeout=120, agent=f"agent-{n}") as client:
                mine = []
                for i in range(per_agent):
                    if i % 2:
                        payload = {"seconds": 0, "tokens": rng.randint(0, 40), "steps": 2}
                        task = client.submit("simulated_agent", f"agent {n} job {i}",
                                             priority=rng.choice(PRIORITIES), tokens=50,
                                             payload=payload)
                    else:
                        payload = {"agent": n, "i": i}
                        task = client.submit("echo", f"agent {n} echo {i}",
                                             priority=rng.choice(PRIORITIES), payload=payload)
                    mine.append((task["id"], payload))
                for task_id, payload in mine:
                    done = client.wait(task_id, timeout=120)
                    with lock:
                        results[task_id] = (done, payload)
        except BaseException as e:  # reported below, with the agent that failed
            failures.append(e)

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert len(results) == agents * per_agent
    used = 0
    for task_id, (done, payload) in results.items():
        assert done["state"] == "completed", (task_id, done["error"])
        if done["type"] == "echo":
            assert done["result"] == payload
        else:
            assert done["tokens_used"] == payload["tokens"]
            used += payload["tokens"]

    with Client(suite.home) as c:
        def settled():  # leases: the last commits reach the ledger within 50 ms
            glob = next(b for b in c.budget()["budgets"] if b["scope"] == "global")
            return glob["reserved"] == 0 and glob["committed"] == used and glob

        glob = wait_for(settled, 30, "every task's tokens settled")
        assert glob["overrun"] == 0
        # What a lease still holds is shown apart, and goes back once idle.
        wait_for(lambda: c.budget()["budgets"][0]["leased"] == 0, 30, "the leases returned")
        # Workers are persistent: the same processes took all 1,000 tasks.
        assert pool_pids(c) == pids_before
        wait_for(lambda: c.call("events", "events.status")["written"] >= 3 * len(results)
                 and c.call("scheduler", "scheduler.status")["events_unacked"] == 0, 30,
                 "events written")
    events = jsonl_events(suite.home)
    by_type: dict[str, Counter] = {}
    for ev in events:
        by_type.setdefault(ev["type"], Counter())[ev["task"]] += 1
    recalled = by_type.get("task.recalled", Counter())  # a prefetched task given back
    for kind in ("task.created", "task.dispatched", "task.completed"):
        counts = by_type.get(kind, Counter())
        again = recalled if kind == "task.dispatched" else Counter()  # is dispatched again
        missing = [t for t in results if counts[t] != 1 + again[t]]
        assert not missing, f"{kind}: {len(missing)} tasks not exactly once"
    assert len({ev["id"] for ev in events}) == len(events)


@pytest.mark.heavy  # a service killed or restarted: CI's second pass
def test_each_service_killed_comes_back_and_serves(suites):
    suite = suites.start(workers=2)
    for name in ("broker", "events", "ledger", "scheduler", "pool"):
        info = {p["name"]: p for p in suite.processes()}[name]
        os.kill(info["pid"], signal.SIGKILL)
        wait_for(lambda n=name, old=info["pid"]: (
            (p := {x["name"]: x for x in suite.processes()}[n])["statename"] == "RUNNING"
            and p["pid"] != old), 30, f"{name} restarted")
        suites.seen(suite)
        with Client(suite.home, timeout=60) as c:
            task = c.submit("echo", f"after killing {name}", payload=name, tokens=5)
            done = c.wait(task["id"], timeout=60)
        assert done["state"] == "completed", (name, done)
        assert done["result"] == name


def test_killed_worker_is_replaced(suites):
    suite = suites.start(workers=3)
    with Client(suite.home) as c:
        before = wait_for(lambda: len(pool_pids(c)) == 3 and pool_pids(c), 30, "3 workers")
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        after = wait_for(lambda: (p := pool_pids(c)) and len(p) == 3 and victim not in p
                         and p, 10, "a replacement worker within 10 s")
        assert len(after - before) == 1
        task = c.submit("echo", "after a worker died", payload=1)
        assert c.wait(task["id"], timeout=30)["state"] == "completed"
