"""The journal syncs in a thread of its own (fsync = "group"): a reply still goes out only
after the sync that covers its turn's records, and what follows it to the same peer waits
behind it; everything else goes out at once."""

from __future__ import annotations

import os
import select
import threading

import pytest
import zmq

from cortex.protocol import wire
from cortex.services.runtime import syncer as syncer_module
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.journal import Journal
from cortex.services.runtime.loop import BusService
from cortex.services.runtime.syncer import HeldSends, Syncer


def readable(fd: int, timeout: float = 10.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_held_sends_come_out_in_order_once_their_generation_is_synced():
    held = HeldSends()
    held.hold(1, (b"a", wire.REPLY, b"1", {}))
    held.hold(1, (b"b", wire.REPLY, b"2", {}))
    held.hold(2, (b"a", wire.REPLY, b"3", {}))
    assert held.holds(b"a") and held.holds(b"b") and not held.holds(b"c")
    assert held.release(0) == []
    assert [s[2] for s in held.release(1)] == [b"1", b"2"]
    assert held.holds(b"a") and not held.holds(b"b")
    assert [s[2] for s in held.release(5)] == [b"3"]
    assert not held and not held.holds(b"a")


def test_a_sync_covers_what_was_written_before_it_was_asked(tmp_path):
    syncer = Syncer("test")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x")
        first = syncer.ask(fd)
        second = syncer.ask(fd)
        assert second == first + 1
        syncer.drain()
        assert syncer.synced == second and syncer.in_flight == 0
        assert readable(syncer.wake_fd)
        syncer.clear_wake()
        assert not readable(syncer.wake_fd, 0)
    finally:
        syncer.close()
        os.close(fd)


def test_a_failed_sync_is_reported_and_never_counted_as_synced(tmp_path):
    syncer = Syncer("test")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    os.close(fd)  # a descriptor that cannot be synced: EBADF
    try:
        syncer.ask(fd)
        with pytest.raises(OSError):
            syncer.drain()
        assert syncer.synced == 0 and syncer.error is not None
        assert readable(syncer.wake_fd)  # the loop hears of it and exits
    finally:
        syncer.close()


class RecordingLink:
    def __init__(self):
        self.sent: list[tuple[bytes, bytes, bytes]] = []

    def send(self, type_, peer, corr=b"", body=None) -> bool:
        self.sent.append((peer, type_, corr))
        return True


class SilentEvents:
    def emit(self, *args, **kwargs):
        raise AssertionError("no events in these turns")

    def flush(self):
        pass


@pytest.fixture
def service(tmp_path, monkeypatch):
    """A service's flush over a real journal, its syncs held until `release` is set."""
    release = threading.Event()
    real = os.fdatasync

    def slow_fdatasync(fd):
        assert release.wait(10), "the test never let the sync end"
        real(fd)

    monkeypatch.setattr(syncer_module.os, "fdatasync", slow_fdatasync)
    svc = object.__new__(BusService)
    svc.name = "test"
    svc.journal = Journal(tmp_path / "test.wal", "group")
    svc.journal.replay()
    svc.syncer, svc.held, svc._written = None, HeldSends(), False
    svc.pending_events = []
    svc.events = SilentEvents()
    svc.link = RecordingLink()
    svc.poller = zmq.Poller()
    svc._busy = lambda: True  # more work waiting: the loop hands its syncs off
    svc.release = release
    yield svc
    release.set()
    if svc.syncer is not None:
        svc.syncer.close()
    svc.journal.close()


def test_a_reply_waits_for_its_sync_and_an_order_to_its_peer_waits_behind_it(service):
    fx = Effects()
    fx.records.append({"k": "task", "id": "t1"})
    fx.notify("worker-a", {"op": "task.run"})  # an order: out before the sync
    fx.reply(b"client-b", b"c1", {"ok": True})  # an acknowledgement: after it
    service.flush(fx)
    assert service.link.sent == [(b"worker-a", wire.NOTIFY, b"")]
    assert service.held.holds(b"client-b")

    later = Effects()  # a later turn, no records: an order to b, one to a
    later.notify("client-b", {"op": "note"})
    later.notify("worker-a", {"op": "task.recall"})
    service.flush(later)
    assert service.link.sent == [(b"worker-a", wire.NOTIFY, b"")] * 2  # b's waits

    service.release.set()
    assert readable(service.syncer.wake_fd)
    service.syncer.clear_wake()
    service.send_synced()
    assert service.link.sent[2:] == [(b"client-b", wire.REPLY, b"c1"),
                                     (b"client-b", wire.NOTIFY, b"")]
    assert not service.held


def test_a_reply_with_nothing_written_waits_only_for_a_sync_under_way(service):
    fx = Effects()
    fx.reply(b"client-b", b"q1", {"status": "ok"})  # nothing written: nothing to wait for
    service.flush(fx)
    assert service.link.sent == [(b"client-b", wire.REPLY, b"q1")]

    fx = Effects()
    fx.records.append({"k": "task", "id": "t1"})
    fx.reply(b"client-b", b"s1", {"ok": True})
    service.flush(fx)
    fx = Effects()
    fx.reply(b"client-c", b"q2", {"status": "t1 queued"})  # may tell of t1: waits for it
    service.flush(fx)
    assert service.link.sent == [(b"client-b", wire.REPLY, b"q1")]
    service.release.set()
    service.settle_syncs()
    assert [s[2] for s in service.link.sent] == [b"q1", b"s1", b"q2"]


def test_an_idle_loop_syncs_in_place(service):
    """Nothing else waiting: the sync runs in the loop, the reply right after it."""
    service._busy = lambda: False
    service.release.set()
    fx = Effects()
    fx.records.append({"k": "task", "id": "t1"})
    fx.reply(b"client-b", b"s1", {"ok": True})
    service.flush(fx)
    assert service.link.sent == [(b"client-b", wire.REPLY, b"s1")]
    assert service.syncer is None and not service.held


def test_a_reply_never_overtakes_a_held_one_whose_sync_just_ended(service, monkeypatch):
    """The sync ends between the flush's release and its replies: the new reply to the
    same peer still goes behind the held one."""
    fx = Effects()
    fx.records.append({"k": "task", "id": "t1"})
    fx.reply(b"client-b", b"s1", {"ok": True})
    service.flush(fx)
    service.release.set()
    service.syncer.drain()  # ended, its replies not yet released
    release = service.send_synced
    monkeypatch.setattr(service, "send_synced", lambda: None)  # as if it ended just after
    fx = Effects()
    fx.reply(b"client-b", b"q1", {"status": "t1 queued"})
    service.flush(fx)
    assert service.link.sent == []
    release()
    assert [s[2] for s in service.link.sent] == [b"s1", b"q1"]
