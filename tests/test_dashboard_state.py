"""The dashboard's pure state: filters, token check, fleet, queue, budgets, latency."""

from __future__ import annotations

import pytest

from cortex.services.dashboard.series import Latency, Resources, percentile
from cortex.services.dashboard.state import (
    GONE_AFTER,
    MAX_QUEUE_ROWS,
    QUEUE_EVERY,
    BadInput,
    Board,
    EventFilter,
    Fleet,
    Queue,
    Services,
    token_ok,
)


def event(type_, task=None, worker=None, ts=100.0, **data):
    return {"id": f"{type_}:{task}:{ts}", "type": type_, "task": task, "worker": worker,
            "ts": ts, "source": "test", "data": data}


# -- token and filters -------------------------------------------------------------------

def test_token_must_match_exactly():
    assert token_ok("abc", "abc")
    assert not token_ok("abc", "abd")
    assert not token_ok("abc", "")
    assert not token_ok("abc", None)
    assert not token_ok("abc", ["abc"])


def test_filter_matches_type_glob_task_worker_and_text_together():
    flt = EventFilter(type="task.*", worker="w1", text="HELLO")
    assert flt.matches(event("task.created", "t1", "w1", message="say hello"))
    assert not flt.matches(event("ledger.reserved", "t1", "w1", message="hello"))
    assert not flt.matches(event("task.created", "t1", "w2", message="hello"))
    assert not flt.matches(event("task.created", "t1", "w1", message="bye"))
    assert EventFilter(task="t2").matches(event("x", "t2"))
    assert not EventFilter(task="t2").matches(event("x", "t1"))
    assert EventFilter().empty and EventFilter().matches(event("anything"))


def test_filter_refuses_what_it_cannot_use():
    with pytest.raises(BadInput):
        EventFilter.from_dict({"kind": "task.*"})
    with pytest.raises(BadInput):
        EventFilter.from_dict({"type": 5})
    with pytest.raises(BadInput):
        EventFilter.from_dict({"text": "x" * 201})
    with pytest.raises(BadInput):
        EventFilter.from_dict(["type"])
    assert EventFilter.from_dict({"type": "", "task": "t1"}).as_dict() == {"task": "t1"}


# -- fleet -------------------------------------------------------------------------------

def test_worker_moves_starting_idle_busy_idle_from_events():
    fleet = Fleet()
    fleet.on_event(event("worker.spawned", worker="w1", pid=7, group="g", extra=True), 1.0)
    assert fleet.workers["w1"]["state"] == "starting" and fleet.workers["w1"]["extra"]
    fleet.on_event(event("worker.registered", worker="w1", types=["echo"], pid=7), 2.0)
    assert fleet.workers["w1"]["state"] == "idle"
    fleet.on_event(event("task.dispatched", "t1", "w1", ts=50.0), 3.0)
    row = fleet.workers["w1"]
    assert (row["state"], row["task"], row["since"]) == ("busy", "t1", 50.0)
    fleet.on_event(event("task.started", "t1", "w1", ts=51.0, at=50.5), 4.0)
    assert fleet.workers["w1"]["since"] == 50.0  # the same task: still busy since dispatch
    fleet.on_event(event("task.completed", "t1", "w1", ts=52.0), 5.0)
    assert (fleet.workers["w1"]["state"], fleet.workers["w1"]["task"]) == ("idle", None)
    assert fleet.workers["w1"]["done"] == 1
    assert set(fleet.take_changes()) == {"w1"} and fleet.take_changes() == {}


def test_a_late_end_of_another_task_does_not_free_a_worker():
    fleet = Fleet()
    fleet.on_event(event("task.dispatched", "t2", "w1"), 1.0)
    fleet.on_event(event("task.failed", "t1", "w1"), 2.0)
    assert fleet.workers["w1"]["state"] == "busy"


def test_prefetched_task_shows_as_next_until_it_starts_or_goes_back():
    fleet = Fleet()
    fleet.on_event(event("task.dispatched", "t1", "w1", ts=50.0), 1.0)
    fleet.on_event(event("task.dispatched", "t2", "w1", ts=51.0, prefetched=True), 2.0)
    row = fleet.workers["w1"]
    assert (row["task"], row["next"], row["since"]) == ("t1", "t2", 50.0)
    fleet.on_event(event("task.completed", "t1", "w1", ts=52.0), 3.0)
    fleet.on_event(event("task.started", "t2", "w1", ts=52.1, at=52.0), 4.0)
    row = fleet.workers["w1"]
    assert (row["state"], row["task"], row["next"]) == ("busy", "t2", None)
    fleet.on_event(event("task.dispatched", "t3", "w1", prefetched=True), 5.0)
    fleet.on_event(event("task.recalled", "t3", "w1"), 6.0)
    assert (fleet.workers["w1"]["task"], fleet.workers["w1"]["next"]) == ("t2", None)
    fleet.on_event(event("task.dispatched", "t4", "w1", prefetched=True), 7.0)
    fleet.on_event(event("task.cancelled", "t4", "w1"), 8.0)
    assert (fleet.workers["w1"]["task"], fleet.workers["w1"]["next"]) == ("t2", None)
    fleet.on_event(event("task.dispatched", "t5", "w1", prefetched=True), 9.0)
    fleet.merge_poll([{"name": "w1", "state": "busy", "task": "t2", "prefetched": "t6"}],
                     [], asked_at=20.0, now=20.0)  # the poll knows of a later one
    assert fleet.workers["w1"]["next"] == "t6"
    fleet.on_event(event("worker.lost", worker="w1"), 21.0)
    assert fleet.workers["w1"]["next"] is None


def test_lost_and_exited_workers_show_then_go():
    fleet = Fleet()
    fleet.on_event(event("worker.registered", worker="w1", types=["echo"]), 1.0)
    fleet.on_event(event("worker.lost", worker="w1"), 2.0)
    assert fleet.workers["w1"]["state"] == "lost"
    fleet.merge_poll([], [], asked_at=3.0, now=3.0)
    assert "w1" in fleet.workers  # still on screen for a while
    fleet.merge_poll([], [], asked_at=3.0 + GONE_AFTER, now=3.0 + GONE_AFTER)
    assert "w1" not in fleet.workers
    assert fleet.take_changes()["w1"] is None


def test_poll_corrects_what_events_missed_but_not_what_is_newer():
    fleet = Fleet()
    pool = [{"name": "w1", "group": "g", "pid": 11, "extra": False, "rss_mb": 30.0,
             "cpu_s": 0.5}, {"name": "w2", "group": "g", "pid": 12, "extra": True}]
    sched = [{"name": "w1", "types": ["echo"], "pid": 11, "state": "busy", "task": "t9",
              "done": 3}]
    fleet.merge_poll(sched, pool, asked_at=10.0, now=10.5, wall=500.0)
    assert fleet.workers["w1"]["state"] == "busy" and fleet.workers["w1"]["task"] == "t9"
    assert fleet.workers["w1"]["rss_mb"] == 30.0 and fleet.workers["w1"]["done"] == 3
    assert fleet.workers["w2"]["state"] == "starting" and fleet.workers["w2"]["extra"]
    # An event after the question wins over the (older) answer.
    fleet.on_event(event("task.completed", "t9", "w1"), 11.0)
    fleet.merge_poll(sched, pool, asked_at=10.8, now=11.2)
    assert fleet.workers["w1"]["state"] == "idle"


def test_poll_with_a_service_missing_removes_nothing():
    fleet = Fleet()
    fleet.on_event(event("worker.registered", worker="w1", types=["echo"]), 1.0)
    fleet.merge_poll(None, [], asked_at=5.0, now=5.0)
    assert fleet.workers["w1"]["state"] == "idle"


def test_external_workers_are_grouped_apart():
    fleet = Fleet()
    fleet.merge_poll([{"name": "ext-1", "types": ["llm"], "pid": 5, "state": "idle"}], [],
                     asked_at=1.0, now=1.0)
    assert fleet.workers["ext-1"]["group"] == "external"


# -- queue -------------------------------------------------------------------------------

def test_queue_rows_follow_events_between_polls():
    queue = Queue()
    queue.on_event(event("task.created", "t1", type="echo", priority="high", agent="a",
                         eta=105.0, description="d"))
    queue.on_event(event("task.waiting", "t1", reason="tokens", detail="global: 0 left"))
    row = queue.view()["rows"][0]
    assert (row["id"], row["waiting"], row["eta"]) == ("t1", "tokens", 105.0)
    assert row["detail"] == {"detail": "global: 0 left"}
    queue.on_event(event("task.dispatched", "t1", "w1"))
    assert queue.view()["rows"] == []
    queue.on_event(event("scheduler.rejected", code="queue_full", type="echo",
                         priority="low", reason="500 queued"))
    queue.on_event(event("scheduler.rejected", code="rejected", type="echo",
                         priority="low", reason="past its deadline"))
    admission = queue.view()["admission"]
    assert (admission["admitted"], admission["refused"], admission["rejected"]) == (1, 1, 1)
    assert [r["code"] for r in queue.view()["refusals"]] == ["rejected", "queue_full"]


def test_recalled_prefetched_task_is_queued_again_until_it_starts_elsewhere():
    queue = Queue()
    queue.on_event(event("task.created", "t1", type="echo", priority="low", agent="a",
                         eta=105.0, description="d"))
    queue.on_event(event("task.dispatched", "t1", "w1", attempt=1, priority="low",
                         prefetched=True))
    assert queue.view()["rows"] == []  # held by w1, to start after its task
    queue.dirty = False
    queue.on_event(event("task.recalled", "t1", "w1", attempt=1))
    [row] = queue.view()["rows"]
    assert (row["id"], row["type"], row["priority"], row["waiting"], row["attempt"],
            row["description"]) == ("t1", "echo", "low", "worker", 1, "d")
    assert queue.dirty
    queue.on_event(event("task.dispatched", "t1", "w2", attempt=1, priority="low"))
    assert queue.view()["rows"] == [] and queue.held == {}
    queue.on_event(event("task.recalled", "t1", "w2", attempt=1))
    assert queue.view()["rows"] == []  # not prefetched there: nothing to give back


def test_prefetched_task_that_starts_or_ends_is_not_queued_again():
    queue = Queue()
    for task, end in (("t1", "task.started"), ("t2", "task.cancelled"), ("t3", "task.dead")):
        queue.on_event(event("task.dispatched", task, "w1", attempt=2, priority="high",
                             agent="a", prefetched=True))  # created before we looked
        queue.on_event(event(end, task, "w1", attempt=2))
        queue.on_event(event("task.recalled", task, "w1", attempt=2))
    assert queue.view()["rows"] == [] and queue.held == {}
    queue.on_event(event("task.dispatched", "t4", "w1", attempt=2, priority="high",
                         agent="a", prefetched=True))
    queue.on_event(event("task.recalled", "t4", "w1", attempt=2))
    [row] = queue.view()["rows"]  # known from its dispatch alone: what it said
    assert (row["id"], row["priority"], row["agent"], row["attempt"], row["waiting"]) == (
        "t4", "high", "a", 2, "worker")


def test_prefetched_rows_kept_are_bounded():
    queue = Queue()
    for i in range(MAX_QUEUE_ROWS + 5):
        queue.on_event(event("task.dispatched", f"t{i}", "w1", attempt=1, priority="low",
                             prefetched=True))
    assert len(queue.held) == MAX_QUEUE_ROWS and "t0" not in queue.held
    queue.on_event(event("task.recalled", "t0", "w1", attempt=1))
    assert queue.view()["rows"] == []  # forgotten: the next poll shows it


def test_queue_poll_replaces_rows_and_reads_counts():
    queue = Queue()
    tasks = [{"id": f"t{i}", "type": "echo", "priority": "low", "waiting": "worker",
              "eta": 1.0, "times": {"created": 0.5}} for i in range(MAX_QUEUE_ROWS + 10)]
    queue.merge_poll(tasks, {"queue": {"critical": 0, "high": 1, "medium": 2, "low": 3},
                             "waiting": {"cpu": 1}},
                     {"tasks": {"created": 9}, "rejections": {"queue_full": 2, "rejected": 1}})
    view = queue.view()
    assert len(view["rows"]) == MAX_QUEUE_ROWS and view["rows"][0]["created"] == 0.5
    assert view["totals"]["total"] == 6 and view["totals"]["waiting"] == {"cpu": 1}
    assert (view["admission"]["admitted"], view["admission"]["refused"],
            view["admission"]["rejected"]) == (9, 2, 1)


# -- services, resources -----------------------------------------------------------------

def test_services_answering_pid_uptime_and_supervisor_state():
    services = Services(["ledger"])
    services.merge_poll("ledger", {"pid": 42, "started": 90.0}, now=100.0)
    row = services.view()[0]
    assert (row["answering"], row["pid"], row["started"], row["supervisor"]) == (
        True, 42, 90.0, "RUNNING")
    services.on_event(event("supervisor.process_exited", name="ledger", pid=42))
    assert services.view()[0]["supervisor"] == "EXITED"
    services.merge_poll("ledger", None, now=101.0)
    assert services.view()[0]["answering"] is False


def test_resources_keep_a_bounded_series_of_rates():
    res = Resources(points=3)
    res.add(0.0, 0.5, 100.0, 1000)
    point = res.add(2.0, 1.25, 110.0, 1600)
    assert (point["tokens"], point["cpu"], point["rss_mb"]) == (300.0, 1.25, 110.0)
    for i in range(5):
        res.add(3.0 + i, 0.1, 100.0, None)
    assert len(res.view()) == 3


# -- latency -----------------------------------------------------------------------------

BOUNDS = [0.001, 0.01, 0.1, 1.0, 10.0]


def test_percentile_of_bucket_counts():
    assert percentile({}, BOUNDS, 0.5) is None
    assert percentile({2: 10}, BOUNDS, 0.5) == pytest.approx(0.01 * 10 ** 0.5)
    # 90 fast ones and 10 slow ones: P50 among the fast, P99 among the slow.
    counts = {1: 90, 4: 10}
    assert 0.001 < percentile(counts, BOUNDS, 0.5) <= 0.01
    assert 1.0 < percentile(counts, BOUNDS, 0.99) <= 10.0


def metrics_reply(queue_counts):
    return {"bounds": BOUNDS, "latency": [], "buckets": [
        {"type": "echo", "priority": "low", "queue": [[i, n] for i, n in queue_counts.items()],
         "run": [], "total": []}]}


def test_latency_points_show_the_recent_window_not_the_history():
    latency = Latency(window=2)
    assert latency.add(1.0, metrics_reply({4: 1000})) is None  # history: not a moment
    point = latency.add(2.0, metrics_reply({4: 1000, 1: 10}))
    stats = point["series"]["echo/low"]["queue"]
    assert stats["n"] == 10 and stats["p99"] <= 0.01  # only the new, fast ones
    assert point["series"]["all"]["queue"]["n"] == 10
    latency.add(3.0, metrics_reply({4: 1000, 1: 20}))
    latency.add(4.0, metrics_reply({4: 1005, 1: 20}))  # the window drops the first delta
    view = latency.view()["series"]["echo/low"]
    assert [p["queue"]["n"] for p in view] == [10, 20, 15]


# -- the board -------------------------------------------------------------------------

def test_board_sends_only_what_changed_and_keeps_recent_events_bounded():
    board = Board(["ledger"])
    board.take_changes(0.0)
    assert board.take_changes(0.0) == {}
    board.on_event(event("ledger.overrun", "t1", data_=1), 1.0)
    changes = board.take_changes(0.1)
    assert "budgets" in changes and changes["budgets"]["overruns"][0]["task"] == "t1"
    assert board.budgets.stale
    # The queue table goes at most every QUEUE_EVERY seconds, then with all that changed.
    board.on_event(event("task.created", "q1", type="echo", priority="low"), 1.0)
    assert "queue" not in board.take_changes(0.2)
    assert [r["id"] for r in board.take_changes(0.0 + QUEUE_EVERY)["queue"]["rows"]] == ["q1"]
    assert board.take_changes(0.7) == {}
    for i in range(6000):
        board.on_event(event("x.y", f"t{i}", ts=float(i)), 2.0)
    assert len(board.recent) == 5000
    assert [e["task"] for e in board.matching(EventFilter(task="t5999"))] == ["t5999"]
    assert len(board.matching(EventFilter(type="x.*"))) == 1000
