"""The scheduler's direct line to the workers on its own machine, beside the bus.

A task costs five routed messages, and three of them are between the scheduler and the
worker: its run order, the worker's finish and the answer to it. Each one through the
broker is two hops and a broker turn. Local workers talk to the scheduler over its own
socket (`run/work.sock`, beside the bus socket, in the same owner-only directory)
instead: one hop, and the broker's work goes. It is a Unix `SOCK_SEQPACKET` socket, not
a ZeroMQ one: a datagram per message is one system call on each side, where each ZeroMQ
message also passes through libzmq's I/O threads (about twice the CPU per message:
`python -m cortex.loadtest.transport`). It needs Linux (epoll, and SEQPACKET on AF_UNIX);
elsewhere, and with CORTEX_PORTABLE=1, there is no line and everything takes the bus.

The broker still fixes who is who. The scheduler offers the line to a worker through
the bus (`worker.direct`, a fresh random token sent to the name the broker bound at the
worker's HELLO); the worker says HELLO on the line with its name and that token, and
from then its messages on the line are delivered as the broker would have: its name as
the sender, the role `worker`. A connection that has not said HELLO with a valid token
is answered WHO and nothing it sends is read as an order. Liveness stays the broker's:
a worker it declares lost is forgotten here too.

A client of this machine (the `Client` face) takes the line the same way, asking for its
token over the bus (`line.open`): then its submits, waits and their answers skip the
broker too. The broker's bounds on a client hold on the line: at most MAX_IN_FLIGHT
requests waiting for replies (`too_many`), and a client silent on the line for
CLIENT_IDLE is forgotten (its connection is closed: it goes back to the bus). A peer
whose connection ends (it exited, or was killed) is forgotten at once.

Everything sent to a peer the line does not know (or can no longer reach) goes over
the bus, as before: a worker or client on another machine, or one that has not taken
the line. `DirectPeers` holds the state (tokens, names, roles, offers, what waits for
replies); `DirectLine` the sockets.
"""

from __future__ import annotations

import hmac
import secrets
import select
import socket
import time
from collections import Counter

from cortex.protocol import locate, wire
from cortex.protocol.direct import MAX_DATAGRAM, Datagrams, line_socket, pack, unpack
from cortex.services.runtime.connections import default_cap, raise_fd_limit

REOFFER_AFTER = 2.0  # seconds before a worker that has not taken an offer gets another
# A peer that stops reading fills its connection's buffer (MAX_DATAGRAM, doubled by the
# kernel): past it, its messages go over the bus, which bounds a slow reader in bytes and
# cuts it off.
READY_MAX = 64  # connections taken from one look at epoll
ACCEPT_MAX = 64  # connections accepted in one go
SCHEDULER = b"scheduler"
SERVICE = b"service"
HELLO_KEYS = frozenset({"role", "name", "version", "token"})
LINE_ROLES = ("worker", "client")
CLIENT = b"client"
CLIENT_IDLE = 300.0  # seconds a client may be silent on the line before it is forgotten
TOKEN_TTL = 60.0  # seconds an offered token stays good (one never used is not kept)


class DirectPeers:
    """Who holds the line: name <-> routing id, the tokens offered, the workers that can
    take it (they said so in a `worker.ready` or `task.heartbeat`)."""

    def __init__(self, reoffer_after: float = REOFFER_AFTER,
                 max_in_flight: int = wire.MAX_IN_FLIGHT):
        self.reoffer_after = reoffer_after
        self.max_in_flight = max_in_flight
        self.rid_of: dict[bytes, bytes] = {}  # peer name -> its connection's routing id
        self.name_of: dict[bytes, bytes] = {}
        self.role_of: dict[bytes, bytes] = {}  # peer name -> b"worker" | b"client"
        # name -> (token offered, role, when): one per name, dropped when used or stale
        self.tokens: dict[bytes, tuple[str, str, float]] = {}
        self.offered_at: dict[bytes, float] = {}
        self.capable: set[bytes] = set()
        self.waiting: dict[bytes, set[bytes]] = {}  # client -> corrs of unanswered requests
        self.heard: dict[bytes, float] = {}  # client -> when last heard on the line

    def offer(self, name: bytes, mono: float) -> str | None:
        """A new token for a worker that can take the line and has not (None: no offer
        due now)."""
        if name in self.rid_of or name not in self.capable:
            return None
        if mono - self.offered_at.get(name, -1e18) < self.reoffer_after:
            return None
        self.offered_at[name] = mono
        return self.token_for(name, "worker", mono)

    def token_for(self, name: bytes, role: str, mono: float) -> str:
        """A fresh token for `name` in `role` (a client asks for its own: `line.open`)."""
        token = secrets.token_hex(16)
        self.tokens[name] = (token, role, mono)
        return token

    def hello(self, rid: bytes, name: bytes, token: str, role: str, mono: float = 0.0
              ) -> bool:
        """Bind a connection to the peer the token was offered to, in its role."""
        offered = self.tokens.get(name)
        if offered is None or offered[1] != role or mono - offered[2] > TOKEN_TTL \
                or not hmac.compare_digest(offered[0].encode(), token.encode()):
            return False
        del self.tokens[name]  # once: a copy of the token opens nothing
        self.unbind(name)
        old = self.name_of.pop(rid, None)
        if old is not None:
            self.unbind(old)
        self.rid_of[name], self.name_of[rid] = rid, name
        self.role_of[name] = role.encode()
        if role == "client":
            self.heard[name] = mono
        return True

    def request_in(self, name: bytes, corr: bytes, mono: float) -> bool:
        """A client's request arrived on the line: False when it has too many waiting
        for replies already (a re-send of one of them is not another)."""
        self.heard[name] = mono
        waiting = self.waiting.setdefault(name, set())
        if corr not in waiting and len(waiting) >= self.max_in_flight:
            return False
        waiting.add(corr)
        return True

    def answered(self, name: bytes, corr: bytes) -> None:
        """A reply to `name` goes out (on either path)."""
        waiting = self.waiting.get(name)
        if waiting is not None:
            waiting.discard(corr)
            if not waiting:
                del self.waiting[name]

    def idle_clients(self, mono: float, idle: float = CLIENT_IDLE) -> list[bytes]:
        """The clients silent on the line past `idle`; stale tokens are dropped meanwhile
        (a peer that asked and never came, so asking cannot fill the table)."""
        for name in [n for n, t in self.tokens.items() if mono - t[2] > TOKEN_TTL]:
            del self.tokens[name]
        return [name for name, at in self.heard.items() if mono - at > idle]

    def shut(self, name: bytes) -> None:
        """Sends to `name` go over the bus from now; what its connection still brings
        is read as its own until the connection ends. No new offer until it says it can
        take the line again, which it does once it has read the old one's end: a new
        line taken sooner would close the old one with our messages unread."""
        self.rid_of.pop(name, None)
        self.capable.discard(name)

    def unbind(self, name: bytes) -> None:
        rid = self.rid_of.pop(name, None)
        if rid is not None:
            self.name_of.pop(rid, None)
        self.role_of.pop(name, None)
        self.heard.pop(name, None)
        self.waiting.pop(name, None)

    def forget(self, name: bytes) -> None:
        """The worker is gone (lost, exited, leaving): nothing of it is kept."""
        self.unbind(name)
        self.tokens.pop(name, None)
        self.offered_at.pop(name, None)
        self.capable.discard(name)


class DirectLine:
    """The socket local workers and clients connect to, and their connections (each a
    routing id here: its file descriptor); what they send becomes bus messages."""

    def __init__(self, endpoint: str, log, cap: int | None = None):
        self.endpoint = endpoint
        self.log = log
        self.peers = DirectPeers()
        raise_fd_limit()  # one connection per local worker and client
        self.cap = default_cap() if cap is None else cap
        self.conns: dict[int, socket.socket] = {}
        self.accepted_at: dict[int, float] = {}  # connection -> when (monotonic)
        self.shut_at: dict[int, float] = {}  # connection -> when its sending side was shut
        self._ready: list[tuple[int, int]] = []  # from the last look at epoll, not yet read
        self._datagrams = Datagrams()
        self.listener = line_socket()
        self.epoll = select.epoll()
        try:
            self.listener.bind(str(locate.ipc_path(endpoint)))
            self.listener.listen(socket.SOMAXCONN)
            self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        except OSError:
            self.close()
            raise
        self.fd = self.epoll.fileno()  # readable when any connection is: for the loop's poll
        self.stats = {"refused": 0, "malformed": 0, "fallbacks": 0, "too_many": 0,
                      "over_cap": 0}
        self.flows: Counter = Counter()  # (from, to, type) -> messages, as the broker's

    def has_message(self) -> bool:
        """Whether a connection (or the listener) has something to read."""
        if not self._ready:
            self._ready = self.epoll.poll(0, READY_MAX)
        return bool(self._ready)

    def receive(self, mono: float = 0.0) -> wire.Message | None | bool:
        """One message from a worker or client (its name and role stamped), None when
        nothing waits, False for one handled here (a HELLO, a BYE, a connection accepted
        or ended, something refused). One message per ready connection per look at epoll:
        a busy peer does not starve the rest."""
        while True:
            if not self.has_message():
                return None
            rid = self._ready.pop()[0]
            if rid == self.listener.fileno():
                self._accept(mono)
                return False
            conn = self.conns.get(rid)
            if conn is None:
                continue  # closed since the look
            data = self._datagrams.read(conn)
            if data is not None:
                break
        if not data:
            self._end(rid)
            return False
        try:
            msg = wire.parse(unpack(data))
        except wire.ProtocolError as e:
            self.stats["malformed"] += 1
            self._answer(rid, wire.ERROR, b"", wire.error_body(e.code, e.message))
            return False
        if msg.type == wire.HELLO:
            self._hello(rid, msg, mono)
            return False
        name = self.peers.name_of.get(rid)
        if name is None:  # never introduced, or forgotten (lost, or we restarted)
            self.stats["refused"] += 1
            self._answer(rid, wire.WHO, b"", b"")
            return False
        role = self.peers.role_of[name]
        if msg.type == wire.BYE:
            self.peers.unbind(name)  # closing: what goes to it next goes over the bus
            return False
        if msg.type not in (wire.REQUEST, wire.NOTIFY, wire.REPLY, wire.ERROR):
            return False  # heartbeats belong to the bus
        if role == CLIENT:
            if msg.type != wire.REQUEST:
                return False  # a client only asks
            if not self.peers.request_in(name, msg.corr, mono):
                self.stats["too_many"] += 1
                self._answer(rid, wire.ERROR, msg.corr, wire.error_body(
                    "too_many", f"{self.peers.max_in_flight} requests already wait for "
                                "replies"))
                return False
        self.flows[role.decode(), "scheduler", msg.type] += 1
        return wire.Message(msg.type, name, msg.corr, msg.body, role)

    def _accept(self, mono: float) -> None:
        for _ in range(ACCEPT_MAX):
            try:
                conn = self.listener.accept()[0]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors: those waiting stay in the backlog
                self.log.warning("direct line: accept failed: %s", e)
                return
            if len(self.conns) >= self.cap:
                self.stats["over_cap"] += 1
                conn.close()  # its peer finds the line closed and stays on the bus
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_DATAGRAM)
            self.conns[conn.fileno()] = conn
            self.accepted_at[conn.fileno()] = mono
            self.epoll.register(conn.fileno(), select.EPOLLIN)

    def _end(self, rid: int) -> None:
        """A connection ended (its peer closed it, exited or was killed), or we end it:
        its peer is off the line."""
        conn = self.conns.pop(rid, None)
        if conn is None:
            return
        self.accepted_at.pop(rid, None)
        self.shut_at.pop(rid, None)
        name = self.peers.name_of.pop(rid, None)
        if name is not None and self.peers.rid_of.get(name, rid) == rid:
            self.peers.unbind(name)  # (not when it has said HELLO on a new connection)
        self.epoll.unregister(rid)
        conn.close()

    def end_idle(self, mono: float) -> None:
        """End the connections of clients silent past CLIENT_IDLE, those that never said
        HELLO (or were refused) TOKEN_TTL after they came, and those shut TOKEN_TTL ago
        whose peer never read their end: the peers go back to the bus, and the
        descriptors are free."""
        for name in self.peers.idle_clients(mono):
            rid = self.peers.rid_of.get(name)
            self.peers.unbind(name)
            if rid is not None:
                self._end(rid)
        for rid, at in list(self.accepted_at.items()):
            since = self.shut_at.get(rid, None if rid in self.peers.name_of else at)
            if since is not None and mono - since > TOKEN_TTL:
                self._end(rid)

    def _hello(self, rid: int, msg: wire.Message, mono: float) -> None:
        try:
            body = msg.decoded()
            name, token, role = body.get("name"), body.get("token"), body.get("role")
            if set(body) - HELLO_KEYS or role not in LINE_ROLES \
                    or not wire.valid_name(name) or not isinstance(token, str) \
                    or not 0 < len(token) <= 64:
                raise wire.ProtocolError("bad_request", "a direct HELLO is {role: worker "
                                                        "or client, name, version, token}")
        except wire.ProtocolError as e:
            self.stats["malformed"] += 1
            self._answer(rid, wire.ERROR, msg.corr, wire.error_body(e.code, e.message))
            return
        if not self.peers.hello(rid, name.encode(), token, role, mono):
            self.stats["refused"] += 1
            self._answer(rid, wire.ERROR, msg.corr, wire.error_body(
                "unauthorized", "no such offer: ask for the line (worker.direct, line.open)"))
            return
        self._answer(rid, wire.WELCOME, msg.corr, b"")

    def _answer(self, rid: int, type_: bytes, corr: bytes, body) -> None:
        try:
            self.conns[rid].send(pack(wire.frames(type_, SCHEDULER, corr, body,
                                                  role=SERVICE)))
        except OSError:
            pass  # gone already, or not reading: it learns on its next message

    def send(self, type_: bytes, peer: bytes, corr: bytes, body) -> bool:
        """Send to a peer on the line; False when it is not on it (send over the bus)."""
        if type_ in (wire.REPLY, wire.ERROR):
            self.peers.answered(peer, corr)
        rid = self.peers.rid_of.get(peer)
        if rid is None:
            return False
        try:
            self.conns[rid].send(pack(wire.frames(type_, SCHEDULER, corr, body,
                                                  role=SERVICE)))
        except OSError:
            # Not reading (its buffer is full), a message too large for the buffer, or
            # gone: this and what follows go over the bus (which bounds a slow reader),
            # in order. Our end of the connection is shut: the peer reads what the line
            # holds, then its end, and turns to the bus at once (where a reply it waits
            # for now is); what it sent meanwhile is still read here, as its own.
            self.stats["fallbacks"] += 1
            self.peers.shut(peer)
            self.shut_at.setdefault(rid, time.monotonic())
            try:
                self.conns[rid].shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return False
        self.flows["scheduler", self.peers.role_of[peer].decode(), type_] += 1
        return True

    def status(self) -> dict:
        roles = list(self.peers.role_of.values())
        return {"workers": roles.count(b"worker"), "clients": roles.count(CLIENT),
                "connections": len(self.conns), **self.stats,
                "flows": [{"from": src, "to": dst, "type": type_.decode(), "count": n}
                          for (src, dst, type_), n in sorted(self.flows.items())]}

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        self.epoll.close()
        self.listener.close()
