"""The token ledger on the real suite: contention, a ledger killed -9, budgets set at run time.

Every check on balances is made two ways: against the ledger's own answer (ledger.status),
and from the event log alone. Each ledger change is an event carrying its journal sequence
number (lsn) and every touched scope's numbers after the change, so replaying the events in
lsn order re-derives every intermediate balance: each one must match what the event says,
and none may break ``committed - overrun + reserved <= limit``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict

import pytest

from cortex.protocol import Client, errors
from cortex.services.cli import app as cli

from .conftest import suite_config, wait_for
from .test_suite_integration import jsonl_events

R = 100  # tokens every task of the contention test reserves
CHANGES = ("ledger.reserved", "ledger.extended", "ledger.committed", "ledger.released",
           "ledger.budget_set", "ledger.leased", "ledger.lease_returned",
           "ledger.lease_reclaimed")
NUMBERS = ("limit", "reserved", "leased", "committed", "overrun")


# -- helpers ------------------------------------------------------------------------------


def ledger_config(workers: int, budget: int, agents: dict[str, int], fsync: str = "group",
                  windowed=(), scheduler: str = "") -> str:
    tables = f'[ledger]\nbudget = {budget}\n'
    for agent, limit in agents.items():
        tables += f'[ledger.budgets."agent:{agent}"]\nlimit = {limit}\n'
        if agent in windowed:  # a window that will not reset during the test
            tables += 'window = "rolling:86400"\n'
    return suite_config(workers, fsync=fsync, tables=tables, scheduler=scheduler)


def initial_budgets(budget: int, agents: dict[str, int]) -> dict[str, dict]:
    scopes = {"global": budget, **{f"agent:{a}": limit for a, limit in agents.items()}}
    return {s: {"limit": limit, "reserved": 0, "leased": 0, "committed": 0,
                "overrun": 0}
            for s, limit in scopes.items()}


def balances(client: Client) -> dict[str, dict]:
    return {row["scope"]: row for row in client.budget()["budgets"]}


def settled_balances(client: Client) -> dict[str, dict]:
    """The balances once every ledger order is answered and nothing is reserved: a task's
    end reaches its client before the ledger hears its settle order."""
    wait_for(lambda: client.call("scheduler", "scheduler.status")["ledger_orders"] == 0
             and all(b["reserved"] == 0 for b in balances(client).values()), 30,
             "every ledger order answered, nothing reserved")
    return balances(client)


def numbers(rows: dict[str, dict]) -> dict[str, tuple]:
    return {s: tuple(row[k] for k in NUMBERS) for s, row in rows.items()}


def set_budget(client: Client, scope: str, limit: int | None) -> dict:
    return client.call("ledger", "ledger.set", {"scope": scope, "limit": limit, "window": None})


def ledger_pid(suite) -> int:
    info = {p["name"]: p for p in suite.processes()}["ledger"]
    assert info["statename"] == "RUNNING", info
    return info["pid"]


def kill_ledger(suites, suite) -> None:
    """SIGKILL the ledger; return once supervisord has it running again and it answers."""
    old = ledger_pid(suite)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: (p := {x["name"]: x for x in suite.processes()}["ledger"])["statename"]
             == "RUNNING" and p["pid"] != old, 30, "the ledger restarted")
    suites.seen(suite)
    with Client(suite.home, timeout=30) as c:
        c.budget()  # answers (the client retries while it is still recovering)


def fits(row: dict) -> bool:
    return row["limit"] is None or row["committed"] - row["overrun"] + row["reserved"] \
        + row["leased"] <= row["limit"]


def replay_ledger(events: list[dict], initial: dict[str, dict]) -> dict[str, dict]:
    """Re-derive every balance from the ledger's events, in lsn order, checking each step.

    Raises AssertionError naming the first event whose numbers are inconsistent, break the
    invariant, or (for a grant) over-allocate; returns the balances after the last event."""
    changes: dict[int, dict] = {}
    for e in events:
        if e["type"] in CHANGES:
            lsn = e["data"]["lsn"]
            if lsn in changes:  # re-sent after a restart: must be the same change
                assert changes[lsn]["data"] == e["data"], (changes[lsn], e)
            changes[lsn] = e
        if e["type"].startswith("ledger.") and "budgets" in e["data"]:
            for scope, row in e["data"]["budgets"].items():
                assert fits(row), f"{scope} above its limit in {e['type']} {e['data']}"
    lsns = sorted(changes)
    assert lsns == list(range(1, len(lsns) + 1)), f"lsn gaps: {len(lsns)} changes, " \
        f"last {lsns[-1] if lsns else None}"
    state = {s: dict(row) for s, row in initial.items()}
    for lsn in lsns:
        e = changes[lsn]
        kind, d = e["type"], e["data"]
        touched = d["budgets"]
        if kind == "ledger.budget_set":
            (scope,) = touched
            state.setdefault(scope, {"reserved": 0, "leased": 0, "committed": 0, "overrun": 0})
            state[scope]["limit"] = d["limit"]
        for scope in touched:
            b = state[scope]
            if kind == "ledger.reserved":
                assert list(touched) == d["scopes"], d
                b["reserved"] += d["amount"]
                if "lease" in d:  # assigned from a lease: it was leased already
                    b["leased"] -= d["amount"]
            elif kind == "ledger.leased":
                b["leased"] += d["amount"]
            elif kind in ("ledger.lease_returned", "ledger.lease_reclaimed"):
                b["leased"] -= d["amount"]
            elif kind == "ledger.extended":
                b["reserved"] += d["amount"]
            elif kind == "ledger.released":
                b["reserved"] -= d["amount"]
            elif kind == "ledger.committed":
                b["reserved"] -= d["reserved"]
                b["committed"] += d["used"]
                b["overrun"] += max(0, d["used"] - d["reserved"])
            got = {k: touched[scope][k] for k in NUMBERS}
            assert got == {k: b[k] for k in NUMBERS}, f"lsn {lsn} {kind} {scope}: event says " \
                f"{got}, replay gives {b}"
            assert b["reserved"] >= 0 and b["leased"] >= 0 and fits(b), \
                f"lsn {lsn} {kind} {scope}: {b}"
            if kind in ("ledger.reserved", "ledger.extended", "ledger.leased") \
                    and b["limit"] is not None:
                # A grant needs committed + reserved + leased + amount <= limit before it.
                assert b["committed"] + b["reserved"] + b["leased"] <= b["limit"], \
                    f"lsn {lsn}: {kind} over-allocated {scope}: {b}"
    return state


def settled_events(suite, client: Client, initial: dict[str, dict]) -> list[dict]:
    """The event log once it holds every ledger change the ledger's balances reflect."""
    wait_for(lambda: client.call("scheduler", "scheduler.status")["events_unacked"] == 0, 60,
             "scheduler events acknowledged")
    last = []

    def agree():
        events = jsonl_events(suite.home)
        try:
            replayed = replay_ledger(events, initial)
        except AssertionError as e:
            last[:] = [str(e)]
            if "lsn gaps" in str(e) or "replay gives" in str(e):
                return None  # events still on their way (re-sent after a restart)
            raise
        want = numbers(balances(client))
        got = {s: tuple(b[k] for k in NUMBERS) for s, b in replayed.items()}
        last[:] = [f"replay {got} != status {want}"]
        return events if got == want else None

    try:
        return wait_for(agree, 60, "the event log to agree with the ledger", interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}: {last[0][:3000] if last else ''}") from None


def run_agents(home, plans: dict[int, list[dict]], accepted: dict, final: dict,
               errors: list, lock: threading.Lock, wait_timeout: float) -> list[threading.Thread]:
    """One thread per agent, each with its own Client: submit every planned task, then wait
    for each to end."""

    def agent(n: int) -> None:
        try:
            with Client(home, timeout=60, agent=f"agent-{n}") as client:
                mine = []
                for i, plan in enumerate(plans[n]):
                    task = client.submit("simulated_agent", f"agent {n} job {i}", tokens=R,
                                         priority=plan["priority"], payload=plan["payload"])
                    assert task["agent"] == f"agent-{n}"
                    with lock:
                        accepted[task["id"]] = (n, plan)
                    mine.append(task["id"])
                for task_id in mine:
                    done = client.wait(task_id, timeout=wait_timeout)
                    with lock:
                        final[task_id] = done
        except BaseException as e:  # reported by the test, with the agent that failed
            errors.append((n, e))

    threads = [threading.Thread(target=agent, args=(n,), daemon=True) for n in plans]
    for t in threads:
        t.start()
    return threads


def quiesce(client: Client, expected: int, polls: int = 4, timeout: float = 60) -> dict:
    """Wait until every expected task is known, none is dispatched or running, no tokens are
    reserved anywhere, and the task states stay the same for `polls` checks 0.5 s apart."""
    seen: list = []

    def still():
        status = client.call("scheduler", "scheduler.status")
        states = status["states"]
        busy = states.get("dispatched", 0) + states.get("running", 0)
        reserved = sum(b["reserved"] for b in balances(client).values())
        if sum(states.values()) < expected or busy or reserved:
            seen.clear()
            return None
        seen.append(states)
        if len(seen) >= polls and all(s == seen[-1] for s in seen[-polls:]):
            return states
        return None

    return wait_for(still, timeout, "the suite to quiesce", interval=0.5)


def lost_use(events: list[dict]) -> int:
    """Tokens reported by attempts lost part-way (their use happened, so it is committed)."""
    return sum(e["data"].get("tokens_used", 0) for e in events
               if e["type"] in ("task.retry", "task.dead"))


# -- 1. contention ------------------------------------------------------------------------


def contention_plans() -> tuple[dict[int, list[dict]], dict[str, int]]:
    """100 agents, 4 tasks each, every task reserving R tokens. By n % 10:
    0  "tiny":    agent limit 50 < R, in a day's window, normal use: every task waits for
                  tokens (a limit with no window would refuse them at submit)
    1  "exact":   agent limit R, each task tries to use 2R through use_tokens: the first
                  one reserved has its extension refused and fails budget_exceeded
    2  "overrun": agent limit 250, use 130..180 reported after the fact (overrun)
    else          agent limit 250..450, random use: some over R (extension asked),
                  some over R reported after the fact, some failing after their use."""
    plans: dict[int, list[dict]] = {}
    limits: dict[str, int] = {}
    for n in range(100):
        rng = random.Random(6000 + n)
        kind = n % 10
        tasks = []
        for _ in range(4):
            seconds = rng.choice((0, 0.02, 0.05))
            steps = rng.randint(1, 4)
            if kind == 0:
                payload = {"tokens": rng.randint(0, R)}
            elif kind == 1:
                payload = {"tokens": 2 * R, "steps": 4}
            elif kind == 2:
                payload = {"tokens": rng.randint(130, 180), "overrun": True}
            else:
                roll = rng.random()
                if roll < 0.15:
                    payload = {"tokens": rng.randint(R + 1, 180), "overrun": True}
                elif roll < 0.35:
                    payload = {"tokens": rng.randint(R + 1, 2 * R)}
                elif roll < 0.45:
                    payload = {"tokens": rng.randint(0, R), "fail": True}
                else:
                    payload = {"tokens": rng.randint(0, R)}
            tasks.append({"kind": kind, "priority": "high" if kind <= 2 else
                          rng.choice(("medium", "low")),
                          "payload": {"seconds": seconds, "steps": steps} | payload})
        plans[n] = tasks
        limits[f"agent-{n}"] = (50, R, 250)[kind] if kind <= 2 else rng.randint(250, 450)
    return plans, limits


def test_hundred_agents_contend_for_budgets_exactly(suites):
    started = time.monotonic()
    plans, limits = contention_plans()
    budget = 12_000  # combined demand: 400 tasks x R = 40,000 reserved, ~30,000 used
    demand = sum(len(p) for p in plans.values()) * R
    assert budget < demand and budget < sum(limits.values())
    tiny = {f"agent-{n}" for n in range(0, 100, 10)}
    suite = suites.start(config=ledger_config(16, budget, limits, windowed=tiny))
    initial = initial_budgets(budget, limits)
    accepted: dict[str, tuple[int, dict]] = {}
    final: dict[str, dict] = {}
    errors: list = []
    lock = threading.Lock()
    # Wave 1 (tiny, exact, overrun agents) is queued before the others start, so its first
    # reservations meet agent limits only; the global budget binds during wave 2.
    wave1 = {n: p for n, p in plans.items() if n % 10 <= 2}
    threads = run_agents(suite.home, wave1, accepted, final, errors, lock, 120)
    wait_for(lambda: len(accepted) == 4 * len(wave1) or errors, 60, "wave 1 submitted")
    wave2 = {n: p for n, p in plans.items() if n % 10 > 2}
    threads += run_agents(suite.home, wave2, accepted, final, errors, lock, 120)

    with Client(suite.home, timeout=60) as c:
        wait_for(lambda: len(accepted) == 400 or errors, 60, "every task submitted")
        assert not errors, errors[:3]
        states = quiesce(c, 400)
        # Phase 1 over: whatever is not final waits for tokens, for good.
        now1 = {t: c.status(t) for t in accepted}
        done1 = {t: s for t, s in now1.items() if s["final"]}
        blocked = [t for t in accepted if t not in done1]
        assert states.get("queued", 0) == len(blocked), (states, len(blocked))
        assert blocked, "no task was refused"
        for task_id in blocked:
            status = wait_for(lambda t=task_id: (s := c.status(t))["waiting"] == "tokens" and s,
                              10, f"{task_id} shown waiting for tokens")
            assert status["state"] == "queued" and status["reserved"] == 0, status
        after1 = balances(c)
        assert after1["global"]["reserved"] == 0
        # The global budget was competed for: it ran out (less than R left).
        assert after1["global"]["committed"] > budget - R, after1["global"]
        by_agent: dict[int, list[str]] = defaultdict(list)
        for task_id, (n, _) in accepted.items():
            by_agent[n].append(task_id)
        for n in range(0, 100, 10):  # tiny agents: nothing ran
            assert all(t in blocked for t in by_agent[n]), n
            assert after1[f"agent:agent-{n}"]["committed"] == 0
        for n in range(1, 100, 10):  # exact agents: one reserved, extension refused, failed
            ended = [done1[t] for t in by_agent[n] if t in done1]
            assert len(ended) == 1, (n, ended)
            assert ended[0]["state"] == "failed" and ended[0]["tokens_used"] == R, ended[0]
            assert ended[0]["error"]["category"] == "budget_exceeded", ended[0]
            assert after1[f"agent:agent-{n}"]["committed"] == R

        # Phase 2: raise budgets at run time (ledger.set, what `cortex budget set` sends).
        # Half the tiny agents stay blocked: their tasks are cancelled instead.
        cancel_agents = set(range(10, 100, 20))
        raised = {n for n in {accepted[t][0] for t in blocked}} - cancel_agents
        for n in sorted(raised):
            reply = set_budget(c, f"agent:agent-{n}", 10_000)
            assert reply["limit"] == 10_000 and not reply["over_limit"], reply
        reply = set_budget(c, "global", 10_000_000)
        assert reply["limit"] == 10_000_000
        cancelled = [t for t in blocked if accepted[t][0] in cancel_agents]
        for task_id in cancelled:
            assert c.cancel(task_id)["state"] == "cancelled"
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[:3]
        assert set(final) == set(accepted), "an agent did not get every task back"
        end = settled_balances(c)
        reservations = {t: c.call("ledger", "ledger.task", {"task": t})["reservation"]
                        for t in accepted}
        events = settled_events(suite, c, initial)

    # Nothing lost: every task ended, as its kind says it must.
    states = Counter(t["state"] for t in final.values())
    assert states["cancelled"] == len(cancelled) == 20, states
    assert set(states) <= {"completed", "failed", "cancelled"}, states
    for task_id, task in final.items():
        n, plan = accepted[task_id]
        payload, res = plan["payload"], reservations[task_id]
        if task_id in cancelled:
            assert task["state"] == "cancelled" and task["tokens_used"] == 0, task
            assert task["reserved"] == 0 and res is None, (task, res)  # never granted
            continue
        assert res is not None and res["reserved"] == 0, res
        assert res["state"] == "committed" or (res["state"] == "released"
                                               and task["tokens_used"] == 0), res
        assert res["used"] in (task["tokens_used"], None), (task, res)
        if task["state"] == "completed":
            assert task["tokens_used"] == payload["tokens"], task
        elif task["error"]["category"] == "budget_exceeded":
            # An extension was refused: the use counted is what the reservation covered.
            assert not payload.get("overrun") and payload["tokens"] > R, (task, payload)
            assert task["tokens_used"] <= res["granted"] < payload["tokens"], (task, res)
        else:
            assert task["error"]["category"] == "handler_error" and payload.get("fail"), task
            assert task["tokens_used"] == payload["tokens"], task
        if payload.get("overrun") and task["tokens_used"] > R:
            assert res["overrun"] == task["tokens_used"] - R, res
    for n in range(1, 100, 10):  # exact agents after the raise: extensions granted
        ended = Counter((final[t]["state"], final[t]["tokens_used"]) for t in by_agent[n])
        assert ended == {("failed", R): 1, ("completed", 2 * R): 3}, (n, ended)

    # Exact totals: committed equals the sum of reported use, globally and per agent.
    used = sum(t["tokens_used"] for t in final.values()) + lost_use(events)
    assert end["global"]["committed"] == used
    per_agent = Counter()
    for task_id, task in final.items():
        per_agent[f"agent:agent-{accepted[task_id][0]}"] += task["tokens_used"]
    for scope, row in end.items():
        assert row["reserved"] == 0, row
        if scope != "global":
            assert row["committed"] == per_agent[scope], (scope, row, per_agent[scope])
    over = [t for t in final.values() if t["tokens_used"] > 0 and reservations[t["id"]]
            and reservations[t["id"]]["overrun"]]
    assert end["global"]["overrun"] == sum(reservations[t["id"]]["overrun"] for t in over) > 0

    # Every refusal is visible, and justified by the numbers at that instant.
    refused = [e for e in events if e["type"] == "ledger.refused"]
    assert {e["data"]["scope"] for e in refused} >= {"global"} | {
        f"agent:agent-{n}" for n in range(0, 100, 10)}
    for e in refused:
        d = e["data"]
        row = d["budgets"][d["scope"]]
        assert row["committed"] + row["reserved"] + d["requested"] > row["limit"], d
    refused_reserve = {e["task"] for e in refused if e["data"]["op"] == "reserve"}
    waited = {e["task"] for e in events if e["type"] == "task.waiting"
              and e["data"]["reason"] == "tokens"}
    assert refused_reserve == waited
    assert set(blocked) <= refused_reserve
    refused_extend = {e["task"] for e in refused if e["data"]["op"] == "extend"}
    failed_budget = {t for t, task in final.items() if task["state"] == "failed"
                     and task["error"]["category"] == "budget_exceeded"}
    assert refused_extend == failed_budget and len(failed_budget) >= 10
    overruns = {e["task"]: e["data"]["excess"] for e in events if e["type"] == "ledger.overrun"}
    assert overruns == {t["id"]: reservations[t["id"]]["overrun"] for t in over}
    assert all(final[t]["tokens_used"] > R for t in overruns)
    assert any(e["type"] == "ledger.extended" for e in events)
    # replay_ledger (in settled_events) checked every step against the invariant.
    print(f"\ncontention: {dict(states)}, {len(refused)} refusals, "
          f"{time.monotonic() - started:.1f} s")


# -- 2. the ledger killed -9 ----------------------------------------------------------------


@pytest.mark.heavy  # a service killed or restarted: CI's second pass
@pytest.mark.parametrize("lease", [False, True])
def test_ledger_killed_keeps_exact_balances(suites, lease):
    agents = {f"agent-{n}": 2000 for n in range(0, 12, 3)}
    budget = 1_000_000
    suite = suites.start(config=ledger_config(8, budget, agents,
                                              scheduler=f"lease = {str(lease).lower()}\n"))
    initial = initial_budgets(budget, agents)
    lock = threading.Lock()
    accepted: dict[str, tuple[int, dict]] = {}
    final: dict[str, dict] = {}
    errors: list = []

    def plans(seed: int, seconds: tuple) -> dict[int, list[dict]]:
        out = {}
        for n in range(12):
            rng = random.Random(seed + n)
            out[n] = [{"priority": "medium", "payload": {
                "seconds": rng.choice(seconds), "steps": 4, "tokens": rng.randint(0, 2 * R),
                "overrun": rng.random() < 0.2, "fail": rng.random() < 0.1}} for _ in range(4)]
        return out

    with Client(suite.home, timeout=60, agent="outside") as c:
        # a. Quiesced: a settled batch, an open reservation with an extension, a budget set
        # at run time; kill -9; the ledger comes back with identical balances.
        threads = run_agents(suite.home, plans(100, (0, 0.02)), accepted, final, errors, lock,
                             60)
        for t in threads:
            t.join(timeout=90)
        assert not errors and len(final) == 48, errors[:3]
        quiesce(c, 48, polls=2)
        assert c.reserve("ext-1", 500)["granted"]
        ext = c.call("ledger", "ledger.extend", {"task": "ext-1", "attempt": 1, "amount": 70,
                                                 "seq": 1})
        assert ext["granted"] and ext["reserved"] == 570
        assert c.reserve("ext-2", 300)["granted"]
        assert set_budget(c, "agent:agent-3", 5000)["limit"] == 5000
        assert set_budget(c, "type:simulated_agent", 900_000)["limit"] == 900_000
        wait_for(lambda: balances(c)["global"]["reserved"] == 870 and not any(
            b["leased"] for b in balances(c).values()), 30, "only ext-1/2 held, no lease")
        before = balances(c)
        tasks_before = {t: c.call("ledger", "ledger.task", {"task": t})["reservation"]
                        for t in [*accepted, "ext-1", "ext-2"]}
        kill_ledger(suites, suite)
        assert balances(c) == before
        assert {t: c.call("ledger", "ledger.task", {"task": t})["reservation"]
                for t in tasks_before} == tasks_before
        # Replays after the restart are recognised: nothing counts twice.
        assert c.reserve("ext-1", 500)["reserved"] == 500
        again = c.call("ledger", "ledger.extend", {"task": "ext-1", "attempt": 1, "amount": 70,
                                                   "seq": 1})
        assert again == ext
        assert balances(c) == before
        first = c.commit("ext-1", 600)
        assert first["overrun"] == 30 and first["released"] == 0
        assert c.commit("ext-1", 600) == first
        assert c.release("ext-2")["released"] == 300
        assert c.release("ext-2")["released"] == 300
        outside = before["global"]["committed"] + 600
        b = balances(c)["global"]
        assert (b["committed"], b["reserved"]) == (outside, 0)

        # b. Mid-run: the ledger killed twice while tasks with tokens run and agents submit.
        batch2 = {n: [dict(p) for p in ps] for n, ps in plans(200, (0.3, 0.6, 1.0)).items()}
        threads = run_agents(suite.home, batch2, accepted, final, errors, lock, 90)
        for _ in range(2):
            wait_for(lambda: balances(c)["global"]["reserved"] > 0, 30, "tasks holding tokens")
            mid = balances(c)
            kill_ledger(suites, suite)
            now = balances(c)
            for scope, row in mid.items():  # nothing forgotten: usage never goes back
                assert now[scope]["committed"] >= row["committed"], (scope, row, now[scope])
                assert now[scope]["limit"] == row["limit"]
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[:3]
        assert set(final) == set(accepted) and len(final) == 96
        end = settled_balances(c)
        events = settled_events(suite, c, initial)

    for task_id, task in final.items():
        payload = accepted[task_id][1]["payload"]
        assert task["state"] in ("completed", "failed"), task
        if task["state"] == "completed":
            assert task["tokens_used"] == payload["tokens"], task
        elif task["error"]["category"] == "budget_exceeded":
            # Refused, or the ledger was away when the handler asked for more.
            assert task["tokens_used"] < payload["tokens"], task
        else:
            assert task["error"]["category"] == "handler_error" and payload["fail"], task
    used = sum(t["tokens_used"] for t in final.values()) + lost_use(events)
    assert end["global"]["committed"] == used + 600
    assert end["type:simulated_agent"]["committed"] <= used  # created part-way
    for n in range(0, 12, 3):
        mine = sum(t["tokens_used"] for i, t in final.items() if accepted[i][0] == n)
        assert end[f"agent:agent-{n}"]["committed"] == mine
    assert end["agent:agent-3"]["limit"] == 5000  # set at run time, kept across restarts
    # Four incarnations; one killed before it had anything to say leaves no epoch of its
    # own, so the restarts show as 2 to 4 epochs (what is lossless is checked below).
    assert 2 <= len({e["epoch"] for e in events if e["source"] == "ledger"}) <= 4
    assert not [i for i, k in Counter(e["id"] for e in events).items() if k > 1]
    outcomes = Counter((t["state"], (t["error"] or {}).get("category")) for t in final.values())
    print(f"\nledger killed 3 times: {dict(outcomes)}")


# -- 3. `cortex budget set` unblocks waiting tasks ----------------------------------------------


def test_budget_set_from_the_cli_unblocks_waiting_tasks(suites, capsys):
    suite = suites.start(config=ledger_config(2, 1_000_000, {"agent-cli": 250}))
    home = str(suite.home)
    with Client(suite.home, timeout=30, agent="agent-cli") as c:
        # Asking more than the limit itself could never run: refused at submit.
        with pytest.raises(errors.BudgetExceeded, match="agent:agent-cli"):
            c.submit("simulated_agent", "above the limit", tokens=300)
        # A holder takes 200 of the 250: the three below wait for tokens.
        holder = c.submit("simulated_agent", "holder", tokens=200,
                          payload={"seconds": 120, "tokens": 0})["id"]
        wait_for(lambda: c.status(holder)["state"] == "running", 30, "the holder to run")
        ids = [c.submit("simulated_agent", f"cli {i}", tokens=R,
                        payload={"seconds": 0, "tokens": 60 + i})["id"] for i in range(3)]
        for task_id in ids:
            status = wait_for(lambda t=task_id: (s := c.status(t))["waiting"] == "tokens" and s,
                              15, "waiting for tokens")
            assert status["state"] == "queued" and status["reserved"] == 0
        time.sleep(1.2)  # a few retries later, still refused
        assert all(c.status(t)["state"] == "queued" for t in ids)
        capsys.readouterr()
        code = cli.main(["budget", "set", "agent:agent-cli", "1000", "--home", home, "--json"])
        out = capsys.readouterr().out
        assert code == cli.Exit.OK, out
        assert json.loads(out)["limit"] == 1000
        done = [c.wait(t, timeout=30) for t in ids]
        assert [(t["state"], t["tokens_used"]) for t in done] == [
            ("completed", 60 + i) for i in range(3)]
        c.cancel(holder)
        wait_for(lambda: balances(c)["agent:agent-cli"]["reserved"] == 0, 30,
                 "the holder's reservation released")
        row = balances(c)["agent:agent-cli"]
        assert (row["limit"], row["committed"], row["reserved"]) == (1000, 183, 0)
        # Lowered below usage from the CLI: over limit, and new work waits again.
        assert cli.main(["budget", "set", "agent:agent-cli", "100", "--home", home]) == \
            cli.Exit.OK
        assert "note:" in capsys.readouterr().out
        blocked = c.submit("simulated_agent", "over limit", tokens=1, payload={"tokens": 1})
        wait_for(lambda: c.status(blocked["id"])["waiting"] == "tokens", 15, "refused again")
        assert cli.main(["budget", "set", "agent:agent-cli", "unlimited", "--home", home]) \
            == cli.Exit.OK
        assert c.wait(blocked["id"], timeout=30)["state"] == "completed"
        assert balances(c)["agent:agent-cli"]["limit"] is None
