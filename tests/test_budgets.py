"""Token ledger state logic (services/budgets.py): operations, edges, windows, replay."""

import json
import math

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cortex.services.ledger.budgets import DAY, LedgerState

T0 = 19_700 * DAY + 86_000.0  # 400 s before a UTC midnight
BUDGETS = {
    "global": {"limit": 1000, "window": None},
    "type:llm": {"limit": 500, "window": "daily"},
    "agent:a1": {"limit": 300, "window": "rolling:60"},
}


def ledger(budgets=BUDGETS, **kw) -> LedgerState:
    return LedgerState(json.loads(json.dumps(budgets)), now=T0, **kw)


def numbers(state: LedgerState, scope: str) -> dict:
    return next(row for row in state.status(state.clock) if row["scope"] == scope)


def event_names(outcome) -> list[str]:
    return [name for name, _ in outcome.events]


def assert_unchanged(state: LedgerState, before: dict, outcome, code: str) -> None:
    assert (outcome.ok, outcome.code, outcome.journal) == (False, code, None)
    assert state.snapshot() == before


# -- reserve -------------------------------------------------------------------------------


def test_reserve_grants_and_counts_in_every_applicable_scope():
    s = ledger()
    out = s.reserve("t1", 1, 200, "llm", "a1", now=T0)
    assert out.ok and out.code is None
    assert out.reply == {"granted": True, "task_id": "t1", "attempt": 1, "reserved": 200,
                         "scopes": ["global", "type:llm", "agent:a1"]}
    assert out.journal["op"] == "reserve" and out.journal["lsn"] == 1
    assert event_names(out) == ["ledger.reserved"]
    for scope in ("global", "type:llm", "agent:a1"):
        assert numbers(s, scope)["reserved"] == 200
    assert numbers(s, "global")["available"] == 800


def test_reserve_ignores_scopes_that_do_not_exist():
    s = ledger()
    out = s.reserve("t1", 1, 400, "embed", "nobody", now=T0)
    assert out.ok and out.reply["scopes"] == ["global"]
    assert numbers(s, "type:llm")["reserved"] == 0


def test_reserve_refused_when_agent_budget_full_changes_nothing():
    s = ledger()
    s.reserve("t1", 1, 250, "llm", "a1", now=T0)
    before = s.snapshot()
    out = s.reserve("t2", 1, 100, "llm", "a1", now=T0)
    assert_unchanged(s, before, out, "budget_exceeded")
    assert out.reply["granted"] is False
    assert (out.reply["scope"], out.reply["requested"], out.reply["available"]) == ("agent:a1", 100,
                                                                                   50)
    assert event_names(out) == ["ledger.refused"]


def test_reserve_refused_when_global_full_names_global_first():
    s = ledger()
    out = s.reserve("t1", 1, 1001, "llm", "a1", now=T0)
    assert out.code == "budget_exceeded" and out.reply["scope"] == "global"


def test_reserve_exactly_to_the_limit_is_granted():
    s = ledger()
    assert s.reserve("t1", 1, 300, "llm", "a1", now=T0).ok
    assert numbers(s, "agent:a1")["available"] == 0
    assert s.reserve("t2", 1, 0, "llm", "a1", now=T0).ok  # zero always fits


def test_reserve_replay_returns_original_outcome_without_double_counting():
    s = ledger()
    first = s.reserve("t1", 1, 200, "llm", now=T0)
    before = s.snapshot()
    again = s.reserve("t1", 1, 999, "other", "a1", now=T0)  # a retry, even with other args
    assert again.reply == first.reply and again.ok and again.journal is None
    assert again.events == [] and s.snapshot() == before


def test_refused_reserve_is_not_remembered_so_a_retry_can_succeed_later():
    s = ledger()
    s.reserve("t1", 1, 300, "llm", "a1", now=T0)
    assert not s.reserve("t2", 1, 100, "llm", "a1", now=T0).ok
    s.release("t1", 1, T0)
    assert s.reserve("t2", 1, 100, "llm", "a1", now=T0).ok


def test_reserve_for_new_attempt_is_a_new_reservation():
    s = ledger()
    s.reserve("t1", 1, 100, now=T0)
    assert s.reserve("t1", 2, 100, now=T0).journal is not None
    assert numbers(s, "global")["reserved"] == 200


def test_unlimited_budget_never_refuses():
    s = LedgerState(now=T0)  # global only, no limit
    assert s.reserve("t1", 1, 2**63 - 1, now=T0).ok
    assert s.reserve("t2", 1, 2**63 - 1, now=T0).ok
    assert numbers(s, "global")["available"] is None


def test_reserve_after_commit_without_reservation_is_bad_request():
    s = ledger()
    s.commit("t1", 1, 10, T0)
    before = s.snapshot()
    assert_unchanged(s, before, s.reserve("t1", 1, 10, now=T0), "bad_request")


# -- extend --------------------------------------------------------------------------------


def test_extend_grows_reservation_in_every_scope():
    s = ledger()
    s.reserve("t1", 1, 100, "llm", "a1", now=T0)
    out = s.extend("t1", 1, 50, T0)
    assert out.ok and out.reply["reserved"] == 150 and event_names(out) == ["ledger.extended"]
    out2 = s.extend("t1", 1, 25, T0, seq=2)
    assert out2.reply["reserved"] == 175
    for scope in ("global", "type:llm", "agent:a1"):
        assert numbers(s, scope)["reserved"] == 175


def test_extend_refused_when_any_scope_full_changes_nothing():
    s = ledger()
    s.reserve("t1", 1, 250, "llm", "a1", now=T0)
    before = s.snapshot()
    out = s.extend("t1", 1, 51, T0)
    assert_unchanged(s, before, out, "budget_exceeded")
    assert out.reply["scope"] == "agent:a1" and out.reply["available"] == 50


def test_extend_replay_with_same_seq_returns_first_answer():
    s = ledger()
    s.reserve("t1", 1, 100, now=T0)
    first = s.extend("t1", 1, 50, T0, seq=1)
    s.extend("t1", 1, 10, T0, seq=2)
    before = s.snapshot()
    again = s.extend("t1", 1, 50, T0, seq=1)
    assert again.reply == first.reply and again.journal is None and s.snapshot() == before


def test_extend_without_open_reservation_is_not_found():
    s = ledger()
    before = s.snapshot()
    assert_unchanged(s, before, s.extend("t1", 1, 10, T0), "not_found")
    s.reserve("t1", 1, 10, now=T0)
    s.commit("t1", 1, 5, T0)
    before = s.snapshot()
    assert_unchanged(s, before, s.extend("t1", 1, 10, T0), "not_found")


# -- commit --------------------------------------------------------------------------------


def test_commit_releases_unused_remainder():
    s = ledger()
    s.reserve("t1", 1, 200, "llm", "a1", now=T0)
    out = s.commit("t1", 1, 120, T0)
    assert out.reply == {"task_id": "t1", "attempt": 1, "committed": 120, "reserved": 200,
                         "released": 80, "overrun": 0}
    assert event_names(out) == ["ledger.committed"]
    row = numbers(s, "agent:a1")
    assert (row["reserved"], row["committed"], row["overrun"]) == (0, 120, 0)


def test_commit_above_reservation_is_committed_and_flagged_overrun():
    s = ledger()
    s.reserve("t1", 1, 200, "llm", "a1", now=T0)
    out = s.commit("t1", 1, 350, T0)
    assert out.ok and out.reply["overrun"] == 150
    assert event_names(out) == ["ledger.committed", "ledger.overrun"]
    assert dict(out.events)["ledger.overrun"]["excess"] == 150
    row = numbers(s, "agent:a1")
    assert (row["committed"], row["overrun"], row["available"]) == (350, 150, 0)
    # The invariant excludes overrun, but overrun still counts against new grants.
    assert row["committed"] - row["overrun"] + row["reserved"] <= row["limit"]
    assert not s.reserve("t2", 1, 1, agent="a1", now=T0).ok


def test_commit_without_reservation_is_all_overrun_in_named_scopes():
    s = ledger()
    out = s.commit("t1", 1, 40, T0, task_type="llm", agent="a1")
    assert out.ok and out.reply["overrun"] == 40 and out.reply["reserved"] == 0
    for scope in ("global", "type:llm", "agent:a1"):
        assert numbers(s, scope)["committed"] == numbers(s, scope)["overrun"] == 40
    assert event_names(s.commit("t2", 1, 0, T0)) == ["ledger.committed"]  # 0 is no overrun


def test_commit_twice_is_noop_returning_first_outcome():
    s = ledger()
    s.reserve("t1", 1, 200, now=T0)
    first = s.commit("t1", 1, 150, T0)
    before = s.snapshot()
    again = s.commit("t1", 1, 999, T0)
    assert again.reply == first.reply and again.journal is None and again.events == []
    assert s.snapshot() == before


def test_late_commit_after_release_counts_once_as_overrun():
    s = ledger()
    s.reserve("t1", 1, 200, "llm", now=T0)
    s.release("t1", 1, T0)
    out = s.commit("t1", 1, 120, T0)
    assert out.ok and out.reply["overrun"] == 120 and out.reply["reserved"] == 0
    assert s.commit("t1", 1, 120, T0).journal is None
    row = numbers(s, "type:llm")
    assert (row["reserved"], row["committed"], row["overrun"]) == (0, 120, 120)


# -- release -------------------------------------------------------------------------------


def test_release_returns_reservation_in_every_scope():
    s = ledger()
    s.reserve("t1", 1, 200, "llm", "a1", now=T0)
    s.extend("t1", 1, 50, T0)
    out = s.release("t1", 1, T0)
    assert out.reply["released"] == 250 and event_names(out) == ["ledger.released"]
    assert all(row["reserved"] == 0 for row in s.status(T0))


def test_release_twice_is_noop_returning_first_outcome():
    s = ledger()
    s.reserve("t1", 1, 200, now=T0)
    first = s.release("t1", 1, T0)
    before = s.snapshot()
    again = s.release("t1", 1, T0)
    assert again.reply == first.reply and again.journal is None and s.snapshot() == before


def test_release_after_commit_is_noop():
    s = ledger()
    s.reserve("t1", 1, 200, now=T0)
    s.commit("t1", 1, 100, T0)
    before = s.snapshot()
    out = s.release("t1", 1, T0)
    assert out.ok and out.journal is None and out.reply["released"] == 0
    assert s.snapshot() == before


def test_release_of_unknown_attempt_is_not_found():
    s = ledger()
    assert_unchanged(s, s.snapshot(), s.release("nope", 1, T0), "not_found")


# -- set_budget ----------------------------------------------------------------------------


def test_set_budget_creates_scope_that_only_new_reservations_count_against():
    s = ledger()
    s.reserve("t1", 1, 100, "embed", now=T0)
    out = s.set_budget("type:embed", 150, None, T0)
    assert out.ok and out.journal["op"] == "set_budget"
    assert event_names(out) == ["ledger.budget_set"]
    assert numbers(s, "type:embed")["reserved"] == 0
    assert s.reserve("t2", 1, 150, "embed", now=T0).ok
    assert not s.reserve("t3", 1, 1, "embed", now=T0).ok
    s.commit("t1", 1, 100, T0)  # settles against the scopes it was granted in
    assert numbers(s, "type:embed")["committed"] == 0


def test_set_budget_lowered_below_usage_refuses_until_usage_drops():
    s = ledger()
    s.reserve("t1", 1, 400, "llm", now=T0)
    out = s.set_budget("type:llm", 100, "daily", T0)
    assert out.ok and out.reply["over_limit"] and "note" in out.reply
    assert not s.reserve("t2", 1, 0, "llm", now=T0).ok  # even zero: usage is above the limit
    assert s.extend("t1", 1, 1, T0).code == "budget_exceeded"
    s.commit("t1", 1, 50, T0)
    assert numbers(s, "type:llm")["over_limit"] is False
    assert s.reserve("t2", 1, 50, "llm", now=T0).ok


def test_set_budget_with_same_values_journals_nothing():
    s = ledger()
    out = s.set_budget("type:llm", 500, "daily", T0)
    assert out.ok and out.journal is None and out.events == []


def test_set_budget_window_change_starts_a_new_window_now_keeping_usage():
    s = ledger()
    s.commit("t1", 1, 100, T0, task_type="llm")
    s.set_budget("type:llm", 500, "rolling:1000", T0 + 10)
    row = numbers(s, "type:llm")
    assert row["committed"] == 100 and row["resets_at"] == _iso(T0 + 1010)


def test_set_budget_unlimited_limit():
    s = ledger()
    assert s.set_budget("agent:a1", None, None, T0).ok
    assert s.reserve("t1", 1, 1000, agent="a1", now=T0).ok


@pytest.mark.parametrize("scope, limit, window", [
    ("", 1, None), ("team:x", 1, None), ("type:", 1, None), (5, 1, None),
    ("global", -1, None), ("global", 1.0, None), ("global", True, None), ("global", 2**63, None),
    ("global", 1, "weekly"), ("global", 1, "rolling:0"), ("global", 1, "rolling:-5"),
    ("global", 1, "rolling:1.5"), ("global", 1, 86400),
])
def test_set_budget_rejects_bad_scope_limit_or_window(scope, limit, window):
    s = ledger()
    assert_unchanged(s, s.snapshot(), s.set_budget(scope, limit, window, T0), "bad_request")


def test_constructor_rejects_bad_config():
    with pytest.raises(ValueError):
        LedgerState({"type:llm": {"limit": -5}}, now=T0)


# -- numbers from the wire -----------------------------------------------------------------

BAD_AMOUNTS = [True, False, 1.0, 1.5, math.nan, math.inf, -math.inf, -1, 2**63, "5", None, [1]]


@pytest.mark.parametrize("bad", BAD_AMOUNTS, ids=repr)
@pytest.mark.parametrize("op", ["reserve", "extend", "commit"])
def test_bad_amount_is_bad_request_and_changes_nothing(op, bad):
    s = ledger()
    s.reserve("t1", 1, 100, "llm", "a1", now=T0)
    before = s.snapshot()
    call = {"reserve": lambda: s.reserve("t2", 1, bad, now=T0),
            "extend": lambda: s.extend("t1", 1, bad, T0),
            "commit": lambda: s.commit("t1", 1, bad, T0)}[op]
    out = call()
    assert_unchanged(s, before, out, "bad_request")
    assert out.events == [] and out.reply["error"] == "bad_request"


@pytest.mark.parametrize("task_id, attempt", [
    ("", 1), (None, 1), (5, 1), ("x" * 1000, 1), ("t1", 0), ("t1", -1), ("t1", True),
    ("t1", 2**31), ("t1", 1.0), ("t1", "1"), ("t1", math.nan),
])
@pytest.mark.parametrize("op", ["reserve", "extend", "commit", "release"])
def test_bad_task_id_or_attempt_is_bad_request_and_changes_nothing(op, task_id, attempt):
    s = ledger()
    s.reserve("t1", 1, 100, now=T0)
    before = s.snapshot()
    call = {"reserve": lambda: s.reserve(task_id, attempt, 10, now=T0),
            "extend": lambda: s.extend(task_id, attempt, 10, T0),
            "commit": lambda: s.commit(task_id, attempt, 10, T0),
            "release": lambda: s.release(task_id, attempt, T0)}[op]
    assert_unchanged(s, before, call(), "bad_request")


@pytest.mark.parametrize("kw", [{"task_type": ""}, {"agent": 3}, {"agent": "a" * 300}])
def test_bad_task_type_or_agent_is_bad_request(kw):
    s = ledger()
    assert_unchanged(s, s.snapshot(), s.reserve("t1", 1, 10, now=T0, **kw), "bad_request")


@pytest.mark.parametrize("seq", [0, -1, True, 1.0, "1", 2**31])
def test_bad_extend_seq_is_bad_request(seq):
    s = ledger()
    s.reserve("t1", 1, 10, now=T0)
    assert_unchanged(s, s.snapshot(), s.extend("t1", 1, 10, T0, seq=seq), "bad_request")


def test_largest_amount_is_accepted():
    s = LedgerState(now=T0)
    assert s.commit("t1", 1, 2**63 - 1, T0).ok


# -- windows -------------------------------------------------------------------------------


def _iso(t):
    from datetime import UTC, datetime
    return datetime.fromtimestamp(t, UTC).isoformat()


def test_daily_window_resets_at_utc_midnight_keeping_reservations():
    s = ledger()
    s.reserve("t1", 1, 100, "llm", now=T0)
    s.reserve("t2", 1, 200, "llm", now=T0)
    s.commit("t2", 1, 250, T0)  # 50 overrun
    midnight = T0 + 400
    assert numbers(s, "type:llm")["resets_at"] == _iso(midnight)
    assert "type:llm" not in [d["scope"] for _, d in s.tick(midnight - 0.001)]
    events = s.tick(midnight)
    reset = [d for name, d in events if name == "ledger.window_reset" and d["scope"] == "type:llm"]
    assert reset and (reset[0]["committed_before"], reset[0]["overrun_before"]) == (250, 50)
    row = numbers(s, "type:llm")
    assert (row["committed"], row["overrun"], row["reserved"]) == (0, 0, 100)
    assert row["resets_at"] == _iso(midnight + DAY)
    assert numbers(s, "global")["committed"] == 250  # no window: never resets


def test_rolling_window_resets_every_n_seconds_from_creation():
    s = ledger()
    s.commit("t1", 1, 100, T0 + 10, agent="a1")
    assert s.tick(T0 + 59.9) == [] and numbers(s, "agent:a1")["committed"] == 100
    assert [d["scope"] for _, d in s.tick(T0 + 60)] == ["agent:a1"]
    s.commit("t2", 1, 70, T0 + 61, agent="a1")
    s.tick(T0 + 60 * 5 + 1)  # several windows skipped at once: one reset, boundary aligned
    row = numbers(s, "agent:a1")
    assert row["committed"] == 0 and row["resets_at"] == _iso(T0 + 360)


def test_window_reset_is_applied_by_any_operation_without_tick():
    s = ledger()
    s.reserve("t1", 1, 300, agent="a1", now=T0)
    s.commit("t1", 1, 300, T0)
    assert not s.reserve("t2", 1, 300, agent="a1", now=T0 + 59).ok
    out = s.reserve("t2", 1, 300, agent="a1", now=T0 + 60)
    assert out.ok and event_names(out) == ["ledger.window_reset", "ledger.reserved"]


def test_clock_stepping_back_is_clamped():
    s = ledger()
    s.tick(T0 + 100)
    out = s.reserve("t1", 1, 10, now=T0)
    assert out.journal["now"] == T0 + 100 and s.clock == T0 + 100


def test_status_shows_pending_reset_without_applying_it():
    s = ledger()
    s.commit("t1", 1, 100, T0, agent="a1")
    before = s.snapshot()
    row = next(r for r in s.status(T0 + 61) if r["scope"] == "agent:a1")
    assert row["committed"] == 0 and s.snapshot() == before
    assert [r["scope"] for r in s.status(T0)] == ["global", "agent:a1", "type:llm"]


# -- memory, snapshot, journal -------------------------------------------------------------


def test_finished_memory_is_bounded_and_evicts_oldest():
    s = ledger(max_finished=3)
    for i in range(10):
        s.reserve(f"t{i}", 1, 1, now=T0)
        s.commit(f"t{i}", 1, 1, T0)
    snap = s.snapshot()
    assert [r["task_id"] for r in snap["finished"]] == ["t7", "t8", "t9"]
    assert s.reservation("t0") is None and s.reservation("t9")["state"] == "committed"
    assert LedgerState.from_snapshot(snap).snapshot() == snap


def test_open_reservations_are_never_evicted():
    s = ledger(max_finished=1)
    s.reserve("open", 1, 5, now=T0)
    for i in range(5):
        s.commit(f"t{i}", 1, 1, T0)
    assert s.reservation("open")["reserved"] == 5


def test_reservation_shows_latest_attempt():
    s = ledger()
    assert s.reservation("t1") is None
    s.reserve("t1", 1, 100, "llm", now=T0)
    s.release("t1", 1, T0)
    s.reserve("t1", 2, 80, "llm", now=T0)
    s.extend("t1", 2, 20, T0)
    assert s.reservation("t1") == {"task_id": "t1", "attempt": 2, "state": "reserved",
                                   "reserved": 100, "granted": 100, "used": None, "overrun": 0,
                                   "scopes": ["global", "type:llm"]}
    s.commit("t1", 2, 130, T0)
    assert s.reservation("t1")["overrun"] == 30


def test_snapshot_is_json_and_round_trips():
    s = ledger()
    s.reserve("t1", 1, 100, "llm", "a1", now=T0)
    s.extend("t1", 1, 5, T0, seq=3)
    s.reserve("t2", 1, 50, now=T0)
    s.commit("t2", 1, 60, T0)
    snap = json.loads(json.dumps(s.snapshot()))
    restored = LedgerState.from_snapshot(snap)
    assert restored.snapshot() == snap
    # Idempotency memory survived: replays are still harmless after the restart.
    assert restored.commit("t2", 1, 60, T0).journal is None
    assert restored.extend("t1", 1, 5, T0, seq=3).journal is None


def test_journal_replay_reproduces_state_and_skips_applied_records():
    s = ledger()
    base = json.loads(json.dumps(s.snapshot()))
    journal = []
    for out in (s.reserve("t1", 1, 100, "llm", "a1", now=T0),
                s.extend("t1", 1, 50, T0 + 1),
                s.set_budget("type:new", 10, "rolling:5", T0 + 2),
                s.commit("t1", 1, 200, T0 + 500),  # after midnight and several rolling windows
                s.reserve("t2", 1, 10, now=T0 + 501),
                s.release("t2", 1, T0 + 502)):
        journal.append(json.loads(json.dumps(out.journal)))
    restored = LedgerState.from_snapshot(base)
    for record in journal + journal:  # the second pass is already applied: skipped
        restored.apply_journal(record)
    assert restored.snapshot() == s.snapshot()


def test_journal_gap_raises():
    s = ledger()
    base = s.snapshot()
    s.reserve("t1", 1, 1, now=T0)
    second = s.reserve("t2", 1, 1, now=T0).journal
    with pytest.raises(ValueError, match="gap"):
        LedgerState.from_snapshot(base).apply_journal(second)


# -- random sequences against a model ------------------------------------------------------

TASKS = st.sampled_from(["t0", "t1", "t2"])
TYPES = st.sampled_from([None, "a", "b", "c"])
AGENTS = st.sampled_from([None, "x", "y", "z"])
SCOPES = st.sampled_from(["global", "type:a", "type:b", "type:c", "agent:x", "agent:y",
                          "agent:z"])
WINDOWS = st.sampled_from([None, "daily", "rolling:100", "rolling:37"])
MACHINE_BUDGETS = {
    "global": {"limit": 3000, "window": None},
    "type:a": {"limit": 1200, "window": "rolling:100"},
    "type:b": {"limit": 800, "window": None},
    "agent:x": {"limit": 900, "window": "daily"},
    "agent:y": {"limit": 700, "window": "rolling:37"},
}


class Model:
    """The ledger written the obvious way: totals per scope since its last reset."""

    def __init__(self, budgets: dict, now: float):
        self.budgets: dict[str, dict] = {}
        self.attempts: dict[tuple, dict] = {}
        for scope, spec in budgets.items():
            self.set_budget(scope, spec["limit"], spec["window"], now)

    def set_budget(self, scope, limit, window, now):
        b = self.budgets.setdefault(scope, {"committed": 0, "overrun": 0, "window": "unset"})
        b["limit"] = limit
        if b["window"] != window:
            if window is None or window == "daily":
                period = window and DAY
            else:
                period = int(window.removeprefix("rolling:"))
            b.update(window=window, period=period, origin=0.0 if window == "daily" else now)
            b["index"] = self.index(b, now)

    @staticmethod
    def index(b, now):
        return None if b["period"] is None else (now - b["origin"]) // b["period"]

    def roll(self, now):
        for b in self.budgets.values():
            if b["period"] is not None and self.index(b, now) > b["index"]:
                b.update(committed=0, overrun=0, index=self.index(b, now))

    @staticmethod
    def is_open(a) -> bool:
        return a["granted"] is not None and not a["released"] and a["used"] is None

    def held(self, a) -> int:
        return a["granted"] + sum(a["extends"].values()) if self.is_open(a) else 0

    def reserved(self, scope) -> int:
        return sum(self.held(a) for a in self.attempts.values() if scope in a["scopes"])

    def fits(self, scopes, amount) -> bool:
        return all(self.budgets[s]["limit"] is None
                   or self.budgets[s]["committed"] + self.reserved(s) + amount
                   <= self.budgets[s]["limit"] for s in scopes)

    def scopes(self, task_type, agent):
        return [s for s in ("global", task_type and f"type:{task_type}", agent and f"agent:{agent}")
                if s in self.budgets]

    def reserve(self, key, amount, task_type, agent) -> str | None:
        """Expected code (None: ok), applying the change."""
        if key in self.attempts:
            return None if self.attempts[key]["granted"] is not None else "bad_request"
        scopes = self.scopes(task_type, agent)
        if not self.fits(scopes, amount):
            return "budget_exceeded"
        self.attempts[key] = {"scopes": scopes, "granted": amount, "extends": {},
                              "released": False, "used": None}
        return None

    def extend(self, key, seq, amount) -> str | None:
        a = self.attempts.get(key)
        if a is not None and seq in a["extends"]:
            return None
        if a is None or not self.is_open(a):
            return "not_found"
        if not self.fits(a["scopes"], amount):
            return "budget_exceeded"
        a["extends"][seq] = amount
        return None

    def commit(self, key, used, task_type, agent) -> str | None:
        a = self.attempts.get(key)
        if a is not None and a["used"] is not None:
            return None
        if a is None:
            a = self.attempts[key] = {"scopes": self.scopes(task_type, agent), "granted": None,
                                      "extends": {}, "released": False, "used": None}
        held = self.held(a)
        for s in a["scopes"]:
            self.budgets[s]["committed"] += used
            self.budgets[s]["overrun"] += max(0, used - held)
        a["used"] = used
        return None

    def release(self, key) -> str | None:
        a = self.attempts.get(key)
        if a is None:
            return "not_found"
        a["released"] = a["released"] or self.is_open(a)
        return None


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.now = T0
        self.ledger = LedgerState(json.loads(json.dumps(MACHINE_BUDGETS)), now=T0)
        self.model = Model(MACHINE_BUDGETS, T0)
        self.base = json.loads(json.dumps(self.ledger.snapshot()))  # last restart point
        self.journal: list[dict] = []  # records since `base`
        self.done: list[tuple] = []  # state-changing requests, replayable any time later
        self.last = None  # the previous request, replayable while nothing else happened
        self.keys: list[tuple[str, int]] = []  # (task, attempt) used so far
        self.attempts: dict[str, int] = {}  # latest attempt per task
        self.usage = self.usage_now()

    def call(self, name, *args, **kw):
        out = getattr(self.ledger, name)(*args, **kw)
        if out.journal is not None:
            self.journal.append(json.loads(json.dumps(out.journal)))
            if name != "set_budget":  # the only op whose answer later requests may change
                self.done.append((name, args, kw, out))
        json.dumps(out.reply), json.dumps(out.events)  # all JSON-able
        self.last = (name, args, kw, out)
        return out

    def expect(self, out, code):
        assert (out.ok, out.code) == (code is None, code), out
        assert (out.journal is None) or out.ok

    def fresh_key(self, data) -> tuple[str, int]:
        task = data.draw(TASKS, label="task")
        self.attempts[task] = self.attempts.get(task, 0) + 1
        self.keys.append((task, self.attempts[task]))
        return self.keys[-1]

    def key(self, data, new) -> tuple[str, int]:
        """Mostly a key with an open reservation, else one seen before, sometimes `new()`."""
        open_keys = [k for k in self.keys
                     if k in self.model.attempts and self.model.is_open(self.model.attempts[k])]
        pick = data.draw(st.integers(0, 7), label="pick")
        if open_keys and pick < 4:
            return data.draw(st.sampled_from(open_keys), label="open key")
        if self.keys and pick < 7:
            return data.draw(st.sampled_from(self.keys), label="seen key")
        return new()

    def unknown_key(self, data) -> tuple[str, int]:
        return (f"unknown-{data.draw(TASKS, label='task')}", 1)

    @rule(data=st.data(), new=st.booleans(), amount=st.integers(0, 1200), task_type=TYPES,
          agent=AGENTS)
    def reserve(self, data, new, amount, task_type, agent):
        # Mostly new work; otherwise a repeat, possibly with other arguments.
        key = self.fresh_key(data) if new else self.key(data, lambda: self.fresh_key(data))
        self.model.roll(self.now)
        code = self.model.reserve(key, amount, task_type, agent)
        self.expect(self.call("reserve", *key, amount, task_type, agent, now=self.now), code)

    @rule(data=st.data(), amount=st.integers(0, 600), seq=st.integers(1, 3))
    def extend(self, data, amount, seq):
        task, attempt = key = self.key(data, lambda: self.unknown_key(data))
        self.model.roll(self.now)
        code = self.model.extend(key, seq, amount)
        self.expect(self.call("extend", task, attempt, amount, self.now, seq=seq), code)

    @rule(data=st.data(), used=st.integers(0, 900), task_type=TYPES, agent=AGENTS)
    def commit(self, data, used, task_type, agent):
        # A fresh key here is a commit with no reservation.
        task, attempt = key = self.key(data, lambda: self.fresh_key(data))
        self.model.roll(self.now)
        code = self.model.commit(key, used, task_type, agent)
        self.expect(self.call("commit", task, attempt, used, self.now, task_type, agent), code)

    @rule(data=st.data())
    def release(self, data):
        task, attempt = key = self.key(data, lambda: self.unknown_key(data))
        self.model.roll(self.now)
        self.expect(self.call("release", task, attempt, self.now), self.model.release(key))

    @rule(scope=SCOPES, limit=st.sampled_from([None, 0, 100, 400, 1000, 3000]), window=WINDOWS)
    def set_budget(self, scope, limit, window):
        self.model.roll(self.now)
        self.model.set_budget(scope, limit, window, self.now)
        self.expect(self.call("set_budget", scope, limit, window, self.now), None)

    @rule(bad=st.sampled_from(BAD_AMOUNTS), task=TASKS)
    def bad_request(self, bad, task):
        self.ledger.tick(self.now)
        self.model.roll(self.now)
        before = self.ledger.snapshot()
        out = self.call("reserve", task, 1, bad, now=self.now)
        assert out.code == "bad_request" and self.ledger.snapshot() == before

    def replay(self, name, args, kw, first):
        self.ledger.tick(self.now)  # time-driven resets are not part of the replay
        self.model.roll(self.now)
        before = self.ledger.snapshot()
        out = getattr(self.ledger, name)(*args, **kw)
        assert (out.ok, out.code, out.reply) == (first.ok, first.code, first.reply)
        assert out.journal is None and self.ledger.snapshot() == before

    @precondition(lambda self: self.last is not None)
    @rule()
    def replay_last(self):
        self.replay(*self.last)

    @precondition(lambda self: self.done)
    @rule(data=st.data())
    def replay_earlier(self, data):
        self.replay(*data.draw(st.sampled_from(self.done)))

    @rule(dt=st.sampled_from([0.5, 7, 30, 200, 1000, 20_000, 90_000]))
    def advance_time(self, dt):
        self.now += dt
        self.last = None  # a refusal may rightly turn into a grant after a reset

    @rule()
    def tick(self):
        self.ledger.tick(self.now)
        self.model.roll(self.now)

    @rule()
    def restart_from_snapshot(self):
        snap = json.loads(json.dumps(self.ledger.snapshot()))
        self.ledger = LedgerState.from_snapshot(snap)
        assert self.ledger.snapshot() == snap
        self.base, self.journal = snap, []

    @rule()
    def restart_from_journal(self):
        restored = LedgerState.from_snapshot(self.base)
        for record in self.journal:
            restored.apply_journal(record)
        # The live ledger may have applied resets due by time alone; the next call does too.
        restored.tick(self.ledger.clock)
        assert restored.snapshot() == self.ledger.snapshot()
        self.ledger = restored
        self.base, self.journal = json.loads(json.dumps(restored.snapshot())), []

    def usage_now(self) -> dict:
        return {s: b["committed"] - b["overrun"] + b["reserved"]
                for s, b in self.ledger.snapshot()["budgets"].items()}

    @invariant()
    def invariant_holds_and_totals_match_model(self):
        budgets = self.ledger.snapshot()["budgets"]
        assert set(budgets) == set(self.model.budgets)
        for scope, b in budgets.items():
            m = self.model.budgets[scope]
            assert (b["limit"], b["window"]) == (m["limit"], m["window"])
            assert b["reserved"] == self.model.reserved(scope)
            assert (b["committed"], b["overrun"]) == (m["committed"], m["overrun"]), scope
            if m["period"] is not None:  # window boundaries stay aligned to their origin
                expected = m["origin"] + (m["index"] + 1) * m["period"]
                assert math.isclose(b["next_reset"], expected, rel_tol=0, abs_tol=1e-6), scope
            assert 0 <= b["overrun"] <= b["committed"] and b["reserved"] >= 0
            usage = b["committed"] - b["overrun"] + b["reserved"]
            # Holds always, except after a limit was lowered below usage: then usage only falls.
            assert b["limit"] is None or usage <= b["limit"] or usage <= self.usage.get(scope, 0)
        self.usage = self.usage_now()


LedgerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestLedgerMachine = LedgerMachine.TestCase
