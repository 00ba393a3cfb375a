"""The scheduler's direct line to the workers on its own machine, beside the bus.

A task costs five routed messages, and three of them are between the scheduler and the
worker: its run order, the worker's finish and the answer to it. Each one through the
broker is two hops and a broker turn. Local workers talk to the scheduler over its own
ROUTER (`run/work.sock`, beside the bus socket, in the same owner-only directory)
instead: one hop, and the broker's work goes.

The broker still fixes who is who. The scheduler offers the line to a worker through
the bus (`worker.direct`, a fresh random token sent to the name the broker bound at the
worker's HELLO); the worker says HELLO on the line with its name and that token, and
from then its messages on the line are delivered as the broker would have: its name as
the sender, the role `worker`. A connection that has not said HELLO with a valid token
is answered WHO and nothing it sends is read as an order. Liveness stays the broker's:
a worker it declares lost is forgotten here too.

Everything sent to a worker the line does not know (or can no longer reach) goes over
the bus, as before: a worker on another machine, or one that has not taken the line.
`DirectPeers` holds the state (tokens, names, offers); `DirectLine` the socket.
"""

from __future__ import annotations

import hmac
import secrets
from collections import Counter

import zmq

from cortex.protocol import wire
from cortex.protocol.peer import make_socket, recv_frames, send_frames
from cortex.services.runtime.connections import ConnectionGuard, default_cap, raise_fd_limit

REOFFER_AFTER = 2.0  # seconds before a worker that has not taken an offer gets another
# Messages waiting for one worker on the line. A worker holds at most a few tasks, so
# only one that stopped reading gets near it: past it, its messages go over the bus,
# which bounds a slow reader in bytes and cuts it off.
SEND_HWM = 1000
WORKER = b"worker"
SCHEDULER = b"scheduler"
SERVICE = b"service"
HELLO_KEYS = frozenset({"role", "name", "version", "token"})


class DirectPeers:
    """Who holds the line: name <-> routing id, the tokens offered, the workers that can
    take it (they said so in a `worker.ready` or `task.heartbeat`)."""

    def __init__(self, reoffer_after: float = REOFFER_AFTER):
        self.reoffer_after = reoffer_after
        self.rid_of: dict[bytes, bytes] = {}  # worker name -> its connection's routing id
        self.name_of: dict[bytes, bytes] = {}
        self.tokens: dict[bytes, str] = {}  # worker name -> the token offered to it
        self.offered_at: dict[bytes, float] = {}
        self.capable: set[bytes] = set()

    def offer(self, name: bytes, mono: float) -> str | None:
        """A new token for a worker that can take the line and has not (None: no offer
        due now)."""
        if name in self.rid_of or name not in self.capable:
            return None
        if mono - self.offered_at.get(name, -1e18) < self.reoffer_after:
            return None
        token = secrets.token_hex(16)
        self.tokens[name], self.offered_at[name] = token, mono
        return token

    def hello(self, rid: bytes, name: bytes, token: str) -> bool:
        """Bind a connection to the worker the token was offered to."""
        offered = self.tokens.get(name)
        if offered is None or not hmac.compare_digest(offered.encode(), token.encode()):
            return False
        del self.tokens[name]  # once: a copy of the token opens nothing
        self.unbind(name)
        old = self.name_of.pop(rid, None)
        if old is not None:
            self.rid_of.pop(old, None)
        self.rid_of[name], self.name_of[rid] = rid, name
        return True

    def unbind(self, name: bytes) -> None:
        rid = self.rid_of.pop(name, None)
        if rid is not None:
            self.name_of.pop(rid, None)

    def forget(self, name: bytes) -> None:
        """The worker is gone (lost, exited, leaving): nothing of it is kept."""
        self.unbind(name)
        self.tokens.pop(name, None)
        self.offered_at.pop(name, None)
        self.capable.discard(name)


class DirectLine:
    """The ROUTER local workers connect to; what it receives becomes bus messages."""

    def __init__(self, ctx: zmq.Context, endpoint: str, log):
        self.endpoint = endpoint
        self.log = log
        self.peers = DirectPeers()
        self.socket = make_socket(ctx, zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        raise_fd_limit()  # one connection per local worker
        self.guard = ConnectionGuard(self.socket, default_cap(), "work")
        self.socket.bind(endpoint)
        self.stats = {"refused": 0, "malformed": 0, "fallbacks": 0}
        self.flows: Counter = Counter()  # (from, to, type) -> messages, as the broker's

    def receive(self) -> wire.Message | None | bool:
        """One message from a worker (its name and role stamped), None when nothing
        waits, False for one handled here (a HELLO, something refused)."""
        parts = recv_frames(self.socket)
        if parts is None:
            return None
        rid = parts[0]
        try:
            msg = wire.parse(parts[1:])
        except wire.ProtocolError as e:
            self.stats["malformed"] += 1
            self._answer(rid, wire.ERROR, b"", wire.error_body(e.code, e.message))
            return False
        if msg.type == wire.HELLO:
            self._hello(rid, msg)
            return False
        name = self.peers.name_of.get(rid)
        if name is None:  # never introduced, or forgotten (lost, or we restarted)
            self.stats["refused"] += 1
            self._answer(rid, wire.WHO, b"", b"")
            return False
        if msg.type not in (wire.REQUEST, wire.NOTIFY, wire.REPLY, wire.ERROR):
            return False  # heartbeats and farewells belong to the bus
        self.flows["worker", "scheduler", msg.type] += 1
        return wire.Message(msg.type, name, msg.corr, msg.body, WORKER)

    def _hello(self, rid: bytes, msg: wire.Message) -> None:
        try:
            body = msg.decoded()
            name, token = body.get("name"), body.get("token")
            if set(body) - HELLO_KEYS or body.get("role") != "worker" \
                    or not wire.valid_name(name) or not isinstance(token, str) \
                    or not 0 < len(token) <= 64:
                raise wire.ProtocolError("bad_request", "a direct HELLO is {role: worker, "
                                                        "name, version, token}")
        except wire.ProtocolError as e:
            self.stats["malformed"] += 1
            self._answer(rid, wire.ERROR, msg.corr, wire.error_body(e.code, e.message))
            return
        if not self.peers.hello(rid, name.encode(), token):
            self.stats["refused"] += 1
            self._answer(rid, wire.ERROR, msg.corr, wire.error_body(
                "unauthorized", "no such offer: take the direct line from worker.direct"))
            return
        self._answer(rid, wire.WELCOME, msg.corr, b"")

    def _answer(self, rid: bytes, type_: bytes, corr: bytes, body) -> None:
        try:
            send_frames(self.socket, [rid, *wire.frames(type_, SCHEDULER, corr, body,
                                                         role=SERVICE)])
        except zmq.ZMQError:
            pass  # gone already, or not reading: it learns on its next message

    def send(self, type_: bytes, peer: bytes, corr: bytes, body) -> bool:
        """Send to a worker on the line; False when it is not on it (send over the bus)."""
        rid = self.peers.rid_of.get(peer)
        if rid is None:
            return False
        try:
            send_frames(self.socket, [rid, *wire.frames(type_, SCHEDULER, corr, body,
                                                         role=SERVICE)])
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            # Disconnected, or not reading: this and what follows go over the bus (which
            # bounds a slow reader), in order.
            self.stats["fallbacks"] += 1
            self.peers.unbind(peer)
            return False
        self.flows["scheduler", "worker", type_] += 1
        return True

    def status(self) -> dict:
        return {"workers": len(self.peers.rid_of), **self.stats,
                "flows": [{"from": src, "to": dst, "type": type_.decode(), "count": n}
                          for (src, dst, type_), n in sorted(self.flows.items())]}

    def close(self) -> None:
        self.guard.stop()
        self.socket.close(linger=0)
