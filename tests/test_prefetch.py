"""Prefetch slots and recall, on the pure scheduler state (no sockets): a busy worker holds
one more task and starts it when its task ends; a queued higher-priority task takes back
the prefetched lower ones; whatever happens to the worker, an unstarted prefetched task
goes back to the queue with its attempt unchanged."""

from __future__ import annotations

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.prefetch import Slots, fold_prefetches
from cortex.services.scheduler.tasks import State, Task
from cortex.services.scheduler.workers import Worker, WorkerState

from .test_scheduling import HB, Sim, answer, check_invariants, events, replay, runs, table


def recalls(fx) -> list[tuple[str, dict]]:
    return [(p.decode(), b) for p, t, _, b in fx.sends
            if t == wire.NOTIFY and b.get("op") == "task.recall"]


def recalled(sim: Sim, name: str, task, given_back: bool = True):
    body = {"id": task.id, "attempt": task.attempt, "recalled": given_back}
    return sim.turn(sim.state.task_recalled, name, body, sim.now)


def busy_with_prefetch(sim: Sim, name: str = "w1", low: str = "low"):
    """One worker running a long task with a `low` one prefetched."""
    sim.ready(name)
    long_ = sim.add(description="long")
    sim.started(name, long_)
    held = sim.add(priority=low, description="prefetched")
    assert held.state is State.DISPATCHED and held.prefetched and held.worker == name
    assert sim.state.workers[name].prefetched == held.id
    return long_, held


# -- the slot ------------------------------------------------------------------------------
def test_a_busy_worker_gets_one_more_task_marked_prefetch_and_no_third():
    sim = Sim(prefetch=1)
    sim.ready("w1")
    first = sim.add()
    fx = sim.submit()
    [(worker, task)] = runs(fx)
    assert worker == "w1" and task["id"] != first.id
    run = next(b for _, t, _, b in fx.sends if b.get("op") == "task.run")
    assert run["prefetch"] is True
    [(_, data, _, _)] = events(fx, "task.dispatched")
    assert data["prefetched"] is True
    assert runs(sim.submit()) == []  # the slot is full: it waits in the queue
    check_invariants(sim.state)


def test_prefetch_zero_gives_a_busy_worker_nothing():
    sim = Sim(prefetch=0)
    sim.ready("w1")
    sim.add()
    assert runs(sim.submit()) == []
    assert sim.state.workers["w1"].prefetched is None


def test_idle_workers_are_served_before_any_slot_is_filled():
    sim = Sim(prefetch=1)
    sim.ready("w1")
    sim.ready("w2")
    a, b = sim.add(), sim.add()
    assert {a.worker, b.worker} == {"w1", "w2"} and not a.prefetched and not b.prefetched


def test_a_prefetched_task_has_no_clock_until_its_start():
    """Its timeout and silence count from its start: held for long, it is not overdue."""
    sim = Sim(prefetch=1)
    _, held = busy_with_prefetch(sim)
    held.timeout = 1.0
    for _ in range(5):
        sim.heartbeat("w1", sim.state.tasks[sim.state.workers["w1"].task])
        sim.tick(HB)
    assert held.state is State.DISPATCHED and held.attempt == 1 and held.prefetched


def test_the_finish_starts_the_prefetched_task_and_refills_the_slot():
    sim = Sim(prefetch=1)
    long_, held = busy_with_prefetch(sim)
    nxt = sim.add(description="next")
    assert nxt.state is State.QUEUED
    fx = sim.finish("w1", long_)
    worker = sim.state.workers["w1"]
    assert worker.state is WorkerState.BUSY and worker.task == held.id
    assert not held.prefetched and sim.state.marks[held.id].dispatched == sim.now.mono
    assert [t["id"] for _, t in runs(fx)] == [nxt.id] and nxt.prefetched  # refilled
    sim.finish("w1", held)
    assert held.state is State.COMPLETED and held.attempt == 1
    check_invariants(sim.state)


def test_the_refill_rides_on_the_reply_to_the_finish_that_allows_it():
    sim = Sim(prefetch=1)
    long_, held = busy_with_prefetch(sim)
    nxt = sim.add(description="next")
    fx = sim.finish("w1", long_)
    [reply] = [(p, corr, b) for p, t, corr, b in fx.sends if t == wire.REPLY]
    assert reply[0] == b"w1" and [t["id"] for _, t in runs(fx)] == [nxt.id]
    folded = fold_prefetches(fx.sends, {b"w1": reply[1]})
    assert not [b for _, t, _, b in folded if t == wire.NOTIFY and b.get("op") == "task.run"]
    [(_, _, corr, body)] = [s for s in folded if s[1] == wire.REPLY]
    assert corr == reply[1] and body["run"]["id"] == nxt.id and "run" not in reply[2]
    assert len(folded) == len(fx.sends) - 1
    # A finish that does not allow it, or another corr, or another worker: as they were.
    assert fold_prefetches(fx.sends, {}) == fx.sends
    assert fold_prefetches(fx.sends, {b"w1": b"other"}) == fx.sends
    assert fold_prefetches(fx.sends, {b"w2": reply[1]}) == fx.sends


def test_only_prefetch_orders_fold_and_never_into_an_error():
    run = {"op": "task.run", "task": {"id": "t1"}}
    sends = [(b"w1", wire.ERROR, b"c1", wire.error_body("bad_request", "no")),
             (b"w1", wire.NOTIFY, b"", {**run, "prefetch": True})]
    assert fold_prefetches(sends, {b"w1": b"c1"}) == sends
    sends = [(b"w1", wire.REPLY, b"c1", {"ok": True}), (b"w1", wire.NOTIFY, b"", run)]
    assert fold_prefetches(sends, {b"w1": b"c1"}) == sends  # a start at once: not delayed


def test_eta_counts_prefetched_tasks_ahead_of_a_queued_one():
    sim = Sim(prefetch=1)
    sim.state.estimates.avg_duration["echo"] = 10.0
    busy_with_prefetch(sim, low="medium")
    alone = sim.state.estimates.wait_before_start("echo", "medium", sim.now.mono)
    assert alone > 10.0  # after the running task and the prefetched one
    critical = sim.state.estimates.wait_before_start("echo", "critical", sim.now.mono)
    assert critical < alone  # a lower prefetched task is recalled for it


# -- recall: critical first -----------------------------------------------------------------
def test_a_critical_task_recalls_a_prefetched_low_one_and_starts_first():
    sim = Sim(prefetch=1)
    long_, low = busy_with_prefetch(sim)
    fx = sim.submit(priority="critical", description="urgent")
    critical = sim.state.tasks[[t for t in sim.state.tasks.values()
                                if t.description == "urgent"][0].id]
    assert recalls(fx) == [("w1", {"op": "task.recall", "id": low.id, "attempt": 1})]
    assert critical.state is State.QUEUED and sim.state.workers["w1"].recalling
    assert recalls(sim.tick()) == []  # asked once
    fx = recalled(sim, "w1", low)
    assert low.state is State.QUEUED and low.attempt == 1 and not low.prefetched
    # A critical task waits for the first worker to free up, never in a slot; nothing
    # lower takes the slot meanwhile.
    assert runs(fx) == [] and critical.state is State.QUEUED
    fx = sim.finish("w1", long_)
    assert [t["id"] for _, t in runs(fx)] == [critical.id]
    # The slot stays empty for prefetch_pause after the critical task was queued (the
    # next of a burst takes the first worker to free up), then takes the low task.
    assert low.state is State.QUEUED
    assert runs(sim.tick(0.1)) == []
    assert [t["id"] for _, t in runs(sim.tick(0.15))] == [low.id]
    assert sim.state.workers["w1"].task == critical.id and low.prefetched
    assert low.attempt == 1
    check_invariants(sim.state)


def test_without_the_pause_the_slot_refills_as_the_critical_task_starts():
    sim = Sim(prefetch=1, prefetch_pause=0.0)
    long_, low = busy_with_prefetch(sim)
    sim.submit(priority="critical", description="urgent")
    critical = next(t for t in sim.state.tasks.values() if t.description == "urgent")
    recalled(sim, "w1", low)
    fx = sim.finish("w1", long_)
    assert [t["id"] for _, t in runs(fx)] == [critical.id, low.id]  # then low, prefetched
    check_invariants(sim.state)


def test_a_burst_of_critical_tasks_recalls_the_slots_once_not_for_each():
    """Three workers busy with low tasks prefetched; critical tasks arrive one after
    another, each soon after the last started. The first recalls the three slots; while
    the burst lasts the slots stay empty, so the others recall nothing and each starts on
    the next worker to free up. Without the pause every critical task recalls again."""
    def burst(pause: float) -> tuple[int, list[str]]:
        sim = Sim(prefetch=1, prefetch_pause=pause)
        names = ("w1", "w2", "w3")
        for name in names:
            sim.ready(name)
        running = {name: sim.add(description="long") for name in names}
        for name, task in running.items():
            sim.started(name, task)
        for _ in names:
            sim.add(priority="low")
        assert all(sim.state.workers[name].prefetched for name in names)
        asked, started = 0, []
        for i, name in enumerate(names):
            fx = sim.submit(priority="critical", description=f"urgent-{i}")
            for worker, body in recalls(fx):
                asked += 1
                recalled(sim, worker, sim.state.tasks[body["id"]])
            fx = sim.finish(name, running[name])
            (_, task), *_ = runs(fx)
            started.append(sim.state.tasks[task["id"]].description)
            sim.tick(0.05)
            check_invariants(sim.state)
        return asked, started

    assert burst(0.2) == (3, ["urgent-0", "urgent-1", "urgent-2"])
    asked, started = burst(0.0)
    assert asked > 3 and started == ["urgent-0", "urgent-1", "urgent-2"]


def test_the_pause_holds_only_the_critical_tasks_types():
    slots = Slots(1, pause=0.2)
    echo, other = Worker("w1", ("echo",), 1), Worker("w2", ("other",), 2)
    for w in (echo, other):
        w.state = WorkerState.BUSY
    counts = {"echo": [1, 0, 0, 1], "other": [0, 0, 0, 1]}
    slots.pause_for_critical(counts, 10.0)
    counts["echo"][0] = 0  # the critical task started
    assert not slots.may_fill(echo, counts, 10.1) and slots.may_fill(other, counts, 10.1)
    assert slots.may_fill(echo, counts, 10.21)  # the pause is over
    assert not Slots(1, pause=0.0).paused  # 0: never paused
    off = Slots(1, pause=0.0)
    off.pause_for_critical({"echo": [1, 0, 0, 1]}, 10.0)
    assert off.may_fill(echo, counts, 10.0)


def test_a_recall_that_came_too_late_leaves_the_started_task_running():
    """The one-round-trip race: the worker began the low task before the recall came."""
    sim = Sim(prefetch=1)
    long_, low = busy_with_prefetch(sim)
    sim.submit(priority="critical")
    sim.finish("w1", long_)  # its finish crossed the recall: the low task started
    assert sim.state.workers["w1"].task == low.id
    fx = recalled(sim, "w1", low, given_back=False)
    assert low.state is State.DISPATCHED and low.attempt == 1 and low.worker == "w1"
    assert events(fx, "task.recalled") == []
    check_invariants(sim.state)


def test_the_same_priority_recalls_nothing():
    sim = Sim(prefetch=1)
    busy_with_prefetch(sim, low="medium")
    fx = sim.submit(priority="medium")
    assert recalls(fx) == []


def test_an_idle_worker_takes_the_critical_task_without_any_recall():
    sim = Sim(prefetch=1)
    busy_with_prefetch(sim)
    sim.ready("w2")
    fx = sim.submit(priority="critical")
    assert recalls(fx) == [] and runs(fx)[0][0] == "w2"


def test_recall_only_where_the_worker_serves_the_waiting_type():
    sim = Sim(prefetch=1)
    busy_with_prefetch(sim)  # an echo worker
    sim.ready("w9", ("llm",))
    sim.add(type="llm")
    fx = sim.submit(priority="critical", type="llm")
    assert recalls(fx) == []


# -- the reserve: an idle worker kept for the next critical task of a burst ---------------
def three_busy(sim: Sim) -> dict:
    """w1, w2, w3 each running a medium task, three low ones queued behind."""
    for name in ("w1", "w2", "w3"):
        sim.ready(name)
    running = {name: sim.add(description=f"long-{name}") for name in ("w1", "w2", "w3")}
    for name, task in running.items():
        sim.started(name, task)
    for i in range(3):
        sim.add(priority="low", description=f"low-{i}")
    return running


def test_during_a_critical_burst_one_idle_worker_waits_for_the_next_critical_task():
    sim = Sim(critical_reserve=1, prefetch_pause=0.2)
    running = three_busy(sim)
    first = sim.add(priority="critical", description="urgent-0")
    assert first.state is State.QUEUED  # every worker busy
    fx = sim.finish("w1", running["w1"])
    assert [t["id"] for _, t in runs(fx)] == [first.id]
    # The next worker to free up takes no low task: it is kept for the burst.
    assert runs(sim.finish("w2", running["w2"])) == []
    assert sim.state.workers["w2"].state is WorkerState.IDLE
    # One is enough: when the critical task ends, its worker takes a low one.
    fx = sim.finish("w1", first)
    assert [(w, t["description"]) for w, t in runs(fx)] == [("w1", "low-0")]
    # The next critical task starts at once on the kept worker, with no recall.
    sim.tick(0.05)
    fx = sim.submit(priority="critical", description="urgent-1")
    (worker, task), = runs(fx)
    assert worker == "w2" and task["description"] == "urgent-1"
    fx = sim.finish("w2", sim.state.tasks[task["id"]])
    assert runs(fx) == []  # kept again while the window lasts
    # The window closes 0.2 s after the last critical task was queued: the state's tick
    # wakes for it, and the kept worker goes back to the low tasks.
    assert 0.0 < sim.state.tick(Effects(), sim.now, HB) <= 0.2 + 1e-9
    assert [(w, t["description"]) for w, t in runs(sim.tick(0.21))] == [("w2", "low-1")]
    check_invariants(sim.state)


def test_a_types_only_worker_is_never_kept_and_0_keeps_none():
    for workers, reserve in ((("w1",), 1), (("w1", "w2"), 0)):
        sim = Sim(critical_reserve=reserve, prefetch_pause=0.2)
        for name in workers:
            sim.ready(name)
        running = {name: sim.add(description="long") for name in workers}
        sim.add(priority="low", description="low")
        critical = sim.add(priority="critical")
        assert [t["id"] for _, t in runs(sim.finish("w1", running["w1"]))] == [critical.id]
        fx = sim.finish("w1", critical)
        assert [t["description"] for _, t in runs(fx)] == ["low"], (workers, reserve)


def test_the_reserve_counts_a_worker_of_several_types_for_each():
    slots = Slots(0, pause=0.2, reserve=1)
    both = Worker("w1", ("echo", "llm"), 1)
    echo = Worker("w2", ("echo",), 2)
    llm = Worker("w3", ("llm",), 3)
    slots.pause_for_critical({"echo": [1, 0, 0, 0], "llm": [1, 0, 0, 0]}, 10.0)
    serving = {"echo": 5, "llm": 5}.get
    # One kept for each type: w3 for llm, then w2 for echo (the last idle of each).
    kept, closes = slots.kept_free([both, echo, llm], serving, 10.1)
    assert kept == {"w2", "w3"} and closes == 10.2
    kept, _ = slots.kept_free([echo, both], serving, 10.1)
    assert kept == {"w1"}  # the one serving both stands for both
    assert slots.kept_free([both, echo, llm], serving, 10.21) == (set(), None)
    assert not slots.paused  # closed windows are forgotten


# -- the worker goes: its prefetched task returns, attempt unchanged ----------------------
def test_a_lost_worker_returns_its_prefetched_task_without_spending_an_attempt():
    sim = Sim(prefetch=1, default_retries=2)
    long_, held = busy_with_prefetch(sim)
    sim.gone("w1", kill=True)
    assert long_.attempt == 2  # it ran: a lost attempt
    assert held.state is State.QUEUED and held.attempt == 1 and not held.prefetched
    sim.ready("w2")
    assert held.worker == "w2"
    check_invariants(sim.state)


def test_a_leaving_worker_returns_its_prefetched_task_and_finishes_its_own():
    sim = Sim(prefetch=1)
    long_, held = busy_with_prefetch(sim)
    sim.turn(sim.state.worker_leaving, "w1", {"reason": "stopping"}, sim.now)
    assert held.state is State.QUEUED and held.attempt == 1
    # Its own rejection of the task crosses this: a stray, changes nothing.
    sim.turn(sim.state.task_rejected, "w1", {"id": held.id, "attempt": 1,
                                              "reason": "stopping"}, sim.now)
    assert held.state is State.QUEUED and held.attempt == 1
    sim.finish("w1", long_)
    assert long_.state is State.COMPLETED and held.state is State.QUEUED
    check_invariants(sim.state)


def test_a_timed_out_task_kills_its_worker_and_frees_the_prefetched_one():
    sim = Sim(prefetch=1)
    long_, held = busy_with_prefetch(sim)
    long_.timeout = 1.0
    sim.tick(2.0)
    assert long_.attempt == 2 or long_.final
    assert held.state is State.QUEUED and held.attempt == 1


def test_cancelling_a_prefetched_task_kills_no_worker():
    sim = Sim(prefetch=1)
    long_, held = busy_with_prefetch(sim)
    fx = sim.cancel(held)
    assert held.state is State.CANCELLED and not held.prefetched
    assert not [b for p, _, _, b in fx.sends if p == b"pool"]  # w1 keeps running
    assert ("w1", held.id) in [(p.decode(), b.get("id")) for p, _, _, b in fx.sends
                               if b.get("op") == "task.cancel"]
    worker = sim.state.workers["w1"]
    assert worker.state is WorkerState.BUSY and worker.task == long_.id
    assert worker.prefetched is None
    check_invariants(sim.state)


def test_after_a_restart_a_prefetched_task_given_back_or_never_claimed_keeps_its_attempt():
    sim = Sim(prefetch=1)
    _, held = busy_with_prefetch(sim)
    _, other = busy_with_prefetch(sim, name="w2")
    fresh = replay(sim.records, overrides={"prefetch": 1})
    fresh.restore(sim.now)
    back = fresh.tasks[held.id]
    assert back.prefetched and back.state is State.DISPATCHED
    sim.state = fresh
    # w1 gives it back on worker.sync; w2 says nothing of its own.
    sim.turn(fresh.task_rejected, "w1", {"id": held.id, "attempt": 1, "reason": "sync"},
             sim.now)
    assert back.state is State.QUEUED and back.attempt == 1
    sim.tick(HB * wire.HEARTBEAT_LIVENESS + 1)
    lost = fresh.tasks[other.id]
    assert lost.state is State.QUEUED and lost.attempt == 1 and not lost.prefetched


def test_a_prefetched_task_replays_as_prefetched_and_then_as_started():
    sim = Sim(prefetch=1)
    long_, held = busy_with_prefetch(sim)
    assert table(replay(sim.records))[held.id]["state"] == "dispatched"
    assert replay(sim.records).tasks[held.id].prefetched
    sim.finish("w1", long_)
    assert not replay(sim.records).tasks[held.id].prefetched


# -- Slots alone -----------------------------------------------------------------------------
def task(task_id: str, priority: str, type_: str = "echo") -> Task:
    return Task(id=task_id, type=type_, description="", priority=priority, tokens=0,
                timeout=1.0, retries=0, agent="a", key=task_id)


def test_slots_recall_only_outranked_tasks_once_and_count_by_type():
    slots = Slots(1)
    w1 = Worker("w1", ("echo",), 1, state=WorkerState.BUSY)
    w2 = Worker("w2", ("echo",), 2, state=WorkerState.BUSY)
    assert slots.free(w1)
    slots.fill(w1, task("a", "low"))
    slots.fill(w2, task("b", "high"))
    assert not slots.free(w1) and slots.by_type == {"echo": 2}
    slots.queued(task("c", "low"))
    assert not slots.recall_due  # nothing held is lower than low
    slots.queued(task("d", "high"))
    assert slots.recall_due
    workers = {"w1": w1, "w2": w2}
    assert slots.to_recall(workers, {"echo": [0, 1, 0, 0]}) == [(w1, "a")]
    assert not slots.recall_due and w1.recalling
    assert slots.to_recall(workers, {"echo": [0, 1, 0, 0]}) == []  # asked already
    assert slots.empty(w1) == "a" and not w1.recalling and slots.free(w1)
    assert slots.by_type == {"echo": 1} and slots.empty(w1) is None


def test_slots_off_and_on_busy_workers_only():
    off = Slots(0)
    assert not off.free(Worker("w", ("echo",), 1, state=WorkerState.BUSY))
    on = Slots(5)  # one task per worker at most
    assert on.size == 1
    for state in (WorkerState.IDLE, WorkerState.CLAIMED, WorkerState.LEAVING):
        assert not on.free(Worker("w", ("echo",), 1, state=state))


def test_a_worker_that_comes_idle_takes_a_prefetched_task_from_a_busy_one():
    """A surge worker registers (or one frees up with nothing queued): the prefetched
    task is recalled, once, and starts there instead of after the other worker's task."""
    sim = Sim(prefetch=1)
    _, held = busy_with_prefetch(sim, low="high")
    fx = sim.ready("w2")
    assert recalls(fx) == [("w1", {"op": "task.recall", "id": held.id, "attempt": 1})]
    assert recalls(sim.ready("w2")) == []  # on its way already
    fx = recalled(sim, "w1", held)
    assert runs(fx) == [("w2", runs(fx)[0][1])] and runs(fx)[0][1]["id"] == held.id
    assert held.worker == "w2" and not held.prefetched and held.attempt == 1
    check_invariants(sim.state)


def test_slots_steal_one_per_idle_worker_best_priority_first():
    slots = Slots(1)
    busy = [Worker(f"w{i}", ("echo",), i, state=WorkerState.BUSY) for i in range(3)]
    for w, p in zip(busy, ("low", "critical", "medium"), strict=True):
        slots.fill(w, task(f"t{w.name}", p))
    workers = {w.name: w for w in busy}
    idle = [Worker("i1", ("echo",), 9, state=WorkerState.IDLE)]
    assert slots.to_steal(idle, workers) == [(busy[1], "tw1")]
    assert slots.to_steal(idle, workers) == []  # one recall on its way for one idle worker
    other = [Worker("i2", ("llm",), 9, state=WorkerState.IDLE)]
    assert slots.to_steal(idle + other, workers) == []  # llm: nothing of its type


def test_a_prefetched_task_counts_against_the_queue_limit_as_before():
    sim = Sim(prefetch=1, max_queue_per_type=2)
    busy_with_prefetch(sim, low="medium")
    sim.add()  # queued: the prefetched one and this one make the two
    kind, body = answer(sim.submit())
    assert kind == wire.ERROR and body["code"] == "queue_full"


def test_a_critical_task_is_never_prefetched_and_holds_the_slots_of_its_type_empty():
    sim = Sim(prefetch=1)
    sim.ready("w1")
    sim.ready("w2")
    sim.add(description="busy 1")
    sim.add(description="busy 2")
    critical = sim.add(priority="critical")
    fx = sim.submit(priority="low")
    assert runs(fx) == [] and critical.state is State.QUEUED
    assert all(w.prefetched is None for w in sim.state.workers.values())


def test_no_lower_task_is_prefetched_while_a_higher_one_waits_unstarted_in_a_slot():
    sim = Sim(prefetch=1)
    sim.ready("w1")
    sim.ready("w2")
    first = sim.add(description="busy 1")
    sim.add(description="busy 2")
    high = sim.add(priority="high")
    assert high.prefetched
    low = sim.add(priority="low")
    assert low.state is State.QUEUED  # w2's slot stays empty: low would start before high
    fx = sim.finish(high.worker, first if high.worker == first.worker else None)
    assert not high.prefetched and [t["id"] for _, t in runs(fx)] == [low.id]



# -- the scheduler's turn while a critical task waits ---------------------------------------
class TurnOf:
    """The scheduler process's turn rules over a Sim's state (no sockets)."""

    def __init__(self, sim: Sim):
        from cortex.services.scheduler.process import Scheduler

        self.sim, self.end_turn = sim, False
        self.state = sim.state
        self.critical_may_start = Scheduler.critical_may_start.__get__(self)


def test_a_worker_report_ends_the_turn_only_when_a_critical_task_went_out():
    sim = Sim(prefetch=1)
    long_, held = busy_with_prefetch(sim)
    critical = sim.add(priority="critical", description="urgent")
    assert critical.state is State.QUEUED
    turn = TurnOf(sim)
    fx = Effects()
    turn.critical_may_start(fx, sim.now)  # nothing freed: it goes on with the turn
    assert not turn.end_turn and critical.state is State.QUEUED and not runs(fx)
    recalled(sim, "w1", held)  # the slot gives its low task back
    fx = sim.turn(sim.state.task_finished, "w1", b"w1", sim.corr(),
                  {"id": long_.id, "attempt": 1, "ok": True, "result": None}, sim.now,
                  dispatch=False)
    turn.critical_may_start(fx, sim.now)
    assert turn.end_turn and critical.state is State.DISPATCHED and not critical.prefetched
    assert [t["id"] for _, t in runs(fx)][0] == critical.id  # the low one may refill the slot


def test_after_a_restart_a_task_its_live_worker_never_mentions_goes_back():
    """In flight at a restart, on a worker that is alive and says so (ready while idle,
    heartbeats of another task) but never names the task (its order or the reply carrying
    it was lost with the old scheduler): the worker's beats do not keep it in flight. A
    prefetched one goes back to the queue unstarted; one it should have been running is
    retried."""
    sim = Sim(prefetch=1)
    long_, held = busy_with_prefetch(sim)
    sim.ready("w2")
    lost = sim.add(description="its run order was lost")
    assert lost.worker == "w2" and not lost.prefetched
    fresh = replay(sim.records, overrides={"prefetch": 1})
    fresh.restore(sim.now)
    sim.state = fresh
    restarted = len(sim.effects)
    for _ in range(int(wire.HEARTBEAT_LIVENESS) + 2):
        # w1 runs its long task and says so; w2 is idle and says so, every beat.
        sim.heartbeat("w1", fresh.tasks[long_.id])
        sim.ready("w2")
        sim.tick(HB)
    sent = [(worker, task["id"], task["attempt"]) for fx in sim.effects[restarted:]
            for worker, task in runs(fx)]
    # Both are sent again (to whichever worker has room), the prefetched one unstarted.
    assert any(t == held.id and attempt == 1 for _, t, attempt in sent), sent
    assert any(t == lost.id and attempt == 2 for _, t, attempt in sent), sent
    assert fresh.tasks[long_.id].state is State.RUNNING and fresh.tasks[long_.id].attempt == 1
    check_invariants(fresh)


def test_after_a_restart_a_worker_first_heard_with_recovered_tasks_is_asked_to_sync():
    """The broker's list at our start may miss a worker (it was reconnecting): its first
    message asks it to sync, so a prefetched task it holds comes back unstarted before
    the watch could send it elsewhere. A worker with nothing recovered is not asked."""
    sim = Sim(prefetch=1)
    long_, held = busy_with_prefetch(sim)
    sim.ready("w2")
    lost = sim.add(description="its run order was lost")
    fresh = replay(sim.records, overrides={"prefetch": 1})
    fresh.restore(sim.now)
    sim.state = fresh

    def syncs(fx) -> list[str]:
        return [p.decode() for p, t, _, b in fx.sends
                if t == wire.NOTIFY and b.get("op") == "worker.sync"]

    assert syncs(sim.heartbeat("w1", fresh.tasks[long_.id])) == ["w1"]
    assert syncs(sim.heartbeat("w1", fresh.tasks[long_.id])) == []  # first contact only
    assert syncs(sim.ready("w2")) == ["w2"]
    assert syncs(sim.ready("w3")) == []
    # w1 answers the sync as a worker does: what it holds comes back, same attempt.
    sim.turn(fresh.task_rejected, "w1", {"id": held.id, "attempt": 1, "reason": "sync"},
             sim.now)
    assert fresh.tasks[held.id].attempt == 1 and not fresh.tasks[held.id].prefetched
    for _ in range(int(wire.HEARTBEAT_LIVENESS) + 2):
        sim.heartbeat("w1", fresh.tasks[long_.id])
        sim.tick(HB)
    assert fresh.tasks[lost.id].attempt == 2  # never named by w2: sent again
    check_invariants(fresh)
