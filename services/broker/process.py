"""The broker process: routes messages between named peers; owns nothing else.

    python -m cortex.services.broker [--home DIR]

A ROUTER whose peers' routing ids are their names, so routing is one send; the broker
decodes only HELLO bodies and its own requests. ROUTER_MANDATORY makes an unroutable
message an error we answer (`unavailable`) instead of a silent drop.
"""

from __future__ import annotations

import os
import time

import zmq

from cortex.protocol import wire
from cortex.protocol.peer import make_socket, poll_ms, recv_frames, send_frames
from cortex.services.broker.peers import PeerTable
from cortex.services.runtime.entry import serve
from cortex.services.runtime.process import ServiceRuntime

MAX_BATCH = 5000
# Services told when a peer is lost, so work held by a dead worker is not forgotten.
LOSS_SUBSCRIBERS = (b"scheduler", b"pool")


class Broker:
    name = "broker"

    def __init__(self, home=None):
        self.rt = ServiceRuntime(self.name, home)
        self.log = self.rt.log
        interval = self.rt.settings.suite.heartbeat_interval
        self.table = PeerTable(interval=interval)
        self.endpoint = self.rt.endpoints["bus"]
        self.socket = make_socket(self.rt.ctx, zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes its name back
        self.socket.setsockopt(zmq.BACKLOG, 1024)
        self.rt.remove_socket(self.endpoint)  # left by a killed predecessor (we hold the lock)
        self.socket.bind(self.endpoint)
        self.stats = {"routed": 0, "malformed": 0, "unroutable": 0, "lost_peers": 0}
        self.next_beat = time.monotonic() + interval

    def send(self, dest: bytes, parts: list) -> bool:
        try:
            send_frames(self.socket, [dest, *parts])
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH: unknown peer; EAGAIN: its queue is full
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            self.stats["unroutable"] += 1
            return False

    def reply_error(self, dest: bytes, corr: bytes, code: str, message: str) -> None:
        self.send(dest, wire.frames(wire.ERROR, wire.BROKER, corr, wire.error_body(code,
                                                                                    message)))

    def on_message(self, parts: list, now: float) -> None:
        sender, rest = parts[0], parts[1:]
        try:
            msg = wire.parse(rest)
        except wire.ProtocolError as e:
            self.stats["malformed"] += 1
            corr = bytes(rest[3])[: wire.MAX_CORR_BYTES] if len(rest) == wire.FRAME_COUNT else b""
            self.reply_error(sender, corr, e.code, e.message)
            return
        name = sender.decode(errors="replace")
        if msg.type == wire.HELLO:
            try:
                body = msg.decoded()
                role = wire.field_choice(body, "role", wire.ROLES)
                if body.get("name") != name:
                    raise wire.ProtocolError("bad_request", "HELLO name must equal routing id")
            except wire.ProtocolError as e:
                self.stats["malformed"] += 1
                self.reply_error(sender, msg.corr, e.code, e.message)
                return
            if self.table.hello(name, role, now):
                self.log.info("peer %s joined as %s", name, role)
            self.send(sender, wire.frames(wire.WELCOME, wire.BROKER, msg.corr, {
                "heartbeat_ms": int(self.table.interval * 1000)}))
            return
        if not self.table.heard(name, now) and msg.type != wire.BYE:
            self.send(sender, wire.frames(wire.WHO, wire.BROKER))
        if msg.type == wire.HEARTBEAT:
            return
        if msg.type == wire.BYE:
            self.table.forget(name)
            return
        if msg.peer == wire.BROKER:
            self.serve(sender, msg, now)
            return
        if msg.type not in (wire.REQUEST, wire.REPLY, wire.ERROR, wire.NOTIFY):
            self.stats["malformed"] += 1
            self.reply_error(sender, msg.corr, "unknown_type",
                             f"{msg.type.decode()} is not routed by the broker")
            return
        if self.send(msg.peer, [wire.TAG, msg.type, sender, msg.corr, msg.body]):
            self.stats["routed"] += 1
        elif msg.type in (wire.REQUEST, wire.NOTIFY):
            self.reply_error(sender, msg.corr, "unavailable",
                             f"{msg.peer.decode(errors='replace')} is not connected")

    def serve(self, sender: bytes, msg: wire.Message, now: float) -> None:
        """The broker's own requests: who is connected, and its counters."""
        if msg.type != wire.REQUEST:
            return
        try:
            op = msg.decoded().get("op")
        except wire.ProtocolError as e:
            self.reply_error(sender, msg.corr, e.code, e.message)
            return
        if op in ("broker.peers", "broker.status"):
            body = {"peers": self.table.describe(now), "stats": self.stats,
                    "uptime": time.time() - self.rt.started, "pid": os.getpid()}
            self.send(sender, wire.frames(wire.REPLY, wire.BROKER, msg.corr, body))
        else:
            self.reply_error(sender, msg.corr, "unknown_type", f"unknown operation {op!r}")

    def heartbeat(self, now: float) -> None:
        beat = wire.frames(wire.HEARTBEAT, wire.BROKER)
        for name in self.table.heartbeat_targets():
            self.send(name.encode(), beat)
        for peer in self.table.expire(now):
            self.stats["lost_peers"] += 1
            self.log.warning("peer %s (%s) lost: silent for %.1f s", peer.name, peer.role,
                             now - peer.last_seen)
            notice = wire.frames(wire.NOTIFY, wire.BROKER, b"", {
                "op": "peer.lost", "name": peer.name, "role": peer.role})
            for dest in LOSS_SUBSCRIBERS:
                if dest.decode() in self.table.peers:
                    self.send(dest, notice)

    def run(self) -> None:
        self.log.info("broker listening on %s", self.endpoint)
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
                        parts = recv_frames(self.socket)
                        if parts is None:
                            break
                        self.on_message(parts, now)
        finally:
            self.socket.close(linger=0)
            self.rt.remove_socket(self.endpoint)
            self.rt.close()
            self.log.info("broker stopped")


def main(argv=None) -> None:
    serve("cortex-broker", __doc__, Broker, argv)
