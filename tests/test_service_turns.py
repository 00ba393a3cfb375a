"""A service's turn ends when its time is up, so a burst of costly requests cannot keep
its heartbeats (and every reply of the turn) from the broker past the point where the
broker declares it lost; what is left waits in the inbox for the next turn. Urgent
messages (the scheduler's critical submits) are handled before those read with them,
and a peer's messages keep their order."""

from __future__ import annotations

import zmq

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.inbox import Inbox
from cortex.services.runtime.loop import BusService


class PairLink:
    """The service's link, over an inproc pair: any frames stand for one request."""

    def __init__(self, socket: zmq.Socket):
        self.socket = socket

    @staticmethod
    def accept(parts: list) -> wire.Message:
        return wire.Message(wire.REQUEST, b"c1", parts[0], wire.encode_body({"n": 1}),
                            b"client")


def service_reading(ctx: zmq.Context, waiting: int, turn_limit: float):
    inbox, outbox = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    inbox.bind("inproc://turns")
    outbox.connect("inproc://turns")
    for i in range(waiting):
        outbox.send(str(i).encode())
    svc = object.__new__(BusService)
    svc.halted, svc.catalogue, svc.turn_limit = None, None, turn_limit
    svc.inbox = Inbox(lambda msg: 0)
    svc.link = PairLink(inbox)
    handled: list[bytes] = []
    svc.handle = lambda fx, msg, body, now: handled.append(msg.corr)
    return svc, handled, (inbox, outbox)


def test_a_turn_whose_time_is_up_leaves_the_rest_in_the_inbox():
    ctx = zmq.Context()
    svc, handled, sockets = service_reading(ctx, 5, turn_limit=0.0)
    try:
        assert svc.read_turn(Effects()) == 1 and handled == [b"0"]
        assert len(svc.inbox) == 4  # the loop polls without waiting while it holds any
        while svc.read_turn(Effects()):
            pass
        assert handled == [str(i).encode() for i in range(5)]  # all, in order
    finally:
        for s in sockets:
            s.close(linger=0)
        ctx.term()


def test_a_turn_with_time_left_reads_everything_waiting():
    ctx = zmq.Context()
    svc, handled, sockets = service_reading(ctx, 5, turn_limit=60.0)
    try:
        assert svc.read_turn(Effects()) == 5 and len(handled) == 5
        assert svc.read_turn(Effects()) == 0
    finally:
        for s in sockets:
            s.close(linger=0)
        ctx.term()


def test_work_after_a_turn_that_fails_keeps_what_it_did_and_the_service_goes_on():
    """A dispatch that raises part-way: the task it moved stays moved in memory, so its
    record stays in the turn (and an admitted submit before it keeps its own); what
    cannot be encoded is dropped; an internal_error event carries the traceback."""
    import logging

    def half_done(fx, now):
        fx.records.append({"k": "moved", "task": "t1"})
        fx.emit("task.dispatched", {"task": "t1"})
        raise RuntimeError("dispatch bug")

    svc = object.__new__(BusService)
    svc.name, svc.halted, svc.internal_errors = "scheduler", None, 0
    svc.log = logging.getLogger("turns-test")
    svc.after_turn = half_done
    fx = Effects()
    fx.records.append({"k": "submit", "task": "t1"})  # the turn's message: admitted
    svc._after_turn(fx)
    assert [r["k"] for r in fx.records] == ["submit", "moved"]
    assert svc.internal_errors == 1
    [kinds] = [[e[0] for e in fx.events]]
    assert kinds == ["task.dispatched", "scheduler.internal_error"]
    assert "dispatch bug" in fx.events[-1][1]["traceback"]

    def unencodable(fx, now):
        fx.records.append({"k": "moved", "bad": {1, 2}})  # a set: not JSON

    svc.after_turn = unencodable
    fx = Effects()
    fx.records.append({"k": "submit", "task": "t2"})
    svc._after_turn(fx)
    assert [r["k"] for r in fx.records] == ["submit"] and svc.internal_errors == 2


def message(peer: bytes, corr: bytes, body: bytes = b"x", role: bytes = b"client"
            ) -> wire.Message:
    return wire.Message(wire.REQUEST, peer, corr, body, role)


def scheduler_lanes(msg: wire.Message) -> int:
    return 0 if b"critical" in msg.body else 1 if msg.role == b"worker" else 2


def test_lanes_come_in_rank_order_and_each_keeps_arrival_order():
    inbox = Inbox(scheduler_lanes, lanes=3)
    for peer, corr, body, role in [(b"a", b"1", b"low", b"client"),
                                   (b"w1", b"2", b"finished", b"worker"),
                                   (b"b", b"3", b"critical", b"client"),
                                   (b"c", b"4", b"low", b"client"),
                                   (b"w2", b"5", b"finished", b"worker"),
                                   (b"d", b"6", b"critical", b"client")]:
        inbox.put(message(peer, corr, body, role))
    assert [inbox.take().corr for _ in range(len(inbox))] == [
        b"3", b"6", b"2", b"5", b"1", b"4"]


def test_a_peer_s_urgent_message_never_overtakes_its_own_earlier_one():
    """A client's cancel, then its critical submit: both in the order sent; another
    client's critical submit still goes first."""
    inbox = Inbox(scheduler_lanes, lanes=3)
    inbox.put(message(b"a", b"1", b"cancel"))
    inbox.put(message(b"a", b"2", b"critical"))
    inbox.put(message(b"b", b"3", b"critical"))
    assert [inbox.take().corr for _ in range(3)] == [b"3", b"1", b"2"]
    assert not any(inbox.waiting) and inbox.bytes == 0 and not inbox


def test_one_lane_is_arrival_order():
    inbox = Inbox(scheduler_lanes)
    for corr, body in [(b"1", b"low"), (b"2", b"critical"), (b"3", b"low")]:
        inbox.put(message(corr, corr, body))
    assert [inbox.take().corr for _ in range(3)] == [b"1", b"2", b"3"]


def test_the_inbox_is_bounded_in_messages_and_bytes():
    inbox = Inbox(lambda msg: 0, max_messages=3, max_bytes=10)
    inbox.put(message(b"a", b"1", b"12345"))
    assert not inbox.full()
    inbox.put(message(b"a", b"2", b"12345"))
    assert inbox.full()  # 10 bytes
    inbox.take()
    assert not inbox.full()
    inbox.put(message(b"a", b"3"))
    inbox.put(message(b"a", b"4"))
    assert inbox.full()  # 3 messages


class TwoPeerLink(PairLink):
    """Frames starting with b"!" come from an urgent peer, the rest from another."""

    @staticmethod
    def accept(parts: list) -> wire.Message:
        peer = b"urgent" if parts[0].startswith(b"!") else b"c1"
        return wire.Message(wire.REQUEST, peer, parts[0], wire.encode_body({"n": 1}),
                            b"client")


def test_an_urgent_message_arriving_mid_turn_is_handled_next(monkeypatch):
    """With lanes, a turn looks at the bus as it goes: what arrives meanwhile is ranked
    with what was read before it, not left behind it until the inbox is empty."""
    import cortex.services.runtime.loop as loop

    monkeypatch.setattr(loop, "LOOK_EVERY_S", 0.0)  # look after every message
    ctx = zmq.Context()
    svc, handled, sockets = service_reading(ctx, 5, turn_limit=60.0)
    svc.LANES = 2
    svc.inbox = Inbox(lambda msg: 0 if msg.corr.startswith(b"!") else 1, lanes=2)
    svc.link = TwoPeerLink(sockets[0])

    def handle(fx, msg, body, now):
        handled.append(msg.corr)
        if msg.corr == b"0":
            sockets[1].send(b"!critical")  # arrives while the other four wait

    svc.handle = handle
    try:
        assert sockets[0].poll(1000)  # the five are there to read
        while svc.read_turn(Effects()):
            pass
        assert handled == [b"0", b"!critical", b"1", b"2", b"3", b"4"]
    finally:
        for s in sockets:
            s.close(linger=0)
        ctx.term()
