"""Pure unit tests of the scheduler's parts one by one, without the facade: admission,
the task table, ledger orders, long polls, the timeout watch, the ETA, the machine holds
and the scaler's learning. (The facade's behaviour is in test_scheduling.py.)"""

from __future__ import annotations

import pytest

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.settings import SchedulerSettings
from cortex.services.scheduler.admission import Admission, Request
from cortex.services.scheduler.clock import Marks, Now
from cortex.services.scheduler.eta import DEFAULT_DURATION, Estimates
from cortex.services.scheduler.feasibility import Readings, ResourceMonitor
from cortex.services.scheduler.holds import MachineHolds
from cortex.services.scheduler.queue import TaskQueue
from cortex.services.scheduler.scaling import Scaler
from cortex.services.scheduler.settlement import (
    LEDGER_RESEND,
    LedgerOrders,
    refusal_detail,
    settle_order,
)
from cortex.services.scheduler.table import TaskTable
from cortex.services.scheduler.tasks import State, Task
from cortex.services.scheduler.waiters import Waiters
from cortex.services.scheduler.watch import WATCH_INTERVAL, Watch
from cortex.services.scheduler.workers import WorkerRegistry, WorkerState

NOW = Now(1_700_000_000.0, 100.0)


def make_task(task_id="t1", **fields) -> Task:
    base = dict(id=task_id, type="echo", description="", priority="medium", tokens=0,
                timeout=30.0, retries=1, agent="a", key=f"k-{task_id}",
                times={"created": NOW.wall})
    return Task(**(base | fields))


# --- admission ----------------------------------------------------------------------------

def request(**fields) -> Request:
    base = dict(key="k", type="echo", description="", priority="medium", tokens=0,
                timeout=30.0, retries=0, deadline=None, agent="a", payload=None, size=0,
                wait=0.0)
    return Request(**(base | fields))


def test_admission_parses_defaults_from_the_settings():
    admission = Admission(SchedulerSettings(default_timeout=12.0, default_retries=3), {})
    req = admission.parse({"idempotency_key": "k", "type": "echo"}, b"peer")
    assert (req.timeout, req.retries, req.agent, req.priority, req.wait) == (
        12.0, 3, "peer", "medium", 0.0)


def test_admission_judges_queue_full_deadline_and_max_wait():
    admission = Admission(SchedulerSettings(max_queue_per_type=2, max_wait=60.0), {})
    assert admission.judge(request(), 1, 0.0, NOW) is None
    assert admission.judge(request(), 2, 0.0, NOW)[0] == "queue_full"
    assert admission.judge(request(priority="critical"), 2, 0.0, NOW) is None
    code, reason = admission.judge(request(deadline=NOW.wall + 5), 0, 6.0, NOW)
    assert code == "rejected" and "past the deadline" in reason
    assert admission.judge(request(deadline=NOW.wall + 5), 0, 5.0, NOW) is None
    code, reason = admission.judge(request(), 0, 61.0, NOW)
    assert code == "rejected" and "maximum wait of 60 s" in reason


def test_admission_remembers_refusals_and_journals_them():
    counters = {"rejected": 0}
    admission = Admission(SchedulerSettings(), counters)
    fx = Effects()
    admission.refuse(fx, b"p", b"c", request(key="no"), "queue_full", "full")
    assert admission.refused("no") == ("queue_full", "full", "") and counters["rejected"] == 1
    assert fx.records == [{"k": "rejected", "key": "no", "code": "queue_full",
                           "reason": "full", "digest": ""}]
    assert fx.sends == [(b"p", wire.ERROR, b"c", wire.error_body("queue_full", "full"))]


# --- the task table -----------------------------------------------------------------------

def test_table_add_set_move_journal_and_apply_replays():
    counters = {"submitted": 0}
    table = TaskTable(retention=10, counters=counters)
    fx = Effects()
    task = make_task()
    table.add(fx, task, NOW)
    table.set(fx, task, reserved=5)
    table.move(fx, task, State.DISPATCHED, NOW + 1, worker="w1")
    table.move(fx, task, State.COMPLETED, NOW + 2, result={"ok": 1})
    assert counters == {"submitted": 1, "completed": 1}
    assert task.id not in table.marks and task.id in table.finished
    fresh = TaskTable(10, {})
    for record in fx.records:
        fresh.apply(record)
    again = fresh.tasks[task.id]
    assert (again.state, again.worker, again.reserved, again.result) == (
        State.COMPLETED, "w1", 5, {"ok": 1})
    assert again.times == task.times


def test_table_keeps_marks_for_live_tasks_on_the_monotonic_clock():
    table = TaskTable(10, {"submitted": 0})
    table.add(Effects(), make_task(), NOW)
    assert table.marks["t1"] == Marks(created=NOW.mono)


def test_table_forgets_the_oldest_finished_beyond_retention():
    table = TaskTable(retention=1, counters={"submitted": 0})
    fx = Effects()
    for i in range(3):
        task = make_task(f"t{i}")
        table.add(fx, task, NOW)
        table.move(fx, task, State.CANCELLED, NOW)
    assert list(table.tasks) == ["t2"] and table.by_key("k-t0") is None


# --- ledger orders ------------------------------------------------------------------------

def test_settle_order_commits_what_was_used_or_releases_the_rest():
    assert settle_order(make_task(tokens_used=7, tokens=10)) == {
        "op": "ledger.commit", "task": "t1", "attempt": 1, "used": 7, "type": "echo",
        "agent": "a"}
    assert settle_order(make_task(tokens=10)) == {"op": "ledger.release", "task": "t1",
                                                  "attempt": 1}
    assert settle_order(make_task()) is None


def test_ledger_orders_are_resent_until_answered_with_the_same_corr():
    orders = LedgerOrders()
    fx = Effects()
    corr = orders.send(fx, {"op": "ledger.release"}, 10.0)
    assert fx.sends == [(b"ledger", wire.REQUEST, corr, {"op": "ledger.release"})]
    again = Effects()
    orders.resend_due(again, 10.0 + LEDGER_RESEND - 0.01)
    assert again.sends == []
    orders.resend_due(again, 10.0 + LEDGER_RESEND)
    assert [s[2] for s in again.sends] == [corr]
    assert orders.answered(corr) == {"op": "ledger.release"} and orders.answered(corr) is None


def test_a_recovered_order_goes_out_at_the_next_scan():
    orders = LedgerOrders()
    orders.resend_soon({"op": "ledger.commit"}, 50.0)
    fx = Effects()
    orders.resend_due(fx, 50.0)
    assert [s[3] for s in fx.sends] == [{"op": "ledger.commit"}]


def test_refusal_detail_keeps_what_the_ledger_said_and_nothing_else():
    detail = refusal_detail({"granted": False, "scope": "agent:x", "limit": 300,
                             "available": 12, "requested": 1000, "reason": "r",
                             "next_reset": NOW.wall + 60, "extra": "no", "ok": False},
                            NOW.wall)
    assert detail == {"message": "r", "scope": "agent:x", "limit": 300, "available": 12,
                      "requested": 1000, "resets_at": NOW.wall + 60, "resets_in_s": 60.0}
    assert refusal_detail({"code": "bad_request", "message": "m", "limit": True},
                          NOW.wall) == {"message": "m"}


# --- long polls ---------------------------------------------------------------------------

def test_waiters_answer_on_the_end_or_at_their_time_once_each():
    waiters = Waiters()
    task = make_task()
    waiters.hold("t1", b"p", b"a", until=10.0)
    waiters.hold("t1", b"p", b"b", until=20.0)
    waiters.hold("t1", b"p", b"a", until=12.0)  # re-sent: replaces its first hold
    fx = Effects()
    assert waiters.expire(fx, {"t1": task}, 11.0) == 12.0 and fx.sends == []
    assert waiters.expire(fx, {"t1": task}, 12.0) == 20.0
    assert [s[2] for s in fx.sends] == [b"a"]
    fx = Effects()
    waiters.wake(fx, task)
    assert [s[2] for s in fx.sends] == [b"b"] and waiters.by_task == {}


# --- the watch ----------------------------------------------------------------------------

def test_watch_scans_at_most_every_interval_and_finds_timeouts_and_silence():
    marks = {"a": Marks(0.0, dispatched=100.0), "b": Marks(0.0, dispatched=100.0,
                                                            heard=110.0)}
    watch = Watch(marks)
    slow, quiet = make_task("a", timeout=5.0, worker="w"), make_task("b", timeout=99.0)
    watch.add(slow)
    watch.add(quiet)
    assert watch.scan_due(0.0) and not watch.scan_due(WATCH_INTERVAL / 2)
    found = watch.overdue(WorkerRegistry(), 105.5, lost_after=15.0)
    assert [(t.id, kind) for t, kind, _ in found] == [("a", "timeout")]
    found = watch.overdue(WorkerRegistry(), 125.5, lost_after=15.0)
    assert [(t.id, kind, round(s, 1)) for t, kind, s in found] == [
        ("a", "timeout", 25.5), ("b", "silent", 15.5)]
    watch.discard("a")
    assert list(watch.active) == ["b"]


# --- ETA ----------------------------------------------------------------------------------

def test_eta_uses_the_monotonic_dispatch_time_of_busy_workers():
    queue = TaskQueue(aging=None)
    registry = WorkerRegistry()
    running = make_task("r", worker="w1", state=State.DISPATCHED)
    marks = {"r": Marks(0.0, dispatched=100.0)}
    estimates = Estimates(None, queue, registry, {"r": running}, marks)
    estimates.learn("echo", 4.0)
    worker = registry.register(Effects(), "w1", ("echo",), 1, NOW, busy=True, task="r")
    assert worker.state is WorkerState.BUSY
    assert estimates.time_left(running, 101.0) == pytest.approx(3.0)
    assert estimates.wait_before_start("echo", "medium", 101.0) == pytest.approx(3.0)
    assert estimates.wait_before_start("sleep", "medium", 101.0) == 0.0  # none ahead
    assert estimates.mean_duration("sleep") == DEFAULT_DURATION


# --- machine holds ------------------------------------------------------------------------

def test_holds_count_a_dispatched_tasks_share_until_released():
    readings = Readings(cpu_free_cores=1.0, mem_available_mb=1e4, mem_percent=10.0,
                        mem_total_mb=1e5, cpu_cores=2)
    holds = MachineHolds(ResourceMonitor(lambda: readings), memory_threshold=80.0)
    task = make_task(predicted={"duration": 2.0, "cpu_s": 2.0, "memory_mb": 100.0,
                                "source": "model"})
    _, held = holds.readings(0.0)
    assert held == {"cpu": 0.0, "memory_mb": 0.0} and holds.blocker(task, readings, held) is None
    holds.hold(task, pid=0)
    _, held = holds.readings(0.5)
    assert held == {"cpu": 1.0, "memory_mb": 100.0}
    reason, detail = holds.blocker(make_task("t2", predicted=task.predicted), readings, held)
    assert reason == "cpu" and detail["held_cores"] == 1.0
    holds.release(task.id)
    assert holds.held(readings) == {"cpu": 0.0, "memory_mb": 0.0}


# --- the scaler's learning ----------------------------------------------------------------

def test_the_scaler_learns_how_long_a_worker_takes_to_start():
    settings = SchedulerSettings(worker_start=0.5)
    queue = TaskQueue(aging=None)
    registry = WorkerRegistry()
    estimates = Estimates(None, queue, registry, {}, {})
    holds = MachineHolds(ResourceMonitor(lambda: None), 80.0)
    scaler = Scaler(settings, queue, registry, estimates, holds, {})
    scaler.requested["echo"] = 10.0
    scaler.registered(["echo"], 12.0)
    assert scaler.worker_start_s == pytest.approx(0.7 * 0.5 + 0.3 * 2.0)
    scaler.registered(["echo"], 20.0)  # not asked for: nothing learned
    assert scaler.worker_start_s == pytest.approx(0.7 * 0.5 + 0.3 * 2.0)
