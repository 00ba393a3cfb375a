"""The scheduler's side of leases (services/scheduler/leases.py), on its pure state: a
lease asked and journaled, tasks carved from it and dispatched with no round trip, carves
and settles batched, the lease returned once idle and every order confirmed, and a
restart that re-sends the carves before returning the leases it finds in its journal."""

from __future__ import annotations

from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.feasibility import ResourceMonitor
from cortex.services.scheduler.leases import GATHER, LEASE_IDLE, LEASE_TASKS
from cortex.services.scheduler.tasks import State

from .test_scheduling import IDLE_MACHINE, Sim, ledger_requests, replay, runs


def lease_sim() -> Sim:
    return Sim(lease=True)


def granted_lease(sim: Sim, tokens: int = 10) -> str:
    """A first task goes the per-task way while its key's lease is asked; grant both."""
    first = sim.add(tokens=tokens)
    fx = sim.ready("w0")
    (lease_corr, lease), = ledger_requests(fx, "ledger.lease")
    (reserve_corr, _), = ledger_requests(fx, "ledger.reserve")
    assert lease["amount"] == tokens * LEASE_TASKS
    assert {"k": "lease", "id": lease["lease"], "type": "echo", "agent": "client-1"} \
        in fx.records  # journaled in the turn that asks
    sim.ledger(lease_corr, granted=True, lease=lease["lease"], amount=lease["amount"])
    sim.ledger(reserve_corr, granted=True)
    assert first.state is State.DISPATCHED and first.lease is None
    return lease["lease"]


def flush(sim: Sim, dt: float = GATHER) -> Effects:
    sim.now += dt
    fx = sim.tick()
    return fx


def test_a_task_carved_from_a_lease_runs_with_no_ledger_round_trip():
    sim = lease_sim()
    lease_id = granted_lease(sim)
    task = sim.add(tokens=10)
    fx = sim.ready("w1")
    assert ledger_requests(fx) == []  # no reserve: dispatched in the same turn
    (worker, run), = runs(fx)
    assert worker == "w1" and run["id"] == task.id and run["lease"] == lease_id
    assert task.reserved == 10 and task.lease == lease_id
    assert {"k": "set", "id": task.id, "reserved": 10, "lease": lease_id} in fx.records
    # The carve reaches the ledger in the next batch.
    (corr, body), = ledger_requests(flush(sim))
    assert body == {"op": "ledger.assign", "items": [{
        "task": task.id, "attempt": 1, "amount": 10, "lease": lease_id, "type": "echo",
        "agent": "client-1"}]}
    sim.ledger(corr, results=[{"ok": True}])
    assert sim.state.leases.held[lease_id].orders == 0


def test_settles_batch_and_carry_their_lease_then_the_idle_lease_goes_back():
    sim = lease_sim()
    lease_id = granted_lease(sim)
    a, b = sim.add(tokens=10), sim.add(tokens=10)
    sim.ready("w1")
    sim.ready("w2")
    sim.finish("w1", a, tokens_used=7)
    sim.finish("w2", b, tokens_used=0)
    (corr, body), = ledger_requests(flush(sim))
    assert body["op"] == "ledger.settle" and len(body["items"]) == 2
    assert [(o["op"], o["task"], o.get("lease"), o.get("amount")) for o in body["orders"]] == [
        ("ledger.commit", a.id, lease_id, 10), ("ledger.release", b.id, lease_id, 10)]
    assert a.settle and b.settle and a.lease is None
    # Not returned while its orders are unconfirmed, however idle.
    assert ledger_requests(flush(sim, LEASE_IDLE + 1), "ledger.return") == []
    sim.ledger(corr, results=[{"ok": True, "released": 3}, {"ok": True, "released": 10}],
               assigned=[{"ok": True}, {"ok": True}])
    assert a.settle == {} and b.settle == {}
    (corr, ret), = ledger_requests(flush(sim, LEASE_IDLE + 1), "ledger.return")
    assert ret == {"op": "ledger.return", "lease": lease_id}
    fx = sim.ledger(corr, lease=lease_id, returned=140)
    assert {"k": "lease", "id": lease_id, "gone": True} in fx.records
    assert sim.state.leases.held == {}
    assert replay(sim.records, overrides={"lease": True}).leases.held == {}


def test_a_refused_lease_leaves_the_per_task_path_as_it_was():
    sim = lease_sim()
    task = sim.add(tokens=10)
    fx = sim.ready("w0")
    (lease_corr, lease), = ledger_requests(fx, "ledger.lease")
    (reserve_corr, _), = ledger_requests(fx, "ledger.reserve")
    fx = sim.ledger(lease_corr, ok=True, granted=False, reason="near the limit")
    assert {"k": "lease", "id": lease["lease"], "gone": True} in fx.records
    sim.ledger(reserve_corr, granted=True)
    assert task.state is State.DISPATCHED and task.lease is None
    other = sim.add(tokens=10)
    fx = sim.ready("w1")
    assert [b["op"] for _, b in ledger_requests(fx)] == ["ledger.reserve"]  # no new ask yet
    assert other.state is State.QUEUED


def test_after_a_restart_carves_are_resent_before_the_leases_go_back():
    sim = lease_sim()
    lease_id = granted_lease(sim)
    task = sim.add(tokens=10)
    sim.ready("w1")  # carved and dispatched; the assign never left before the "crash"
    fresh = replay(sim.records, overrides={"lease": True})
    fresh.monitor = ResourceMonitor(sample=lambda: IDLE_MACHINE)
    fresh.restore(sim.now)
    assert fresh.leases.held[lease_id].retiring
    fx = Effects()
    fresh.tick(fx, sim.now, 5.0)
    (corr, body), = ledger_requests(fx)
    assert body["op"] == "ledger.assign" and body["items"][0]["task"] == task.id
    fx = Effects()
    fresh.ledger_reply(fx, corr, True, {"results": [{"ok": True}]}, sim.now)
    fx = Effects()
    fresh.tick(fx, sim.now + 1, 5.0)
    assert [b for _, b in ledger_requests(fx)] == [{"op": "ledger.return", "lease": lease_id}]


def test_ledger_orders_counts_what_the_ledger_has_not_answered():
    """`scheduler.status` `ledger_orders`: a task's carve and settle count from the turn
    that makes them (gathered) until the ledger answers them; at 0 its totals are final."""
    sim = lease_sim()
    granted_lease(sim)
    assert sim.state.ledger_orders() == 0
    task = sim.add(tokens=10)
    sim.ready("w1")
    sim.finish("w1", task, tokens_used=7)
    assert sim.state.ledger_orders() == 2  # its carve and its settle, gathered
    (corr, _), = ledger_requests(flush(sim))
    assert sim.state.ledger_orders() == 1  # one batch on its way
    sim.ledger(corr, results=[{"ok": True, "released": 3}], assigned=[{"ok": True}])
    assert sim.state.ledger_orders() == 0
    # The per-task path: the reservation, then the commit, each until answered.
    sim = Sim(lease=False)
    task = sim.add(tokens=10)
    (corr, _), = ledger_requests(sim.ready("w0"), "ledger.reserve")
    assert sim.state.ledger_orders() == 1
    sim.ledger(corr, granted=True)
    assert sim.state.ledger_orders() == 0
    (corr, _), = ledger_requests(sim.finish("w0", task, tokens_used=4), "ledger.commit")
    assert sim.state.ledger_orders() == 1
    sim.ledger(corr, committed=4, released=6)
    assert sim.state.ledger_orders() == 0


def test_a_batch_the_ledger_failed_on_is_sent_again_not_forgotten():
    sim = lease_sim()
    granted_lease(sim)
    task = sim.add(tokens=10)
    sim.ready("w1")
    sim.finish("w1", task, tokens_used=4)
    (corr, body), = ledger_requests(flush(sim))
    sim.ledger(corr, ok=False, code="internal", message="ledger failed on ledger.settle")
    assert task.settle  # still owed
    fx = flush(sim, 1.5)  # past the re-send delay
    assert [(c, b) for c, b in ledger_requests(fx)] == [(corr, body)]


def test_a_lease_the_ledger_took_back_is_carved_from_no_more():
    sim = lease_sim()
    lease_id = granted_lease(sim)
    task = sim.add(tokens=10)
    sim.ready("w1")  # carved
    (corr, body), = ledger_requests(flush(sim))
    # A client's reservation took the lease's rest back; the carve became its own
    # reservation (leases.py in the ledger); the reply says the lease is closed.
    sim.ledger(corr, results=[{"ok": True}], closed=[lease_id])
    lease = sim.state.leases.held[lease_id]
    assert lease.left == 0 and sim.state.leases.reclaimed == 1
    assert task.lease == lease_id and task.reserved == 10  # its carve stands
    other = sim.add(tokens=10)
    fx = sim.ready("w2")
    # Per-task for that key a while: no carve, no new lease asked yet.
    assert [b["op"] for _, b in ledger_requests(fx)] == ["ledger.reserve"]
    assert other.state is State.QUEUED and other.lease is None
    # Returned like a replaced lease (the ledger answers 0), then forgotten.
    (corr, ret), = ledger_requests(flush(sim, 1.0), "ledger.return")
    assert ret == {"op": "ledger.return", "lease": lease_id}
    fx = sim.ledger(corr, lease=lease_id, returned=0)
    assert {"k": "lease", "id": lease_id, "gone": True} in fx.records
