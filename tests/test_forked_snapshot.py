"""The scheduler's snapshot is written by a forked child (services/runtime/forked.py), so a
large task table never stops its loop: the child writes a temp file, the parent alone puts
it in place once it has reaped a child that succeeded. A child that fails or is killed
leaves nothing behind, holds none of the parent's descriptors, and the state survives
kill -9 of the scheduler, even with its newest snapshot lost after a forked one landed."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time

from cortex.protocol import Client
from cortex.services.runtime.forked import ForkedWrite, temp_path

from .conftest import suite_config, wait_for

LONG = 60


def test_the_child_writes_a_temp_file_and_the_parent_gets_it(tmp_path):
    target = tmp_path / "tasks.json"
    forked = ForkedWrite(target)
    forked.start(lambda: b'{"n": 1}\n', tag=42)
    pid = forked.pid
    assert forked.running and pid != os.getpid()
    tmp, tag = forked.poll(block=True)
    assert tag == 42 and tmp == temp_path(target, pid)
    assert tmp.read_bytes() == b'{"n": 1}\n'
    assert oct(tmp.stat().st_mode & 0o777) == "0o600"
    assert not target.exists()  # put in place by the caller, never by the child
    assert not forked.running and forked.poll() is None
    try:
        os.waitpid(pid, os.WNOHANG)
        raise AssertionError("the child was not reaped")
    except ChildProcessError:
        pass


def test_a_failed_child_leaves_nothing(tmp_path):
    def boom() -> bytes:
        raise ValueError("cannot encode")

    forked = ForkedWrite(tmp_path / "tasks.json")
    forked.start(boom, tag="t")
    assert forked.poll(block=True) == (None, "t")
    assert list(tmp_path.iterdir()) == []


def test_a_cancelled_child_is_killed_reaped_and_leaves_nothing(tmp_path):
    def slow() -> bytes:
        time.sleep(LONG)
        return b"late"

    forked = ForkedWrite(tmp_path / "tasks.json")
    forked.start(slow)
    pid = forked.pid
    forked.cancel()
    assert not forked.running
    try:
        os.kill(pid, 0)
        raise AssertionError("the child still runs")
    except ProcessLookupError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_the_child_holds_none_of_the_parents_descriptors(tmp_path):
    """A child that kept the journal's descriptor would keep its flock after the parent
    died, and the restarted service could not open its journal."""
    journal = tmp_path / "scheduler.wal"
    fd = os.open(journal, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        def probe() -> bytes:
            try:
                os.fstat(fd)
                return b"open"
            except OSError:
                return b"closed"

        forked = ForkedWrite(tmp_path / "tasks.json")
        forked.start(probe)
        tmp, _ = forked.poll(block=True)
        assert tmp.read_bytes() == b"closed"
    finally:
        os.close(fd)


def _tasks_in(path) -> set[str]:
    try:
        return {t["id"] for t in json.loads(path.read_bytes())["tasks"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def test_after_a_forked_snapshot_kill_9_and_a_lost_newest_snapshot_lose_nothing(suites):
    """Snapshots every 2 s, each written by a child. Once one holding every task is in
    place, the scheduler is killed with -9 and that snapshot damaged: the one before it
    (holding only the first tasks) plus the journal rebuild every task (the journal was
    rotated where the child's snapshot began, so it reaches back to the previous one)."""
    suite = suites.start(config=suite_config(2, ("echo",), snapshot_interval=2.0))
    state = suite.home / "state"
    with Client(suite.home, timeout=LONG) as c:
        ids = [c.submit("echo", f"t{i}", payload=i)["id"] for i in range(20)]
        for task_id in ids:
            assert c.wait(task_id, timeout=LONG)["state"] == "completed"
        wait_for(lambda: set(ids) <= _tasks_in(state / "tasks.json"), LONG,
                 "a snapshot holding the tasks")
        more = [c.submit("echo", f"u{i}", payload=i)["id"] for i in range(5)]
        for task_id in more:
            assert c.wait(task_id, timeout=LONG)["state"] == "completed"
        wait_for(lambda: set(more) <= _tasks_in(state / "tasks.json"), LONG,
                 "a snapshot holding the later tasks")
    # The one before it, as the child's came in place: the first tasks, not all the later
    # ones (the journal holds those).
    previous = _tasks_in(state / "tasks.json.prev")
    assert set(ids) <= previous and not set(more) <= previous
    rpc = suite.rpc().supervisor
    pid = rpc.getProcessInfo("scheduler")["pid"]
    os.kill(pid, signal.SIGKILL)  # the pid supervisord started
    (state / "tasks.json").write_bytes(b'{"torn": ')
    wait_for(lambda: rpc.getProcessInfo("scheduler")["pid"] not in (0, pid), LONG,
             "the scheduler restarted")
    with Client(suite.home, timeout=LONG) as c:
        states = wait_for(lambda: _states(c, ids + more), LONG, "the scheduler answers")
    assert set(states.values()) == {"completed"}, states
    assert (state / "tasks.json.bad").exists()
    assert not list(state.glob(".tasks.json.*.tmp"))


def _states(c: Client, ids: list[str]) -> dict | None:
    try:
        return {task_id: c.status(task_id)["state"] for task_id in ids}
    except Exception:  # noqa: BLE001 - not answering yet
        return None
