"""Nothing acknowledged lost (issue 14, cases 1 and 2): snapshots that can be lost, and
a damaged journal record that halts its service with what, where and what to do.

Unit tests on the journal's segments, then the real suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from cortex.protocol import Client, errors
from cortex.services.runtime.journal import Journal, repair

from .conftest import suite_config, wait_for


def _replay(path, after_lsn: int = 0):
    j = Journal(path)
    try:
        return j.replay(after_lsn=after_lsn)
    finally:
        j.close()


def _write(j: Journal, n: int) -> None:
    for i in range(n):
        j.append({"n": i})
    j.commit()


def test_rotation_keeps_what_the_previous_snapshot_needs(tmp_path):
    path = tmp_path / "s.wal"
    j = Journal(path)
    j.replay()
    _write(j, 3)  # lsn 1..3
    previous_snapshot = j.last_lsn
    j.rotate()
    _write(j, 2)  # lsn 4..5
    j.rotate()  # the newest snapshot covers 5; the journal still reaches back to 3
    _write(j, 1)  # lsn 6
    j.close()
    # The newest snapshot lost: the previous one plus the journal rebuild everything.
    records, report = _replay(path, previous_snapshot)
    assert [r["lsn"] for r in records] == [4, 5, 6] and not report.damage


def test_a_damaged_record_is_damage_unless_the_snapshot_covers_it(tmp_path):
    path = tmp_path / "s.wal"
    j = Journal(path)
    j.replay()
    _write(j, 4)
    j.close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"n":1', b'"n":7')  # one changed byte, checksum now wrong
    path.write_bytes(b"".join(lines))
    _, report = _replay(path)
    assert len(report.damage) == 1 and report.damage[0]["offset"] == len(lines[0])
    assert report.damage[0]["after_lsn"] == 1 and '"n":7' in report.damage[0]["shows"]
    _, covered = _replay(path, 3)  # the snapshot holds lsn 1..3
    assert not covered.damage and len(covered.corrupt) == 1
    # The repair moves the line aside (kept, with its place) and leaves the rest.
    moved = repair(path)
    assert len(moved) == 1
    assert b'"n":7' in (tmp_path / "s.wal.damaged").read_bytes()
    records, report = _replay(path)
    assert [r["lsn"] for r in records] == [1, 3, 4] and not report.damage


def _cli(home, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cortex.services.cli", "--home", str(home),
                           *args], capture_output=True, text=True, timeout=timeout)


def _stop_without_snapshot(suite, name: str) -> None:
    """End a service the way a crash does (no last snapshot), and keep it stopped:
    frozen, then stopped by supervisord, which kills it when it does not answer."""
    rpc = suite.rpc().supervisor
    pid = rpc.getProcessInfo(name)["pid"]
    os.kill(pid, signal.SIGSTOP)
    rpc.stopProcess(name, False)
    wait_for(lambda: rpc.getProcessInfo(name)["statename"] == "STOPPED", 60,
             f"{name} to be killed")


def _twenty_completed(suite) -> list[str]:
    with Client(suite.home, timeout=60) as c:
        ids = [c.submit("echo", f"t{i}", payload={"i": i})["id"] for i in range(20)]
        for task_id in ids:
            assert c.wait(task_id, timeout=60)["state"] == "completed"
    return ids


@pytest.fixture
def slow_snapshots(suites):
    """A suite whose scheduler snapshots only at start and stop."""
    return suites.start(config=suite_config(2, ("echo", "sleep"), snapshot_interval=3600))


def test_an_empty_snapshot_loses_no_acknowledged_task(slow_snapshots):
    suite = slow_snapshots
    ids = _twenty_completed(suite)
    rpc = suite.rpc().supervisor
    rpc.stopProcess("scheduler")  # a clean stop: snapshot, journal rotated
    state = suite.home / "state"
    (state / "tasks.json").write_bytes(b"")
    leftovers = [state / ".tasks.json.12345.tmp", state / ".tasks.json.prev.12346.tmp"]
    for tmp in leftovers:
        tmp.write_text('{"half": ')
    rpc.startProcess("scheduler")
    with Client(suite.home, timeout=60) as c:
        wait_for(lambda: _answers(c), 60, "the scheduler back")
        states = {task_id: c.status(task_id)["state"] for task_id in ids}
    assert set(states.values()) == {"completed"}, states
    assert not [t for t in leftovers if t.exists()]
    assert (state / "tasks.json.bad").exists()  # set aside for the operator


def _answers(c) -> bool:
    try:
        c.call("scheduler", "scheduler.status", timeout=2)
        return True
    except errors.CortexError:
        return False


@pytest.mark.heavy  # slow: real processes started, killed and restarted
def test_a_damaged_record_halts_the_service_until_repaired(slow_snapshots):
    suite = slow_snapshots
    ids = _twenty_completed(suite)
    _stop_without_snapshot(suite, "scheduler")
    wal = suite.home / "wal" / "scheduler.wal"
    lines = wal.read_bytes().splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if i > len(lines) // 3
                  and ids[10].encode() in line)
    offset = sum(len(line) for line in lines[:victim])
    at = lines[victim].index(ids[10].encode()) + 2
    lines[victim] = lines[victim][:at] + bytes([lines[victim][at] ^ 1]) + \
        lines[victim][at + 1:]
    wal.write_bytes(b"".join(lines))
    suite.rpc().supervisor.startProcess("scheduler")
    with Client(suite.home, timeout=60) as c:
        halted = wait_for(lambda: _halted(c), 60, "the scheduler to report itself halted")
        assert halted["offset"] == offset and halted["file"].endswith("scheduler.wal")
        assert "repair" in halted["repair"]
        # Everything else is refused with the reason, not answered from a partial state.
        with pytest.raises(errors.CortexError) as refused:
            c.status(ids[0])
        assert f"offset {offset}" in str(refused.value)
    # No restart loop: it stays up, and `cortex status` says what, where and what to do.
    assert suite.rpc().supervisor.getProcessInfo("scheduler")["statename"] == "RUNNING"
    status = _cli(suite.home, "status")
    assert status.returncode != 0 and f"offset {offset}" in status.stdout, status.stdout
    assert "journal repair" in status.stdout
    # The operator repairs; the scheduler notices, restarts by itself and recovers.
    fixed = subprocess.run(halted["repair"].split(), capture_output=True, text=True,
                           timeout=60)
    assert fixed.returncode == 0 and f"offset {offset}" in fixed.stdout, fixed.stderr
    with Client(suite.home, timeout=60) as c:
        wait_for(lambda: _answers(c) and not _halted(c), 90, "the scheduler recovered")
        recovered = [t for t in ids if t != ids[10]]
        assert {c.status(t)["state"] for t in recovered} == {"completed"}
    assert (suite.home / "wal" / "scheduler.wal.damaged").exists()
    events = [json.loads(line) for path in sorted((suite.home / "events").glob("*.jsonl"))
              for line in path.read_text().splitlines() if line.strip()]
    assert any(e["type"] == "scheduler.journal_damaged" and e["data"].get("halted")
               for e in events)


def _halted(c) -> dict | None:
    try:
        return c.call("scheduler", "scheduler.status", timeout=2).get("halted")
    except errors.CortexError:
        return None
