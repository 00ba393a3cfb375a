"""The scheduler's direct line to the workers on its machine (services/runtime/direct.py):
who may take it, what a stranger on it gets, and that work goes on over it through a
scheduler's kill -9."""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import time

import pytest

from cortex.protocol import Client, wire
from cortex.protocol.client import LINE_AFTER_CALLS
from cortex.protocol.direct import MAX_DATAGRAM, DirectLink, pack, unpack
from cortex.services.runtime.direct import DirectLine, DirectPeers
from tests.conftest import wait_for
from tests.trust_peers import RawPeer


# -- who holds the line (pure) ---------------------------------------------------------------
def test_an_offer_goes_only_to_a_worker_that_can_take_the_line_and_is_not_on_it():
    peers = DirectPeers(reoffer_after=2.0)
    assert peers.offer(b"w1", 0.0) is None  # never said it can
    peers.capable.add(b"w1")
    token = peers.offer(b"w1", 0.0)
    assert token and len(token) == 32
    assert peers.offer(b"w1", 1.0) is None  # one offer at a time
    again = peers.offer(b"w1", 2.5)  # not taken: a new token replaces the old
    assert again and again != token
    assert not peers.hello(b"r1", b"w1", token, "worker")
    assert peers.hello(b"r1", b"w1", again, "worker")
    assert peers.offer(b"w1", 10.0) is None  # on the line


def test_a_token_opens_the_line_once_and_only_for_the_name_it_was_offered_to():
    peers = DirectPeers()
    peers.capable.update({b"w1", b"w2"})
    token = peers.offer(b"w1", 0.0)
    assert not peers.hello(b"r9", b"w2", token, "worker")  # someone else's name
    assert not peers.hello(b"r9", b"w1", token[:-1] + ("0" if token[-1] != "0" else "1"),
                           "worker")
    assert not peers.hello(b"r9", b"w1", token, "client")  # offered to a worker
    assert peers.hello(b"r1", b"w1", token, "worker")
    assert not peers.hello(b"r2", b"w1", token, "worker")  # used up
    assert peers.rid_of == {b"w1": b"r1"} and peers.name_of == {b"r1": b"w1"}


def test_a_token_not_used_within_a_minute_is_stale_and_dropped():
    peers = DirectPeers()
    token = peers.token_for(b"c1", "client", 0.0)
    assert not peers.hello(b"r1", b"c1", token, "client", 61.0)
    peers.token_for(b"c2", "client", 100.0)
    peers.idle_clients(120.0)
    assert set(peers.tokens) == {b"c2"}  # c1's never used: not kept
    peers.idle_clients(161.0)
    assert peers.tokens == {}


def test_a_worker_reconnecting_takes_its_name_over_and_forget_leaves_nothing():
    peers = DirectPeers(reoffer_after=0.0)
    peers.capable.add(b"w1")
    assert peers.hello(b"r1", b"w1", peers.offer(b"w1", 0.0), "worker")
    peers.unbind(b"w1")  # its connection failed (a send found it gone)
    assert peers.hello(b"r2", b"w1", peers.offer(b"w1", 1.0), "worker")
    assert peers.rid_of == {b"w1": b"r2"} and peers.name_of == {b"r2": b"w1"}
    peers.forget(b"w1")
    assert not (peers.rid_of or peers.name_of or peers.tokens or peers.offered_at
                or peers.capable)


# -- the line's sockets, in this process -------------------------------------------------------
@pytest.fixture
def line():
    """A DirectLine on a socket of its own (a short path: Unix socket paths are short)."""
    where = tempfile.mkdtemp(prefix="cx-line-", dir="/tmp")
    endpoint = f"ipc://{where}/work.sock"
    server = DirectLine(endpoint, logging.getLogger("test"))
    try:
        yield server, endpoint
    finally:
        server.close()
        shutil.rmtree(where)


def serve(server: DirectLine, until, seconds: float = 10.0) -> list:
    """Read the line as the scheduler's loop would until `until(messages)` holds."""
    messages: list = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        select.select([server.fd], [], [], 0.05)
        while (msg := server.receive(time.monotonic())) is not None:
            if msg:
                messages.append(msg)
        if until(messages):
            return messages
    raise AssertionError(f"the line never got there; read {messages}")


def welcomed(server: DirectLine, endpoint: str, name: str, role: str = "client") -> DirectLink:
    token = server.peers.token_for(name.encode(), role, time.monotonic())
    link = DirectLink(endpoint, name, token, role=role)
    serve(server, lambda _: name.encode() in server.peers.rid_of)
    parts = link.within(10)
    assert parts is not None and link.accept(parts) is None and link.welcomed
    return link


def test_a_message_each_way_and_a_peer_that_ends_is_off_the_line_at_once(line):
    server, endpoint = line
    link = welcomed(server, endpoint, "c1")
    assert link.send_frames(wire.frames(wire.REQUEST, b"scheduler", b"k1", {"op": "x"}))
    msg = serve(server, lambda got: got)[0]
    assert (msg.type, msg.peer, msg.role, msg.corr) == (wire.REQUEST, b"c1", b"client", b"k1")
    assert server.send(wire.REPLY, b"c1", b"k1", {"answer": 42})
    got = link.accept(link.within(10))
    assert got.type == wire.REPLY and got.role == b"service" and got.decoded() == {
        "answer": 42}
    link.close()  # no BYE: as a killed peer's connection ends
    serve(server, lambda _: not server.conns)
    assert server.peers.rid_of == {} and not server.send(wire.REPLY, b"c1", b"k2", {})


def test_what_a_peer_sent_before_closing_with_our_messages_unread_is_still_read(line):
    """A peer that closes with messages from us unread makes the kernel report a reset
    before the datagrams it sent first (a leaving worker's hand-back, say): read, not lost."""
    server, endpoint = line
    link = welcomed(server, endpoint, "w1", role="worker")
    assert server.send(wire.NOTIFY, b"w1", b"", {"op": "task.run"})  # never read
    assert link.send_frames(wire.frames(wire.NOTIFY, b"scheduler", b"", {
        "op": "task.rejected", "id": "t-1"}))
    link.close()
    got = serve(server, lambda got: got and not server.conns)
    assert [m.decoded()["op"] for m in got] == ["task.rejected"]
    assert server.peers.rid_of == {}


def test_a_message_the_buffer_cannot_take_goes_over_the_bus_and_so_does_what_follows(line):
    server, endpoint = line
    link = welcomed(server, endpoint, "w1", role="worker")
    server.peers.capable.add(b"w1")  # (as its reports said before it took the line)
    rid = server.peers.rid_of[b"w1"]
    server.conns[rid].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    assert not server.send(wire.NOTIFY, b"w1", b"", {"op": "task.run", "x": "y" * 100_000})
    assert server.stats["fallbacks"] == 1
    assert not server.send(wire.NOTIFY, b"w1", b"", {"op": "task.cancel"})  # in order
    server.peers.reoffer_after = 0.0
    assert server.peers.offer(b"w1", time.monotonic()) is None  # not before it read the end
    # The worker reads the line's end at once (not at its next look at the bus); what
    # it sent before it knew is still read.
    assert link.send_frames(wire.frames(wire.NOTIFY, b"scheduler", b"", {"op": "late"}))
    assert link.within(10) is None and link.closed
    got = serve(server, lambda got: got)
    assert [m.decoded()["op"] for m in got] == ["late"] and got[0].peer == b"w1"
    # A peer that never reads the end has its connection ended a minute on.
    server.end_idle(time.monotonic() + 30)
    assert server.conns
    server.end_idle(time.monotonic() + 61)
    assert not server.conns and not server.peers.name_of and not server.peers.role_of
    link.close()


def test_connections_past_the_cap_are_closed_and_a_missing_line_is_just_closed(line):
    server, endpoint = line
    server.cap = 1
    first = welcomed(server, endpoint, "c1")
    token = server.peers.token_for(b"c2", "client", time.monotonic())
    second = DirectLink(endpoint, "c2", token, role="client")
    serve(server, lambda _: server.stats["over_cap"] == 1)
    assert second.within(10) is None and second.closed  # its connection ended
    assert list(server.peers.rid_of) == [b"c1"]
    second.close()
    first.close()
    nowhere = DirectLink(endpoint.replace("work.sock", "none.sock"), "c3", "t" * 32)
    assert nowhere.closed and not nowhere.send_frames(wire.frames(wire.NOTIFY, b"scheduler"))
    nowhere.close()


def test_silent_strangers_and_idle_clients_have_their_connections_ended(line):
    server, endpoint = line
    worker = welcomed(server, endpoint, "w1", role="worker")
    client = welcomed(server, endpoint, "c1")
    stranger = LineSocket.__new__(LineSocket)
    stranger.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stranger.sock.connect(endpoint[len("ipc://"):])
    serve(server, lambda _: len(server.conns) == 3)
    now = time.monotonic()
    server.end_idle(now + 30)  # not yet
    assert len(server.conns) == 3
    server.end_idle(now + 61)  # the stranger never said HELLO: ended
    assert len(server.conns) == 2 and stranger.poll(10_000)
    assert stranger.sock.recv(MAX_DATAGRAM) == b""
    server.end_idle(now + 301)  # a silent client (a worker's liveness is the broker's)
    assert list(server.peers.rid_of) == [b"w1"] and len(server.conns) == 1
    assert client.within(10) is None and client.closed  # back to the bus
    for peer in (worker, client, stranger):
        peer.close()


def test_a_datagram_is_an_array_of_byte_strings_and_nothing_else():
    frames = wire.frames(wire.NOTIFY, b"scheduler", b"c", {"op": "x"})
    assert unpack(pack(frames)) == frames
    assert unpack(memoryview(pack(frames))) == frames
    for bad in (b"", b"\xc1", pack([b"a", "b"]), pack({"a": b"b"}), pack(7), pack([[b"a"]]),
                pack(frames) + b"\x00"):
        with pytest.raises(wire.ProtocolError):
            unpack(bad)


# -- on a real suite ----------------------------------------------------------------------------
def line_status(home) -> dict:
    with Client(home, timeout=30) as c:
        return c.call("scheduler", "scheduler.status")["direct_line"]


class LineSocket:
    """A raw connection to the line, as any local process of the owner could open."""

    def __init__(self, home):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(str(home / "run" / "work.sock"))

    def send_multipart(self, frames: list) -> None:
        self.sock.send(pack(frames))

    def send_raw(self, data: bytes) -> None:
        self.sock.send(data)

    def poll(self, timeout_ms: int) -> bool:
        return bool(select.select([self.sock], [], [], timeout_ms / 1000)[0])

    def recv_multipart(self) -> list:
        data = self.sock.recv(MAX_DATAGRAM)
        assert data, "the scheduler ended the connection"
        return unpack(data)

    def close(self, linger: int = 0) -> None:
        self.sock.close()


def line_socket(home) -> LineSocket:
    return LineSocket(home)


def answer(sock: LineSocket, timeout_ms: int = 10_000) -> wire.Message:
    assert sock.poll(timeout_ms), "no answer on the direct line"
    return wire.parse(sock.recv_multipart())


@pytest.mark.processes
def test_workers_take_the_line_and_their_tasks_no_longer_pass_the_broker(suites):
    suite = suites.start(workers=2)
    with Client(suite.home, timeout=60) as c:
        for n in range(6):
            assert c.submit_and_wait("echo", "warm", payload=n)["state"] == "completed"
        wait_for(lambda: line_status(suite.home)["workers"] == 2, 20,
                 "both workers on the line")

        def worker_hops():
            flows = c.call("broker", "broker.status")["flows"]
            return {(f["from"], f["to"], f["type"]): f["count"] for f in flows
                    if "worker" in (f["from"], f["to"]) and f["type"] != "HEARTBEAT"}

        def line_hops():
            return {(f["from"], f["to"], f["type"]): f["count"]
                    for f in line_status(suite.home)["flows"]}

        broker_before, line_before = worker_hops(), line_hops()
        ids = [c.submit("echo", "on the line", payload=n)["id"] for n in range(20)]
        assert all(c.wait(i)["state"] == "completed" for i in ids)
        assert worker_hops() == broker_before  # not one run, finish or answer routed
        finishes = line_hops()[("worker", "scheduler", "REQUEST")] \
            - line_before.get(("worker", "scheduler", "REQUEST"), 0)
        assert finishes == 20


@pytest.mark.processes
def test_a_stranger_on_the_line_is_told_who_and_a_forged_token_opens_nothing(shared_suite):
    home = shared_suite.home
    before = line_status(home)
    sock = line_socket(home)
    try:
        # An order before any HELLO: not read as anything, answered WHO.
        sock.send_multipart(wire.frames(wire.REQUEST, b"scheduler", b"c1", {
            "op": "task.finished", "id": "t-nope", "attempt": 1, "ok": True}))
        assert answer(sock).type == wire.WHO
        # A HELLO with a token never offered, as a worker that is on the bus.
        with Client(home, timeout=30) as c:
            name = c.call("scheduler", "worker.list")["workers"][0]["name"]
        sock.send_multipart(wire.frames(wire.HELLO, b"scheduler", b"h1", {
            "role": "worker", "name": name, "version": 2, "token": "0" * 32}))
        refused = answer(sock)
        assert refused.type == wire.ERROR and refused.decoded()["code"] == "unauthorized"
        # A client's HELLO with a token never given to it.
        sock.send_multipart(wire.frames(wire.HELLO, b"scheduler", b"h1", {
            "role": "client", "name": "x", "version": 2, "token": "a" * 32}))
        assert answer(sock).decoded()["code"] == "unauthorized"
        # Malformed: a HELLO without its token, as a service, a broken envelope.
        for body in ({"role": "worker", "name": name, "version": 2},
                     {"role": "service", "name": "scheduler", "version": 2, "token": "a" * 32},
                     {"role": "worker", "name": name, "token": 7}):
            sock.send_multipart(wire.frames(wire.HELLO, b"scheduler", b"h2", body))
            got = answer(sock)
            assert got.type == wire.ERROR and got.decoded()["code"] == "bad_request"
        sock.send_multipart([b"CX2", b"REQUEST"])  # two frames of six
        got = answer(sock)
        assert got.type == wire.ERROR and got.decoded()["code"] == "bad_request"
        for raw in (b"\xc1", b"\x92\x01\x02", pack({"a": b"b"})):  # not frames
            sock.send_raw(raw)
            got = answer(sock)
            assert got.type == wire.ERROR and got.decoded()["code"] == "bad_request"
        # An empty datagram reads as the connection's end (a read of 0 bytes): ended.
        sock.send_raw(b"")
        assert sock.poll(10_000) and sock.sock.recv(MAX_DATAGRAM) == b""
    finally:
        sock.close(linger=0)
    after = line_status(home)  # the scheduler serves on
    assert after["refused"] >= before["refused"] + 3
    assert after["malformed"] >= before["malformed"] + 7
    with Client(home, timeout=30) as c:
        assert c.submit_and_wait("echo", "still serving")["state"] == "completed"


@pytest.mark.processes
def test_only_the_name_the_broker_bound_gets_the_token_and_it_opens_the_line(suites):
    """A raw worker asks for the line through the bus and takes it with the token the
    scheduler sent to its name; its reports then arrive under that name. A client
    cannot ask (worker.ready is a worker's)."""
    home = suites.start(workers=1).home
    client = RawPeer(home, "client")
    worker = RawPeer(home, "worker")
    sock = None
    try:
        client.notify("scheduler", {"op": "worker.ready", "types": ["echo"], "direct": True})
        worker.notify("scheduler", {"op": "worker.ready", "types": ["nothing-runs-this"],
                                    "direct": True})
        offer = worker.receive(lambda m: m.type == wire.NOTIFY
                               and m.decoded().get("op") == "worker.direct", 20)
        assert offer.peer == b"scheduler" and offer.role == b"service"
        token = offer.decoded()["token"]
        sock = line_socket(home)
        sock.send_multipart(wire.frames(wire.HELLO, b"scheduler", b"h", {
            "role": "worker", "name": worker.name, "version": 2, "token": token}))
        assert answer(sock).type == wire.WELCOME
        # The same token again, on another connection: used up.
        other = line_socket(home)
        try:
            other.send_multipart(wire.frames(wire.HELLO, b"scheduler", b"h", {
                "role": "worker", "name": worker.name, "version": 2, "token": token}))
            assert answer(other).decoded()["code"] == "unauthorized"
        finally:
            other.close(linger=0)
        # On the line, the scheduler knows us by the broker's name for us.
        sock.send_multipart(wire.frames(wire.NOTIFY, b"scheduler", b"", {
            "op": "worker.leaving", "reason": "test"}))
        with Client(home, timeout=30) as c:
            wait_for(lambda: any(w["name"] == worker.name and w["state"] == "leaving"
                                 for w in c.call("scheduler", "worker.list")["workers"]),
                     20, "the raw worker leaving, as told on the line")
            assert not any(w["name"] == client.name
                           for w in c.call("scheduler", "worker.list")["workers"])
        with pytest.raises(AssertionError):  # no offer ever reaches a client
            client.receive(lambda m: m.type == wire.NOTIFY, 1.0)
    finally:
        if sock is not None:
            sock.close(linger=0)
        worker.close()
        client.close()


@pytest.mark.processes
def test_after_a_scheduler_kill_work_goes_on_and_the_workers_take_the_new_line(suites):
    suite = suites.start(workers=2, fsync="group")
    with Client(suite.home, timeout=90) as c:
        for n in range(6):
            assert c.submit_and_wait("echo", "before", payload=n)["state"] == "completed"
        wait_for(lambda: line_status(suite.home)["workers"] == 2, 20, "both on the line")
        ids = [c.submit("echo", "across the kill", payload=n)["id"] for n in range(10)]
        pid = c.call("scheduler", "scheduler.status")["pid"]
        os.kill(pid, signal.SIGKILL)
        ids += [c.submit("echo", "after the kill", payload=n)["id"] for n in range(10)]
        finals = [c.wait(i) for i in ids]
        assert [f["state"] for f in finals] == ["completed"] * 20
        assert c.call("scheduler", "scheduler.status")["pid"] != pid
        wait_for(lambda: line_status(suite.home)["workers"] == 2, 30,
                 "both workers on the new scheduler's line")
        more = [c.submit("echo", "on the new line", payload=n)["id"] for n in range(6)]
        assert all(c.wait(i)["state"] == "completed" for i in more)
    suites.seen(suite)


# -- clients on the line ------------------------------------------------------------------------
@pytest.mark.processes
def test_a_client_that_keeps_calling_takes_the_line_and_leaves_it_when_closed(suites):
    suite = suites.start(workers=2)
    before = line_status(suite.home)
    with Client(suite.home, timeout=30) as c:
        results = [c.submit_and_wait("echo", "client on the line", payload=n)
                   for n in range(8)]
        assert [r["result"] for r in results] == list(range(8))
        during = line_status(suite.home)
        assert during["clients"] >= before["clients"] + 1
        flows = {(f["from"], f["to"], f["type"]): f["count"] for f in during["flows"]}
        assert flows[("client", "scheduler", "REQUEST")] >= 4  # its later calls
        assert flows[("scheduler", "client", "REPLY")] >= 4
        # Calls to other services still go over the bus, and work.
        assert c.call("broker", "broker.status")["stats"]["routed"] >= 0
    wait_for(lambda: line_status(suite.home)["clients"] == before["clients"], 10,
             "the closed client's BYE on the line")


def test_the_call_that_earns_the_line_goes_over_the_bus_and_opens_it_after(suites):
    """Opening the line is a round trip through the broker and a handshake: done after
    the call that earns it, so that call (a submit, say) never waits for it."""
    suite = suites.start(workers=1)
    before = line_status(suite.home)
    with Client(suite.home, timeout=30) as c:
        for n in range(LINE_AFTER_CALLS):
            assert c.submit_and_wait("echo", "on the bus", payload=n)["result"] == n
        during = line_status(suite.home)
        assert during["clients"] == before["clients"] + 1  # opened, after the last call
        flows = {(f["from"], f["to"], f["type"]): f["count"] for f in during["flows"]}
        assert flows.get(("client", "scheduler", "REQUEST"), 0) == 0  # none on it yet
        assert c.submit_and_wait("echo", "on the line", payload="x")["result"] == "x"
        flows = {(f["from"], f["to"], f["type"]): f["count"]
                 for f in line_status(suite.home)["flows"]}
        assert flows[("client", "scheduler", "REQUEST")] == 1


@pytest.mark.processes
def test_a_client_on_the_line_has_at_most_64_requests_waiting(suites):
    """The broker's bound on a client holds on the line: held waits beyond 64 are
    answered `too_many` at once, and the scheduler serves on."""
    suite = suites.start(workers=1)
    home = suite.home
    with Client(home, timeout=30) as c:
        sleeper = c.submit("sleep", "holds the waits", payload={"seconds": 60})["id"]
    raw = RawPeer(home, "client")
    sock = None
    try:
        kind, body = raw.request("scheduler", {"op": "line.open"})
        assert kind == wire.REPLY
        sock = line_socket(home)
        sock.send_multipart(wire.frames(wire.HELLO, b"scheduler", b"h", {
            "role": "client", "name": raw.name, "version": 2, "token": body["token"]}))
        assert answer(sock).type == wire.WELCOME
        for n in range(70):
            sock.send_multipart(wire.frames(wire.REQUEST, b"scheduler", f"w{n}".encode(),
                                            {"op": "task.wait", "id": sleeper, "hold": 30}))
        refused = [answer(sock) for _ in range(6)]
        assert {m.type for m in refused} == {wire.ERROR}
        assert {m.decoded()["code"] for m in refused} == {"too_many"}
        assert sorted(m.corr for m in refused) == sorted(f"w{n}".encode()
                                                          for n in range(64, 70))
        assert line_status(home)["too_many"] >= 6
    finally:
        if sock is not None:
            sock.close(linger=0)
        raw.close()
        with Client(home, timeout=30) as c:
            c.cancel(sleeper)
            assert c.submit_and_wait("echo", "still serving")["state"] == "completed"
