"""Provider limits as a feasibility dimension of the scheduler (pure: SchedulerState driven
with explicit clocks): a task past its provider's window waits `rate_limit` with an ETA
and is dispatched the moment it fits, other providers' tasks go ahead meanwhile, the
concurrency limit frees at a task's end, a 429 shrinks the provider and pauses it, a
refused reservation gives the slot back, and the windows survive a journal replay and a
snapshot."""

from __future__ import annotations

import pytest

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.settings import ProviderSettings, SchedulerSettings
from cortex.services.scheduler.feasibility import ResourceMonitor
from cortex.services.scheduler.ratelimit import EPSILON
from cortex.services.scheduler.state import SchedulerState
from cortex.services.scheduler.tasks import State
from tests.test_scheduling import (
    IDLE_MACHINE,
    T0,
    Midpoint,
    Sim,
    answer,
    events,
    journal_copy,
    ledger_requests,
    runs,
)

WINDOW = 2.0


def providers(**limits) -> dict:
    slow = ProviderSettings(name="slow", base_url="http://127.0.0.1:9/v1", model="m",
                            window=WINDOW, **limits)
    fast = ProviderSettings(name="fast", base_url="http://127.0.0.1:9/v1", model="m")
    return {"slow": slow, "fast": fast}


def new_state(**limits) -> SchedulerState:
    return SchedulerState(SchedulerSettings(), monitor=ResourceMonitor(lambda: IDLE_MACHINE),
                          rng=Midpoint(), providers=providers(**limits))


def sim_with(workers: int = 6, **limits) -> Sim:
    sim = Sim()
    sim.state = new_state(**limits)
    for i in range(workers):
        sim.ready(f"w{i}", types=("llm",), pid=100 + i)
    return sim


def llm(sim: Sim, provider: str, tokens: int = 0):
    return sim.add(type="llm", description="say hi", tokens=tokens,
                   payload={"provider": provider, "model": "m"})


def windows(state: SchedulerState, now: float) -> dict:
    """The providers' windows (without how many tasks wait: the queue is rebuilt apart)."""
    return {name: {k: v for k, v in row.items() if k != "waiting"}
            for name, row in state.limits.status(now).items()}


def dispatched(sim: Sim) -> set[str]:
    return {t.id for t in sim.state.tasks.values() if t.state is State.DISPATCHED}


def test_a_task_past_the_window_waits_with_an_eta_while_other_providers_go_ahead():
    sim = sim_with(requests_per_window=2)
    slow = [llm(sim, "slow") for _ in range(4)]
    assert dispatched(sim) == {slow[0].id, slow[1].id}
    held = slow[2]
    assert held.waiting == "rate_limit"
    detail = held.waiting_detail
    assert detail["check"] == "requests" and detail["provider"] == "slow"
    assert detail["eta"] == pytest.approx(T0 + WINDOW + EPSILON)
    assert detail["in_window"]["requests"] == 2 and detail["allowed"]["requests"] == 2
    assert [e[1]["reason"] for e in events(sim.effects[-2], "task.waiting")] == ["rate_limit"]
    # Another provider's task is not held behind them: it goes at once, to a free worker.
    fast = llm(sim, "fast")
    assert fast.id in dispatched(sim) and fast.waiting is None
    # Not a moment before the window lets them in; the moment it does, both go.
    sim.tick(WINDOW - 0.01)
    assert slow[2].state is State.QUEUED and slow[3].state is State.QUEUED
    fx = sim.tick(0.01 + 2 * EPSILON)
    assert {t["id"] for _, t in runs(fx)} == {slow[2].id, slow[3].id}


def test_the_concurrency_limit_frees_when_a_call_ends():
    sim = sim_with(concurrent=1)
    first, second = llm(sim, "slow"), llm(sim, "slow")
    assert first.state is State.DISPATCHED and second.waiting == "rate_limit"
    assert second.waiting_detail["check"] == "concurrent"
    assert second.waiting_detail["eta"] is None  # only a running call's end frees it
    sim.finish(first.worker, first)
    fx = sim.tick(0.0)
    assert [t["id"] for _, t in runs(fx)] == [second.id]


def test_a_429_shrinks_the_provider_and_pauses_it_for_its_retry_after():
    sim = sim_with(requests_per_window=8)
    task = llm(sim, "slow")
    fx = sim.finish(task.worker, task, ok=False, result=None,
                    error={"category": "rate_limited", "message": "429",
                           "retry_after": 3.0})
    throttled = events(fx, "provider.throttled")
    assert throttled and throttled[0][1]["factor"] == 0.5
    assert throttled[0][1]["allowed"]["requests"] == 4
    assert task.error["retry_after"] == 3.0  # kept with the task
    later = llm(sim, "slow")
    assert later.waiting == "rate_limit" and later.waiting_detail["check"] == "paused"
    assert later.waiting_detail["wait_s"] == pytest.approx(3.0, abs=0.01)
    fx = sim.tick(3.0 + 2 * EPSILON)
    assert [t["id"] for _, t in runs(fx)] == [later.id]


def test_a_success_that_met_429s_shrinks_the_provider_too():
    sim = sim_with(requests_per_window=8)
    task = llm(sim, "slow")
    fx = sim.finish(task.worker, task, result={"content": "hi", "throttled": 2,
                                               "provider": "slow", "retry_after": 0.5})
    assert events(fx, "provider.throttled")[0][1]["retry_after"] is None  # waited out
    assert sim.state.limits.status(sim.now.wall)["slow"]["factor"] == 0.5


def test_a_refused_reservation_gives_the_slot_back():
    sim = sim_with(requests_per_window=1)
    task = llm(sim, "slow", tokens=100)
    (corr, _), = ledger_requests(sim.effects[-1], "ledger.reserve")
    assert sim.state.limits.status(sim.now.wall)["slow"]["requests"] == 1
    # A windowed budget: the task waits for its reset (one with no window would fail it).
    sim.ledger(corr, ok=True, granted=False, scope="global", limit=10, available=0,
               requested=100, next_reset=sim.now.wall + 60)
    assert task.waiting == "tokens"
    assert sim.state.limits.status(sim.now.wall)["slow"]["requests"] == 0
    other = llm(sim, "slow")  # the slot the refused task took is free again
    assert other.state is State.DISPATCHED


def test_more_tokens_than_a_whole_window_is_refused_at_submit():
    sim = sim_with(tokens_per_window=1000)
    kind, body = answer(sim.submit(type="llm", tokens=1001, payload={"provider": "slow"}))
    assert kind == wire.ERROR and body["code"] == "rejected"
    assert "1000 tokens per 2 s" in body["message"]


def test_the_windows_survive_a_journal_replay_and_a_snapshot():
    sim = sim_with(requests_per_window=2, tokens_per_window=5000)
    tasks = [llm(sim, "slow", tokens=0) for _ in range(3)]
    sim.finish(tasks[0].worker, tasks[0], ok=False, result=None,
               error={"category": "rate_limited", "message": "429", "retry_after": 1.0})
    live = windows(sim.state, sim.now.wall)
    assert live["slow"]["factor"] == 0.5 and live["slow"]["requests"] == 2

    replayed = new_state(requests_per_window=2, tokens_per_window=5000)
    for record in sim.records:
        replayed.apply(record)
    assert windows(replayed, sim.now.wall) == live
    assert replayed.limits.taken == sim.state.limits.taken == {
        tasks[1].id: ("slow", f"{tasks[1].id}/1")}

    snapped = new_state(requests_per_window=2, tokens_per_window=5000)
    snapped.load_snapshot(journal_copy(sim.state.snapshot()))
    assert windows(snapped, sim.now.wall) == live
    assert snapped.limits.taken == sim.state.limits.taken


def test_a_slot_held_for_a_task_that_ended_is_given_back_at_restore():
    sim = sim_with(requests_per_window=2)
    task = llm(sim, "slow")
    take = [r for r in sim.records if r["k"] == "rate"]
    fresh = new_state(requests_per_window=2)
    for record in sim.records:
        fresh.apply(record)
    fresh.tasks[task.id].state = State.CANCELLED  # its end's record was lost
    fresh.restore(sim.now)
    assert take and fresh.limits.taken == {}
    assert fresh.limits.status(sim.now.wall)["slow"]["running"] == 0


def test_tasks_of_no_provider_are_never_held():
    state = new_state(requests_per_window=1)
    fx = Effects()
    state.worker_ready(fx, "w1", {"types": ["echo"], "pid": 1}, Sim().now)
    assert state.limits.provider_of(type("T", (), {"type": "echo", "payload": None})) is None
    assert state.limits.provider_of(type("T", (), {"type": "llm", "payload": None})) is None
    assert state.limits.provider_of(type("T", (), {"type": "agent",
                                                  "payload": {"provider": "slow"}})) == "slow"
