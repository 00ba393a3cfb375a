"""Chaos: agents keep submitting while services and workers are killed with SIGKILL.

At the end: every accepted task completed exactly once (or dead-lettered with a reason),
no completion recorded twice, the ledger equals the sum of reported use, every event is
in JSONL exactly once with no sequence gap, and nothing of the suite is left running.
Both are heavy: CI runs them in its second pass (`pytest --heavy -m heavy`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict

import psutil
import pytest

from cortex.protocol import Client, QueueFull

from .conftest import wait_for
from .test_suite_integration import jsonl_events

SERVICES = ("broker", "events", "ledger", "scheduler", "pool")


class ServingPids:
    """The pids of services that have said in their log that they serve (their start
    line): on a loaded machine a service can need ten seconds to start, and killing it
    again and again before it serves tests nothing but the start-up."""

    def __init__(self, home):
        self.logs, self.offsets, self.pids = home / "logs", {}, set()

    def serves(self, program: dict) -> bool:
        if program["name"] not in SERVICES:
            return True  # no start line to wait for
        path = self.logs / f"{program['name']}.log"
        start = self.offsets.get(path, 0)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                text = f.read()
        except OSError:
            return False
        whole = text[: text.rfind(b"\n") + 1]  # a line still being written is read again
        self.offsets[path] = start + len(whole)
        for line in whole.splitlines():
            if b" serving " in line or b" listening on " in line:
                pid = line.split(b"] ", 1)[0].rpartition(b"[")[2]  # "<time> name[pid] ..."
                if pid.isdigit():
                    self.pids.add(int(pid))
        return program["pid"] in self.pids


def chaos_monkey(suite, stop: threading.Event, every: float, seed: int, kills: list):
    rng = random.Random(seed)
    serving = ServingPids(suite.home)
    while not stop.wait(every):
        try:
            running = [p for p in suite.processes() if p["statename"] == "RUNNING"
                       and serving.serves(p)]
        except Exception:
            continue
        if running:
            victim = rng.choice(running)
            try:
                os.kill(victim["pid"], signal.SIGKILL)
                kills.append((victim["name"], victim["pid"]))
            except ProcessLookupError:
                pass
        try:
            rows = json.loads((suite.home / "run" / "workers.pids").read_text())
        except (OSError, ValueError):
            rows = []
        if rows:
            row = rng.choice(rows)
            try:
                os.kill(int(row["pid"]), signal.SIGKILL)
                kills.append(("worker", row["pid"]))
            except ProcessLookupError:
                pass


def run_chaos(suites, agents: int, tasks: int, workers: int, every: float, seed: int = 7):
    suite = suites.start(workers=workers, fsync="group")
    per_agent = tasks // agents
    accepted: dict[str, dict] = {}
    final: dict[str, dict] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def agent(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        try:
            with Client(suite.home, timeout=180, agent=f"agent-{n}") as client:
                mine = []
                for i in range(per_agent):
                    payload = {"seconds": rng.choice((0, 0.01, 0.05)),
                               "tokens": rng.randint(0, 30), "steps": 2}
                    while True:
                        try:
                            task = client.submit(
                                "simulated_agent", f"chaos {n}/{i}", tokens=40,
                                payload=payload, retries=5,
                                priority=rng.choice(("high", "medium", "low")))
                            break
                        except QueueFull:
                            time.sleep(0.2)  # an agent backing off, as admission asks

                    with lock:
                        accepted[task["id"]] = payload
                    mine.append(task["id"])
                for task_id in mine:
                    done = client.wait(task_id, timeout=600)
                    with lock:
                        final[task_id] = done
        except BaseException as e:
            errors.append(e)

    stop = threading.Event()
    kills: list = []
    monkey = threading.Thread(target=chaos_monkey, args=(suite, stop, every, seed, kills))
    threads = [threading.Thread(target=agent, args=(n,)) for n in range(agents)]
    monkey.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        monkey.join()
    assert not errors, errors[:3]
    assert any(name in SERVICES for name, _ in kills), f"no service was killed: {kills}"
    suite.wait_ready(60)  # everything back up before the final accounting
    suites.seen(suite)

    # Every accepted task ended exactly once: completed, or dead with a reason.
    assert set(final) == set(accepted)
    states = Counter(t["state"] for t in final.values())
    assert set(states) <= {"completed", "dead"}, states
    for task in final.values():
        if task["state"] == "dead":
            assert task["error"]["category"] in ("worker_lost", "timeout"), task["error"]

    with Client(suite.home, timeout=60) as c:
        wait_for(lambda: c.call("scheduler", "scheduler.status")["events_unacked"] == 0, 60,
                 "events acknowledged")
        # A client hears its task's end before the ledger hears the settle order (journaled
        # with the end, gathered up to 50 ms, re-sent after a restart), and a task carved
        # from a lease is reserved at the ledger only when its settle arrives: nothing
        # reserved is not yet settled. Settled is every ledger order answered.
        wait_for(lambda: c.call("scheduler", "scheduler.status")["ledger_orders"] == 0
                 and next(b for b in c.budget()["budgets"]
                          if b["scope"] == "global")["reserved"] == 0, 60,
                 "every ledger order answered, nothing reserved")
        budget = next(b for b in c.budget()["budgets"] if b["scope"] == "global")
    for task_id, task in final.items():
        if task["state"] == "completed":
            assert task["tokens_used"] == accepted[task_id]["tokens"]

    # Publishers that were restarted re-send what was not acknowledged: poll the log until
    # every completion is in and no stream has a gap; a gap that stays is a lost event.
    def gaps_in(events):
        seqs = defaultdict(set)
        for e in events:
            seqs[(e["source"], e["epoch"])].add(e["seq"])
        return {k: max(v) - len(v) for k, v in seqs.items() if max(v) != len(v)}

    def settled():
        events = jsonl_events(suite.home)
        done = Counter(e["task"] for e in events if e["type"] == "task.completed")
        complete = all(done[t] == 1 for t, v in final.items() if v["state"] == "completed")
        return events if complete and not gaps_in(events) else None
    try:
        events = wait_for(settled, 90, "every completion in JSONL, no sequence gap", 1.0)
    except AssertionError:
        events = jsonl_events(suite.home)
        done = Counter(e["task"] for e in events if e["type"] == "task.completed")
        missing = [t for t, v in final.items() if v["state"] == "completed" and done[t] != 1]
        raise AssertionError(f"after 90 s: sequence gaps {gaps_in(events)}, completions "
                             f"not once in JSONL {missing[:5]}") from None
    ids = Counter(e["id"] for e in events)
    assert not [i for i, n in ids.items() if n > 1], "an event is in JSONL twice"
    completions = Counter(e["task"] for e in events if e["type"] == "task.completed")
    assert all(n == 1 for n in completions.values())
    # The ledger holds exactly what was reported: by completed attempts, and by attempts
    # lost part-way (their use happened, so it is committed, once).
    used = sum(t["tokens_used"] for t in final.values() if t["state"] == "completed")
    used += sum(e["data"].get("tokens_used", 0) for e in events
                if e["type"] in ("task.retry", "task.dead"))
    assert budget["committed"] == used
    return suite, kills, states


def no_orphans(home) -> list[int]:
    marker = str(home)
    left = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or ()) and \
                    proc.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(proc.info["pid"])
        except psutil.Error:
            continue
    return left


@pytest.mark.heavy
@pytest.mark.timeout(1200)
def test_chaos_small(suites):
    suite, kills, states = run_chaos(suites, agents=100, tasks=2000, workers=10, every=2.0)
    home = suite.home
    problems = suites.stop_all()
    suites.suites.clear()
    assert not problems, problems
    assert not no_orphans(home)


@pytest.mark.heavy
@pytest.mark.timeout(2400)
def test_chaos_large(suites):
    started = time.monotonic()
    suite, kills, states = run_chaos(suites, agents=100, tasks=10_000, workers=20, every=2.0)
    print(f"\nchaos large: {len(kills)} kills, states {dict(states)}, "
          f"{time.monotonic() - started:.0f} s")
