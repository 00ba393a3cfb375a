"""Pure unit tests of the scheduler's state logic: SchedulerState driven through its
methods with an explicit `now` (both clocks) and an `Effects`, the machine readings and
the jitter injected.

Every turn goes the way Scheduler.handle does it (handle, then dispatch), and the journal
records of every turn are kept (through JSON, as the journal stores them) so that replay
and snapshot + replay can be checked against the live state.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.protocol import wire
from cortex.protocol.calls import Session
from cortex.protocol.operations import Plans
from cortex.protocol.wire import ProtocolError
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.settings import SchedulerSettings
from cortex.services.scheduler import admission
from cortex.services.scheduler.clock import Now
from cortex.services.scheduler.feasibility import Readings, ResourceMonitor
from cortex.services.scheduler.reports import DISPATCH_GRACE
from cortex.services.scheduler.scaling import SCALE_COOLDOWN
from cortex.services.scheduler.settlement import LEDGER_RESEND
from cortex.services.scheduler.state import BACKOFF_BASE, TIMEOUT_GRACE, SchedulerState
from cortex.services.scheduler.tasks import State
from cortex.services.scheduler.waiting import BLOCKED_RETRY
from cortex.services.scheduler.watch import WATCH_INTERVAL

T0 = 1_700_000_000.0  # the wall clock at the start
M0 = 5_000.0  # the monotonic clock at the start
NOW0 = Now(T0, M0)
CLIENT = b"client-1"
HB = 5.0  # task heartbeat interval given to tick(): lost after 3 of them
IDLE_MACHINE = Readings(cpu_free_cores=64.0, mem_available_mb=1e6, mem_percent=10.0,
                        mem_total_mb=1e6, cpu_cores=64)


def journal_copy(value):
    """What the journal gives back: the record through JSON."""
    return orjson.loads(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS))


class Midpoint(random.Random):
    """Jitter that always lands in the middle: delays come out exact."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def new_state(**overrides) -> SchedulerState:
    # One task per worker, none kept idle for critical tasks (test_prefetch*.py: both).
    overrides = {"prefetch": 0, "critical_reserve": 0, **overrides}
    return SchedulerState(SchedulerSettings(**overrides),
                          monitor=ResourceMonitor(sample=lambda: IDLE_MACHINE), rng=Midpoint())


class Sim:
    """A SchedulerState, its clocks, and every journal record it wrote."""

    def __init__(self, **overrides):
        overrides = {"prefetch": 0, "critical_reserve": 0, **overrides}
        self.settings = SchedulerSettings(**overrides)
        self.state = new_state(**overrides)
        self.records: list[dict] = []
        self.effects: list[Effects] = []  # every turn's, in order
        self.now = NOW0
        self._corr = 0
        self._key = 0

    def turn(self, handler, *args, dispatch: bool = True) -> Effects:
        fx = Effects()
        handler(fx, *args)
        if dispatch:
            self.state.dispatch(fx, self.now)
        self.records.extend(journal_copy(r) for r in fx.records)
        self.effects.append(fx)
        return fx

    def corr(self) -> bytes:
        self._corr += 1
        return b"c%d" % self._corr

    # -- clients ---------------------------------------------------------------------------
    def submit(self, **fields) -> Effects:
        self._key += 1
        body = {"idempotency_key": f"key-{self._key}", "type": "echo"} | fields
        return self.turn(self.state.submit, CLIENT, self.corr(), body, self.now)

    def add(self, **fields):
        """Submit and expect acceptance; returns the task."""
        kind, body = answer(self.submit(**fields))
        assert kind == wire.REPLY, body
        return self.state.tasks[body["id"]]

    def cancel(self, task) -> Effects:
        return self.turn(self.state.cancel, CLIENT, self.corr(), {"id": task.id}, self.now)

    def wait(self, task, hold: float, corr: bytes = b"w") -> Effects:
        return self.turn(self.state.wait, b"waiter", corr, {"id": task.id, "hold": hold},
                         self.now)

    # -- workers ---------------------------------------------------------------------------
    def ready(self, name: str, types=("echo",), pid: int = 100) -> Effects:
        return self.turn(self.state.worker_ready, name, {"types": list(types), "pid": pid},
                         self.now)

    def started(self, name: str, task, attempt: int | None = None) -> Effects:
        body = {"id": task.id, "attempt": attempt or task.attempt, "at": self.now.wall}
        return self.turn(self.state.task_started, name, body, self.now)

    def heartbeat(self, name: str, task, **extra) -> Effects:
        body = {"id": task.id, "attempt": task.attempt, "types": ["echo"]} | extra
        return self.turn(self.state.task_heartbeat, name, body, self.now)

    def finish(self, name: str, task, ok: bool = True, attempt: int | None = None,
               **extra) -> Effects:
        body = {"id": task.id, "attempt": attempt or task.attempt, "ok": ok,
                "result": {"echo": task.id} if ok else None} | extra
        return self.turn(self.state.task_finished, name, name.encode(), self.corr(), body,
                         self.now)

    def gone(self, name: str, kill: bool = False) -> Effects:
        return self.turn(self.state.worker_gone, name, "exited", self.now, kill)

    # -- ledger and time -------------------------------------------------------------------
    def ledger(self, corr: bytes, ok: bool = True, **body) -> Effects:
        return self.turn(self.state.ledger_reply, corr, ok, body, self.now)

    def tick(self, dt: float = 0.0) -> Effects:
        self.now += dt
        return self.turn(self.state.tick, self.now, HB)


def answer(fx: Effects, peer: bytes = CLIENT):
    """(type, body) of the last message to `peer`."""
    sent = [(t, b) for p, t, _, b in fx.sends if p == peer]
    assert sent, fx.sends
    return sent[-1]


def runs(fx: Effects) -> list[tuple[str, dict]]:
    return [(p.decode(), b["task"]) for p, t, _, b in fx.sends
            if t == wire.NOTIFY and b.get("op") == "task.run"]


def ledger_requests(fx: Effects, op: str | None = None) -> list[tuple[bytes, dict]]:
    return [(c, b) for p, t, c, b in fx.sends
            if p == b"ledger" and t == wire.REQUEST and (op is None or b["op"] == op)]


def kills(fx: Effects) -> list[dict]:
    return [b for p, t, _, b in fx.sends if p == b"pool" and b.get("op") == "pool.kill"]


def events(fx: Effects, type_: str | None = None) -> list[tuple]:
    return [e for e in fx.events if type_ is None or e[0] == type_]


def error_code(call, *args) -> str:
    with pytest.raises(ProtocolError) as info:
        call(*args)
    assert info.value.code in wire.ERROR_CODES
    return info.value.code


# --- admission ----------------------------------------------------------------------------

def test_submit_queues_the_task_and_replies_with_its_summary():
    sim = Sim()
    fx = sim.submit(description="hello", priority="high", tokens=0, payload={"a": 1})
    kind, body = answer(fx)
    assert kind == wire.REPLY
    assert body["state"] == "queued" and body["final"] is False and body["attempt"] == 1
    task = sim.state.tasks[body["id"]]
    assert (task.priority, task.payload, task.waiting, task.agent) == (
        "high", {"a": 1}, "worker", "client-1")
    assert task.timeout == sim.settings.default_timeout
    assert task.retries == sim.settings.default_retries
    assert task.eta == T0  # nothing ahead: it could start now
    assert [r["k"] for r in fx.records] == ["new"]
    assert events(fx, "task.created")[0][2] == task.id
    assert sim.state.counters["submitted"] == 1


def test_submit_same_idempotency_key_returns_the_same_task():
    sim = Sim()
    first = answer(sim.turn(sim.state.submit, CLIENT, b"1",
                            {"idempotency_key": "k", "type": "echo"}, NOW0))[1]
    fx = sim.turn(sim.state.submit, CLIENT, b"2",
                  {"idempotency_key": "k", "type": "echo"}, NOW0 + 1)
    kind, again = answer(fx)
    assert kind == wire.REPLY and again["id"] == first["id"] and again["type"] == "echo"
    assert fx.records == [] and len(sim.state.tasks) == 1
    assert sim.state.counters["duplicates"] == 1 and sim.state.counters["submitted"] == 1
    # The same key with other content is refused: it would silently be the first task.
    fx = sim.turn(sim.state.submit, CLIENT, b"3",
                  {"idempotency_key": "k", "type": "sleep", "description": "other"}, NOW0 + 2)
    kind, refused = answer(fx)
    assert (kind, refused["code"]) == (wire.ERROR, "conflict") and len(sim.state.tasks) == 1


def test_submit_same_key_after_completion_returns_the_finished_task():
    sim = Sim()
    task = sim.add(idempotency_key="once")
    sim.ready("w1")
    sim.finish("w1", task)
    kind, body = answer(sim.turn(sim.state.submit, CLIENT, b"x",
                                 {"idempotency_key": "once", "type": "echo"}, sim.now))
    assert kind == wire.REPLY and body["id"] == task.id and body["state"] == "completed"


BAD_SUBMITS = [
    ({"idempotency_key": None}, "missing key"),
    ({"idempotency_key": ""}, "empty key"),
    ({"idempotency_key": "k" * 129}, "long key"),
    ({"type": None}, "missing type"),
    ({"type": ""}, "empty type"),
    ({"type": 5}, "type not str"),
    ({"type": "t" * 65}, "long type"),
    ({"type": "ec\x00ho"}, "nul in type"),
    ({"description": "d" * (admission.MAX_DESCRIPTION + 1)}, "long description"),
    ({"description": b"bytes"}, "description bytes"),
    ({"priority": "urgent"}, "unknown priority"),
    ({"priority": "HIGH"}, "priority case"),
    ({"tokens": -1}, "negative tokens"),
    ({"tokens": 1.5}, "float tokens"),
    ({"tokens": True}, "bool tokens"),
    ({"tokens": wire.MAX_INT + 1}, "huge tokens"),
    ({"timeout": 0}, "zero timeout"),
    ({"timeout": math.nan}, "nan timeout"),
    ({"timeout": math.inf}, "inf timeout"),
    ({"timeout": 7 * 86400 + 1}, "timeout above a week"),
    ({"retries": -1}, "negative retries"),
    ({"retries": 101}, "too many retries"),
    ({"retries": False}, "bool retries"),
    ({"deadline": "tomorrow"}, "deadline str"),
    ({"deadline": -1}, "negative deadline"),
    ({"deadline": math.nan}, "nan deadline"),
    ({"agent": ""}, "empty agent"),
    ({"agent": "a" * 129}, "long agent"),
    ({"follow": -1}, "negative follow"),
    ({"follow": 61}, "follow above a minute"),
    ({"follow": "5"}, "follow str"),
    ({"follow": True}, "bool follow"),
    ({"follow": math.nan}, "nan follow"),
]


@pytest.mark.parametrize("fields", [f for f, _ in BAD_SUBMITS],
                         ids=[i.replace(" ", "_") for _, i in BAD_SUBMITS])
def test_submit_validation_error_is_bad_request_and_changes_nothing(fields):
    sim = Sim()
    body = {"idempotency_key": "k", "type": "echo"} | fields
    body = {k: v for k, v in body.items() if v is not None}
    fx = Effects()
    assert error_code(sim.state.submit, fx, CLIENT, b"c", body, NOW0) == "bad_request"
    assert fx.sends == fx.records == [] and sim.state.tasks == {}
    assert sim.state.counters["submitted"] == 0


@pytest.mark.parametrize("field_,value", [("timeout", 0.001), ("timeout", 7 * 86400),
                                          ("retries", 0), ("retries", 100),
                                          ("tokens", wire.MAX_INT), ("deadline", 1e11)])
def test_submit_accepts_the_limits(field_, value):
    assert getattr(Sim().add(**{field_: value}), field_) == value


def test_submit_queue_full_refuses_non_critical_but_accepts_critical():
    sim = Sim(max_queue_per_type=2)
    sim.add()
    sim.add(priority="low")
    for priority in ("low", "medium", "high"):
        kind, body = answer(sim.submit(priority=priority))
        assert kind == wire.ERROR and body["code"] == "queue_full", priority
        assert "full" in body["message"]
    assert sim.add(priority="critical").state is State.QUEUED
    assert sim.add(type="sleep").state is State.QUEUED  # per type
    assert sim.state.counters["rejected"] == 3


def test_refused_submit_journals_the_refusal_and_emits_why():
    sim = Sim(max_queue_per_type=0)
    fx = sim.submit(idempotency_key="full-1")
    [record] = fx.records
    assert record.pop("digest") and record == {"k": "rejected", "key": "full-1",
                                               "code": "queue_full",
                                               "reason": answer(fx)[1]["message"]}
    assert events(fx, "scheduler.rejected")[0][1]["code"] == "queue_full"


def test_resent_refused_submit_gets_the_same_refusal_even_when_it_would_now_fit():
    sim = Sim(max_queue_per_type=1)
    first = sim.add()
    refused = answer(sim.submit(idempotency_key="again"))
    sim.cancel(first)  # room now
    kind, body = answer(sim.turn(sim.state.submit, CLIENT, b"r",
                                 {"idempotency_key": "again", "type": "echo"}, sim.now))
    assert (kind, body) == refused


def test_submit_deadline_before_the_estimated_start_is_rejected_with_the_eta():
    sim = Sim()
    sim.add()  # one task ahead, no worker: the next one starts in about 1 s (default mean)
    kind, body = answer(sim.submit(deadline=T0 + 0.5))
    assert kind == wire.ERROR and body["code"] == "rejected"
    assert f"estimated start {T0 + 1:.3f}" in body["message"]
    assert f"deadline {T0 + 0.5:.3f}" in body["message"]
    assert sim.add(deadline=T0 + 1).deadline == T0 + 1  # exactly the ETA: accepted


def test_submit_deadline_is_fine_with_an_idle_worker():
    sim = Sim()
    sim.ready("w1")
    task = sim.add(deadline=T0)
    assert task.eta == T0 and task.state is State.DISPATCHED


def test_submit_beyond_max_wait_is_rejected():
    sim = Sim(max_wait=3.0)
    for _ in range(4):  # ETAs now, +1, +2, +3: the last is exactly the maximum
        sim.add()
    kind, body = answer(sim.submit())
    assert kind == wire.ERROR and body["code"] == "rejected"
    assert "maximum wait" in body["message"] and "in 4 s" in body["message"]


def test_critical_eta_counts_only_critical_work_ahead():
    sim = Sim(max_wait=3.0)
    for _ in range(4):
        sim.add(priority="low")
    assert sim.add(priority="critical").eta == T0
    assert answer(sim.submit(priority="low"))[0] == wire.ERROR


def test_client_submit_body_is_accepted_by_the_scheduler(monkeypatch):
    monkeypatch.delenv("CORTEX_AGENT", raising=False)
    request = next(Plans(Session("/tmp/x"), "n").submit(
        "echo", "desc", priority="high", tokens=10, timeout=5.0, retries=1, deadline=T0 + 60,
        payload={"p": [1]}))
    body = wire.decode_body(wire.encode_body({"op": request.op, **request.body}))
    fx = Effects()
    new_state().submit(fx, CLIENT, b"c", body, NOW0)
    kind, summary = answer(fx)
    assert kind == wire.REPLY
    assert (summary["agent"], summary["tokens"], summary["retries"]) == ("n", 10, 1)


@pytest.mark.parametrize("payload", [b"\x00raw", {"k": b"v"}, {b"k": 1},
                                     msgpack.Timestamp(1, 0)],
                         ids=["bytes", "nested_bytes", "bytes_key", "timestamp"])
def test_submit_refuses_a_payload_the_journal_cannot_hold(payload):
    state = new_state()
    fx = Effects()
    try:
        state.submit(fx, CLIENT, b"c", {"idempotency_key": "k", "type": "echo",
                                        "payload": payload}, NOW0)
    except ProtocolError as e:
        assert e.code == "bad_request"
        return
    for record in fx.records:
        orjson.dumps(record)  # what Journal.append does: must not raise


def test_submit_refuses_a_payload_above_max_payload_bytes():
    state = new_state()
    body = {"idempotency_key": "k", "type": "echo",
            "payload": "x" * (admission.MAX_PAYLOAD_BYTES + 1)}
    assert error_code(state.submit, Effects(), CLIENT, b"c", body, NOW0) in (
        "bad_request", "too_large")


# --- dispatch order -----------------------------------------------------------------------

def test_dispatch_priority_order_critical_high_medium_low():
    sim = Sim()
    for i, priority in enumerate(("low", "medium", "high", "critical")):
        sim.now = NOW0 + i
        sim.add(priority=priority, description=priority)
    order = []
    for i in range(4):
        order += [t["description"] for _, t in runs(sim.ready(f"w{i}"))]
    assert order == ["critical", "high", "medium", "low"]


def test_dispatch_fifo_within_a_level():
    sim = Sim()
    for i in range(5):
        sim.now = NOW0 + i * 0.01
        sim.add(description=f"n{i}")
    order = []
    for i in range(5):
        order += [t["description"] for _, t in runs(sim.ready(f"w{i}"))]
    assert order == [f"n{i}" for i in range(5)]


def test_dispatch_oldest_first_across_the_types_of_a_worker():
    sim = Sim()
    sim.add(type="sleep", description="older")
    sim.now += 1
    sim.add(type="echo", description="newer")
    assert [t["description"] for _, t in runs(sim.ready("w1", ("echo", "sleep")))] == ["older"]


def test_dispatch_gives_a_worker_only_its_types():
    sim = Sim()
    task = sim.add(type="sleep")
    assert runs(sim.ready("w1", ("echo",))) == []
    assert task.state is State.QUEUED and sim.state.workers["w1"].state == "idle"
    assert runs(sim.ready("w2", ("sleep",)))[0][0] == "w2"


def test_dispatch_sends_task_run_and_journals_the_move():
    sim = Sim()
    task = sim.add(payload={"x": 1}, timeout=9.0, description="d")
    fx = sim.ready("w1")
    (name, run), = runs(fx)
    assert name == "w1"
    assert run == {"id": task.id, "attempt": 1, "type": "echo", "description": "d",
                   "priority": "medium", "payload": {"x": 1}, "tokens": 0, "timeout": 9.0}
    assert task.state is State.DISPATCHED and task.worker == "w1" and task.waiting is None
    assert sim.state.workers["w1"].state == "busy"
    # Why it waited is not journaled: a restart rebuilds it (queued tasks wait for a worker).
    assert {"k": "set", "id": task.id, "state": "dispatched", "at": T0, "worker": "w1"} \
        in fx.records
    assert [e[2:] for e in events(fx, "worker.busy")] == [(task.id, "w1")]


def test_one_worker_takes_one_task_at_a_time():
    sim = Sim()
    a, b = sim.add(), sim.add()
    assert len(runs(sim.ready("w1"))) == 1
    assert b.state is State.QUEUED
    fx = sim.finish("w1", a)
    assert [t["id"] for _, t in runs(fx)] == [b.id]  # freed by its finish, takes the next


def test_memory_pressure_holds_non_critical_work_but_not_critical():
    sim = Sim()
    sim.state.monitor = ResourceMonitor(sample=lambda: Readings(8.0, 1e5, 95.0, 1e6, 8))
    medium = sim.add()
    fx = sim.ready("w1")
    assert runs(fx) == [] and medium.waiting == "memory"
    assert sim.state.status(sim.now)["memory_pressure"] is True
    critical = sim.add(priority="critical")
    assert critical.state is State.DISPATCHED


# --- tokens -------------------------------------------------------------------------------

def reserve_of(fx: Effects) -> tuple[bytes, dict]:
    (corr, body), = ledger_requests(fx, "ledger.reserve")
    return corr, body


def test_task_with_tokens_is_reserved_before_it_runs():
    sim = Sim()
    task = sim.add(tokens=100)
    fx = sim.ready("w1")
    corr, body = reserve_of(fx)
    assert corr.startswith(b"L")
    assert body == {"op": "ledger.reserve", "task": task.id, "attempt": 1, "amount": 100,
                    "type": "echo", "agent": "client-1", "worker": "w1"}
    assert runs(fx) == []
    assert task.state is State.QUEUED and task.waiting == "reserving"
    assert sim.state.workers["w1"].state == "claimed"


def test_reservation_granted_dispatches_with_the_tokens():
    sim = Sim()
    task = sim.add(tokens=100)
    corr, _ = reserve_of(sim.ready("w1"))
    fx = sim.ledger(corr, granted=True)
    (name, run), = runs(fx)
    assert name == "w1" and run["tokens"] == 100 and task.reserved == 100
    assert task.state is State.DISPATCHED
    assert events(fx, "task.reserved")


def test_reservation_refused_waits_for_tokens_without_blocking_others():
    sim = Sim()
    rich = sim.add(tokens=10**9)
    sim.now += 0.01
    cheap = sim.add()
    corr, _ = reserve_of(sim.ready("w1"))
    fx = sim.ledger(corr, granted=False, reason="global budget")
    assert rich.state is State.QUEUED and rich.waiting == "tokens"
    assert events(fx, "task.waiting")[0][1]["detail"] == {"message": "global budget"}
    assert [t["id"] for _, t in runs(fx)] == [cheap.id]  # the worker took the next task
    assert sim.state.status(sim.now)["waiting"] == {"tokens": 1}


def refuse(sim: Sim, corr: bytes, available: int = 0, requested: int = 50) -> Effects:
    return sim.ledger(corr, granted=False, scope="global", limit=1000, available=available,
                      requested=requested, reason=f"global has {available} of 1000 tokens "
                      f"available, {requested} requested")


def test_refused_reservation_is_asked_again_on_a_capped_backoff():
    sim = Sim()
    task = sim.add(tokens=50)
    corr, _ = reserve_of(sim.ready("w1"))
    refuse(sim, corr)
    gaps = []
    for _ in range(7):
        waited = 0.0
        while True:  # each refusal: the next try comes after a longer pause, at most the cap
            waited += 0.25
            fx = sim.tick(0.25)
            if ledger_requests(fx, "ledger.reserve"):
                break
        gaps.append(waited)
        corr, _ = reserve_of(fx)
        assert task.waiting == "tokens"  # a retry keeps saying why it waits
        refuse(sim, corr)
    assert gaps == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]  # waiting.TOKENS_RETRY_CAP
    corr, _ = reserve_of(sim.tick(5.0))
    assert runs(sim.ledger(corr, granted=True))[0][1]["id"] == task.id


def refused_twice(sim: Sim, task, available: int = 0, worker: str = "w1") -> None:
    """Refused, then refused again on its first retry: its next try is 1 s away."""
    corr, _ = reserve_of(sim.ready(worker))
    refuse(sim, corr, available=available, requested=task.tokens)
    corr, _ = reserve_of(sim.tick(BLOCKED_RETRY))
    refuse(sim, corr, available=available, requested=task.tokens)
    sim.now += BLOCKED_RETRY  # the least pause between two tries is over


def test_tokens_given_back_let_a_waiter_try_sooner_once_they_cover_what_it_lacked():
    sim = Sim()
    task = sim.add(tokens=50)
    refused_twice(sim, task, available=10)  # it lacks 40
    sim.state.waiting.tokens_returned(30)  # does not cover 40: it keeps its backoff
    assert ledger_requests(sim.tick(0.0), "ledger.reserve") == []
    sim.state.waiting.tokens_returned(10)  # 40 back since its refusal: it tries at once
    assert reserve_of(sim.tick(0.0))[1]["task"] == task.id


def test_grant_for_a_task_cancelled_meanwhile_is_given_back():
    sim = Sim()
    task = sim.add(tokens=70)
    corr, _ = reserve_of(sim.ready("w1"))
    sim.cancel(task)
    fx = sim.ledger(corr, granted=True)
    (_, release), = ledger_requests(fx, "ledger.release")
    assert release == {"op": "ledger.release", "task": task.id, "attempt": 1}
    assert runs(fx) == [] and sim.state.workers["w1"].state == "idle"


def test_grant_after_the_claimed_worker_left_requeues_with_the_reservation():
    sim = Sim()
    task = sim.add(tokens=70)
    corr, _ = reserve_of(sim.ready("w1"))
    sim.gone("w1")
    assert task.state is State.QUEUED
    sim.ledger(corr, granted=True)
    assert task.reserved == 70 and task.waiting == "worker"
    fx = sim.ready("w2")
    assert ledger_requests(fx) == [] and runs(fx)[0][1]["tokens"] == 70


def test_ledger_unavailable_keeps_the_request_and_resends_it():
    sim = Sim(lease=False)  # the per-task ledger protocol (leases: test_lease_*)
    sim.add(tokens=5)
    corr, body = reserve_of(sim.ready("w1"))
    sim.ledger(corr, ok=False, code="unavailable", message="restarting")
    assert corr in sim.state.ledger.pending
    assert ledger_requests(sim.tick(LEDGER_RESEND / 2)) == []
    assert ledger_requests(sim.tick(LEDGER_RESEND / 2)) == [(corr, body)]


def test_unanswered_ledger_request_is_resent_with_the_same_corr():
    sim = Sim(lease=False)  # the per-task ledger protocol (leases: test_lease_*)
    sim.add(tokens=5)
    corr, body = reserve_of(sim.ready("w1"))
    assert ledger_requests(sim.tick(LEDGER_RESEND - 0.01)) == []
    # The scans run at most every WATCH_INTERVAL: due now, sent by the next scan.
    assert ledger_requests(sim.tick(WATCH_INTERVAL)) == [(corr, body)]


def test_ledger_reply_with_an_unknown_corr_is_ignored():
    sim = Sim()
    fx = sim.ledger(b"L" + (99).to_bytes(8, "big"), granted=True)
    assert fx.sends == fx.records == []


# --- start and finish ---------------------------------------------------------------------

def running(sim: Sim, name: str = "w1", **fields):
    task = sim.add(**fields)
    sim.ready(name)
    sim.started(name, task)
    assert task.state is State.RUNNING
    return task


def test_task_started_moves_dispatched_to_running_once():
    sim = Sim()
    task = sim.add()
    sim.ready("w1")
    fx = sim.started("w1", task)
    assert task.state is State.RUNNING and task.times["started"] == sim.now.wall
    assert events(fx, "task.started")
    assert sim.started("w1", task).records == []  # a duplicate changes nothing


@pytest.mark.parametrize("who,attempt", [("w2", 1), ("w1", 2)], ids=["other_worker",
                                                                      "other_attempt"])
def test_task_started_from_the_wrong_worker_or_attempt_is_ignored(who, attempt):
    sim = Sim()
    task = sim.add()
    sim.ready("w1")
    assert sim.started(who, task, attempt=attempt).records == []
    assert task.state is State.DISPATCHED


def test_task_finished_completes_once():
    sim = Sim()
    task = running(sim)
    sim.now += 2
    fx = sim.finish("w1", task, tokens_used=0, started_at=T0, finished_at=sim.now.wall)
    assert answer(fx, b"w1") == (wire.REPLY, {"ok": True})
    assert task.state is State.COMPLETED and task.result == {"echo": task.id}
    worker = sim.state.workers["w1"]
    assert (worker.state, worker.task, worker.done) == ("idle", None, 1)
    assert sim.state.counters["completed"] == 1
    assert events(fx, "task.completed")[0][1]["duration"] == 2.0
    fx = sim.finish("w1", task)  # the same report again (re-sent)
    assert answer(fx, b"w1") == (wire.REPLY, {"ok": True})  # acknowledged, not applied
    assert fx.records == [] and sim.state.counters["completed"] == 1
    assert sim.state.counters["late_results"] == 1
    assert events(fx, "task.late_result")


def test_task_finished_without_started_goes_dispatched_to_completed():
    sim = Sim()
    task = sim.add()
    sim.ready("w1")
    sim.finish("w1", task)
    assert task.state is State.COMPLETED and "running" not in task.times


def test_task_finished_not_ok_fails_with_the_category():
    sim = Sim()
    task = running(sim)
    fx = sim.finish("w1", task, ok=False, error={"category": "budget_exceeded",
                                                  "message": "m" * 5000})
    assert task.state is State.FAILED
    assert task.error["category"] == "budget_exceeded" and len(task.error["message"]) == 2000
    assert events(fx, "task.failed")[0][1]["category"] == "budget_exceeded"


def test_task_finished_not_ok_without_error_is_a_handler_error():
    sim = Sim()
    task = running(sim)
    sim.finish("w1", task, ok=False, error="not a dict")
    assert task.error == {"category": "handler_error", "message": ""}


@pytest.mark.parametrize("used", [-1, True, 1.5, "7", wire.MAX_INT + 1])
def test_task_finished_ignores_a_bad_tokens_used(used):
    sim = Sim()
    task = running(sim)
    sim.finish("w1", task, tokens_used=used)
    assert task.tokens_used == 0


def test_finish_from_a_superseded_attempt_is_counted_late_and_not_applied():
    sim = Sim()
    task = running(sim, "w1")
    sim.gone("w1")  # attempt 1 lost: retry as attempt 2
    sim.ready("w2")
    sim.tick(BACKOFF_BASE)
    assert task.attempt == 2 and task.worker == "w2"
    fx = sim.finish("w1", task, attempt=1)
    assert task.state is State.DISPATCHED and task.result is None
    assert sim.state.counters["late_results"] == 1 and fx.records == []
    sim.finish("w2", task)
    assert task.state is State.COMPLETED and sim.state.counters["completed"] == 1


def test_late_finish_of_an_old_attempt_does_not_free_the_worker_running_the_new_one():
    sim = Sim()
    task = sim.add()
    sim.ready("w1")
    sim.now += DISPATCH_GRACE + 1
    sim.ready("w1")  # idle long after the dispatch: the run order was lost, retry
    sim.tick(BACKOFF_BASE)
    assert task.attempt == 2 and task.worker == "w1"
    sim.finish("w1", task, attempt=1)  # a copy of an old report
    worker = sim.state.workers["w1"]
    assert (worker.state, worker.task) == ("busy", task.id)


def test_task_heartbeat_records_tokens_used_and_keeps_it_alive():
    sim = Sim()
    task = running(sim)
    sim.now += 14
    sim.heartbeat("w1", task, tokens_used=33)
    assert task.tokens_used == 33 and task.times["heartbeat"] == sim.now.wall
    assert kills(sim.tick(14)) == [] and task.state is State.RUNNING


def test_task_heartbeat_after_a_restart_re_registers_a_busy_worker():
    sim = Sim()
    task = running(sim)
    del sim.state.workers["w1"]
    sim.heartbeat("w1", task, pid=321)
    worker = sim.state.workers["w1"]
    assert (worker.state, worker.task, worker.pid) == ("busy", task.id, 321)


def test_task_rejected_by_the_worker_goes_back_first_with_the_same_attempt():
    sim = Sim()
    task = sim.add()
    sim.now += 1
    later = sim.add()
    sim.ready("w1")
    fx = sim.turn(sim.state.task_rejected, "w1", {"id": task.id, "attempt": 1,
                                                  "reason": "stopping"}, sim.now)
    assert sim.state.workers["w1"].state == "leaving" and sim.state.workers["w1"].task is None
    assert task.state is State.QUEUED and task.attempt == 1 and task.worker is None
    assert fx.records[-1]["state"] == "queued"
    assert [t["id"] for _, t in runs(sim.ready("w2"))] == [task.id]
    assert later.state is State.QUEUED


def test_task_rejected_leaves_no_worker_holding_the_task():
    sim = Sim()
    task = sim.add()
    sim.ready("w1")
    sim.turn(sim.state.task_rejected, "w1", {"id": task.id, "attempt": 1}, sim.now)
    sim.ready("w2")
    assert task.worker == "w2"
    assert [w.name for w in sim.state.workers.values() if w.task == task.id] == ["w2"]


# --- lost workers and retries -------------------------------------------------------------

def test_worker_gone_retries_with_the_next_attempt_after_a_backoff():
    sim = Sim()
    task = running(sim, retries=2)
    fx = sim.gone("w1")
    assert task.state is State.QUEUED and task.attempt == 2 and task.worker is None
    assert task.waiting == "backoff" and task.error["category"] == "worker_lost"
    assert events(fx, "task.retry")[0][1]["after"] == BACKOFF_BASE
    assert sim.state.counters["retried"] == 1
    sim.ready("w2")
    assert runs(sim.tick(BACKOFF_BASE - 0.01)) == []  # not before the backoff
    (name, run), = runs(sim.tick(0.01))
    assert name == "w2" and run["attempt"] == 2


def test_backoff_doubles_with_each_attempt():
    sim = Sim()
    task = running(sim, "w0", retries=5)
    delays = []
    for n in range(3):
        delays.append(events(sim.gone(f"w{n}"), "task.retry")[0][1]["after"])
        sim.ready(f"w{n + 1}")
        sim.tick(delays[-1])
        sim.started(f"w{n + 1}", task)
    assert delays == [BACKOFF_BASE, 2 * BACKOFF_BASE, 4 * BACKOFF_BASE]


def test_backoff_is_jittered_so_tasks_lost_together_do_not_retry_together():
    sim = Sim()
    sim.state.rng = random.Random(7)  # real jitter
    tasks = [sim.add(retries=1) for _ in range(20)]
    for i in range(20):
        sim.ready(f"w{i}")
    delays = []
    for i in range(20):  # w{i} runs tasks[i]
        delays.append(events(sim.gone(f"w{i}"), "task.retry")[0][1]["after"])
    assert len(set(delays)) > 10  # spread, not one wave
    assert all(0.8 * BACKOFF_BASE <= d <= 1.2 * BACKOFF_BASE for d in delays)
    sim.ready("late")
    due = [t for t in tasks if t.state is State.DISPATCHED]
    assert due == []  # none before its own delay
    sim.tick(min(delays))
    assert [t.id for t in tasks if t.state is State.DISPATCHED] == \
        [tasks[delays.index(min(delays))].id]


def test_retries_spent_ends_dead():
    sim = Sim()
    task = running(sim, retries=1)
    sim.gone("w1")
    sim.ready("w2")
    sim.tick(BACKOFF_BASE)
    assert task.attempt == 2
    fx = sim.gone("w2")
    assert task.state is State.DEAD and task.attempt == 2
    assert task.error["category"] == "worker_lost"
    assert events(fx, "task.dead") and sim.state.counters["dead"] == 1


def test_no_retries_fails_on_the_first_loss():
    sim = Sim()
    task = running(sim, retries=0)
    fx = sim.gone("w1")
    assert task.state is State.FAILED and task.error["category"] == "worker_lost"
    assert events(fx, "task.failed") and sim.state.counters["failed"] == 1


def test_worker_gone_kill_asks_the_pool_to_end_it():
    sim = Sim()
    running(sim)
    (kill,), = [kills(sim.gone("w1", kill=True))]
    assert kill["worker"] == "w1" and kill["pid"] == 100 and kill["reason"] == "exited"


def test_worker_gone_unknown_or_idle_changes_no_task():
    sim = Sim()
    assert sim.gone("nobody").records == []
    sim.ready("w1")
    assert sim.gone("w1").records == [] and sim.state.workers == {}


def test_worker_ready_right_after_a_dispatch_keeps_the_task():
    sim = Sim()
    task = sim.add()
    sim.ready("w1")
    sim.now += DISPATCH_GRACE - 0.1
    sim.ready("w1")  # crossed our task.run on the way
    assert task.state is State.DISPATCHED and task.attempt == 1


def test_worker_ready_long_after_a_dispatch_means_the_task_was_lost():
    sim = Sim()
    task = sim.add()
    sim.ready("w1")
    sim.now += DISPATCH_GRACE + 0.1
    sim.ready("w1")
    assert task.state is State.QUEUED and task.attempt == 2
    assert task.error["category"] == "worker_lost"


@pytest.mark.parametrize("body", [{}, {"types": [""]}, {"types": [1]}, {"type": None}],
                         ids=["none", "empty", "int", "null_type"])
def test_worker_ready_without_types_is_bad_request(body):
    state = new_state()
    assert error_code(state.worker_ready, Effects(), "w1", body, NOW0) == "bad_request"
    assert state.workers == {}


# --- timeouts and silence -----------------------------------------------------------------

def test_timeout_kills_the_worker_and_retries():
    sim = Sim()
    task = running(sim, timeout=10.0, retries=1)
    for n in range(1, 10):  # heartbeats keep it alive, the timeout still applies
        sim.now = NOW0 + n
        sim.heartbeat("w1", task)
    assert kills(sim.tick(1.0)) == []  # exactly the timeout: not yet
    fx = sim.tick(WATCH_INTERVAL)  # the next scan
    (kill,) = kills(fx)
    assert kill == {"op": "pool.kill", "worker": "w1", "pid": 100, "reason": "timeout",
                    "grace": TIMEOUT_GRACE}
    assert events(fx, "task.timeout")
    assert task.state is State.QUEUED and task.attempt == 2
    assert task.error["category"] == "timeout" and "w1" not in sim.state.workers


def test_timeout_without_retries_fails_with_category_timeout():
    sim = Sim()
    task = running(sim, timeout=1.0, retries=0)
    sim.tick(1.5)
    assert task.state is State.FAILED and task.error["category"] == "timeout"


def test_silent_running_task_is_lost_after_three_heartbeats():
    sim = Sim()
    task = running(sim)
    sim.now += 10
    sim.heartbeat("w1", task)
    assert kills(sim.tick(3 * HB)) == []  # exactly three heartbeats: not yet
    fx = sim.tick(WATCH_INTERVAL)  # the next scan
    assert kills(fx)[0]["reason"] == "silent"
    assert events(fx, "worker.lost")[0][1]["reason"] == "silent"
    assert task.state is State.QUEUED and task.error["category"] == "worker_lost"


# --- cancel -------------------------------------------------------------------------------

def test_cancel_queued():
    sim = Sim()
    task = sim.add()
    fx = sim.cancel(task)
    kind, body = answer(fx)
    assert kind == wire.REPLY and body["state"] == "cancelled" and body["final"] is True
    assert task.error["category"] == "cancelled" and sim.state.counters["cancelled"] == 1
    assert sim.state.queue.depth("echo") == 0
    assert runs(sim.ready("w1")) == []
    assert ledger_requests(fx) == []  # no tokens, nothing to release


def test_cancel_running_tells_the_worker_and_the_pool():
    sim = Sim()
    task = running(sim)
    fx = sim.cancel(task)
    notes = [b for p, t, _, b in fx.sends if p == b"w1" and t == wire.NOTIFY]
    assert notes == [{"op": "task.cancel", "id": task.id, "attempt": 1}]
    assert kills(fx)[0]["reason"] == "cancel"
    assert task.state is State.CANCELLED
    sim.finish("w1", task)  # it finished anyway: too late
    assert task.state is State.CANCELLED and sim.state.counters["late_results"] == 1


def test_cancel_a_final_task_changes_nothing():
    sim = Sim()
    task = sim.add()
    sim.cancel(task)
    fx = sim.cancel(task)
    assert fx.records == [] and answer(fx)[1]["state"] == "cancelled"
    assert sim.state.counters["cancelled"] == 1


def test_cancel_unknown_task_is_not_found():
    state = new_state()
    assert error_code(state.cancel, Effects(), CLIENT, b"c", {"id": "t-none"}, NOW0) == \
        "not_found"
    assert error_code(state.cancel, Effects(), CLIENT, b"c", {}, NOW0) == "bad_request"


def test_cancel_during_backoff_is_not_requeued_later():
    sim = Sim()
    task = running(sim)
    sim.gone("w1")
    sim.cancel(task)
    sim.ready("w2")
    assert runs(sim.tick(10)) == [] and task.state is State.CANCELLED


def test_cancel_with_tokens_releases_them():
    sim = Sim(lease=False)  # the per-task ledger protocol (leases: test_lease_*)
    task = sim.add(tokens=40)
    fx = sim.cancel(task)
    (corr, body), = ledger_requests(fx)
    assert body == {"op": "ledger.release", "task": task.id, "attempt": 1}
    assert task.settle == {"1": body}


# --- wait ---------------------------------------------------------------------------------

def test_wait_without_hold_answers_at_once():
    sim = Sim()
    task = sim.add()
    assert answer(sim.wait(task, 0), b"waiter")[1]["state"] == "queued"


def test_wait_holds_until_the_task_ends():
    sim = Sim()
    task = sim.add()
    fx = sim.wait(task, 30, corr=b"w1")
    assert [s for s in fx.sends if s[0] == b"waiter"] == []
    sim.wait(task, 30, corr=b"w2")
    sim.ready("wk")
    fx = sim.finish("wk", task)
    woken = [(c, b["state"]) for p, t, c, b in fx.sends if p == b"waiter"]
    assert woken == [(b"w1", "completed"), (b"w2", "completed")]
    assert sim.state.waiters.by_task == {}


def test_wait_expires_with_the_current_state():
    sim = Sim()
    task = sim.add()
    sim.wait(task, 2)
    assert sim.tick(1).sends == []
    sim.state.watch.next_scan = 0  # look again at once (tick scans every WATCH_INTERVAL)
    assert sim.state.tick(Effects(), sim.now, HB) == pytest.approx(1.0)  # next: the waiter
    fx = sim.tick(1)
    assert answer(fx, b"waiter") == (wire.REPLY, task.summary())


def test_wait_on_a_final_task_answers_at_once():
    sim = Sim()
    task = sim.add()
    sim.cancel(task)
    assert answer(sim.wait(task, 30), b"waiter")[1]["final"] is True


def test_a_followed_submit_is_answered_now_and_again_when_its_task_ends():
    sim = Sim()
    fx = sim.submit(follow=5.0)
    (_, _, corr, body), = [s for s in fx.sends if s[0] == CLIENT]
    assert body["state"] == "queued"
    task = sim.state.tasks[body["id"]]
    sim.ready("wk")
    fx = sim.finish("wk", task)
    assert [(c, b["state"]) for p, t, c, b in fx.sends if p == CLIENT] == [
        (corr + wire.FOLLOW_SUFFIX, "completed")]
    assert sim.state.waiters.by_task == {}


def test_a_follow_is_up_after_its_hold_with_the_current_state():
    sim = Sim()
    (_, _, corr, body), = sim.submit(follow=2.0).sends
    assert [s for s in sim.tick(1).sends if s[0] == CLIENT] == []
    sim.state.watch.next_scan = 0  # look again at once (tick scans every WATCH_INTERVAL)
    fx = sim.tick(1.5)
    assert [(c, b["state"], b["final"]) for p, t, c, b in fx.sends if p == CLIENT] == [
        (corr + wire.FOLLOW_SUFFIX, "queued", False)]


def test_no_follow_with_wait_for_an_ended_task_or_a_full_corr():
    sim = Sim()
    sim.submit(follow=5.0, wait=5.0)  # the submit's own answer waits instead
    long_corr = b"c" * wire.MAX_CORR_BYTES
    sim.turn(sim.state.submit, CLIENT, long_corr, {"idempotency_key": "long", "type": "echo",
                                                   "follow": 5.0}, sim.now)
    assert [len(holds) for holds in sim.state.waiters.by_task.values()] == [1]
    task = sim.add()
    sim.cancel(task)
    again = sim.turn(sim.state.submit, CLIENT, b"again", {
        "idempotency_key": task.key, "type": "echo", "follow": 5.0}, sim.now)
    assert answer(again)[1]["final"] and task.id not in sim.state.waiters.by_task


@pytest.mark.parametrize("hold", [-1, 61, math.nan, "5"])
def test_wait_bad_hold_is_bad_request(hold):
    sim = Sim()
    task = sim.add()
    assert error_code(sim.state.wait, Effects(), b"p", b"c", {"id": task.id, "hold": hold},
                      NOW0) == "bad_request"


# --- settling tokens ----------------------------------------------------------------------

def test_finish_with_tokens_used_commits_and_the_reply_clears_the_order():
    sim = Sim(lease=False)  # the per-task ledger protocol (leases: test_lease_*)
    task = sim.add(tokens=100)
    corr, _ = reserve_of(sim.ready("w1"))
    sim.ledger(corr, granted=True)
    fx = sim.finish("w1", task, tokens_used=60)
    (corr, body), = ledger_requests(fx)
    assert body == {"op": "ledger.commit", "task": task.id, "attempt": 1, "used": 60,
                    "type": "echo", "agent": "client-1"}
    assert task.settle == {"1": body} and task.reserved == 0
    assert {"k": "set", "id": task.id, "reserved": 0, "settle": {"1": body}} in fx.records
    fx = sim.ledger(corr, committed=60)
    assert task.settle == {} and fx.records == [{"k": "set", "id": task.id, "settle": {}}]


def test_finish_without_tokens_used_releases_the_reservation():
    sim = Sim(lease=False)  # the per-task ledger protocol (leases: test_lease_*)
    task = sim.add(tokens=100)
    corr, _ = reserve_of(sim.ready("w1"))
    sim.ledger(corr, granted=True)
    (corr, body), = ledger_requests(sim.finish("w1", task, tokens_used=0))
    assert body == {"op": "ledger.release", "task": task.id, "attempt": 1}
    sim.ledger(corr, released=100)
    assert task.settle == {}


def test_finish_of_a_task_without_tokens_sends_no_ledger_order():
    sim = Sim()
    task = running(sim)
    assert ledger_requests(sim.finish("w1", task)) == [] and task.settle == {}


def test_lost_attempt_settles_its_own_attempt_and_the_retry_starts_clean():
    sim = Sim(lease=False)  # the per-task ledger protocol (leases: test_lease_*)
    task = sim.add(tokens=100)
    corr, _ = reserve_of(sim.ready("w1"))
    sim.ledger(corr, granted=True)
    sim.heartbeat("w1", task, tokens_used=30)
    fx = sim.gone("w1")
    (_, body), = ledger_requests(fx)
    assert body["op"] == "ledger.commit" and body["attempt"] == 1 and body["used"] == 30
    assert (task.attempt, task.reserved, task.tokens_used) == (2, 0, 0)
    sim.ready("w2")
    corr, reserve = reserve_of(sim.tick(BACKOFF_BASE))
    assert reserve["attempt"] == 2


def test_a_settle_reply_that_gives_tokens_back_lets_the_waiters_try_sooner():
    sim = Sim(lease=False)  # the per-task ledger protocol (leases: test_lease_*)
    first = sim.add(tokens=100)
    corr, _ = reserve_of(sim.ready("w1"))
    sim.ledger(corr, granted=True)
    second = sim.add(tokens=100)
    refused_twice(sim, second, worker="w2")
    (corr, _), = ledger_requests(sim.finish("w1", first, tokens_used=0))
    assert ledger_requests(sim.tick(0.0), "ledger.reserve") == []  # not confirmed yet
    sim.ledger(corr, released=100)
    assert reserve_of(sim.tick(0.0))[1]["task"] == second.id  # before its backoff (1 s)


def test_a_commit_that_gives_nothing_back_does_not_wake_the_waiters():
    sim = Sim(lease=False)  # the per-task ledger protocol (leases: test_lease_*)
    first = sim.add(tokens=100)
    corr, _ = reserve_of(sim.ready("w1"))
    sim.ledger(corr, granted=True)
    refused_twice(sim, sim.add(tokens=100), worker="w2")
    (corr, _), = ledger_requests(sim.finish("w1", first, tokens_used=100))
    sim.ledger(corr, committed=100, released=0)
    assert ledger_requests(sim.tick(0.0), "ledger.reserve") == []


# --- listing and status -------------------------------------------------------------------

def test_list_tasks_filters_by_state_and_limits():
    sim = Sim()
    tasks = [sim.add() for _ in range(5)]
    sim.cancel(tasks[0])
    listed = sim.state.list_tasks({"state": "queued", "limit": 2})
    assert [t["id"] for t in listed["tasks"]] == [tasks[3].id, tasks[4].id]
    assert all(t["payload"] is None and t["result"] is None for t in listed["tasks"])
    assert sim.state.list_tasks({})["total"] == 5


@pytest.mark.parametrize("body", [{"state": "sleeping"}, {"limit": 0}, {"limit": 10001},
                                  {"state": 1}])
def test_list_tasks_bad_arguments(body):
    assert error_code(new_state().list_tasks, body) == "bad_request"


def test_get_unknown_is_not_found():
    assert error_code(new_state().get, {"id": "t0"}) == "not_found"


def test_status_counts():
    sim = Sim()
    running(sim, "w1")
    sim.add(priority="high")
    sim.add(priority="low")
    status = sim.state.status(sim.now)
    assert status["states"] == {"running": 1, "queued": 2}
    assert status["queue"] == {"critical": 0, "high": 1, "medium": 0, "low": 1}
    assert status["workers"] == {"echo": {"idle": 0, "busy": 1, "leaving": 0}}


def _counted_in_full(state) -> tuple[dict, dict, dict]:
    """What status reports, counted the slow way: every task of the table."""
    states, queued, waiting = Counter(), Counter(), Counter()
    for t in state.tasks.values():
        states[str(t.state)] += 1
        if t.state is State.QUEUED:
            queued[t.priority] += 1
            waiting[t.waiting or "worker"] += 1
    return dict(states), dict(queued), dict(waiting)


def test_status_counts_the_whole_table_live_and_after_a_restart():
    sim = Sim(lease=False, retention=3)
    running(sim, "w1")
    for i in range(6):  # more finished than retention keeps
        sim.cancel(sim.add(priority="low", idempotency_key=f"gone{i}"))
    sim.add(priority="high")
    sim.add(tokens=10**9)  # waits for tokens, queued all the same
    sim.add(priority="low")
    fresh = replay(sim.records, overrides={"lease": False, "retention": 3})
    fresh.monitor = ResourceMonitor(sample=lambda: IDLE_MACHINE)
    fresh.restore(sim.now)
    for state in (sim.state, fresh):
        status = state.status(sim.now)
        states, queued, waiting = _counted_in_full(state)
        assert status["states"] == states and states["cancelled"] == 3
        assert {p: n for p, n in status["queue"].items() if n} == queued
        assert sum(status["queued_by_reason"].values()) == sum(waiting.values()) == 3


def test_retention_forgets_the_oldest_finished_tasks_and_their_keys():
    sim = Sim(retention=2)
    done = []
    for i in range(3):
        task = sim.add(idempotency_key=f"r{i}")
        sim.cancel(task)
        done.append(task)
    assert done[0].id not in sim.state.tasks and "r0" not in sim.state.table.keys
    assert [t.id for t in done[1:]] == list(sim.state.tasks)
    again = sim.add(idempotency_key="r0")  # its key is free again: a new task
    assert again.id != done[0].id


# --- journal replay, snapshots, restore ---------------------------------------------------

COMPARED = ("type", "priority", "key", "agent", "tokens", "timeout", "retries", "payload",
            "deadline", "state", "attempt", "worker", "result", "error", "tokens_used",
            "reserved", "settle")
TRANSIENT_TIMES = {"started", "heartbeat", "recovered"}  # not journaled on purpose


def table(state: SchedulerState) -> dict:
    """The journaled part of every task. Tokens used by an attempt in flight come with its
    heartbeats (not journaled: the worker reports them again after a restart); the final
    count is journaled with a completion (other ends: see the xfail test below)."""
    return {t.id: {f: getattr(t, f) for f in COMPARED}
            | {"times": {k: v for k, v in t.times.items() if k not in TRANSIENT_TIMES},
               "tokens_used": t.tokens_used if t.state is State.COMPLETED else None}
            for t in state.tasks.values()}


@pytest.mark.parametrize("end", ["cancel", "lost"])
def test_final_tokens_used_survives_replay(end):
    sim = Sim()
    task = running(sim, "w1", retries=0)
    sim.heartbeat("w1", task, tokens_used=9)
    sim.cancel(task) if end == "cancel" else sim.gone("w1")
    assert task.final and task.tokens_used == 9
    assert replay(sim.records).tasks[task.id].tokens_used == 9


def replay(records, snapshot=None, overrides=None) -> SchedulerState:
    fresh = new_state(**(overrides or {}))
    if snapshot is not None:
        fresh.load_snapshot(journal_copy(snapshot))
    for record in records:
        fresh.apply(journal_copy(record))
    return fresh


def scenario() -> Sim:
    """A bit of everything: tokens, a loss and retry, a cancel, failures, a timeout (the
    tokens by the per-task ledger protocol; leases: test_lease_scheduler.py)."""
    sim = Sim(lease=False)
    a = sim.add(tokens=100, payload={"n": 1})
    b = sim.add(priority="high", retries=0)
    c = sim.add()
    d = sim.add(timeout=5.0)
    sim.ready("w1")  # b
    sim.ready("w2")  # a: reserve
    corr, _ = [(k, v[1]) for k, v in sim.state.ledger.pending.items()][0]
    sim.ledger(corr, granted=True)
    sim.started("w1", b)
    sim.started("w2", a)
    sim.finish("w1", b, ok=False, error={"category": "handler_error", "message": "boom"})
    sim.heartbeat("w2", a, tokens_used=10)
    sim.gone("w2")  # a: retry as attempt 2, commit 10 for attempt 1
    sim.cancel(c)
    sim.ready("w3")
    sim.tick(BACKOFF_BASE)
    sim.tick(6.0)  # d timed out on w3
    sim.ready("w4")
    sim.ready("w5")
    for _ in range(4):  # the rest runs to the end
        sim.tick(2.0)
        for corr in list(sim.state.ledger.pending):
            body = sim.state.ledger.pending[corr][1]
            sim.ledger(corr, **({"granted": True} if body["op"] == "ledger.reserve" else {}))
        for name, worker in list(sim.state.workers.items()):
            task = sim.state.tasks.get(worker.task or "")
            if task is not None and worker.state == "busy":
                sim.finish(name, task, tokens_used=3)
    assert [str(t.state) for t in (a, b, c, d)] == ["completed", "failed", "cancelled",
                                                    "completed"]
    assert (a.attempt, d.attempt) == (2, 2)
    return sim


def test_scenario_touches_every_kind_of_change():
    sim = scenario()
    kinds = {r["k"] for r in sim.records}
    states = {r.get("state") for r in sim.records}
    assert kinds == {"new", "set"}
    assert {"dispatched", "running", "queued", "completed", "failed", "cancelled"} <= states


def test_replay_of_every_record_rebuilds_the_task_table():
    sim = scenario()
    assert table(replay(sim.records, overrides={"lease": False})) == table(sim.state)


def test_every_record_is_journalable():
    for record in scenario().records:
        orjson.dumps(record)


def test_snapshot_plus_the_records_after_it_rebuilds_the_same_table():
    sim = Sim()
    a = sim.add(tokens=10)
    b = sim.add()
    sim.ready("w1")
    corr, _ = [(k, v[1]) for k, v in sim.state.ledger.pending.items()][0]
    snap, upto = journal_copy(sim.state.snapshot()), len(sim.records)
    sim.ledger(corr, granted=True)
    sim.ready("w2")
    sim.finish("w1", a, tokens_used=4)
    sim.gone("w2")
    assert b.attempt == 2
    fresh = replay(sim.records[upto:], snapshot=snap)
    assert table(fresh) == table(sim.state)
    assert fresh.counters == journal_copy(snap)["counters"]


def test_snapshot_keeps_refusals():
    sim = Sim(max_queue_per_type=0)
    refusal = answer(sim.submit(idempotency_key="no"))
    fresh = replay([], snapshot=sim.state.snapshot())
    fx = Effects()
    fresh.submit(fx, CLIENT, b"c", {"idempotency_key": "no", "type": "echo"}, NOW0)
    assert answer(fx) == refusal


def test_replay_keeps_refusals():
    sim = Sim(max_queue_per_type=0)
    refusal = answer(sim.submit(idempotency_key="no"))
    fresh = replay(sim.records)
    fx = Effects()
    fresh.submit(fx, CLIENT, b"c", {"idempotency_key": "no", "type": "echo"}, NOW0)
    assert answer(fx) == refusal


def test_restore_requeues_queued_holds_in_flight_and_resends_settle_orders():
    sim = Sim(lease=False)  # the per-task ledger protocol (leases: test_lease_*)
    in_flight = running(sim, "w1")
    sim.now += 1
    sim.add()  # stays queued
    settled = sim.add(tokens=9)
    sim.cancel(settled)  # a release order not confirmed before the "crash"
    fresh = replay(sim.records, overrides={"lease": False})
    fresh.monitor = ResourceMonitor(sample=lambda: IDLE_MACHINE)
    fresh.restore(sim.now)
    flight = fresh.tasks[in_flight.id]
    assert flight.state is State.RUNNING and flight.times["recovered"] == sim.now.wall
    orders = [body for _, body in fresh.ledger.pending.values()]
    assert orders == [{"op": "ledger.release", "task": settled.id, "attempt": 1}]
    fx = Effects()
    fresh.tick(fx, sim.now, HB)
    assert [b for p, _, _, b in fx.sends if p == b"ledger"] == orders  # re-sent at once
    fx = Effects()
    fresh.worker_ready(fx, "w9", {"types": ["echo"]}, sim.now)
    fresh.dispatch(fx, sim.now)
    assert len(runs(fx)) == 1  # the queued one, now w9's
    fx = Effects()
    fresh.tick(fx, sim.now + 3 * HB + 1, HB)  # the in-flight worker never spoke again
    assert flight.state is State.QUEUED and flight.attempt == 2


# A random walk through the scheduler's handlers; then replay and snapshot + replay must
# give the live task table back. Worker reports go to a worker that holds a task (picked
# by index), so the walk reaches running, finished, lost and retried tasks.
WORKERS = {"w0": ("echo",), "w1": ("echo", "llm"), "w2": ("llm",)}
worker_names = st.sampled_from(sorted(WORKERS))
pick = st.integers(0, 7)
submit_op = st.tuples(st.just("submit"), st.sampled_from(["critical", "high", "medium", "low"]),
                      st.sampled_from([0, 0, 50]), st.integers(0, 2), st.integers(0, 9),
                      st.sampled_from(["echo", "llm"]))
ops = st.one_of(
    submit_op, submit_op,
    st.tuples(st.just("ready"), worker_names),
    st.tuples(st.just("started"), pick),
    st.tuples(st.just("started"), pick),
    st.tuples(st.just("heartbeat"), pick, st.sampled_from([0, 9])),
    st.tuples(st.just("finish"), pick, st.booleans(), st.sampled_from([0, 7])),
    st.tuples(st.just("finish"), pick, st.booleans(), st.sampled_from([0, 7])),
    st.tuples(st.just("stale_finish"), pick),
    st.tuples(st.just("gone"), worker_names),
    st.tuples(st.just("leaving"), worker_names),
    st.tuples(st.just("rejected"), pick),
    st.tuples(st.just("ledger"), st.booleans(), st.booleans()),
    st.tuples(st.just("ledger"), st.just(True), st.booleans()),
    st.tuples(st.just("cancel"), pick),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 0.1, 0.5, 2.0, 20.0, 400.0])),
    st.tuples(st.just("snapshot")),
)


def run_op(sim: Sim, op: tuple, ids: list[str]) -> None:
    kind, *args = op
    state = sim.state
    holding = sorted((w.name, w.task) for w in state.workers.values()
                     if w.task in state.tasks and w.state == "busy")
    if kind == "submit":
        priority, tokens, retries, key, type_ = args
        fx = sim.submit(priority=priority, tokens=tokens, retries=retries, type=type_,
                        idempotency_key=f"k{key}", timeout=300.0)
        kind_, body = answer(fx)
        if kind_ == wire.REPLY and body["id"] not in ids:
            ids.append(body["id"])
    elif kind == "ready":
        sim.ready(args[0], WORKERS[args[0]])
    elif kind in ("started", "heartbeat", "finish", "rejected"):
        if not holding:
            return
        name, task_id = holding[args[0] % len(holding)]
        task = state.tasks[task_id]
        if kind == "started":
            sim.started(name, task)
        elif kind == "heartbeat":
            sim.heartbeat(name, task, tokens_used=args[1])
        elif kind == "finish":
            sim.finish(name, task, ok=args[1], tokens_used=args[2])
        else:
            sim.turn(state.task_rejected, name, {"id": task.id, "attempt": task.attempt},
                     sim.now)
    elif kind == "stale_finish":
        retried = [t for t in map(state.tasks.get, ids) if t is not None and t.attempt > 1]
        if retried:
            task = retried[args[0] % len(retried)]
            sim.finish("w-old", task, attempt=task.attempt - 1)  # its lost worker
    elif kind == "gone":
        sim.gone(args[0])
    elif kind == "leaving":
        sim.turn(state.worker_leaving, args[0], {"reason": "stopping"}, sim.now)
    elif kind == "ledger":
        if state.ledger.pending:
            corr = next(iter(state.ledger.pending))
            ok, granted = args
            sim.ledger(corr, ok=ok, granted=granted, code=None if ok else "unavailable")
    elif kind == "cancel":
        live = [i for i in ids if i in state.tasks]
        if live:
            sim.cancel(state.tasks[live[args[0] % len(live)]])
    elif kind == "tick":
        sim.tick(args[0])


def check_invariants(state: SchedulerState) -> None:
    # A queued task is in the dispatch queue unless it is held out (waiting for its retry)
    # or its tokens are being reserved.
    reserving = {body["task"] for _, body in state.ledger.pending.values()
                 if body["op"] == "ledger.reserve"}
    queued = {}
    for task in state.tasks.values():
        if task.state is State.QUEUED and task.id not in state.waiting.held \
                and task.id not in reserving:
            queued[task.type] = queued.get(task.type, 0) + 1
        if task.state is State.QUEUED:
            assert task.waiting is not None
        else:
            assert task.waiting is None and task.id not in state.waiting.held
        if task.state in (State.DISPATCHED, State.RUNNING):
            assert task.worker is not None
        if task.final:
            assert task.id not in state.waiters.by_task and task.id not in state.marks
    for task_type in set(queued) | set(state.queue.counts):
        assert state.queue.depth(task_type) == queued.get(task_type, 0), task_type
    for task in state.tasks.values():  # the worker record agrees with the task's
        worker = state.workers.get(task.worker or "")
        if task.state in (State.DISPATCHED, State.RUNNING) and worker is not None:
            assert worker.state in ("busy", "leaving") and task.id in (
                worker.task, worker.prefetched)
            assert (worker.prefetched == task.id) is task.prefetched
    claimed = [w.task for w in state.workers.values() if w.state == "claimed"]
    assert len(claimed) == len(set(claimed))
    for task_id in claimed:
        task = state.tasks.get(task_id)
        assert task is None or task.state is not State.QUEUED or \
            task.waiting in ("reserving", "tokens")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=10, max_size=60))
@pytest.mark.parametrize("prefetch", [0, 1])
def test_snapshot_and_replay_equal_the_live_state(prefetch, sequence):
    sim = Sim(prefetch=prefetch)
    for name, types in WORKERS.items():
        sim.ready(name, types)
    ids: list[str] = []
    snapshots = [(None, 0)]
    for op in sequence:
        if op[0] == "snapshot":
            snapshots.append((journal_copy(sim.state.snapshot()), len(sim.records)))
            continue
        leaving = {w.name for w in sim.state.workers.values() if w.state == "leaving"}
        turns = len(sim.effects)
        run_op(sim, op, ids)
        check_invariants(sim.state)
        for fx in sim.effects[turns:]:  # a worker that said it is leaving gets no task
            assert not {name for name, _ in runs(fx)} & leaving
    live = table(sim.state)
    # Trimming a finished task's payload and result is not journaled (the log keeps them).
    trimmed = {t.id for t in sim.state.tasks.values() if t.trimmed}
    for row in trimmed:
        live[row]["payload"] = live[row]["result"] = None
    for snap, upto in snapshots:
        replayed = table(replay(sim.records[upto:], snapshot=snap))
        for row in trimmed:
            replayed[row]["payload"] = replayed[row]["result"] = None
        assert replayed == live


# -- surge and autoscaling ---------------------------------------------------------------
def scale_requests(fx: Effects) -> list[dict]:
    return [b for p, t, _, b in fx.sends if p == b"pool" and b.get("op") == "pool.scale"]


def busy_sim(task_seconds: float, workers: int = 2, **overrides) -> Sim:
    """All `workers` echo workers busy with tasks the scheduler expects to take
    `task_seconds` (the per-type average: no predictor)."""
    sim = Sim(**overrides)
    sim.state.estimates.avg_duration["echo"] = task_seconds
    for i in range(workers):
        sim.ready(f"w{i}")
        sim.add(description=f"long {i}")
    assert all(w.state == "busy" for w in sim.state.workers.values())
    return sim


def scale_turn(sim: Sim) -> Effects:
    return sim.turn(sim.state.scale, sim.now, dispatch=False)


def test_critical_task_surges_when_busy_workers_free_later_than_a_new_one_starts():
    sim = busy_sim(10.0, worker_start=0.5)
    sim.add(priority="critical", description="urgent")
    fx = scale_turn(sim)
    [request] = scale_requests(fx)
    assert request["type"] == "echo" and request["add"] == 1
    [(_, data, _, _)] = events(fx, "scheduler.scale")
    assert data["why"] == "critical task waiting"
    assert data["worker_free_in_s"] == pytest.approx(10.0) and data["worker_start_s"] == 0.5
    assert sim.state.status(sim.now)["counters"]["surges"] == 1  # shown by cortex status


def test_critical_task_waits_for_a_busy_worker_that_frees_sooner_than_a_new_one_starts():
    sim = busy_sim(0.05, worker_start=0.5)
    sim.add(priority="critical", description="urgent")
    fx = scale_turn(sim)
    assert scale_requests(fx) == []
    [(_, data, _, _)] = events(fx, "scheduler.surge_declined")
    assert data["worker_free_in_s"] == pytest.approx(0.05) and data["worker_start_s"] == 0.5
    # Explained once per critical task, not on every turn.
    assert events(scale_turn(sim), "scheduler.surge_declined") == []


def test_an_overdue_task_stops_counting_as_about_to_free_its_worker():
    sim = busy_sim(0.05, worker_start=0.5)
    sim.add(priority="critical", description="urgent")
    assert scale_requests(scale_turn(sim)) == []
    sim.now += 0.3  # 0.25 s overdue: "as long again" is still sooner than a new worker
    assert scale_requests(scale_turn(sim)) == []
    sim.now += 0.3  # 0.55 s overdue
    [request] = scale_requests(scale_turn(sim))
    assert request["reason"]["why"] == "critical task waiting"


def test_no_scaling_past_memory_headroom_but_critical_may_surge_under_pressure():
    pressure = Readings(cpu_free_cores=2.0, mem_available_mb=4000.0, mem_percent=90.0,
                        mem_total_mb=40000.0, cpu_cores=2)
    sim = busy_sim(10.0, scale_backlog=1.0)
    sim.state.monitor = ResourceMonitor(sample=lambda: pressure)
    sim.add(description="backlog")
    fx = scale_turn(sim)
    assert scale_requests(fx) == []
    [(_, data, _, _)] = events(fx, "scheduler.scale_blocked")
    assert data["why"] == "no memory headroom for another worker"
    assert data["readings"]["mem_percent"] == 90.0 and data["backlog_s"] > 1.0
    sim.add(priority="critical", description="urgent")
    [request] = scale_requests(scale_turn(sim))
    assert request["reason"]["why"] == "critical task waiting"


def test_no_surge_when_a_worker_would_not_fit_in_memory():
    full = Readings(cpu_free_cores=2.0, mem_available_mb=20.0, mem_percent=99.0,
                    mem_total_mb=4000.0, cpu_cores=2)
    sim = busy_sim(10.0)
    sim.state.monitor = ResourceMonitor(sample=lambda: full)
    sim.add(priority="critical", description="urgent")
    fx = scale_turn(sim)
    assert scale_requests(fx) == []
    [(_, data, _, _)] = events(fx, "scheduler.scale_blocked")
    assert data["needs"]["memory_mb"] > data["readings"]["mem_available_mb"]
    assert sim.state.counters["scale_blocked"] == 1 and sim.state.counters["surges"] == 0


def test_backlog_scaling_has_hysteresis_and_says_why():
    sim = busy_sim(10.0, scale_backlog=1.0)
    sim.add(description="backlog")
    [request] = scale_requests(scale_turn(sim))
    assert request["reason"]["why"] == "backlog"
    assert request["reason"]["backlog_s"] == pytest.approx(1 * 10.0 / 2)  # queued x s / workers
    assert scale_requests(scale_turn(sim)) == []  # cooling down
    sim.now += SCALE_COOLDOWN
    assert len(scale_requests(scale_turn(sim))) == 1


def test_worker_start_time_is_learned_from_the_workers_asked_for():
    sim = busy_sim(10.0, worker_start=0.5)
    sim.add(priority="critical", description="urgent")
    assert scale_requests(scale_turn(sim))
    sim.now += 2.0
    sim.ready("surge-1")
    assert sim.state.scaler.worker_start_s == pytest.approx(0.7 * 0.5 + 0.3 * 2.0)


# -- CPU feasibility from predictions ----------------------------------------------------
class FixedPredictor:
    """Predicts the same for every task of a type (a learned model's stand-in)."""

    def __init__(self, **by_type):
        self.by_type = by_type

    def observe(self, *args) -> None:
        pass

    def predict(self, task_type, priority, description, size):
        from cortex.services.scheduler.prediction.predictor import Prediction

        duration, cores = self.by_type.get(task_type, (1.0, 0.0))[:2]
        memory = self.by_type.get(task_type, (0, 0, 10.0))[2:] or (10.0,)
        return Prediction(duration=duration, tokens=0.0, memory_mb=memory[0],
                          cpu_s=duration * cores, source="model")


def cpu_sim(free_cores: float, **by_type) -> Sim:
    sim = Sim()
    sim.state.predictor = FixedPredictor(**by_type)
    busy = Readings(cpu_free_cores=free_cores, mem_available_mb=1e5, mem_percent=10.0,
                    mem_total_mb=1e6, cpu_cores=2)
    sim.state.monitor = ResourceMonitor(sample=lambda: busy, interval=1.0)
    return sim


def test_a_long_cpu_bound_task_waits_for_cpu_while_others_that_fit_go_ahead():
    sim = cpu_sim(0.3, heavy=(5.0, 1.0), echo=(0.01, 0.5))
    heavy = sim.add(type="heavy", priority="high")
    light = sim.add(type="echo", priority="low")
    fx = sim.ready("w1", ("heavy", "echo"))
    # The heavy one needs a whole core for 5 s; the light one 0.5 cores for 10 ms of the
    # 1 s interval, i.e. 0.005 cores: it runs though it ranks lower (no head-of-line).
    assert [t["id"] for _, t in runs(fx)] == [light.id]
    assert heavy.waiting == "cpu" and heavy.state is State.QUEUED
    [(_, data, _, _)] = events(fx, "task.waiting")
    assert data["reason"] == "cpu" and data["detail"]["check"] == "cpu"
    assert data["detail"]["need_cores"] == pytest.approx(1.0)
    assert heavy.waiting_detail == data["detail"]
    assert sim.state.status(sim.now)["waiting"] == {"cpu": 1}


def test_running_short_tasks_add_up_to_a_cpu_wait():
    sim = cpu_sim(0.35, echo=(0.1, 1.0))  # each: 1 core for a tenth of the interval
    tasks = [sim.add(description=f"t{i}") for i in range(6)]
    for i in range(6):
        sim.ready(f"w{i}")
    started = [t for t in tasks if t.state is State.DISPATCHED]
    # 0.35 free + 0.1 slack: four running tasks of 0.1 cores fit.
    assert len(started) == 4
    assert all(t.waiting == "cpu" for t in tasks if t.state is State.QUEUED)


def test_scaling_up_respects_cpu_headroom():
    sim = cpu_sim(0.2, echo=(10.0, 1.0))
    sim.ready("w0")
    sim.state.monitor = ResourceMonitor(sample=lambda: IDLE_MACHINE)
    sim.add()  # runs on w0 while the machine is idle
    busy = Readings(cpu_free_cores=0.2, mem_available_mb=1e5, mem_percent=10.0,
                    mem_total_mb=1e6, cpu_cores=2)
    sim.state.monitor = ResourceMonitor(sample=lambda: busy)
    sim.state.settings = SchedulerSettings(scale_backlog=1.0)
    sim.add()
    fx = scale_turn(sim)
    assert scale_requests(fx) == []
    [(_, data, _, _)] = events(fx, "scheduler.scale_blocked")
    assert data["why"] == "no cpu headroom for another worker"
    assert data["needs"]["cpu"] == pytest.approx(1.0)


def test_cpu_counts_as_committed_only_once_a_task_is_dispatched():
    sim = cpu_sim(1.0, echo=(2.0, 0.5))  # a full interval at half a core: 0.5 cores
    task = sim.add(tokens=100)
    corr, _ = reserve_of(sim.ready("w1"))
    readings = sim.state.monitor.readings(0.0)
    assert sim.state.holds.held(readings)["cpu"] == 0.0  # a pending reservation holds no CPU
    sim.ledger(corr, ok=True, granted=True, reserved=100)
    assert task.state is State.DISPATCHED
    assert sim.state.holds.held(readings)["cpu"] == pytest.approx(0.5)


def test_a_finished_tasks_share_is_released_at_once():
    sim = cpu_sim(1.0, heavy=(5.0, 1.0))
    first, second = sim.add(type="heavy"), sim.add(type="heavy")
    sim.ready("w1", ("heavy",))
    sim.ready("w2", ("heavy",))
    assert first.state is State.DISPATCHED and second.waiting == "cpu"
    samples = sim.state.monitor.samples
    fx = sim.finish("w1", first)
    sim.tick(BLOCKED_RETRY)  # the held task is looked at again: no new reading
    assert sim.state.monitor.samples == samples
    assert second.state is State.DISPATCHED, runs(fx)
    assert set(sim.state.holds.holds) == {second.id}


def test_a_long_cpu_bound_task_waits_while_running_tasks_hold_the_cores():
    idle_two = Readings(cpu_free_cores=2.0, mem_available_mb=1e5, mem_percent=10.0,
                        mem_total_mb=1e6, cpu_cores=2)
    sim = cpu_sim(2.0, heavy=(30.0, 1.0))
    sim.state.monitor = ResourceMonitor(sample=lambda: idle_two)
    tasks = [sim.add(type="heavy", description=f"h{i}") for i in range(3)]
    for i in range(3):
        sim.ready(f"w{i}", ("heavy",))
    assert [t.state for t in tasks] == [State.DISPATCHED, State.DISPATCHED, State.QUEUED]
    assert tasks[2].waiting == "cpu"
    sim.finish(tasks[0].worker, tasks[0])
    sim.tick(BLOCKED_RETRY)
    assert tasks[2].state is State.DISPATCHED


def test_one_type_of_sleeps_and_no_ops_never_waits_on_an_idle_machine():
    """The one-type workload: the type's history is 0.1 s sleeps then no-ops, all on one
    handler. With the suite's own CPU not counted as load, no task waits for cpu or
    memory however many no-ops are dispatched back to back."""
    from cortex.services.scheduler.prediction.predictor import Predictor

    predictor = Predictor(None)
    for _ in range(50):
        predictor.observe("work", "medium", "", 20, {"duration": 0.1, "tokens": 0.0,
                                                      "memory_mb": 0.0, "cpu_s": 0.002})
    sim = Sim()
    sim.state.predictor = predictor
    two = Readings(cpu_free_cores=2.0, mem_available_mb=8000.0, mem_percent=30.0,
                   mem_total_mb=16000.0, cpu_cores=2)
    sim.state.monitor = ResourceMonitor(sample=lambda: two)
    workers = [f"w{i}" for i in range(20)]
    for name in workers:
        sim.ready(name, ("work",))
    waited = []
    for round_ in range(100):
        tasks = [sim.add(type="work", description="") for _ in range(20)]
        for task in tasks:
            assert task.state is State.DISPATCHED, (round_, task.waiting)
        for task in tasks:
            fx = sim.finish(task.worker, task, cpu_s=36e-6, mem_mb=0.0)
            waited += events(fx, "task.waiting")
            predictor.observe("work", "medium", "", 20, {"duration": 40e-6, "tokens": 0.0,
                                                          "memory_mb": 0.0, "cpu_s": 36e-6})
    assert waited == []
    assert not sim.state.holds.holds


def test_an_unpredicted_cpu_hog_counts_once_it_ran_through_a_reading():
    readings = iter([])

    def sample():
        return next(readings)

    sim = Sim()
    sim.state.monitor = ResourceMonitor(sample=sample, interval=1.0)
    quiet = Readings(cpu_free_cores=2.0, mem_available_mb=1e5, mem_percent=10.0,
                     mem_total_mb=1e6, cpu_cores=2, per_pid={100: (0.0, 50.0)})
    hog = Readings(cpu_free_cores=2.0, mem_available_mb=1e5, mem_percent=10.0,
                   mem_total_mb=1e6, cpu_cores=2, per_pid={100: (1.0, 50.0)})
    readings = iter([quiet, hog, hog])
    sim.ready("w1", pid=100)
    task = sim.add()  # nothing learned: it holds nothing by prediction
    assert task.state is State.DISPATCHED
    mon = sim.state.monitor
    second = mon.readings(mon.sampled_at + 1.0)  # its worker ran it through this interval...
    assert sim.state.holds.held(second)["cpu"] == 0.0  # ...but not through the whole of it
    third = mon.readings(mon.sampled_at + 1.0)
    assert sim.state.holds.held(third)["cpu"] == pytest.approx(1.0)


def test_memory_a_task_already_took_is_not_held_twice():
    grown = Readings(cpu_free_cores=2.0, mem_available_mb=1e5, mem_percent=10.0,
                     mem_total_mb=1e6, cpu_cores=2, per_pid={100: (0.1, 850.0)})
    start = Readings(cpu_free_cores=2.0, mem_available_mb=1e5, mem_percent=10.0,
                     mem_total_mb=1e6, cpu_cores=2, per_pid={100: (0.1, 50.0)})
    sample = iter([start, grown])
    sim = cpu_sim(2.0, big=(30.0, 0.1, 1000.0))
    sim.state.monitor = ResourceMonitor(sample=lambda: next(sample), interval=1.0)
    sim.ready("w1", ("big",), pid=100)
    task = sim.add(type="big")
    assert task.state is State.DISPATCHED
    mon = sim.state.monitor
    assert sim.state.holds.held(mon.latest)["memory_mb"] == pytest.approx(1000.0)
    later = mon.readings(mon.sampled_at + 1.0)  # the worker grew by 800 MB meanwhile
    assert sim.state.holds.held(later)["memory_mb"] == pytest.approx(200.0)


def test_an_idle_scheduler_trims_old_results_at_its_timeout_scan():
    sim = Sim(keep_results=60.0)
    sim.ready("w1")
    task = sim.add(description="kept a minute")
    sim.started("w1", task)
    sim.finish("w1", task)
    assert task.result is not None and not task.trimmed
    sim.tick(30.0)
    assert task.result is not None  # within keep_results
    sim.tick(61.0)  # nothing submitted or finished since: the scan alone trims it
    assert task.trimmed and task.result is None and task.payload is None
