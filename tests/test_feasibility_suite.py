"""Feasibility on the real suite: the one-type workload (0.1 s sleeps, then no-ops, all
on one handler) never waits for cpu or memory on an idle machine.

The machine's readings are fixed (CORTEX_FIXED_MACHINE: two idle cores, memory to
spare), so the load of other tests cannot disturb the result; what the scheduler holds
for running tasks and what it predicts from the type's history are the real ones.
"""

from __future__ import annotations

import json
import threading

from cortex.protocol import Client
from cortex.services.scheduler.machine import FIXED_MACHINE_ENV

from .conftest import jsonl_events_of, wait_for

IDLE_TWO_CORES = {"cpu_free_cores": 2.0, "cpu_cores": 2, "mem_available_mb": 12000.0,
                  "mem_total_mb": 16000.0, "mem_percent": 25.0}
WORKERS = 8
AGENTS = 8
SLEEPS = 40
NOOPS = 1200


def run_agents(home, jobs_per_agent) -> list[str]:
    ids: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def agent(n: int) -> None:
        try:
            with Client(home, timeout=60, name=f"agent-{n}") as c:
                for payload in jobs_per_agent:
                    task = c.submit("sleep", "onetype", payload=payload)
                    done = c.wait(task["id"], timeout=60)
                    assert done["state"] == "completed", done
                    with lock:
                        ids.append(task["id"])
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(AGENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return ids


def test_one_type_of_sleeps_then_no_ops_never_waits_for_cpu_or_memory(suites, monkeypatch):
    monkeypatch.setenv(FIXED_MACHINE_ENV, json.dumps(IDLE_TWO_CORES))
    suite = suites.start(workers=WORKERS)
    with Client(suite.home, timeout=30) as c:
        wait_for(lambda: len(c.workers()) == WORKERS, 30, "the workers")
    sleeps = run_agents(suite.home, [{"seconds": 0.1}] * (SLEEPS // AGENTS))
    noops = run_agents(suite.home, [{"seconds": 0}] * (NOOPS // AGENTS))
    assert len(sleeps) == SLEEPS and len(noops) == NOOPS

    def all_completed_in_the_log():
        events = jsonl_events_of(suite.home)
        done = {e["task"] for e in events if e["type"] == "task.completed"}
        return events if done >= set(sleeps) | set(noops) else None

    events = wait_for(all_completed_in_the_log, 30, "every completion in the event log")
    waits = [e for e in events if e["type"] == "task.waiting"
             and e["data"].get("reason") in ("cpu", "memory")]
    assert waits == [], waits[:3]
    # The scheduler learnt the type (so a hold was possible) and used the fixed readings.
    completed = [e for e in events if e["type"] == "task.completed" and e["task"] in noops]
    assert any((e["data"].get("predicted") or {}).get("source") != "default"
               for e in completed)
    assert all(e["data"]["actual"]["cpu_s"] >= 0 and e["data"]["actual"]["memory_mb"] >= 0
               for e in completed)
