"""Tests for the JSONL event log (services/runtime/eventlog.py, eventread.py and
sequences.py): no sockets, no database."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import orjson
import pytest

from cortex.services.runtime import eventlog
from cortex.services.runtime.eventlog import (
    EventLogError,
    EventLogWriter,
    RingBuffer,
    SeqTracker,
    list_event_files,
    read_events,
)


def recover_positions(directory) -> dict:
    return SeqTracker.recover(directory).positions()

DAY1 = 1_732_770_000.0  # 2024-11-28 05:00 UTC
DAY2 = DAY1 + 86_400


def ev(seq: int, source: str = "scheduler", epoch: int = 1, **kw) -> dict:
    base = {
        "id": f"{source}:{epoch}:{seq}",
        "source": source,
        "epoch": epoch,
        "seq": seq,
        "ts": DAY1 + seq,
        "type": "task.created",
        "trace": None,
        "task": None,
        "worker": None,
        "data": {},
    }
    base.update(kw)
    return base


def write_all(directory: Path, events: list[dict], **kw) -> None:
    with EventLogWriter(directory, **kw) as w:
        w.append(events)
        w.flush()


def test_round_trip_keeps_awkward_values(tmp_path):
    events = [
        ev(1, data={"nul": "a\x00b", "nested": {"x": [1, {"y": None}]}, "uni": "héllo ✓"}),
        ev(2, data={"big": 2**70, "neg": -(2**70), "u64": 2**64 - 1, "f": 1.5}),
        ev(3, task="t1", worker="w1", trace="tr1", type="task.dispatched"),
    ]
    write_all(tmp_path, events)
    back = list(read_events(tmp_path))
    assert back[0] == events[0]
    # orjson refuses ints beyond 64 bits: they are stored as decimal strings.
    assert back[1]["data"] == {"big": str(2**70), "neg": str(-(2**70)), "u64": 2**64 - 1, "f": 1.5}
    assert back[2] == events[2]
    # One line per event, readable by anything that reads JSON lines.
    (f,) = list_event_files(tmp_path)
    assert f.name == "events-" + f.name[7:15] + "-001.jsonl"
    assert len(f.read_bytes().splitlines()) == 3


def test_rotation_by_size_keeps_order(tmp_path):
    with EventLogWriter(tmp_path, max_bytes=2_000, clock=lambda: DAY1) as w:
        for i in range(1, 201):
            w.append([ev(i)])
            if i % 10 == 0:
                w.flush()
    files = list_event_files(tmp_path)
    assert len(files) > 3
    assert [f.name for f in files][:2] == ["events-20241128-001.jsonl", "events-20241128-002.jsonl"]
    # A file passes max_bytes by at most one flush before the next one starts.
    assert all(f.stat().st_size < 2_000 + 10 * 300 for f in files)
    assert [e["seq"] for e in read_events(tmp_path)] == list(range(1, 201))


def test_rotation_by_day_with_injected_clock(tmp_path):
    now = [DAY1]
    with EventLogWriter(tmp_path, clock=lambda: now[0]) as w:
        w.append([ev(1), ev(2)])
        w.flush()
        now[0] = DAY2
        w.append([ev(3)])
        w.flush()
    names = [f.name for f in list_event_files(tmp_path)]
    assert names == ["events-20241128-001.jsonl", "events-20241129-001.jsonl"]
    assert [e["seq"] for e in read_events(tmp_path)] == [1, 2, 3]


def test_restart_continues_the_days_file(tmp_path):
    write_all(tmp_path, [ev(1)], clock=lambda: DAY1)
    write_all(tmp_path, [ev(2)], clock=lambda: DAY1)
    assert [f.name for f in list_event_files(tmp_path)] == ["events-20241128-001.jsonl"]
    assert [e["seq"] for e in read_events(tmp_path)] == [1, 2]


def test_one_writer_per_directory(tmp_path):
    with EventLogWriter(tmp_path), pytest.raises(EventLogError) as err:
        EventLogWriter(tmp_path)
    assert err.value.code == "events_locked"


def test_index_skips_stretches_by_task_and_time(tmp_path):
    with EventLogWriter(tmp_path, max_bytes=40_000, clock=lambda: DAY1) as w:
        for i in range(1, 2001):
            w.append([ev(i, task=f"t{i // 100}")])
            if i % 50 == 0:
                w.flush()
    assert len(list_event_files(tmp_path)) > 1

    stats: dict = {}
    got = list(read_events(tmp_path, task="t7", stats=stats))
    assert [e["seq"] for e in got] == list(range(700, 800))
    assert stats["stretches_skipped"] > 30  # most of the log was never read
    assert stats["files_skipped"] >= 1

    stats = {}
    got = list(read_events(tmp_path, since=DAY1 + 1500, until=DAY1 + 1510, stats=stats))
    assert [e["seq"] for e in got] == list(range(1500, 1510))
    assert stats["stretches_skipped"] > 30

    # Same answers when the index is gone (it is only a shortcut).
    for idx in tmp_path.glob("*.idx"):
        idx.unlink()
    assert [e["seq"] for e in read_events(tmp_path, task="t7")] == list(range(700, 800))


def test_filters_type_worker_text_limit(tmp_path):
    events = [
        ev(1, type="task.created", task="a"),
        ev(2, type="worker.spawned", worker="w1"),
        ev(3, type="task.completed", task="a", worker="w1", data={"msg": "All GOOD"}),
        ev(4, type="ledger.reserved"),
    ]
    write_all(tmp_path, events)
    seqs = lambda **kw: [e["seq"] for e in read_events(tmp_path, **kw)]  # noqa: E731
    assert seqs(type_pattern="task.*") == [1, 3]
    assert seqs(worker="w1") == [2, 3]
    assert seqs(text="all good") == [3]
    assert seqs(limit=2) == [1, 2]
    assert seqs(type_pattern="task.*", worker="w1") == [3]


def test_torn_tail_and_corrupt_line_are_skipped_and_counted(tmp_path):
    write_all(tmp_path, [ev(1), ev(2)], clock=lambda: DAY1)
    (f,) = list_event_files(tmp_path)
    with open(f, "ab") as fh:
        fh.write(b'{"this is": not json}\n')
        fh.write(orjson.dumps(ev(3)) + b"\n")
        fh.write(b'{"id": "torn", "sour')  # crash mid-write
    stats: dict = {}
    assert [e["seq"] for e in read_events(tmp_path, stats=stats)] == [1, 2, 3]
    assert stats["corrupt"] == 1 and stats["torn"] == 1

    # A restarted writer drops the torn half line before appending after it.
    write_all(tmp_path, [ev(4)], clock=lambda: DAY1)
    stats = {}
    assert [e["seq"] for e in read_events(tmp_path, stats=stats)] == [1, 2, 3, 4]
    assert stats["torn"] == 0 and stats["corrupt"] == 1


def test_recover_positions_with_gaps_and_rotation(tmp_path):
    events = [ev(i, "scheduler", 1) for i in (1, 2, 3, 4, 6, 7)]
    events += [ev(i, "ledger", 2) for i in range(1, 51)]
    events += [ev(1, "scheduler", 2)]
    with EventLogWriter(tmp_path, max_bytes=3_000, clock=lambda: DAY1) as w:
        for e in events:
            w.append([e])
            w.flush()
    assert len(list(tmp_path.glob("*.pos"))) >= 2  # closed files were checkpointed
    want = {("scheduler", 1): 4, ("ledger", 2): 50, ("scheduler", 2): 1}
    assert recover_positions(tmp_path) == want

    # The checkpoints are a shortcut: a full replay gives the same answer.
    for p in tmp_path.glob("*.pos"):
        p.unlink()
    assert recover_positions(tmp_path) == want

    # The recovered tracker knows seq 6 and 7 were written even though 5 is missing.
    t = SeqTracker.recover(tmp_path)
    assert t.observe("scheduler", 1, 6) == "duplicate"
    assert t.observe("scheduler", 1, 5) == "new"
    assert t.position("scheduler", 1) == 7
    assert recover_positions(tmp_path / "missing") == {}


def test_the_writer_knows_what_is_written_or_buffered(tmp_path):
    """The router de-duplicates through the writer's one tracker: an event is seen once
    it is buffered, stays seen once written, and after a restart from the files."""
    with EventLogWriter(tmp_path, clock=lambda: DAY1) as w:
        assert not w.seen(ev(1))
        w.append([ev(1)])
        assert w.seen(ev(1)) and not w.seen(ev(2))
        w.flush()
        assert w.seen(ev(1)) and w.tracker.position("scheduler", 1) == 1
        w.append([ev(3)])
        w.flush()
        assert w.tracker.gaps == 1  # seq 2 is missing
    with EventLogWriter(tmp_path, clock=lambda: DAY1) as again:
        assert again.seen(ev(1)) and again.seen(ev(3)) and not again.seen(ev(2))
        assert again.tracker.gaps == 1


def _contents(directory: Path) -> list[str]:
    return [e["id"] for e in read_events(directory)]


def test_short_write_then_enospc_truncates_and_resumes(tmp_path, monkeypatch):
    """Disk full simulated by patching os.pwrite (tests run as root, so chmod proves nothing).

    The fake writes a partial line (as a real ENOSPC short write does: docs/pitfalls.md) and
    then fails; the file must be cut back and a later flush must write everything once.
    """
    w = EventLogWriter(tmp_path, clock=lambda: DAY1)
    w.append([ev(1), ev(2)])
    w.flush()
    (f,) = list_event_files(tmp_path)
    good = f.stat().st_size

    real_pwrite = os.pwrite
    calls = {"n": 0}

    def full_disk(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_pwrite(fd, bytes(data[:37]), offset)  # short write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(eventlog.os, "pwrite", full_disk)
    w.append([ev(3), ev(4)])
    with pytest.raises(EventLogError) as err:
        w.flush()
    assert err.value.code == "events_unwritable"
    assert isinstance(err.value.__cause__, OSError)
    assert f.stat().st_size == good  # no half line left behind
    assert w.buffered == 2

    monkeypatch.setattr(eventlog.os, "pwrite", real_pwrite)
    w.append([ev(5)])
    w.flush()
    w.close()
    assert _contents(tmp_path) == [ev(i)["id"] for i in range(1, 6)]


def test_unwritable_directory_on_rotation_then_resume(tmp_path, monkeypatch):
    """EACCES when a new file must be created (patched os.open: root ignores chmod 0500)."""
    now = [DAY1]
    w = EventLogWriter(tmp_path, clock=lambda: now[0])
    w.append([ev(1)])
    w.flush()
    real_open = os.open

    def no_access(path, flags, *a):
        if flags & os.O_CREAT and "20241129" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(eventlog.os, "open", no_access)
    now[0] = DAY2
    w.append([ev(2)])
    for _ in range(2):
        with pytest.raises(EventLogError):
            w.flush()
    monkeypatch.setattr(eventlog.os, "open", real_open)
    w.flush()
    w.close()
    assert _contents(tmp_path) == [ev(1)["id"], ev(2)["id"]]
    assert len(list_event_files(tmp_path)) == 2


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 256 KiB tmpfs, so the kernel produces the genuine ENOSPC / short write."""
    mnt = Path("/tmp") / f"cortex-full-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        # Lazy unmount: a failed test may still hold a file open on it.
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


@pytest.mark.processes
def test_real_full_filesystem_then_space_freed(tiny_fs):
    directory = tiny_fs / "events"
    w = EventLogWriter(directory, clock=lambda: DAY1)
    w.append([ev(1)])
    w.flush()
    filler = tiny_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"x" * 4096) > 0:
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    big = [ev(i, data={"pad": "y" * 2000}) for i in range(2, 40)]
    w.append(big)
    with pytest.raises(EventLogError):
        w.flush()
    (f,) = list_event_files(directory)
    assert [e["seq"] for e in read_events(directory)] == [1]  # nothing torn in the file
    filler.unlink()
    w.flush()
    w.close()
    assert [e["seq"] for e in read_events(directory)] == list(range(1, 40))
    assert f.read_bytes().endswith(b"\n")


def test_seq_tracker_counts_gaps_and_duplicates():
    t = SeqTracker()
    assert t.observe("s", 1, 1) == "new"
    assert t.observe("s", 1, 2) == "new"
    assert t.observe("s", 1, 2) == "duplicate"
    assert t.observe("s", 1, 5) == "gap"  # 3 and 4 missing
    assert (t.gaps, t.duplicates) == (2, 1)
    assert t.position("s", 1) == 2
    assert t.observe("s", 1, 5) == "duplicate"
    assert t.observe("s", 1, 3) == "new"  # late arrival fills a hole
    assert t.gaps == 1
    assert t.observe("s", 1, 4) == "new"
    assert (t.position("s", 1), t.gaps, t.duplicates) == (5, 0, 2)
    # Epochs are separate streams; a new incarnation starts again from 1.
    assert t.observe("s", 2, 1) == "new"
    assert t.observe("s", 2, 3) == "gap"
    assert t.position("s", 2) == 1 and t.gaps == 1


def test_seq_tracker_seeded_and_bounded():
    t = SeqTracker({("s", 1): 10}, max_pending=3)
    assert t.observe("s", 1, 10) == "duplicate"
    assert t.observe("s", 1, 11) == "new"
    for seq in (13, 15, 17, 19):  # four out-of-order seqs, bound is three
        t.observe("s", 1, seq)
    assert t.position("s", 1) == 13  # gave up on hole 12
    assert t.gaps == 4  # 12, 14, 16, 18 are still counted as missing


def test_ring_buffer_recent():
    rb = RingBuffer(capacity=5)
    for i in range(1, 9):
        rb.append(ev(i, type="task.created" if i % 2 else "worker.spawned"))
    assert len(rb) == 5
    assert [e["seq"] for e in rb.recent(3)] == [6, 7, 8]
    assert [e["seq"] for e in rb.recent(10)] == [4, 5, 6, 7, 8]
    assert [e["seq"] for e in rb.recent(2, type_pattern="task.*")] == [5, 7]
    assert rb.recent(0) == []
