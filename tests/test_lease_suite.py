"""Leases on the real suite (`[scheduler] lease = true`, the default): tasks with tokens
carved from leases, a client's reservation that takes an idle lease back, and the
scheduler, the ledger or both killed -9 while leases are held and tasks run. Every budget
keeps committed + reserved + leased <= limit at every sample, every task completes once,
and at the end nothing is reserved or leased and committed is what the tasks used."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter

import pytest

from cortex.protocol import Client

from .conftest import suite_config, wait_for
from .test_ledger_suite import balances, initial_budgets, lost_use, run_agents, settled_events
from .test_suite_integration import jsonl_events

R = 100  # tokens every task reserves
AGENTS = 8


def lease_config(workers: int) -> str:
    tables = "[ledger]\nbudget = 400000\n"
    tables += '[ledger.budgets."type:simulated_agent"]\nlimit = 300000\n'
    for n in range(AGENTS):
        tables += f'[ledger.budgets."agent:agent-{n}"]\nlimit = 20000\n'
    return suite_config(workers, fsync="group", scheduler="lease = true\n", tables=tables)


def plans(seed: int, per_agent: int, seconds: tuple) -> dict[int, list[dict]]:
    out = {}
    for n in range(AGENTS):
        rng = random.Random(seed + n)
        out[n] = [{"priority": "medium", "payload": {
            "seconds": rng.choice(seconds), "steps": 2, "tokens": rng.randint(0, R)}}
            for _ in range(per_agent)]
    return out


class Sampler:
    """Reads every budget over and over while the test runs; keeps what broke the limit."""

    def __init__(self, home):
        self.home, self.samples, self.broken = home, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        with Client(self.home, timeout=30, agent="sampler") as c:
            while not self.stop.is_set():
                try:
                    rows = c.budget()["budgets"]
                except Exception:  # the ledger is restarting: the next sample sees it
                    continue
                self.samples += 1
                for row in rows:
                    if row["limit"] is not None and \
                            row["committed"] + row["reserved"] + row["leased"] > row["limit"]:
                        self.broken.append(row)
                self.stop.wait(0.05)  # a sampling period, not a synchronisation

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def kill(suites, suite, names: tuple[str, ...]) -> None:
    """SIGKILL the named services at once; return when each runs again under a new pid."""
    # A service restarted a moment ago may serve before supervisord calls it RUNNING
    # (after its startsecs): wait for that, so the kill meets a program supervisord runs.
    info = wait_for(lambda: (now := {p["name"]: p for p in suite.processes()}) and all(
        now[n]["statename"] == "RUNNING" for n in names) and now, 60,
        f"{', '.join(names)} RUNNING before the kill")
    old = {name: info[name]["pid"] for name in names}
    for name in names:
        os.kill(old[name], signal.SIGKILL)

    def back():
        now = {p["name"]: p for p in suite.processes()}
        return all(now[n]["statename"] == "RUNNING" and now[n]["pid"] != old[n]
                   for n in names)

    wait_for(back, 60, f"{', '.join(names)} restarted")
    suites.seen(suite)


def run_and_check(suites, suite, batches: list[dict], during=None) -> None:
    lock = threading.Lock()
    accepted: dict[str, tuple[int, dict]] = {}
    final: dict[str, dict] = {}
    errors: list = []
    sampler = Sampler(suite.home)
    try:
        with Client(suite.home, timeout=60, agent="outside") as c:
            for batch in batches:
                threads = run_agents(suite.home, batch, accepted, final, errors, lock, 180)
                if during is not None:
                    during(c)
                for t in threads:
                    t.join(timeout=240)
            assert not errors, errors[:3]
            assert set(final) == set(accepted)
            # Idle leases go back: nothing stays reserved anywhere.
            wait_for(lambda: all(b["reserved"] == b["leased"] == 0
                                 for b in balances(c).values()), 60,
                     "every lease returned and every reservation settled")
            end = balances(c)
            wait_for(lambda: c.call("scheduler", "scheduler.status")["events_unacked"] == 0,
                     60, "scheduler events acknowledged")
            assert c.call("ledger", "ledger.status")["leases"] == []
    finally:
        sampler.close()
    assert sampler.samples > 0 and not sampler.broken, sampler.broken[:3]
    events = jsonl_events(suite.home)
    assert not [e for e in events if e["type"].endswith("internal_error")]
    completed = Counter(e["task"] for e in events if e["type"] == "task.completed")
    for task_id, task in final.items():
        assert task["state"] == "completed", task
        assert task["tokens_used"] == accepted[task_id][1]["payload"]["tokens"], task
        assert completed[task_id] == 1, (task_id, completed[task_id])
    used = sum(t["tokens_used"] for t in final.values()) + lost_use(events)
    assert end["global"]["committed"] == used
    assert end["type:simulated_agent"]["committed"] == used
    for n in range(AGENTS):
        mine = sum(t["tokens_used"] for tid, t in final.items() if accepted[tid][0] == n)
        lost = sum(e["data"].get("tokens_used", 0) for e in events
                   if e["type"] in ("task.retry", "task.dead") and e["task"] in
                   {tid for tid, (m, _) in accepted.items() if m == n})
        assert end[f"agent:agent-{n}"]["committed"] == mine + lost, n
    carved = [e for e in events if e["type"] == "task.reserved" and e["data"].get("lease")]
    assert carved, "no task was carved from a lease"
    assert any(e["type"] == "ledger.leased" for e in events)


def test_tasks_with_tokens_run_through_leases(suites):
    suite = suites.start(config=lease_config(4))
    run_and_check(suites, suite, [plans(300, 6, (0, 0.02))])


def test_no_lease_outlives_cortex_down_and_up(suites):
    """Leases go back at down when the ledger answers in time (best effort), and what is
    still held then goes back at the next start: nothing stays reserved."""
    suite = suites.start(config=lease_config(4))
    lock = threading.Lock()
    accepted, final, errors = {}, {}, []
    for t in run_agents(suite.home, plans(500, 6, (0,)), accepted, final, errors, lock, 120):
        t.join(timeout=180)
    assert not errors and len(final) == len(accepted) == 6 * AGENTS, errors[:3]
    suites.seen(suite)
    suite.stop()  # at once: leases may still be held, not yet idle
    suite.start(attached=True, timeout=60)
    suites.seen(suite)
    with Client(suite.home, timeout=60) as c:
        wait_for(lambda: not c.call("ledger", "ledger.status")["leases"], 60,
                 "every lease returned")
        end = balances(c)
    assert all(b["reserved"] == b["leased"] == 0 for b in end.values()), end
    used = sum(t["tokens_used"] for t in final.values())
    assert end["global"]["committed"] == used

    def every_lease_returned_in_the_log():
        # Events reach the log after the ledger's reply: the last returns may be on the way.
        events = jsonl_events(suite.home)
        leased = {e["data"]["lease"] for e in events if e["type"] == "ledger.leased"}
        returned = {e["data"]["lease"] for e in events if e["type"] == "ledger.lease_returned"}
        return leased and leased <= returned

    wait_for(every_lease_returned_in_the_log, 30, "a ledger.lease_returned for every lease")


def test_a_client_reservation_takes_back_the_lease_that_would_starve_it(suites):
    """All that is left of the budget, asked by a client while a lease holds part of it:
    granted, the lease taken back (ledger.lease_reclaimed); the scheduler then returns it
    (answered 0) and the tasks after it still run; the figures end exact."""
    suite = suites.start(config=suite_config(2, scheduler="lease = true\n",
                                             tables="[ledger]\nbudget = 20000\n"))
    used = 0
    with Client(suite.home, timeout=60, agent="outside") as c:

        def burst(n: int) -> int:
            ids = [c.submit("simulated_agent", "burst", tokens=R,
                            payload={"seconds": 0, "steps": 1, "tokens": 10})["id"]
                   for _ in range(n)]
            return sum(c.wait(i, timeout=120)["tokens_used"] for i in ids)

        def reclaimed() -> bool:
            return any(e["type"] == "ledger.lease_reclaimed" for e in c.call(
                "events", "events.recent", {"n": 1000})["events"])

        for attempt in range(1, 6):  # a lease is idle for 2 s before it goes back
            used += burst(20)
            g = balances(c)["global"]
            if not g["leased"]:
                continue
            ask = g["limit"] - g["committed"] - g["reserved"]
            got = c.reserve(f"outside-{attempt}", ask)
            assert got["granted"], got  # never starved by a lease
            c.commit(f"outside-{attempt}", 5)
            used += 5
            try:  # none if the lease went back idle between the read and the ask
                wait_for(reclaimed, 10, "the reclaim's event", interval=0.2)
                break
            except AssertionError:
                continue
        else:
            pytest.fail("no lease was held when a burst ended, five times")
        used += burst(20)  # per-task for a while, then leases again: all still run
        wait_for(lambda: not c.call("ledger", "ledger.status")["leases"], 60,
                 "the leases returned")
        # The scheduler gathers its ledger orders (up to 50 ms) and a carve from a lease
        # the client took back reaches the ledger with its settle, so nothing reserved
        # can still mean orders on their way: wait for the tasks' use to be committed.
        wait_for(lambda: (g := balances(c)["global"])["reserved"] == 0
                 and g["committed"] >= used, 30, "settled")
        end = balances(c)["global"]
        # Every step, reclaims included, re-derived from the events: never past the limit.
        events = settled_events(suite, c, initial_budgets(20000, {}))
    assert (end["committed"], end["reserved"], end["leased"], end["overrun"]) == \
        (used, 0, 0, 0), end
    assert [e for e in events if e["type"] == "ledger.lease_reclaimed"]


@pytest.mark.heavy
@pytest.mark.parametrize("victims", [("scheduler",), ("ledger",), ("scheduler", "ledger")])
def test_lease_under_kill_keeps_every_budget_and_leaks_nothing(suites, victims):
    suite = suites.start(config=lease_config(8))

    def killer(c: Client) -> None:
        for _ in range(2):
            wait_for(lambda: c.call("ledger", "ledger.status")["leases"] and
                     c.call("scheduler", "scheduler.status")["states"].get("running"), 60,
                     "a lease held while tasks run")
            kill(suites, suite, victims)

    run_and_check(suites, suite, [plans(400, 16, (0.1, 0.3, 0.6))], during=killer)
