"""A journaled service's events wait up to `linger` for company, and nothing waits longer:
the loop's tick sends them when due, a full batch or a forced flush at once, and what is
held is in what the snapshot keeps."""

import time
from contextlib import contextmanager
from types import SimpleNamespace

import zmq

from cortex.protocol import wire
from cortex.protocol.peer import make_socket
from cortex.protocol.publisher import BATCH_MAX, IDLE_WAKE, RESEND_AFTER, EventPublisher
from cortex.services.runtime.loop import BusService
from cortex.services.runtime.recovery import EVENT_LINGER
from cortex.services.runtime.syncer import HeldSends


@contextmanager
def _publishing(linger: float):
    """A publisher with `linger`, and the socket its batches reach (the router's place)."""
    ctx = zmq.Context.instance()
    sink = make_socket(ctx, zmq.ROUTER)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    publisher = EventPublisher(ctx, f"tcp://127.0.0.1:{port}", "t", 1, secret="s")
    publisher.linger = linger
    try:
        yield sink, publisher
    finally:
        publisher.close()
        sink.close(linger=0)


def _batch(sink) -> list[dict]:
    assert sink.poll(10_000), "no batch reached the router's socket"
    return wire.parse(sink.recv_multipart()[1:]).decoded()["events"]


def test_held_events_go_in_one_batch_when_the_linger_is_up():
    with _publishing(linger=60.0) as (sink, publisher):
        for turn in range(3):  # three turns' events
            publisher.emit("task.created", {"turn": turn})
            publisher.flush()
        assert not sink.poll(200)  # held: none of them sent yet
        assert publisher.unacked == 3 and len(publisher.unacked_events()) == 3  # snapshotted
        now = time.monotonic()
        assert 0 < publisher.tick(now) <= 60.0  # the loop wakes when they are due
        publisher.tick(now + 60.0)
        assert [e["data"]["turn"] for e in _batch(sink)] == [0, 1, 2]
        assert publisher.tick(now + 60.0) == RESEND_AFTER  # sent: the re-send clock is left


def test_a_full_batch_or_a_forced_flush_is_not_held():
    with _publishing(linger=60.0) as (sink, publisher):
        for i in range(BATCH_MAX):
            publisher.emit("task.created", {"i": i})
        publisher.flush()
        assert len(_batch(sink)) == BATCH_MAX
        publisher.emit("task.created", {"i": "last"})
        publisher.flush()
        assert not sink.poll(100)
        publisher.flush(force=True)  # a service stopping
        assert [e["data"]["i"] for e in _batch(sink)] == ["last"]


def test_without_linger_every_flush_sends_and_an_idle_publisher_sleeps():
    with _publishing(linger=0.0) as (sink, publisher):
        assert publisher.tick(time.monotonic()) == IDLE_WAKE
        publisher.emit("task.created", {})
        publisher.flush()
        assert len(_batch(sink)) == 1


def test_an_event_emitted_on_a_tick_sets_how_long_the_loop_may_wait():
    """The loop's wait is reckoned after the tick's events are held, so a quiet service
    (its next heartbeat seconds away) still sends them within the linger."""
    with _publishing(linger=EVENT_LINGER) as (sink, publisher):
        svc = object.__new__(BusService)  # the loop's due work alone, no process
        svc.halted, svc.journal, svc.pending_events, svc.held = None, None, [], HeldSends()
        svc.link = SimpleNamespace(tick=lambda now: 5.0)  # the next heartbeat
        svc.events = publisher
        svc.on_tick = lambda fx, wall: fx.emit("svc.ticked", {}) or 5.0
        now = time.monotonic()
        wait = svc.do_due(now)
        assert publisher.unacked == 1 and not sink.poll(0)  # held, not sent
        assert 0 <= wait <= EVENT_LINGER + (time.monotonic() - now)  # held during the call
        svc.on_tick = lambda fx, wall: 5.0
        svc.do_due(time.monotonic() + wait)  # the wake it asked for
        assert [e["type"] for e in _batch(sink)] == ["svc.ticked"]
