"""CurveZMQ for a process's listening sockets on tcp, and the ZAP handler that admits keys.

`Listeners` decides once per process: no tcp endpoint, nothing to do; tcp and the suite
has no key pair (settings allowed it: `insecure_tcp = true`), plaintext, said in the log;
else the suite's key pair serves every tcp socket of the process, and a ZAP handler on
the process's context admits the suite's own key and the allow-list's live keys, and
refuses the rest. The
name of the admitted key goes back to libzmq as the ZAP User-Id, which libzmq attaches
to every message of that connection: the broker reads it at HELLO to fix the role.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

import zmq

from cortex.protocol import locate
from cortex.protocol.peer import ZAP_DOMAIN
from cortex.services.runtime.connections import SocketMonitor, shut_connection
from cortex.services.runtime.keys import KeyStore

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
ZAP_VERSION = b"1.0"
POLL_MS = 200  # how often the ZAP thread looks whether it should stop
CHECK_EVERY = 0.25  # seconds between looks at the allow-list from a busy loop


class ZapHandler(threading.Thread):
    """Answers libzmq's ZAP requests for every socket of `ctx` with a ZAP domain."""

    def __init__(self, ctx: zmq.Context, store: KeyStore):
        super().__init__(name="zap", daemon=True)
        self.store = store
        self.admitted = 0
        self.refused: dict[str, int] = {"mechanism": 0, "unknown_key": 0}
        self._stopping = threading.Event()
        self._socket = ctx.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(ZAP_ENDPOINT)
        self.start()

    def run(self) -> None:
        sock = self._socket
        try:
            while not self._stopping.is_set():
                if not sock.poll(POLL_MS):
                    continue
                request = sock.recv_multipart()
                sock.send_multipart(self.answer(request))
        except zmq.ZMQError:
            pass  # the context is ending
        finally:
            sock.close(linger=0)

    def answer(self, request: list[bytes]) -> list[bytes]:
        """One ZAP reply: [version, request id, status, text, user id, metadata]."""
        if len(request) < 6 or request[0] != ZAP_VERSION:
            rid = request[1] if len(request) > 1 else b""
            return [ZAP_VERSION, rid, b"500", b"malformed ZAP request", b"", b""]
        rid, domain, address, mechanism = request[1], request[2], request[3], request[5]
        if mechanism != b"CURVE" or len(request) != 7 or domain != ZAP_DOMAIN:
            self.refused["mechanism"] += 1
            return [ZAP_VERSION, rid, b"400", b"CURVE only", b"", b""]
        admitted = self.store.admit(request[6])
        if admitted is None:
            self.refused["unknown_key"] += 1
            log.warning("refused an unknown or revoked key from %s",
                        address.decode(errors="replace"))
            return [ZAP_VERSION, rid, b"400", b"key not admitted", b"", b""]
        self.admitted += 1
        return [ZAP_VERSION, rid, b"200", b"OK", admitted.name.encode(), b""]

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=2)

    def status(self) -> dict:
        return {"admitted": self.admitted, "refused": dict(self.refused)}


def peer_address(fd: int) -> tuple | None:
    """The remote address of the connection on `fd` (None when it is no connection): a
    descriptor noted earlier is checked with it before it is closed, since a closed
    connection's number may have been reused by another."""
    if fd < 0:
        return None
    try:
        with socket.socket(fileno=os.dup(fd)) as dup:
            return dup.getpeername()
    except OSError:
        return None


class Accepted(SocketMonitor):
    """The descriptors of the connections a listening socket holds, from its monitor: a
    socket that cannot tell which key a connection belongs to (the live XPUB) closes them
    all when a key is revoked; the admitted reconnect at once, the revoked are refused."""

    def __init__(self, sock: zmq.Socket, label: str):
        self.fds: set[int] = set()
        super().__init__(sock, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED,
                         f"accepted-{label}")

    def on_event(self, kind: int, value: int) -> None:
        if kind == zmq.EVENT_ACCEPTED:
            self.fds.add(value)
        else:
            self.fds.discard(value)

    def cut_all(self) -> int:
        fds = list(self.fds)
        for fd in fds:
            shut_connection(fd)
        return len(fds)


class Listeners:
    """What secures one process's listening sockets (or leaves them plaintext)."""

    def __init__(self, ctx: zmq.Context, home, log_=log):
        endpoints = locate.endpoints(home)
        self.tcp = sorted(k for k, v in endpoints.items() if locate.is_tcp(v))
        # Keys are used whenever the suite has them; insecure_tcp only lets it start on
        # tcp without them (settings refuse that otherwise).
        self.insecure = bool(self.tcp) and not locate.suite_key_path(home).exists()
        self.store: KeyStore | None = None
        self.zap: ZapHandler | None = None
        self.tracked: list[Accepted] = []
        self._next_check = 0.0
        self.log = log_
        if self.tcp and not self.insecure:
            self.store = KeyStore(home)
            self.zap = ZapHandler(ctx, self.store)
        elif self.insecure:
            log_.warning("insecure_tcp = true: %s served in PLAINTEXT to anyone who can "
                         "reach the port", ", ".join(self.tcp))

    @property
    def curve(self) -> bool:
        return self.store is not None

    def serve(self, sock: zmq.Socket, endpoint: str, track: bool = False) -> None:
        """Before `sock` binds `endpoint`: CURVE server on tcp unless insecure. `track`:
        its connections are closed when a key is revoked (see `cut_if_revoked`)."""
        if self.store is not None and locate.is_tcp(endpoint):
            sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.store.keys.secret)
            if track:
                self.tracked.append(Accepted(sock, endpoint))

    def tracks(self, sock: zmq.Socket) -> bool:
        """Whether a monitor of ours already watches `sock` (libzmq allows one)."""
        return any(t.watches(sock) for t in self.tracked)

    def cut_if_revoked(self) -> set[str]:
        """For sockets that cannot tell one key's connection from another: when a key
        was revoked, close every connection they hold (each admitted peer reconnects and
        resubscribes; the revoked one is refused)."""
        now = time.monotonic()
        if now < self._next_check:
            return set()
        self._next_check = now + CHECK_EVERY
        revoked = self.revoked()
        if revoked and self.tracked:
            cut = sum(t.cut_all() for t in self.tracked)
            self.log.warning("key(s) %s revoked: closed %d connections to re-admit them",
                             ", ".join(sorted(revoked)), cut)
        return revoked

    def revoked(self) -> set[str]:
        """Names revoked since last asked (the allow-list is re-read when it changed)."""
        return self.store.take_revoked() if self.store is not None else set()

    def status(self) -> dict:
        return {"tcp": self.tcp, "curve": self.curve, "insecure": self.insecure,
                **({"zap": self.zap.status()} if self.zap is not None else {})}

    def stop(self) -> None:
        """Before the process's sockets close (the monitors need them open)."""
        for tracked in self.tracked:
            tracked.stop()
        if self.zap is not None:
            with contextlib.suppress(Exception):
                self.zap.stop()
