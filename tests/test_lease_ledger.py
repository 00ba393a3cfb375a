"""Leases on the ledger's state (services/ledger/leases.py): grant, assign, settle, return,
reclaim for a direct reservation, idempotent re-sends, replay, and the budgets' invariant
after every step."""

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cortex.services.ledger.leases import LeaseLedger

T0 = 1_700_000_000.0
BUDGETS = {"global": {"limit": 1000}, "type:llm": {"limit": 600}, "agent:a1": {"limit": 400}}


def ledger() -> LeaseLedger:
    return LeaseLedger(json.loads(json.dumps(BUDGETS)), now=T0)


def row(state, scope: str) -> dict:
    return next(r for r in state.status(state.clock) if r["scope"] == scope)


def replayed(records: list[dict]) -> LeaseLedger:
    fresh = ledger()
    for record in records:
        fresh.apply_journal(record)
    return fresh


def check_invariant(state) -> None:
    for r in state.status(state.clock):
        if r["limit"] is not None:
            assert r["committed"] - r["overrun"] + r["reserved"] + r["leased"] <= r["limit"], r
            assert r["available"] == max(0, r["limit"] - r["committed"] - r["reserved"]
                                         - r["leased"]), r
        assert r["reserved"] >= 0
        # leased is exactly the unassigned rest of the open leases touching the scope
        assert r["leased"] == sum(x["granted"] - x["assigned"] for x in state.leases()
                                  if r["scope"] in x["scopes"]), r


def test_lease_is_leased_in_every_scope_apart_from_reserved_and_idempotent():
    s = ledger()
    out = s.lease("L1", 100, "llm", "a1", now=T0)
    assert out.ok and out.reply["amount"] == 100
    assert out.reply["scopes"] == ["global", "type:llm", "agent:a1"]
    for scope in ("global", "type:llm", "agent:a1"):
        assert (row(s, scope)["leased"], row(s, scope)["reserved"]) == (100, 0)
    assert row(s, "agent:a1")["available"] == 300
    again = s.lease("L1", 100, "llm", "a1", now=T0)
    assert again.ok and again.journal is None and again.reply == out.reply
    assert row(s, "global")["leased"] == 100
    assert s.leases() == [{"lease": "L1", "scopes": ["global", "type:llm", "agent:a1"],
                           "granted": 100, "assigned": 0, "returned": False}]


def test_lease_refused_past_half_of_what_a_scope_has_left():
    s = ledger()
    out = s.lease("L1", 201, "llm", "a1", now=T0)  # agent:a1 has 400 left
    assert not out.ok and out.code == "budget_exceeded" and out.reply["scope"] == "agent:a1"
    assert out.journal is None and row(s, "global")["leased"] == 0
    assert s.lease("L1", 200, "llm", "a1", now=T0).ok  # asked afresh: decided afresh


def test_assign_moves_tokens_from_lease_to_task_without_changing_totals():
    s = ledger()
    s.lease("L1", 100, "llm", "a1", now=T0)
    out = s.assign("t1", 1, 30, "L1", now=T0)
    assert out.ok and out.reply["reserved"] == 30
    assert [n for n, _ in out.events] == ["ledger.reserved"]
    assert (row(s, "type:llm")["reserved"], row(s, "type:llm")["leased"]) == (30, 70)
    assert row(s, "type:llm")["available"] == 500
    assert s.reservation("t1")["reserved"] == 30
    assert s.assign("t1", 1, 30, "L1", now=T0).journal is None  # a re-send: same answer
    assert s.leases()[0]["assigned"] == 30
    assert s.extend("t1", 1, 10, now=T0).ok  # a carved reservation extends like any
    commit = s.settle({"op": "commit", "task": "t1", "attempt": 1, "used": 25}, now=T0)
    assert [o.ok for o in commit] == [True]
    assert row(s, "global")["committed"] == 25
    assert row(s, "global")["reserved"] == 0
    assert row(s, "global")["leased"] == 70  # the lease's unassigned rest
    returned = s.return_lease("L1", now=T0)
    assert returned.reply == {"lease": "L1", "returned": 70}
    assert row(s, "global")["leased"] == 0 and row(s, "agent:a1")["leased"] == 0
    assert s.return_lease("L1", now=T0).journal is None  # idempotent
    check_invariant(s)


def test_settle_assigns_first_when_the_assign_is_behind():
    s = ledger()
    s.lease("L1", 100, "llm", None, now=T0)
    outcomes = s.settle({"op": "release", "task": "t1", "attempt": 1, "lease": "L1",
                         "amount": 40}, now=T0)
    assert [o.journal["op"] for o in outcomes] == ["assign", "release"]
    assert (row(s, "global")["reserved"], row(s, "global")["leased"]) == (0, 60)
    late = s.assign("t1", 1, 40, "L1", now=T0)  # the assign arriving after: a no-op
    assert late.ok and late.journal is None and row(s, "global")["leased"] == 60


def test_an_extend_naming_its_lease_assigns_first_when_the_assign_is_behind():
    s = ledger()
    s.lease("L1", 100, "llm", None, now=T0)
    first, extended = s.extend_carved("t1", 1, 15, T0, 1, "L1", 30)
    assert (first.journal["op"], extended.journal["op"]) == ("assign", "extend")
    assert extended.reply["reserved"] == 45
    assert (row(s, "global")["reserved"], row(s, "global")["leased"]) == (45, 70)
    (again,) = s.extend_carved("t1", 1, 15, T0, 1, "L1", 30)  # a re-send: same answer
    assert again.journal is None and again.reply == extended.reply
    assert s.assign("t1", 1, 30, "L1", now=T0).journal is None  # the assign, late: no-op
    check_invariant(s)


def test_assign_past_a_returned_lease_is_an_ordinary_reservation():
    s = ledger()
    s.lease("L1", 100, "llm", None, now=T0)
    s.return_lease("L1", now=T0)
    out = s.assign("t1", 1, 30, "L1", now=T0, task_type="llm")
    assert out.ok and out.journal["op"] == "reserve"
    assert row(s, "type:llm")["reserved"] == 30


def test_a_lease_request_arriving_after_its_return_grants_nothing():
    s = ledger()
    assert s.return_lease("L9", now=T0).reply == {"lease": "L9", "returned": 0}
    late = s.lease("L9", 50, None, None, now=T0)
    assert late.ok and late.reply["granted"] is False and late.journal is None
    assert row(s, "global")["reserved"] == 0


def test_replay_and_snapshot_reproduce_the_live_state():
    s = ledger()
    records = []

    def keep(outcome):
        if outcome.journal is not None:
            records.append(outcome.journal)

    keep(s.lease("L1", 100, "llm", "a1", now=T0))
    keep(s.assign("t1", 1, 30, "L1", now=T0 + 1))
    for o in s.settle({"op": "commit", "task": "t2", "attempt": 1, "used": 50,
                       "lease": "L1", "amount": 20}, now=T0 + 2):
        keep(o)
    keep(s.return_lease("L1", now=T0 + 3))
    assert replayed(records).snapshot() == s.snapshot()
    assert LeaseLedger.from_snapshot(s.snapshot()).snapshot() == s.snapshot()


def test_a_direct_reserve_takes_back_an_idle_lease_it_would_be_refused_for():
    s = ledger()
    leased = s.lease("L1", 400, None, None, now=T0)  # global: 600 left
    *reclaimed, out = s.reserve_reclaiming("c1", 1, 700, now=T0 + 1)
    assert out.ok and out.reply["reserved"] == 700
    assert [o.journal["op"] for o in reclaimed] == ["reclaim"]
    assert reclaimed[0].journal["amount"] == 400 and reclaimed[0].journal["task_id"] == "c1"
    assert [n for n, _ in reclaimed[0].events] == ["ledger.lease_reclaimed"]
    assert (row(s, "global")["reserved"], row(s, "global")["leased"]) == (700, 0)
    assert s.leases() == [] and s.closed(["L1", "L1", "L9"]) == ["L1"]
    # A carve on its way from the lease: an ordinary reservation, on the budget left.
    late = s.assign("t1", 1, 30, "L1", now=T0 + 2)
    assert late.ok and late.journal["op"] == "reserve"
    again = s.return_lease("L1", now=T0 + 3)  # the scheduler's, as for a replaced lease
    assert again.reply == {"lease": "L1", "returned": 0} and again.journal is None
    assert s.lease("L1", 10, None, None, now=T0 + 3).reply["granted"] is False
    check_invariant(s)
    records = [o.journal for o in (leased, *reclaimed, out, late)]
    assert replayed(records).snapshot() == s.snapshot() | {"clock": T0 + 2}


def test_a_direct_reserve_takes_back_only_the_unassigned_rest_of_a_part_used_lease():
    s = ledger()
    s.lease("L1", 400, None, None, now=T0)
    s.assign("t1", 1, 100, "L1", now=T0)
    *reclaimed, out = s.reserve_reclaiming("c1", 1, 700, now=T0)
    assert out.ok and [o.journal["amount"] for o in reclaimed] == [300]
    assert (row(s, "global")["reserved"], row(s, "global")["leased"]) == (800, 0)
    assert s.reservation("t1")["reserved"] == 100  # the carved task keeps its tokens
    check_invariant(s)


def test_no_lease_is_taken_back_when_that_would_not_be_enough_or_is_not_needed():
    s = ledger()
    s.lease("L1", 400, None, None, now=T0)
    *reclaimed, out = s.reserve_reclaiming("c1", 1, 1001, now=T0)
    assert not out.ok and out.code == "budget_exceeded" and reclaimed == []
    assert row(s, "global")["leased"] == 400
    *reclaimed, out = s.reserve_reclaiming("c2", 1, 600, now=T0)  # it fits beside the lease
    assert out.ok and reclaimed == [] and row(s, "global")["leased"] == 400
    # agent:a1 blocks and no lease touches it: the lease on type:llm alone stays.
    s2 = ledger()
    s2.lease("L2", 200, "llm", None, now=T0)
    *reclaimed, out = s2.reserve_reclaiming("c3", 1, 500, agent="a1", now=T0)
    assert not out.ok and out.reply["scope"] == "agent:a1" and reclaimed == []
    *reclaimed, out = s2.reserve_reclaiming("c3", 1, 300, "llm", "a1", now=T0)
    assert out.ok and reclaimed == []  # 600 - 200 leaves 400 in type:llm
    *reclaimed, out = s2.reserve_reclaiming("c4", 1, 300, "llm", None, now=T0)
    assert out.ok and [o.journal["lease"] for o in reclaimed] == ["L2"]
    check_invariant(s2)


def test_an_extension_takes_back_a_lease_standing_in_its_way():
    s = ledger()
    s.lease("L1", 300, None, None, now=T0)
    s.lease("L2", 200, None, None, now=T0)
    assert s.reserve("c1", 1, 300, now=T0).ok
    *reclaimed, out = s.extend_carved("c1", 1, 500, T0, 1, None, 0)
    assert out.ok and out.reply["reserved"] == 800
    assert [o.journal["lease"] for o in reclaimed] == ["L1"]  # oldest first, as needed
    *reclaimed, out = s.extend_carved("c1", 1, 500, T0, 1, None, 0)  # a re-send
    assert out.ok and reclaimed == [] and out.journal is None
    *reclaimed, out = s.extend_carved("c1", 1, 200, T0, 2, None, 0)
    assert out.ok and [o.journal["lease"] for o in reclaimed] == ["L2"]
    check_invariant(s)


def test_a_snapshot_that_counted_a_lease_as_reserved_is_read_as_leased():
    s = ledger()
    s.lease("L1", 100, "llm", None, now=T0)
    s.assign("t1", 1, 30, "L1", now=T0)
    old = json.loads(json.dumps(s.snapshot()))
    for b in old["budgets"].values():
        b["reserved"] += b.pop("leased")
    assert LeaseLedger.from_snapshot(old).snapshot() == s.snapshot()


KEYS = st.sampled_from([("llm", "a1"), ("llm", None), (None, "a1"), (None, None)])


@settings(max_examples=60, stateful_step_count=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
class LeaseMachine(RuleBasedStateMachine):
    """Random leases, carves, settles, returns and re-sends: the invariant holds after
    every step, replay equals the live state, and once everything is settled and returned
    nothing is reserved."""

    def __init__(self):
        super().__init__()
        self.s = ledger()
        self.records: list[dict] = []
        self.leases: dict[str, list] = {}  # id -> [left as the scheduler sees it, key]
        self.carved: dict[tuple, tuple] = {}  # (task, attempt) -> (amount, lease)
        self.direct: list[tuple] = []  # reservations made outside leases
        self.used_total = 0
        self.n = 0

    def keep(self, *outcomes):
        for o in outcomes:
            if o.journal is not None:
                self.records.append(o.journal)

    @rule(amount=st.integers(0, 300), key=KEYS)
    def lease(self, amount, key):
        self.n += 1
        lease_id = f"L{self.n}"
        out = self.s.lease(lease_id, amount, *key, now=T0)
        self.keep(out)
        if out.ok:
            self.leases[lease_id] = [amount, key]

    @rule(data=st.data())
    def carve_and_assign(self, data):
        open_ = [k for k, v in self.leases.items() if v[0] > 0]
        if not open_:
            return
        lease_id = data.draw(st.sampled_from(open_))
        amount = data.draw(st.integers(1, self.leases[lease_id][0]))
        self.leases[lease_id][0] -= amount
        self.n += 1
        task = (f"t{self.n}", 1)
        self.carved[task] = (amount, lease_id)
        if data.draw(st.booleans()):  # the assign may still be on its way at the settle
            self.keep(self.s.assign(*task, amount, lease_id, now=T0))

    @rule(data=st.data())
    def settle(self, data):
        if not self.carved:
            return
        task = data.draw(st.sampled_from(sorted(self.carved)))
        amount, lease_id = self.carved.pop(task)
        used = data.draw(st.integers(0, amount))
        order = {"op": "commit" if used else "release", "task": task[0],
                 "attempt": task[1], "used": used, "lease": lease_id, "amount": amount}
        self.keep(*self.s.settle(order, now=T0))
        again = self.s.settle(order, now=T0)  # a re-send changes nothing
        assert all(o.journal is None for o in again)
        self.used_total += used

    @rule(amount=st.integers(1, 700), key=KEYS)
    def direct_reserve(self, amount, key):
        # Not the scheduler: leases in its way are taken back, whatever was carved from
        # them on its way (the machine keeps carving from them: it has not learned).
        self.n += 1
        outcomes = self.s.reserve_reclaiming(f"d{self.n}", 1, amount, *key, now=T0)
        self.keep(*outcomes)
        if outcomes[-1].ok:
            self.direct.append((f"d{self.n}", amount))
        else:
            assert all(o.journal is None for o in outcomes)  # nothing taken for nothing

    @rule(data=st.data())
    def give_back(self, data):
        # A lease goes back only once every task carved from it has been assigned.
        pending = {lease for _, lease in self.carved.values()}
        idle = [k for k in self.leases if k not in pending]
        for task, (amount, lease_id) in list(self.carved.items()):
            self.keep(self.s.assign(*task, amount, lease_id, now=T0))
        if idle:
            lease_id = data.draw(st.sampled_from(idle))
            self.keep(self.s.return_lease(lease_id, now=T0))
            del self.leases[lease_id]

    @invariant()
    def budgets_hold(self):
        check_invariant(self.s)

    @invariant()
    def replay_matches(self):
        assert replayed(self.records).snapshot() == self.s.snapshot()

    def teardown(self):
        for task_id, amount in self.direct:
            self.keep(self.s.commit(task_id, 1, amount // 2, now=T0))
            self.used_total += amount // 2
        for task, (amount, lease_id) in list(self.carved.items()):
            self.keep(*self.s.settle({"op": "release", "task": task[0], "attempt": task[1],
                                      "lease": lease_id, "amount": amount}, now=T0))
        for lease_id in list(self.leases):
            self.keep(self.s.return_lease(lease_id, now=T0))
        for r in self.s.status(self.s.clock):
            assert r["reserved"] == 0 and r["leased"] == 0, r
        assert row(self.s, "global")["committed"] == self.used_total
        check_invariant(self.s)


TestLeaseMachine = LeaseMachine.TestCase
