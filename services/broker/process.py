"""The broker process: routes messages between named peers; owns nothing else.

    python -m cortex.services.broker [--home DIR]

A ROUTER whose peers are known by the names they gave at HELLO (the connection's routing
id is libzmq's, never the peer's choice). Per message the broker reads the envelope only:
it looks up the sender (its name and role), looks up the destination, stamps the sender's
name and role into the forwarded message, and counts the sender's requests waiting for
replies. It decodes only HELLO bodies and its own requests. ROUTER_MANDATORY makes an
unroutable message an error we answer (`unavailable`) instead of a silent drop.

What waits for a peer is bounded in bytes (`[bus] max_unread_mb`): every forwarded
message adds its size to the destination's count, a probe (a HEARTBEAT with a token)
goes out every step of it, and a client or worker whose echoes lag past the bound is a
slow reader: forgotten as a lost peer and its connection closed, which frees its pipe.
"""

from __future__ import annotations

import hmac
import os
import time
from collections import Counter

import zmq

from cortex.protocol import wire
from cortex.protocol.peer import make_socket, poll_ms, recv_with_first, send_frames
from cortex.services.broker.peers import ENVELOPE_BYTES, MIB, QUIET_BEAT, SKIP, Peer, PeerTable
from cortex.services.runtime.connections import (
    ConnectionGuard,
    default_cap,
    raise_fd_limit,
    shut_connection,
)
from cortex.services.runtime.curve import Listeners, peer_address
from cortex.services.runtime.entry import serve
from cortex.services.runtime.keys import may_take
from cortex.services.runtime.process import ServiceRuntime, suite_secret

MAX_BATCH = 5000
SEND_HWM = 10_000  # messages waiting for one peer; past it, that peer's messages are dropped
# Services told when a peer is lost, so work held by a dead worker is not forgotten.
LOSS_SUBSCRIBERS = (b"scheduler", b"pool")
FORWARDED = (wire.REQUEST, wire.REPLY, wire.ERROR, wire.NOTIFY)


class Broker:
    name = "broker"

    def __init__(self, home=None):
        self.rt = ServiceRuntime(self.name, home)
        self.log = self.rt.log
        interval = self.rt.settings.suite.heartbeat_interval
        self.table = PeerTable(interval=interval,
                               max_unread=int(self.rt.settings.bus.max_unread_mb * MIB),
                               quiet_every=self.rt.settings.suite.quiet_heartbeat_every)
        self.quiet_body = wire.encode_body({"next_ms": int(self.table.quiet_spacing * 1000)})
        self.beat = wire.frames(wire.HEARTBEAT, wire.BROKER, role=b"broker")
        self.quiet_beat = wire.frames(wire.HEARTBEAT, wire.BROKER, b"", self.quiet_body,
                                      role=b"broker")
        self.secret = suite_secret(self.rt.home).encode()
        self.endpoint = self.rt.endpoints["bus"]
        self.socket = make_socket(self.rt.ctx, zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.socket.setsockopt(zmq.BACKLOG, 1024)
        self.rt.remove_socket(self.endpoint)  # left by a killed predecessor (we hold the lock)
        raise_fd_limit()
        cap = self.rt.settings.bus.max_connections or default_cap()
        self.guard = ConnectionGuard(self.socket, cap, "bus")
        # On tcp: CURVE, a ZAP handler admitting listed keys, the key's roles fixed at HELLO.
        self.listeners = Listeners(self.rt.ctx, self.rt.home, self.log)
        self.listeners.serve(self.socket, self.endpoint)
        self.curve = self.listeners.curve and self.endpoint.startswith("tcp://")
        self.socket.bind(self.endpoint)
        self.stats = {"routed": 0, "malformed": 0, "unroutable": 0, "lost_peers": 0,
                      "refused_hello": 0, "too_many": 0, "too_large": 0, "revoked": 0,
                      "slow_readers": 0}
        # (from, to, type) -> messages: services by name, other peers by role. What a task
        # costs on the bus is read from these (`python -m cortex.loadtest.count`).
        self.flows: Counter = Counter()
        self.next_beat = time.monotonic() + interval

    def send(self, rid: bytes, parts: list) -> bool:
        try:
            send_frames(self.socket, [rid, *parts])
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH: gone; EAGAIN: its queue is full
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            self.stats["unroutable"] += 1
            return False

    def reply_error(self, rid: bytes, corr: bytes, code: str, message: str) -> None:
        self.send(rid, wire.frames(wire.ERROR, wire.BROKER, corr,
                                   wire.error_body(code, message), role=b"broker"))

    def on_message(self, parts: list, now: float, first: zmq.Frame | None = None) -> None:
        """`first`: the routing id frame, which carries the connection's descriptor and,
        on tcp with CURVE, the admitted key's name (ZAP User-Id)."""
        rid, rest = parts[0], parts[1:]
        try:
            msg = wire.parse(rest)
        except wire.ProtocolError as e:
            self.refuse(rid, rest, e)
            return
        if msg.type == wire.HELLO:
            self.hello(rid, msg, now, first)
            return
        peer = self.table.heard(rid, now)
        if peer is None:
            if msg.type != wire.BYE:
                self.send(rid, wire.frames(wire.WHO, wire.BROKER, role=b"broker"))
                if msg.type == wire.REQUEST:
                    self.reply_error(rid, msg.corr, "unavailable", "say HELLO first")
            return
        source = peer.label
        if msg.type == wire.HEARTBEAT:
            self.flows[source, "broker", wire.HEARTBEAT] += 1
            if msg.body:  # "busy": a worker whose calls go over the scheduler's own line
                peer.active = now
            if msg.corr:  # the echo of a probe (a peer's own beats carry no token)
                self.table.echoed(peer, msg.corr)
            return
        if msg.type == wire.BYE:
            self.table.forget(rid)
            return
        if msg.type != wire.NOTIFY:  # calls make a peer active; its reports do not
            peer.active = now
        if msg.peer == wire.BROKER:
            self.flows[source, "broker", msg.type] += 1
            self.serve(rid, msg, now)
            return
        if msg.type not in FORWARDED:
            self.stats["malformed"] += 1
            self.reply_error(rid, msg.corr, "unknown_type",
                             f"{msg.type.decode()} is not routed by the broker")
            return
        dest = self.table.route(msg.peer)
        if dest is None:
            if msg.type in (wire.REQUEST, wire.NOTIFY):
                self.stats["unroutable"] += 1
                self.reply_error(rid, msg.corr, "unavailable",
                                 f"{msg.peer.decode(errors='replace')} is not connected")
            return
        # The suite's own services are trusted with any number of requests (the scheduler
        # keeps hundreds of ledger orders in flight); clients and workers are bounded.
        if msg.type == wire.REQUEST and peer.role != "service" \
                and not self.table.request_sent(peer, msg.corr, now):
            self.stats["too_many"] += 1
            self.reply_error(rid, msg.corr, "too_many",
                             f"{self.table.max_in_flight} requests already wait for replies")
            return
        if msg.type in (wire.REPLY, wire.ERROR):
            self.table.reply_delivered(dest, msg.corr)
        if self.send(dest.rid, [wire.TAG, msg.type, peer.name_bytes, peer.role_bytes,
                                msg.corr, msg.body]):
            self.stats["routed"] += 1
            self.flows[source, dest.label, msg.type] += 1
            if msg.type != wire.NOTIFY:
                dest.active = now
            dest.sent += len(msg.body) + ENVELOPE_BYTES
            if dest.sent >= dest.probe_due:
                self.probe(dest, self.table.quiet(dest, now))
        elif msg.type in (wire.REQUEST, wire.NOTIFY):
            self.reply_error(rid, msg.corr, "unavailable",
                             f"{dest.name} is not taking messages")

    def refuse(self, rid: bytes, rest: list, error: wire.ProtocolError) -> None:
        """A message that breaks the envelope. An oversized reply is answered to the
        peer that is waiting for it (the requester), not to the service that made it."""
        self.stats["malformed"] += 1
        corr = bytes(rest[4])[:wire.MAX_CORR_BYTES] if len(rest) == wire.FRAME_COUNT else b""
        if error.code == "too_large" and len(rest) == wire.FRAME_COUNT \
                and rest[1] in (wire.REPLY, wire.ERROR):
            sender = self.table.by_rid.get(rid)
            dest = self.table.route(bytes(rest[2]))
            if sender is not None and dest is not None:
                self.stats["too_large"] += 1
                self.table.reply_delivered(dest, corr)
                self.send(dest.rid, wire.frames(
                    wire.ERROR, sender.name_bytes, corr, wire.error_body(
                        "too_large", f"the reply from {sender.name} was {error.message}"),
                    role=sender.role_bytes))
                return
        self.reply_error(rid, corr, error.code, error.message)

    def hello(self, rid: bytes, msg: wire.Message, now: float,
              first: zmq.Frame | None = None) -> None:
        try:
            body = msg.decoded()
            role = wire.field_choice(body, "role", wire.ROLES)
            name = body.get("name")
            if not wire.valid_name(name):
                raise wire.ProtocolError("bad_request", "HELLO needs a valid name")
        except wire.ProtocolError as e:
            self.stats["malformed"] += 1
            self.reply_error(rid, msg.corr, e.code, e.message)
            return
        key, fd = "", self.descriptor(first)
        if self.curve:
            key, fd = self.admitted_key(first)
            roles = self.listeners.store.roles_of(key) if key else frozenset()
            if not may_take(roles, role, name):
                self.stats["refused_hello"] += 1
                self.log.warning("refused HELLO as %s %r: key %r may take %s", role, name,
                                 key, sorted(roles) or "nothing (revoked)")
                self.reply_error(rid, msg.corr, "unauthorized",
                                 f"the key {key!r} may not take the {role} role"
                                 + (f" as {name!r}" if role == "service" else ""))
                return
        secret = body.get("secret")
        proven = isinstance(secret, str) and hmac.compare_digest(secret.encode(), self.secret)
        outcome = self.table.hello(rid, name, role, proven, now)
        if not outcome.ok:
            self.stats["refused_hello"] += 1
            self.log.warning("refused HELLO as %s %r: %s", role, name, outcome.reason)
            self.reply_error(rid, msg.corr, "unauthorized", outcome.reason)
            return
        if outcome.replaced is not None:
            self.log.info("%s %s took its name over from a predecessor", role, name)
        peer = self.table.by_rid[rid]
        peer.fd, peer.connection = fd, connection_inode(fd)
        if self.curve:
            peer.key, peer.address = key, peer_address(fd)
        self.send(rid, wire.frames(wire.WELCOME, wire.BROKER, msg.corr, {
            "heartbeat_ms": int(self.table.interval * 1000)}, role=b"broker"))

    @staticmethod
    def descriptor(first: zmq.Frame | None) -> int:
        if first is None:
            return -1
        try:
            return int(first.get(zmq.SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            return -1

    @staticmethod
    def admitted_key(first: zmq.Frame | None) -> tuple[str, int]:
        """The admitted key's name and the connection's descriptor, from a frame."""
        if first is None:
            return "", -1
        try:
            return first.get("User-Id") or "", int(first.get(zmq.SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            return "", -1

    def cut_revoked(self, now: float) -> None:
        """Drop the peers whose key was revoked: forget them, close their connections
        (the ZAP handler refuses them when their library reconnects)."""
        revoked = self.listeners.revoked()
        if not revoked:
            return
        for peer in self.table.holding(revoked):
            self.stats["revoked"] += 1
            self.log.warning("key %r revoked: cutting %s %s off", peer.key, peer.role,
                             peer.name)
            self.table.forget(peer.rid)
            if peer.address is not None and peer_address(peer.fd) == peer.address:
                shut_connection(peer.fd)  # still that peer's connection: close it
            self.lost(peer)

    def probe(self, peer: Peer, quiet: bool) -> None:
        """Cut the peer off if it is past the bound, else send it a probe. A quiet peer's
        probe says the spacing too: a beat without it means "the normal interval"."""
        if self.table.slow_reader(peer):
            self.cut_slow_reader(peer)
            return
        token = self.table.probe(peer)
        self.send(peer.rid, wire.frames(wire.HEARTBEAT, wire.BROKER, token,
                                        self.quiet_body if quiet else b"", role=b"broker"))

    def cut_slow_reader(self, peer: Peer) -> None:
        """Forget a peer that does not read (as a lost one: its work is requeued) and
        close its connection, so libzmq frees what waits in its pipe."""
        self.stats["slow_readers"] += 1
        self.log.warning("%s %s is a slow reader: %.1f MiB sent to it not read (bound "
                         "%.0f MiB): disconnected", peer.role, peer.name,
                         self.table.unread(peer) / MIB, self.table.max_unread / MIB)
        self.table.forget(peer.rid)
        if peer.connection and connection_inode(peer.fd) == peer.connection:
            shut_connection(peer.fd)  # still that peer's connection: close it
        self.lost(peer)

    def lost(self, peer: Peer) -> None:
        notice = wire.frames(wire.NOTIFY, wire.BROKER, b"", {
            "op": "peer.lost", "name": peer.name, "role": peer.role}, role=b"broker")
        for name in LOSS_SUBSCRIBERS:
            dest = self.table.route(name)
            if dest is not None:
                self.send(dest.rid, notice)

    def serve(self, rid: bytes, msg: wire.Message, now: float) -> None:
        """The broker's own requests: who is connected, and its counters."""
        if msg.type != wire.REQUEST:
            return
        try:
            op = msg.decoded().get("op")
        except wire.ProtocolError as e:
            self.reply_error(rid, msg.corr, e.code, e.message)
            return
        if op in ("broker.peers", "broker.status"):
            body = {"peers": self.table.describe(now), "stats": self.stats,
                    "flows": [{"from": src, "to": dst, "type": type_.decode(), "count": n}
                              for (src, dst, type_), n in sorted(self.flows.items())],
                    "connections": self.guard.status(), "security": self.listeners.status(),
                    "uptime": time.time() - self.rt.started, "pid": os.getpid()}
            self.send(rid, wire.frames(wire.REPLY, wire.BROKER, msg.corr, body,
                                       role=b"broker"))
        else:
            self.reply_error(rid, msg.corr, "unknown_type",
                             f"unknown operation {str(op)[:64]!r}")

    def heartbeat(self, now: float) -> None:
        for peer in self.table.heartbeat_targets():
            kind = self.table.beat_kind(peer, now)
            if kind == SKIP:
                continue
            quiet = kind == QUIET_BEAT
            if self.table.probe_pending(peer):  # a beat that also confirms what was sent
                self.probe(peer, quiet)
            else:
                self.send(peer.rid, self.quiet_beat if quiet else self.beat)
            self.flows["broker", peer.label, wire.HEARTBEAT] += 1
        for peer in self.table.expire(now):
            self.stats["lost_peers"] += 1
            self.log.warning("peer %s (%s) lost: silent for %.1f s", peer.name, peer.role,
                             now - peer.last_seen)
            self.lost(peer)
        self.cut_revoked(now)

    def run(self) -> None:
        self.log.info("broker listening on %s%s", self.endpoint,
                      " (CurveZMQ)" if self.curve else "")
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        wake = self.rt.wake_r.fileno()
        poller.register(wake, zmq.POLLIN)  # signals end the wait
        try:
            while not self.rt.stopping:
                now = time.monotonic()
                if now >= self.next_beat:
                    self.heartbeat(now)
                    self.next_beat = now + self.table.interval
                ready = poller.poll(poll_ms(self.next_beat - now))
                if ready:
                    if any(item == wake for item, _ in ready):
                        self.rt.drain_wakeups()
                    now = time.monotonic()
                    for _ in range(MAX_BATCH):
                        received = recv_with_first(self.socket)
                        if received is None:
                            break
                        self.on_message(received[0], now, received[1])
        finally:
            self.guard.stop()
            self.socket.close(linger=0)
            self.listeners.stop()
            self.rt.remove_socket(self.endpoint)
            self.rt.close()
            self.log.info("broker stopped")


def connection_inode(fd: int) -> int:
    """The inode of the socket on `fd` (0 if none): a descriptor noted at HELLO is
    checked with it before it is closed, since a closed connection's number may have
    been reused by another."""
    if fd < 0:
        return 0
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return 0


def main(argv=None) -> None:
    serve("cortex-broker", __doc__, Broker, argv)
