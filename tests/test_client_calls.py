"""The client core without sockets: the call machine (`calls.py`) and the operations'
plans (`operations.py`) driven over a fake transport with a fake clock."""

from __future__ import annotations

import heapq
import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cortex.protocol import errors, wire
from cortex.protocol.calls import (
    MAX_FOLLOWED,
    PAUSE_BASE,
    PAUSE_CAP,
    RESEND_AFTER,
    Request,
    Session,
    check_size,
    decode_event,
    drive,
    exchange,
)
from cortex.protocol.operations import WAIT_HOLD, Plans

HOME = "/tmp/cx-fake-home"


class FakeBus:
    """A transport and clock for one session: records what is sent, delivers scripted
    answers at their time, and lets time pass while nothing comes."""

    def __init__(self, respond=None, *, heard: bool = True, timeout: float = 10.0,
                 connect_timeout: float = 2.0, seed: int = 7):
        self.now = 1000.0
        self.session = Session(HOME, timeout=timeout, connect_timeout=connect_timeout,
                               clock=lambda: self.now, rng=random.Random(seed))
        if heard:
            self.session.heard()
        self.respond = respond  # respond(bus, corr, body) on every send
        self.sent: list[tuple[float, str, bytes, dict]] = []
        self._inbox: list = []
        self._order = itertools.count()

    def send(self, frames: list) -> None:
        msg = wire.parse(frames)
        assert msg.type == wire.REQUEST
        body = msg.decoded()
        self.sent.append((self.now, body["op"], msg.corr, body))
        if self.respond is not None:
            self.respond(self, msg.corr, body)

    def answer(self, corr: bytes, body: dict, *, after: float = 0.0, error: bool = False):
        kind = wire.ERROR if error else wire.REPLY
        msg = wire.Message(kind, b"scheduler", corr, wire.encode_body(body))
        heapq.heappush(self._inbox, (self.now + after, next(self._order), msg))

    def receive(self, seconds: float):
        if self._inbox and self._inbox[0][0] <= self.now + seconds:
            at, _, msg = heapq.heappop(self._inbox)
            self.now = max(self.now, at)
            self.session.heard()
            return msg
        self.now += seconds
        return None

    def run(self, request: Request):
        return exchange(self.session, request, self.send, self.receive)

    def plans(self) -> Plans:
        return Plans(self.session, "agent-1")

    def run_plan(self, plan):
        return drive(plan, self.run)


def replying(body: dict, after: float = 0.0):
    return lambda bus, corr, _req: bus.answer(corr, body, after=after)


# --- the call machine -------------------------------------------------------------------

def test_a_reply_is_the_value_and_echoes_the_correlation_id():
    bus = FakeBus(replying({"ok": 1}, after=0.01))
    assert bus.run(Request("scheduler", "task.status", {"id": "t1"})) == {"ok": 1}
    assert len(bus.sent) == 1
    _, op, corr, body = bus.sent[0]
    assert (op, body) == ("task.status", {"op": "task.status", "id": "t1"})
    assert len(corr) == 12
    assert bus.session.calls == {}  # nothing left in flight


def test_every_call_gets_its_own_correlation_id():
    bus = FakeBus(replying({}))
    for _ in range(3):
        bus.run(Request("ledger", "ledger.status"))
    assert len({corr for _, _, corr, _ in bus.sent}) == 3


def test_silence_is_resent_with_the_same_id_until_the_deadline():
    bus = FakeBus()  # nobody answers
    with pytest.raises(errors.Timeout, match="scheduler did not answer task.status within 3 s"):
        bus.run(Request("scheduler", "task.status", {"id": "t1"}, timeout=3.0))
    times = [t - 1000.0 for t, *_ in bus.sent]
    assert times == pytest.approx([0.0, RESEND_AFTER, 2 * RESEND_AFTER])
    assert len({corr for _, _, corr, _ in bus.sent}) == 1
    assert bus.now == pytest.approx(1003.0)


def test_a_lost_request_is_recovered_by_the_resend():
    def second_copy_only(bus, corr, _body):
        if len(bus.sent) == 2:
            bus.answer(corr, {"state": "queued"})

    bus = FakeBus(second_copy_only)
    assert bus.run(Request("scheduler", "task.submit", {"idempotency_key": "k"})) == \
        {"state": "queued"}
    assert [t - 1000.0 for t, *_ in bus.sent] == pytest.approx([0.0, RESEND_AFTER])


def test_unavailable_backs_off_capped_with_jitter_then_succeeds():
    def unavailable_six_times(bus, corr, _body):
        if len(bus.sent) <= 6:
            bus.answer(corr, wire.error_body("unavailable", "scheduler is not connected"),
                       error=True)
        else:
            bus.answer(corr, {"done": True})

    bus = FakeBus(unavailable_six_times, timeout=30.0)
    assert bus.run(Request("scheduler", "task.status", {"id": "t"})) == {"done": True}
    times = [t for t, *_ in bus.sent]
    pauses = [b - a for a, b in itertools.pairwise(times)]
    assert len(pauses) == 6
    for attempt, pause in enumerate(pauses, start=1):
        exact = min(PAUSE_CAP, PAUSE_BASE * 2 ** (attempt - 1))
        assert exact * 0.8 <= pause <= exact * 1.2, (attempt, pause)
    assert pauses[-1] <= PAUSE_CAP * 1.2  # capped
    assert len(set(pauses)) == len(pauses)  # jittered, not lock-step


def test_two_clients_failing_together_do_not_retry_together():
    def always_unavailable(bus, corr, _body):
        bus.answer(corr, wire.error_body("unavailable", "down"), error=True)

    schedules = []
    for seed in (1, 2):
        bus = FakeBus(always_unavailable, timeout=5.0, seed=seed)
        with pytest.raises(errors.Unavailable):
            bus.run(Request("scheduler", "task.status", {"id": "t"}))
        schedules.append([round(t, 6) for t, *_ in bus.sent])
    assert schedules[0][1:] != schedules[1][1:]


def test_unavailable_until_the_deadline_raises_unavailable_with_the_reason():
    def always_unavailable(bus, corr, _body):
        bus.answer(corr, wire.error_body("unavailable", "ledger is not connected"), error=True)

    bus = FakeBus(always_unavailable, timeout=4.0)
    with pytest.raises(errors.Unavailable, match="ledger is not connected") as info:
        bus.run(Request("ledger", "ledger.status"))
    assert info.value.code == "unavailable"
    assert bus.now <= 1004.0 + 1e-9  # never waits past the deadline
    assert len(bus.sent) >= 5  # it kept trying in between


@pytest.mark.parametrize("code, cls", [
    ("not_found", errors.NotFound), ("queue_full", errors.QueueFull),
    ("rejected", errors.Rejected), ("bad_request", errors.BadRequest),
    ("budget_exceeded", errors.BudgetExceeded), ("conflict", errors.CortexError),
])
def test_errors_are_typed_and_not_retried(code, cls):
    bus = FakeBus(lambda bus, corr, _b: bus.answer(corr, wire.error_body(code, "no: " + code),
                                                   error=True))
    with pytest.raises(cls) as info:
        bus.run(Request("scheduler", "task.status", {"id": "t"}))
    assert type(info.value) is cls
    assert info.value.code == code and str(info.value) == "no: " + code
    assert info.value.details == {"code": code, "message": "no: " + code}
    assert len(bus.sent) == 1


def test_an_unreadable_answer_is_an_error_not_a_crash():
    def garbage(bus, corr, _b):
        msg = wire.Message(wire.REPLY, b"scheduler", corr, b"\xc1\xc1")
        heapq.heappush(bus._inbox, (bus.now, next(bus._order), msg))

    bus = FakeBus(garbage)
    with pytest.raises(errors.CortexError, match="unreadable answer to task.status") as info:
        bus.run(Request("scheduler", "task.status", {"id": "t"}))
    assert info.value.code == "bad_request"


def test_a_late_reply_to_an_earlier_call_is_dropped_and_counted():
    bus = FakeBus()
    with pytest.raises(errors.Timeout):
        bus.run(Request("scheduler", "task.status", {"id": "old"}, timeout=0.5))
    old_corr = bus.sent[-1][2]

    def late_then_own(bus, corr, _b):
        bus.answer(old_corr, {"id": "old"}, after=0.01)  # the first call's answer, too late
        bus.answer(corr, {"id": "new"}, after=0.02)

    bus.respond = late_then_own
    assert bus.run(Request("scheduler", "task.status", {"id": "new"})) == {"id": "new"}
    assert bus.session.late == 1


def test_the_first_of_two_answers_wins():
    def answers_every_copy_slowly(bus, corr, _b):
        bus.answer(corr, {"copy": len(bus.sent)}, after=1.5)  # slower than the re-send

    bus = FakeBus(answers_every_copy_slowly)
    assert bus.run(Request("scheduler", "task.status", {"id": "t"})) == {"copy": 1}
    assert len(bus.sent) == 2  # re-sent once before the first answer came
    bus.respond = replying({"next": True}, after=2.0)  # after the stray copy
    assert bus.run(Request("scheduler", "task.status", {"id": "u"})) == {"next": True}
    assert bus.session.late == 1  # the second copy's answer, dropped


def test_fail_fast_when_the_bus_never_answers():
    bus = FakeBus(heard=False, timeout=30.0, connect_timeout=2.0)
    with pytest.raises(errors.Unavailable, match=f"no suite is answering in {HOME}"):
        bus.run(Request("scheduler", "task.status", {"id": "t"}))
    assert bus.now == pytest.approx(1002.0)  # the connect deadline, not the call's 30 s


def test_once_heard_silence_is_ridden_out_until_the_call_deadline():
    def restart_then_answer(bus, corr, _b):
        if len(bus.sent) == 1:
            bus.answer(corr, wire.error_body("unavailable", "starting"), error=True)
        elif bus.now >= 1008.0:  # the service is back after 8 s of silence
            bus.answer(corr, {"back": True})

    bus = FakeBus(restart_then_answer, heard=False, timeout=30.0, connect_timeout=2.0)
    assert bus.run(Request("scheduler", "task.status", {"id": "t"})) == {"back": True}
    assert bus.now >= 1008.0


def test_a_request_too_large_is_refused_before_sending():
    bus = FakeBus(replying({}))
    with pytest.raises(errors.BadRequest) as info:
        bus.run(Request("scheduler", "task.submit", {"payload": "x" * wire.MAX_MESSAGE_BYTES}))
    assert info.value.code == "too_large"
    assert bus.sent == [] and bus.session.calls == {}


@pytest.mark.parametrize("timeout", [-1, math.nan])
def test_a_bad_timeout_is_refused(timeout):
    bus = FakeBus(replying({}))
    with pytest.raises(errors.BadRequest):
        bus.run(Request("scheduler", "task.status", {"id": "t"}, timeout=timeout))
    with pytest.raises(errors.BadRequest):
        bus.run_plan(bus.plans().wait("t1", timeout=timeout))


def test_until_answered_never_gives_up():
    def answer_after_a_minute(bus, corr, _b):
        if bus.now >= 1060.0:
            bus.answer(corr, {"ok": True})

    bus = FakeBus(answer_after_a_minute)
    request = Request("scheduler", "task.finished", {"id": "t"}, timeout=math.inf)
    assert bus.run(request) == {"ok": True}


def test_idempotency_keys_are_unique_within_and_across_sessions():
    a, b = FakeBus().session, FakeBus().session
    keys = [a.new_key() for _ in range(1000)] + [b.new_key() for _ in range(1000)]
    assert len(set(keys)) == 2000


# --- the plans -------------------------------------------------------------------------

class FakeScheduler:
    """Answers task.submit / task.wait the way the scheduler does: a task that ends
    `runs` seconds after it was submitted; holds honoured."""

    def __init__(self, runs: float, honours_submit_wait: bool = True, state="completed",
                 honours_follow: bool = True):
        self.runs = runs
        self.honours_submit_wait = honours_submit_wait
        self.honours_follow = honours_follow
        self.final_state = state
        self.ends_at: float | None = None

    def task(self, now: float) -> dict:
        final = now >= self.ends_at
        return {"id": "t1", "state": self.final_state if final else "queued", "final": final,
                "error": None if self.final_state == "completed" else
                {"category": "handler_error", "message": "boom"}}

    def __call__(self, bus, corr, body):
        if body["op"] == "task.submit":
            if self.ends_at is None:
                self.ends_at = bus.now + self.runs
            hold = body.get("wait", 0) if self.honours_submit_wait else 0
            follow = body.get("follow", 0) if not body.get("wait") else 0
            if follow and self.honours_follow and bus.now < self.ends_at:
                after = min(follow, self.ends_at - bus.now)
                bus.answer(corr + wire.FOLLOW_SUFFIX, self.task(bus.now + after), after=after)
        elif body["op"] == "task.wait":
            hold = body["hold"]
        else:
            raise AssertionError(body)
        after = min(hold, max(0.0, self.ends_at - bus.now))
        bus.answer(corr, self.task(bus.now + after), after=after)


def test_submit_and_wait_is_one_round_trip_when_the_task_ends_in_time():
    bus = FakeBus(FakeScheduler(runs=0.002))
    task = bus.run_plan(bus.plans().submit_and_wait("echo", "hi", payload={"a": 1},
                                                    task_timeout=9.0, timeout=30))
    assert task["state"] == "completed"
    assert [op for _, op, _, _ in bus.sent] == ["task.submit"]
    body = bus.sent[0][3]
    assert body["wait"] == WAIT_HOLD and body["timeout"] == 9.0
    assert body["payload"] == {"a": 1} and body["agent"] == "agent-1"
    assert body["idempotency_key"]


def test_submit_and_wait_keeps_waiting_past_the_hold():
    bus = FakeBus(FakeScheduler(runs=12.0))
    task = bus.run_plan(bus.plans().submit_and_wait("sleep", timeout=60))
    assert task["final"] and bus.now == pytest.approx(1012.0)
    assert [op for _, op, _, _ in bus.sent] == ["task.submit", "task.wait", "task.wait"]


def test_submit_and_wait_works_with_a_scheduler_that_ignores_wait():
    bus = FakeBus(FakeScheduler(runs=0.5, honours_submit_wait=False))
    task = bus.run_plan(bus.plans().submit_and_wait("echo", timeout=30))
    assert task["state"] == "completed"
    assert [op for _, op, _, _ in bus.sent] == ["task.submit", "task.wait"]


def test_submit_and_wait_times_out_with_the_task_in_details():
    bus = FakeBus(FakeScheduler(runs=100.0))
    with pytest.raises(errors.Timeout) as info:
        bus.run_plan(bus.plans().submit_and_wait("sleep", timeout=7))
    assert info.value.details["id"] == "t1" and info.value.details["state"] == "queued"
    assert bus.now == pytest.approx(1007.0)


def test_wait_raise_on_failure():
    bus = FakeBus(FakeScheduler(runs=1.0, state="failed"))
    bus.run_plan(bus.plans().submit("fail"))
    plain = bus.run_plan(bus.plans().wait("t1", timeout=10))
    assert plain["state"] == "failed"
    with pytest.raises(errors.TaskFailed, match="t1 failed: handler_error: boom") as info:
        bus.run_plan(bus.plans().wait("t1", timeout=10, raise_on_failure=True))
    assert info.value.details["state"] == "failed" and info.value.code == "task_failed"


def test_wait_rides_out_a_scheduler_restart():
    scheduler = FakeScheduler(runs=20.0)
    bus = FakeBus(scheduler)
    bus.run_plan(bus.plans().submit("sleep"))

    def forgets_held_waits_for_a_while(bus, corr, body):
        if 1003.0 <= bus.now < 1009.0:
            return  # restarting: the held wait is lost, re-sends go unanswered
        scheduler(bus, corr, body)

    bus.respond = forgets_held_waits_for_a_while
    task = bus.run_plan(bus.plans().wait("t1", timeout=60))
    assert task["final"] and bus.now == pytest.approx(1020.0)


# --- a followed submit: its task's end comes unasked -----------------------------------------

def test_a_submit_and_a_wait_for_it_cost_one_request():
    bus = FakeBus(FakeScheduler(runs=0.5))
    submitted = bus.run_plan(bus.plans().submit("sleep"))
    assert not submitted["final"]
    done = bus.run_plan(bus.plans().wait("t1", timeout=30))
    assert done["state"] == "completed" and bus.now == pytest.approx(1000.5)
    assert [op for _, op, _, _ in bus.sent] == ["task.submit"]
    assert bus.session.calls == {} and bus.session.followed == {}


def test_a_task_that_ended_by_its_submit_answer_is_waited_for_without_a_message():
    bus = FakeBus(FakeScheduler(runs=0.0))
    assert bus.run_plan(bus.plans().submit("echo"))["final"]
    done = bus.run_plan(bus.plans().wait("t1", timeout=30))
    assert done["state"] == "completed" and bus.now == 1000.0
    assert [op for _, op, _, _ in bus.sent] == ["task.submit"]


def test_a_follow_up_that_never_comes_is_asked_for_after_its_hold():
    # A scheduler restarted between the submit and the task's end forgets the hold.
    bus = FakeBus(FakeScheduler(runs=2.0, honours_follow=False))
    bus.run_plan(bus.plans().submit("sleep"))
    submit_corr = bus.sent[0][2]
    done = bus.run_plan(bus.plans().wait("t1", timeout=30))
    assert done["final"]
    (_, _, _, _), (at, op, corr, body) = bus.sent
    assert (op, corr, body["id"]) == ("task.wait", submit_corr + wire.FOLLOW_SUFFIX, "t1")
    assert at == pytest.approx(1000.0 + WAIT_HOLD + RESEND_AFTER)


def test_a_long_task_is_followed_up_to_the_hold_then_waited_for_as_usual():
    bus = FakeBus(FakeScheduler(runs=12.0))
    bus.run_plan(bus.plans().submit("sleep"))
    done = bus.run_plan(bus.plans().wait("t1", timeout=60))
    assert done["final"] and bus.now == pytest.approx(1012.0)
    assert [(t - 1000.0, op) for t, op, _, _ in bus.sent] == [
        (0.0, "task.submit"), (pytest.approx(WAIT_HOLD), "task.wait"),
        (pytest.approx(2 * WAIT_HOLD), "task.wait")]  # the first wait came unasked


def test_a_wait_shorter_than_the_follow_asks_on_its_own_and_keeps_its_timeout():
    bus = FakeBus(FakeScheduler(runs=100.0))
    bus.run_plan(bus.plans().submit("sleep"))
    with pytest.raises(errors.Timeout):
        bus.run_plan(bus.plans().wait("t1", timeout=1.0))
    assert bus.now == pytest.approx(1001.0)
    assert [op for _, op, _, _ in bus.sent] == ["task.submit", "task.wait"]


def test_submits_never_waited_for_are_forgotten_beyond_a_bound():
    session = Session(HOME, clock=lambda: 1000.0)
    for n in range(MAX_FOLLOWED + 20):
        call = session.start(Request("scheduler", "task.submit", {"follow": WAIT_HOLD}))
        answer_to(session, wire.REPLY, call.corr, {"id": f"t{n}", "final": False})
        session.forget(call)
    assert len(session.followed) == MAX_FOLLOWED and len(session.calls) == MAX_FOLLOWED
    assert "t0" not in session.followed and f"t{MAX_FOLLOWED + 19}" in session.followed
    # A follow-up for one forgotten is late, as any answer for nobody.
    answer_to(session, wire.REPLY, b"x" * 12 + wire.FOLLOW_SUFFIX, {"id": "t0"})
    assert session.late == 1


def test_no_follow_without_the_field_with_wait_or_after_an_error():
    session = Session(HOME, clock=lambda: 1000.0)
    plain = session.start(Request("scheduler", "task.submit", {}))
    held = session.start(Request("scheduler", "task.submit", {"follow": 5.0, "wait": 5.0}))
    refused = session.start(Request("scheduler", "task.submit", {"follow": 5.0}))
    answer_to(session, wire.REPLY, plain.corr, {"id": "a", "final": False})
    answer_to(session, wire.REPLY, held.corr, {"id": "b", "final": False})
    answer_to(session, wire.ERROR, refused.corr, wire.error_body("queue_full", "full"))
    assert session.followed == {}


def test_wait_with_a_dead_scheduler_gives_up_near_its_deadline():
    bus = FakeBus()  # nothing answers
    with pytest.raises(errors.Timeout, match="scheduler did not answer"):
        bus.run_plan(bus.plans().wait("t1", timeout=2))
    assert bus.now <= 1002.0 + WAIT_HOLD + 5.0  # the hold and its reply margin at most


def test_reserve_refused_is_budget_exceeded():
    bus = FakeBus(replying({"granted": False, "reason": "type:llm limit 10", "scope": "x"}))
    with pytest.raises(errors.BudgetExceeded, match="type:llm limit 10") as info:
        bus.run_plan(bus.plans().reserve("ext-1", 500, task_type="llm"))
    assert info.value.details["scope"] == "x"
    assert bus.sent[0][3] == {"op": "ledger.reserve", "task": "ext-1", "attempt": 1,
                              "amount": 500, "agent": "agent-1", "type": "llm"}


def test_list_and_workers_unwrap_their_replies():
    bus = FakeBus(lambda bus, corr, body: bus.answer(
        corr, {"tasks": [{"id": "a"}], "total": 1} if body["op"] == "task.list"
        else {"workers": [{"name": "w"}]}))
    assert bus.run_plan(bus.plans().list_tasks(state="queued", limit=5)) == [{"id": "a"}]
    assert bus.sent[0][3] == {"op": "task.list", "limit": 5, "state": "queued"}
    assert bus.run_plan(bus.plans().workers()) == [{"name": "w"}]


def test_decode_event_skips_what_is_not_an_event():
    import msgpack

    assert decode_event([b"task.created", msgpack.packb({"type": "task.created"})]) == \
        {"type": "task.created"}
    assert decode_event([b"x", b"\xc1"]) is None
    assert decode_event([b"x", msgpack.packb([1, 2])]) is None
    assert decode_event([b"only one frame"]) is None


# --- identity, correlation ids, answers, sizes, submit bodies ----------------------------

def test_the_agent_defaults_to_the_client_name_or_cortex_agent(monkeypatch):
    from cortex.protocol import Client

    endpoint = "ipc:///tmp/cx-fake-home-none.sock"  # never contacted: no call is made
    monkeypatch.delenv("CORTEX_AGENT", raising=False)
    with Client(HOME, name="n", endpoint=endpoint) as c:
        assert c.agent == "n"
    monkeypatch.setenv("CORTEX_AGENT", "planner")
    with Client(HOME, name="n", endpoint=endpoint) as c:
        assert c.agent == "planner"
    with Client(HOME, name="n", agent="me", endpoint=endpoint) as c:
        assert c.agent == "me"


def test_correlation_ids_are_unique_and_fit_the_corr_frame():
    def corrs(session):
        calls = [session.start(Request("s", "x.y")) for _ in range(1000)]
        return {c.corr for c in calls}

    mine, theirs = corrs(Session(HOME)), corrs(Session(HOME))
    assert len(mine) == 1000 and all(len(c) <= wire.MAX_CORR_BYTES for c in mine)
    assert not mine & theirs


def answer_to(session: Session, type_: bytes, corr: bytes, body):
    raw = body if isinstance(body, bytes) else wire.encode_body(body)
    return session.on_message(wire.Message(type_, b"scheduler", corr, raw))


@pytest.mark.parametrize("type_", sorted(wire.TYPES - {wire.REPLY, wire.ERROR}))
def test_only_replies_and_errors_answer_a_call(type_):
    session = Session(HOME)
    call = session.start(Request("scheduler", "task.status", {"id": "t"}))
    assert answer_to(session, type_, call.corr, {}) is None
    assert not call.done and session.stray == 1 and session.late == 0


EXPECTED_CLASS = {"bad_request": errors.BadRequest, "unavailable": errors.Unavailable,
                  "timeout": errors.Timeout, "not_found": errors.NotFound,
                  "queue_full": errors.QueueFull, "rejected": errors.Rejected,
                  "budget_exceeded": errors.BudgetExceeded}


@pytest.mark.parametrize("code", sorted(wire.ERROR_CODES))
def test_every_error_code_settles_as_its_typed_exception(code):
    session = Session(HOME, timeout=0.001)  # no time left to pause after `unavailable`
    call = session.start(Request("scheduler", "task.status", {"id": "t"}))
    assert answer_to(session, wire.ERROR, call.corr, wire.error_body(code, "m")) is call
    assert call.done and type(call.error) is EXPECTED_CLASS.get(code, errors.CortexError)
    assert call.error.code == code
    with pytest.raises(errors.CortexError):
        session.end(call)


@pytest.mark.parametrize("type_", [wire.REPLY, wire.ERROR])
def test_an_undecodable_answer_settles_as_bad_request(type_):
    session = Session(HOME)
    call = session.start(Request("scheduler", "task.status", {"id": "t"}))
    answer_to(session, type_, call.corr, b"\xc1")
    assert call.done and call.error.code == "bad_request"


def test_an_answer_for_nobody_is_late():
    session = Session(HOME)
    call = session.start(Request("scheduler", "task.status", {"id": "t"}))
    assert answer_to(session, wire.REPLY, b"other", {"id": "t"}) is None
    assert answer_to(session, wire.ERROR, b"", {"code": "timeout"}) is None
    assert session.late == 2 and not call.done
    assert answer_to(session, wire.REPLY, call.corr, {"id": "t"}) is call
    assert session.end(call) == {"id": "t"} and session.calls == {}


def test_the_size_limit_is_inclusive_and_counts_peer_corr_body():
    room = wire.MAX_MESSAGE_BYTES - len(b"scheduler") - 12
    check_size([wire.TAG, wire.REQUEST, b"scheduler", b"", b"c" * 12, b"x" * room])
    with pytest.raises(errors.BadRequest) as info:
        check_size([wire.TAG, wire.REQUEST, b"scheduler", b"", b"c" * 12, b"x" * (room + 1)])
    assert info.value.code == "too_large"


@given(st.integers(0, 64), st.integers(0, 64), st.integers(wire.MAX_MESSAGE_BYTES - 140,
                                                             wire.MAX_MESSAGE_BYTES + 10))
def test_the_size_check_agrees_with_parse(peer, corr, total):
    """What the client lets through, the broker's parse accepts, and the reverse."""
    parts = [wire.TAG, wire.REQUEST, b"p" * peer, b"", b"c" * corr,
             b"x" * (total - peer - corr)]
    try:
        check_size(parts)
        client_ok = True
    except errors.BadRequest:
        client_ok = False
    try:
        wire.parse(parts)
        broker_ok = True
    except wire.ProtocolError:
        broker_ok = False
    assert client_ok == broker_ok


def submit_request(**kwargs) -> Request:
    plans = Plans(Session(HOME), "n")
    return next(plans.submit(*kwargs.pop("args", ("echo", "d")), **kwargs))


def test_a_minimal_submit():
    request = submit_request()
    body = dict(request.body)
    key = body.pop("idempotency_key")
    assert (request.service, request.op) == ("scheduler", "task.submit")
    assert body == {"type": "echo", "description": "d", "priority": "medium", "tokens": 0,
                    "agent": "n", "follow": WAIT_HOLD}
    assert key
    assert "follow" not in submit_request(follow=False).body


def test_a_fresh_idempotency_key_each_submit_unless_given():
    plans = Plans(Session(HOME), "n")
    first, second = next(plans.submit("echo")), next(plans.submit("echo"))
    assert first.body["idempotency_key"] != second.body["idempotency_key"]
    assert submit_request(idempotency_key="mine").body["idempotency_key"] == "mine"


def test_optional_submit_fields_only_when_given_and_falsy_payloads_kept():
    body = submit_request(priority="high", tokens=10, timeout=5.0, retries=0, deadline=1e9,
                          payload={"p": 1}, idempotency_key="k", agent="agent7").body
    assert body["timeout"] == 5.0 and body["retries"] == 0 and body["deadline"] == 1e9
    assert body["payload"] == {"p": 1} and body["agent"] == "agent7"
    assert submit_request(payload=0).body["payload"] == 0
    assert "payload" not in submit_request().body


@pytest.mark.parametrize("timeout", [0, -1, math.nan, None, True, "5"])
def test_a_session_refuses_a_timeout_that_is_no_positive_number(timeout):
    with pytest.raises(ValueError):
        Session(HOME, timeout=timeout)
    with pytest.raises(ValueError):
        Session(HOME, connect_timeout=timeout)
