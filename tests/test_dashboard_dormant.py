"""The dashboard dormant while no one watches: its board caught up on waking equals one
that never slept (pure), and on a real suite it stops following the live events, tasks
run meanwhile, and a page opening then shows them as if it had followed them all along."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp
import pytest

from cortex.protocol import Client
from cortex.services.dashboard.live import DORMANT_AFTER, DORMANT_AFTER_ENV, dormant_after_from
from cortex.services.dashboard.paging import recent_events
from cortex.services.dashboard.state import Board
from cortex.services.runtime.settings import ConfigError

from .conftest import jsonl_events_of, suite_config, wait_for

SERVICES = ("broker", "events", "ledger", "scheduler", "pool")
WAIT = 60  # seconds: real suites are slow on a shared machine


def event(ts, type_, task=None, worker=None, **data):
    return {"id": f"src:1:{ts}", "type": type_, "task": task, "worker": worker, "ts": ts,
            "source": "src", "data": data}


# Before the poll (ts < 200): two workers, a task run through, a refusal, an overrun, a
# task running on w2 with another prefetched behind it, one queued.
BEFORE = [
    event(100, "worker.spawned", worker="w1", pid=11, group="default"),
    event(101, "worker.registered", worker="w1", types=["echo"], pid=11),
    event(102, "worker.spawned", worker="w2", pid=12, group="default"),
    event(103, "worker.registered", worker="w2", types=["echo"], pid=12),
    event(110, "supervisor.process_running", name="scheduler", pid=5),
    event(120, "task.created", "t1", type="echo", priority="medium", agent="a"),
    event(121, "task.dispatched", "t1", "w1"),
    event(122, "task.started", "t1", "w1"),
    event(130, "task.completed", "t1", "w1"),
    event(140, "scheduler.rejected", code="queue_full", type="echo", priority="low",
          reason="the queue is full"),
    event(150, "ledger.overrun", "t1", used=12, reserved=10),
    event(160, "task.created", "t2", type="echo", priority="high", agent="a"),
    event(161, "task.dispatched", "t2", "w2"),
    event(170, "task.created", "t3", type="echo", priority="medium", agent="b"),
    event(171, "task.waiting", "t3", reason="worker"),
    event(180, "task.created", "t4", type="echo", priority="low", agent="b"),
    event(181, "task.dispatched", "t4", "w2", prefetched=True, priority="low", attempt=1),
]
# After the poll (ts >= 200): t2 ends, the prefetched t4 starts, a new task, a rejection.
AFTER = [
    event(210, "task.completed", "t2", "w2"),
    event(211, "task.started", "t4", "w2"),
    event(220, "task.created", "t5", type="echo", priority="critical", agent="c"),
    event(221, "task.dispatched", "t5", "w1"),
    event(230, "scheduler.rejected", code="deadline", type="echo", priority="low",
          reason="too late"),
    event(240, "task.completed", "t5", "w1"),
]
POLL_WALL = 200.0  # the poll's wall time; the tests' monotonic clock is the wall clock
POLL = {
    "status": {
        "broker": {"pid": 1, "uptime": 50.0}, "events": {"pid": 2, "uptime": 50.0},
        "ledger": {"pid": 3, "uptime": 50.0, "budgets": [
            {"scope": "global", "limit": 1000, "committed": 12, "reserved": 0}]},
        "scheduler": {"pid": 5, "uptime": 50.0, "queue": {"critical": 0, "high": 0,
                                                          "medium": 1, "low": 0},
                      "waiting": {"worker": 1}},
        "pool": {"pid": 4, "uptime": 50.0, "workers": [
            {"name": "w1", "pid": 11, "group": "default", "rss_mb": 30.0, "cpu_s": 1.0},
            {"name": "w2", "pid": 12, "group": "default", "rss_mb": 31.0, "cpu_s": 1.5}]}},
    "workers": {"workers": [
        {"name": "w1", "state": "idle", "task": None, "types": ["echo"], "pid": 11, "done": 1},
        {"name": "w2", "state": "busy", "task": "t2", "types": ["echo"], "pid": 12, "done": 0,
         "prefetched": "t4"}]},
    "queued": {"tasks": [{"id": "t3", "type": "echo", "priority": "medium", "agent": "b",
                          "waiting": "worker", "times": {"created": 170}, "attempt": 1}]},
    "metrics": {"tasks": {"created": 4}, "rejections": {"queue_full": 1}},
}


def never_slept() -> Board:
    board = Board(SERVICES)
    for e in BEFORE:
        board.on_event(e, e["ts"])
    board.merge_poll(POLL, POLL_WALL, POLL_WALL + 0.5, POLL_WALL)
    for e in AFTER:
        board.on_event(e, e["ts"])
    return board


def shown(board: Board) -> dict:
    """What a page gets of the board (its feed state aside), the recent events included."""
    snap = board.snapshot()
    snap.pop("feed")
    return {**snap, "recent": list(board.recent)}


def test_a_board_caught_up_on_waking_equals_one_that_never_slept():
    board = Board(SERVICES)
    for e in BEFORE[:3]:  # followed live, then no one watched
        board.on_event(e, e["ts"])
    board.go_dormant(105.0)
    assert board.snapshot()["feed"]["dormant"] is True
    # The router's ring answered with everything up to t5's dispatch; meanwhile the live
    # feed (on again first) brought t2's end onwards: four events in both.
    recent = BEFORE + AFTER[:4]
    live = AFTER[:5]
    board.rebuild(POLL, recent, live, asked=POLL_WALL, wall=POLL_WALL, now=231.0)
    board.on_event(AFTER[5], AFTER[5]["ts"])  # and the live feed goes on
    assert shown(board) == shown(never_slept())
    assert board.counts["events"] == len(BEFORE) + len(AFTER)  # none twice, none missing
    fleet = board.snapshot()["fleet"]
    assert (fleet["w1"]["state"], fleet["w1"]["done"]) == ("idle", 2)
    assert (fleet["w2"]["state"], fleet["w2"]["task"], fleet["w2"]["next"]) == \
        ("busy", "t4", None)
    queue = board.snapshot()["queue"]
    assert [r["id"] for r in queue["rows"]] == ["t3"]
    assert queue["admission"] == {"admitted": 5, "refused": 1, "rejected": 1,
                                  "codes": {"queue_full": 1, "deadline": 1}}
    assert [r["code"] for r in queue["refusals"]] == ["deadline", "queue_full"]
    assert len(board.snapshot()["budgets"]["overruns"]) == 1
    feed = board.snapshot()["feed"]
    assert feed["dormant"] is False and feed["rebuilt_at"] == POLL_WALL


def test_live_events_held_during_the_catch_up_are_applied_once_in_order():
    board = Board(SERVICES)
    board.go_dormant(99.0)
    # The ring was read before any of these came: all are new, none is dropped.
    board.rebuild(POLL, BEFORE, AFTER, asked=POLL_WALL, wall=POLL_WALL, now=241.0)
    assert shown(board) == shown(never_slept())
    # A ring that already holds every live event: nothing is applied twice.
    again = Board(SERVICES)
    again.go_dormant(99.0)
    again.rebuild(POLL, BEFORE + AFTER, AFTER, asked=POLL_WALL, wall=POLL_WALL, now=241.0)
    assert again.counts["events"] == len(BEFORE) + len(AFTER)
    assert [e["id"] for e in again.recent] == [e["id"] for e in BEFORE + AFTER]
    assert again.snapshot()["fleet"]["w1"]["done"] == 2


def test_without_the_router_the_board_keeps_its_events_and_takes_the_poll():
    board = Board(SERVICES)
    for e in BEFORE:
        board.on_event(e, e["ts"])
    board.go_dormant(190.0)
    board.rebuild(POLL, None, AFTER[:1], asked=POLL_WALL, wall=POLL_WALL, now=211.0)
    assert [e["id"] for e in board.recent] == [e["id"] for e in BEFORE + AFTER[:1]]
    assert board.snapshot()["feed"]["dormant"] is False
    assert board.snapshot()["fleet"]["w2"]["state"] == "idle"  # t2's end, applied live
    assert [r["id"] for r in board.snapshot()["queue"]["rows"]] == ["t3"]


def test_recent_events_join_the_routers_pages_oldest_first():
    ring = [{"id": f"e{i}"} for i in range(23)]
    asked = []

    async def router(body: dict) -> dict:  # events.recent: the newest n before `before`
        asked.append(body)
        end = body.get("before", len(ring))
        start = max(0, end - min(body["n"], 5))  # five fit one message
        return {"events": ring[start:end], "more": start > 0, "before": start}

    assert asyncio.run(recent_events(router, 12)) == ring[-12:]
    assert [b["n"] for b in asked] == [12, 7, 2]
    asked.clear()
    assert asyncio.run(recent_events(router, 100)) == ring
    assert asked[-1]["before"] == 3 and len(asked) == 5


def test_dormant_after_is_a_positive_number_of_seconds():
    assert dormant_after_from({}) == DORMANT_AFTER
    assert dormant_after_from({DORMANT_AFTER_ENV: "1.5"}) == 1.5
    for bad in ("0", "-3", "soon", "nan", "inf"):
        with pytest.raises(ConfigError):
            dormant_after_from({DORMANT_AFTER_ENV: bad})


# -- on a real suite -----------------------------------------------------------------------

def get_json(base: str, token: str, path: str) -> dict:
    request = urllib.request.Request(base + path, headers={"X-Cortex-Token": token})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


async def open_page(base: str, token: str, client: Client) -> tuple[dict, str, list[dict]]:
    """A page's first snapshot; then a task submitted while it is open (it waits, both
    workers are busy), and the events that came live until its creation."""
    async with aiohttp.ClientSession() as session:
        ws_url = base.replace("http://", "ws://") + "/ws?token=" + token
        async with session.ws_connect(ws_url, origin=base) as ws:
            snapshot = await ws.receive_json(timeout=WAIT)
            task = client.submit("echo", "after waking")["id"]
            live: list[dict] = []
            while not any(e.get("task") == task for e in live):
                message = await ws.receive_json(timeout=WAIT)
                live += message.get("events", []) if message["t"] == "events" else []
            return snapshot, task, live


def test_a_dormant_dashboard_wakes_to_show_what_ran_while_it_slept(suites, monkeypatch):
    monkeypatch.setenv(DORMANT_AFTER_ENV, "1")
    # No prefetch: the task submitted while both workers are busy stays queued.
    suite = suites.start(suite_config(2, scheduler="prefetch = 0\n", dashboard=True))
    url = (suite.home / "run" / "dashboard.url").read_text().strip()
    base, _, token = url.partition("/?token=")
    status = wait_for(lambda: (s := get_json(base, token, "/api/status"))["dormant"] and s,
                      WAIT, "the dashboard to go dormant")
    assert status["subscribed"] is False and status["dormant_after"] == 1.0
    with Client(suite.home, timeout=WAIT) as client:
        # A first task after the router has surely dropped our subscription; its events
        # and every later one stay away from the dashboard while it sleeps.
        client.wait(client.submit("echo", "settle")["id"], timeout=WAIT)
        seen = get_json(base, token, "/api/status")["events"]
        done = [client.submit("echo", f"while asleep {i}", payload={"i": i})["id"]
                for i in range(20)]
        for task_id in done:
            assert client.wait(task_id, timeout=WAIT)["state"] == "completed"
        busy = [client.submit("sleep", f"hold {i}", payload={"seconds": 120})["id"]
                for i in range(2)]
        wait_for(lambda: all(client.status(t)["state"] == "running" for t in busy), WAIT,
                 "both workers busy")
        queued = client.submit("echo", "waits for a worker")["id"]
        # Its creation reaches the router a few ms later (a service's events wait up to
        # 10 ms for company): the admission count the page catches up on includes it then.
        wait_for(lambda: any(e["type"] == "task.created" and e.get("task") == queued
                             for e in jsonl_events_of(suite.home)), WAIT,
                 "the queued task's creation at the router")
        asleep = get_json(base, token, "/api/status")
        assert asleep["dormant"] is True and asleep["events"] == seen  # nothing came
        snapshot, task, live = asyncio.run(open_page(base, token, client))
        assert snapshot["feed"]["dormant"] is False
        fleet = {w["task"]: w for w in snapshot["fleet"].values() if w["state"] == "busy"}
        assert set(fleet) == set(busy)
        assert [r["id"] for r in snapshot["queue"]["rows"]] == [queued]
        assert snapshot["queue"]["admission"]["admitted"] >= len(done) + 4
        ids = [e["id"] for e in snapshot["events"]]
        assert len(ids) == len(set(ids))  # none twice
        completed = {e["task"] for e in snapshot["events"] if e["type"] == "task.completed"}
        assert set(done) <= completed
        # Awake, it follows the live events again: the page got the new task's as they
        # came, none of them already in its snapshot.
        assert "task.created" in [e["type"] for e in live if e["task"] == task]
        assert not {e["id"] for e in live} & set(ids)
        awake = get_json(base, token, "/api/status")
        assert awake["subscribed"] is True and awake["wakes"] == 1
        assert awake["events"] > seen
        # Unwatched again, it sleeps again.
        wait_for(lambda: get_json(base, token, "/api/status")["dormant"], WAIT,
                 "the dashboard to go dormant again")
        for task_id in [*busy, queued, task]:
            client.cancel(task_id)
