"""When things break: hung workers, timeouts, cancels, an unwritable events directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import psutil
import pytest

from cortex.protocol import Client

from .conftest import SuiteRunner, jsonl_events_of, pid_alive, suite_config, wait_for
from .test_suite_integration import jsonl_events

SPAWNER = '[handlers]\nspawner = { command = ["sh", "-c", "sleep 300 & sleep 300"] }\n'


def worker_pid(client, name: str) -> int:
    return next(w["pid"] for w in client.call("pool", "pool.status")["workers"]
                if w["name"] == name)


def test_hung_worker_is_detected_and_its_task_completes_elsewhere(suites):
    suite = suites.start(workers=2)
    with Client(suite.home, timeout=60) as c:
        wait_for(lambda: len(c.workers()) == 2, 30, "two registered workers")
        task = c.submit("sleep", "hangs", payload={"seconds": 2.0}, retries=2)
        running = wait_for(lambda: (t := c.status(task["id"]))["worker"] and t, 20, "dispatch")
        victim = worker_pid(c, running["worker"])
        os.kill(victim, signal.SIGSTOP)
        try:
            done = c.wait(task["id"], timeout=60)
        finally:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert done["state"] == "completed"
        assert done["attempt"] == 2
        assert done["worker"] != running["worker"]
        # The stopped worker was ended by the pool, not left behind.
        wait_for(lambda: not pid_alive(victim), 30, "the hung worker to be killed")
    # The log may be a moment behind the reply: read it once the completion is there.
    kinds = wait_for(lambda: (k := Counter(ev["type"] for ev in jsonl_events(suite.home)
                                           if ev["task"] == task["id"]))["task.completed"]
                     and k, 30, "the completion in the log")
    assert kinds["task.completed"] == 1
    assert kinds["task.retry"] == 1
    # `cortex task trace` tells the story in order: two dispatches around the retry.
    out = subprocess.run([sys.executable, "-m", "cortex.services.cli", "--home",
                          str(suite.home), "task", "trace", task["id"], "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    story = [json.loads(line) for line in out.stdout.splitlines()]
    types = [e["type"] for e in story]
    assert [e["ts"] for e in story] == sorted(e["ts"] for e in story)
    first, retry = types.index("task.dispatched"), types.index("task.retry")
    assert types.index("task.created") < first < retry < types.index("task.completed")
    assert types.count("task.dispatched") == 2
    assert story[retry]["data"]["category"] == "worker_lost"


def test_timeout_kills_the_task_with_its_children(suites):
    suite = suites.start(workers=1, extra=SPAWNER.replace(
        "[handlers]", '[pool.groups.spawners]\ncount = 1\ntypes = ["spawner"]\n[handlers]'))
    with Client(suite.home, timeout=60) as c:
        task = c.submit("spawner", "sleeps past its timeout", timeout=2.0, retries=0)
        running = wait_for(lambda: (t := c.status(task["id"]))["state"] == "running" and t,
                           20, "running")
        pid = worker_pid(c, running["worker"])
        children = wait_for(lambda: [p.pid for p in psutil.Process(pid).children(True)
                                     if p.name() == "sleep"], 10, "the command's children")
        assert len(children) == 2
        done = c.wait(task["id"], timeout=60)
        assert done["state"] == "failed"
        assert done["error"]["category"] == "timeout"
        # A child may go between two looks at it: ask once (a zombie counts as gone).
        wait_for(lambda: not any(pid_alive(p) for p in children), 30,
                 "the timed-out command's children to be gone")
        suites.seen(suite)
        # The pool replaced the worker, and the next task runs.
        again = c.submit("echo", "after the timeout", payload=1)
        assert c.wait(again["id"], timeout=30)["state"] == "completed"

    def pool_story():
        return [e["type"] for e in jsonl_events_of(suite.home)
                if e.get("source") == "pool" and e.get("worker") == running["worker"]]

    # The pool told the worker's life as one event per state change, its end by the reap.
    story = wait_for(lambda: "worker.exited" in (s := pool_story()) and s, 30,
                     "the timed-out worker's exit in the log")
    assert story[:2] == ["worker.spawned", "worker.stopping"], story
    assert story[-1] == "worker.exited" and set(story[2:-1]) <= {"worker.killed"}, story


@pytest.fixture(scope="module")
def one_worker_suite():
    """A suite with one worker, shared by the tests that end only their own task's worker
    (the pool replaces it) and so leave the suite as they found it."""
    runner = SuiteRunner()
    try:
        yield runner.start(workers=1)
    finally:
        problems = runner.stop_all()
        assert not problems, "; ".join(problems)


def test_cancel_stops_a_running_handler(one_worker_suite):
    suite = one_worker_suite
    with Client(suite.home, timeout=30) as c:
        task = c.submit("sleep", "long", payload={"seconds": 120})
        wait_for(lambda: c.status(task["id"])["state"] == "running", 20, "running")
        assert c.cancel(task["id"])["state"] == "cancelled"
        done = c.wait(task["id"], timeout=5)
        assert done["state"] == "cancelled"
        # The only worker is free again well before the 120 s sleep would have ended.
        after = c.submit("echo", "next", payload=2)
        assert c.wait(after["id"], timeout=30)["result"] == 2


def test_retries_spent_end_in_the_dead_letters(one_worker_suite):
    suite = one_worker_suite
    with Client(suite.home, timeout=60) as c:
        task = c.submit("sleep", "always times out", payload={"seconds": 30}, timeout=0.5,
                        retries=1)
        done = c.wait(task["id"], timeout=60)
        assert done["state"] == "dead"
        assert done["attempt"] == 2
        assert done["error"]["category"] == "timeout"
        assert [t["id"] for t in c.list_tasks(state="dead")] == [task["id"]]


def chattr(flag: str, paths) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True)


def test_unwritable_events_directory_holds_events_and_resumes(suites):
    suite = suites.start(workers=2)
    events_dir = suite.home / "events"
    if subprocess.run(["chattr", "+i", str(events_dir)], capture_output=True).returncode:
        pytest.skip("chattr +i not supported on this filesystem")
    chattr("-i", [events_dir])
    ids = []
    with Client(suite.home, timeout=60) as c:
        ids.append(c.submit("echo", "before", payload=0)["id"])
        c.wait(ids[0])
        wait_for(lambda: c.call("events", "events.status")["buffered"] == 0, 10, "flushed")
        locked = [events_dir, *events_dir.iterdir()]
        chattr("+i", locked)  # even root cannot write an immutable file or directory
        try:
            for i in range(20):
                ids.append(c.submit("echo", f"while unwritable {i}", payload=i)["id"])
            for task_id in ids:
                assert c.wait(task_id, timeout=30)["state"] == "completed"
            status = wait_for(lambda: (s := c.call("events", "events.status"))["unwritable"]
                              and s, 10, "the router to report the directory unwritable")
            assert "ermission" in status["unwritable"] or "not permitted" in status["unwritable"]
            recent = c.call("events", "events.recent", {"n": 200})["events"]
            assert any(e["type"] == "events.unwritable" for e in recent)
        finally:
            chattr("-i", locked)
        wait_for(lambda: not c.call("events", "events.status")["unwritable"], 20,
                 "writing to resume")
        wait_for(lambda: c.call("scheduler", "scheduler.status")["events_unacked"] == 0, 20,
                 "every event acknowledged")
    events = jsonl_events(suite.home)
    assert len({e["id"] for e in events}) == len(events)
    completed = Counter(e["task"] for e in events if e["type"] == "task.completed")
    assert all(completed[t] == 1 for t in ids)
    assert any(e["type"] == "events.writable" for e in events)


def test_workers_recycle_after_max_tasks_without_losing_work(suites):
    suite = suites.start(config=suite_config(1, snapshot_interval=None,
                                             pool="max = 1\nmax_tasks = 3\n"))
    with Client(suite.home, timeout=60) as c:
        ids = [c.submit("echo", f"recycled {i}", payload=i)["id"] for i in range(10)]
        done = [c.wait(t, timeout=60) for t in ids]
        assert [t["result"] for t in done] == list(range(10))
        assert all(t["attempt"] == 1 for t in done)  # handed over cleanly, never lost
        # One worker slot, three tasks per worker: at least four different workers ran them.
        assert len({t["worker"] for t in done}) >= 4
        suites.seen(suite)
    # A recycled worker's replacement is forked at once and can run the last task before
    # the exit's event reaches the log (held up to 10 ms, then written by the router).
    exits = wait_for(lambda: (found := [e for e in jsonl_events(suite.home)
                                        if e["type"] == "worker.exited"])
                     and len(found) >= 3 and found, 60, "three recycled workers' exits")
    assert all(e["data"]["code"] == 0 for e in exits)


@pytest.mark.parametrize("task_heartbeat, bus_interval, spacing", [
    (5.0, 1.0, 1.0), (5.0, 1.0, 3.0), (1.0, 0.5, 0.5), (1.0, 0.5, 1.5), (0.05, 1.0, 3.0)])
def test_an_idle_workers_ready_rides_on_a_heartbeat_yet_comes_within_the_silence_limit(
        tmp_path, task_heartbeat, bus_interval, spacing):
    # An idle worker repeats worker.ready on the first wake after it is due (the broker's
    # heartbeat wakes it anyway: every interval, or every `spacing` once it is quiet); the
    # scheduler takes a worker silent for HEARTBEAT_LIVENESS task heartbeats as lost, so
    # the ready may slip by less than that.
    from cortex.protocol import wire
    from cortex.protocol.worker import Worker

    worker = Worker("echo", lambda ctx: None, home=tmp_path, install_signals=False,
                    endpoint=f"ipc://{tmp_path}/no-bus.sock", heartbeat=task_heartbeat)
    worker._link.interval, worker._link.spacing = bus_interval, spacing
    try:
        worker._ready()
        assert worker._ready_slack > 0  # waits for a heartbeat's wake
        assert task_heartbeat + worker._ready_slack < task_heartbeat * wire.HEARTBEAT_LIVENESS
        worker._on_bus(wire.Message(wire.ERROR, b"scheduler", b"unknown", b"", b"service"))
        assert worker._ready_slack == 0  # our ready may have been lost: at its time
    finally:
        worker._link.close()
        worker._inbox.close(linger=0)
        worker._outbox.close(linger=0)


def test_a_result_too_large_for_a_message_fails_its_task_and_the_worker_goes_on(suites):
    big = '[handlers]\nbig = { command = ["python3", "-c", "print(\'x\' * 2_000_000)"] }\n'
    suite = suites.start(config=suite_config(1, types=("big", "echo"), tables=big))
    with Client(suite.home, timeout=60) as c:
        failed = c.wait(c.submit("big", "two megabytes of output", retries=0)["id"],
                        timeout=60)
        assert failed["state"] == "failed"
        assert failed["error"]["category"] == "handler_error"
        assert "exceeds" in failed["error"]["message"]
        after = c.wait(c.submit("echo", "next", payload=1)["id"], timeout=60)
        assert after["state"] == "completed" and after["worker"] == failed["worker"]
        suites.seen(suite)
    assert not [e for e in jsonl_events(suite.home) if e["type"] == "worker.exited"]
