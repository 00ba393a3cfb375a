"""One peer's link to the broker: socket options, hello, heartbeats both ways, re-hello.

Used by every service, worker and client so the connection rules live in one place.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket as _socket
import struct
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from . import errors, locate, wire

log = logging.getLogger(__name__)

LINGER_MS = 200  # never the infinite default: a context must always terminate
HELLO_CORR = b"hello"  # the broker answers a refused HELLO on this correlation id
HWM = 200_000
# After answering the broker's HEARTBEAT, a peer sends one of its own only if the broker
# has not beaten again within this many intervals.
ANSWERED_BEAT_SLACK = 1.5
BUSY_BODY = wire.encode_body({"busy": True})  # a worker's beat: it took work since the last


def make_socket(ctx: zmq.Context, kind: int, *, name: str | None = None) -> zmq.Socket:
    """A socket with the options every Cortex socket needs: never an infinite linger, a
    size backstop, bounded queues and quick reconnects."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAXMSGSIZE_BACKSTOP)
    sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if name is not None:
        sock.setsockopt(zmq.ROUTING_ID, name.encode())
    return sock


# -- CurveZMQ on tcp ------------------------------------------------------------------------
Z85_KEY_CHARS = 40  # a 32-byte Curve25519 key in Z85
ZAP_DOMAIN = b"cortex"


class KeyFileError(errors.CortexError):
    code = "bad_key"


@dataclass(frozen=True)
class CurveKeys:
    """A peer's key pair and the suite's public key it expects (Z85 text)."""
    public: bytes
    secret: bytes
    server: bytes
    name: str = ""
    path: str = ""


def _z85_key(value, what: str, path: Path) -> bytes:
    if not isinstance(value, str) or len(value) != Z85_KEY_CHARS:
        raise KeyFileError(f"{path}: {what} must be a {Z85_KEY_CHARS}-character Z85 key")
    try:
        z85.decode(value)
    except (ValueError, KeyError, TypeError):
        raise KeyFileError(f"{path}: {what} is not valid Z85") from None
    return value.encode()


def read_key_file(path: str | os.PathLike) -> CurveKeys:
    """A key file as `cortex keys make` writes it: TOML with name, public, secret and
    server (the suite's public key). Refused when others may read it."""
    path = Path(path)
    try:
        info = path.stat()
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read the key file {path}: {e}") from None
    if info.st_mode & 0o077:
        raise KeyFileError(f"the key file {path} is readable by others (mode "
                           f"{info.st_mode & 0o777:o}): chmod 600 it")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise KeyFileError(f"{path}: not a key file ({e})") from None
    if not raw.get("server"):
        raise KeyFileError(f"{path}: no server key: add the suite's public key as "
                           "server = \"...\" (`cortex keys list` on the suite shows it)")
    return CurveKeys(_z85_key(raw.get("public"), "public", path),
                     _z85_key(raw.get("secret"), "secret", path),
                     _z85_key(raw.get("server"), "server", path),
                     str(raw.get("name", "")), str(path))


def keys_for(home: Path, endpoint: str, key_file: str | os.PathLike | None = None,
             ) -> CurveKeys | None:
    """The keys to connect to `endpoint` with: none for ipc; on tcp the key file named
    here, else the home's (`locate.key_file`), else None (plaintext)."""
    if not locate.is_tcp(endpoint):
        return None
    path = Path(key_file).expanduser() if key_file else locate.key_file(home)
    return read_key_file(path) if path is not None else None


def own_keys(home: Path, endpoint: str) -> CurveKeys | None:
    """The suite's own processes connect with the suite's key pair (on tcp, when the
    suite has one: without it, it serves in plaintext under insecure_tcp)."""
    path = locate.suite_key_path(home)
    return read_key_file(path) if locate.is_tcp(endpoint) and path.exists() else None


def use_keys(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    """Make `sock` a CURVE client of the suite (before it connects)."""
    if keys is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


_monitors = itertools.count()
_MONITOR_FRAME = struct.Struct("=Hi")
_HANDSHAKE_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def recv_monitor_event(monitor: zmq.Socket, flags: int = 0) -> tuple[int, int]:
    """(event, value) of the next message of a socket monitor: a 16-bit event and a 32-bit
    value, then the endpoint (zmq_socket_monitor). pyzmq's own reader comes with asyncio,
    which would be loaded into every process for this alone."""
    frames = monitor.recv_multipart(flags)
    if len(frames) != 2 or len(frames[0]) != 6:
        raise RuntimeError(f"not a socket monitor message: {frames!r}")
    event, value = _MONITOR_FRAME.unpack(frames[0])
    return event, value


class HandshakeWatch:
    """Reads a tcp connection's monitor so a failure can name its cause: the suite's key
    is not the one expected, the suite does not admit our key, or it wants CURVE."""

    def __init__(self, sock: zmq.Socket, endpoint: str, keys: CurveKeys | None):
        self.endpoint = endpoint
        self.keys = keys
        self.connected = False
        self.succeeded = False
        self.problem: str | None = None
        self._rank = 0  # how telling the problem's cause is (see _cause)
        self._monitor = sock.get_monitor_socket(
            _HANDSHAKE_EVENTS, addr=f"inproc://cortex-handshake-{os.getpid()}-{next(_monitors)}")

    def read(self) -> str | None:
        """Take the events waiting; the last failure's cause, None after a success."""
        while self._monitor.poll(0):
            try:
                kind, value = recv_monitor_event(self._monitor, zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            # value: an fd or an error code
            if kind == zmq.EVENT_CONNECTED:
                self.connected = True
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded, self.problem, self._rank = True, None, 0
            elif kind & _HANDSHAKE_EVENTS:
                # A connection fails the same way each retry, but libzmq may report a
                # retry with less detail: the most telling cause seen is kept.
                rank, problem = self._cause(kind, value)
                if rank >= self._rank:
                    self._rank, self.problem = rank, problem
        return self.problem

    def _cause(self, kind: int, value: int) -> tuple[int, str]:
        if self.keys is None:
            return 3, (f"the suite at {self.endpoint} requires CurveZMQ keys: give a key "
                       "file (key_file=, $CORTEX_KEY_FILE or [bus] key_file)")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return 3, (f"not admitted: the suite at {self.endpoint} does not list the key "
                       f"{self.keys.name!r}{self._where()} (never added, or revoked)")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL \
                and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return 2, (f"the suite at {self.endpoint} serves in plaintext (insecure_tcp) "
                       "but this peer uses CurveZMQ keys")
        return 1, (f"server key mismatch: the suite at {self.endpoint} did not complete the "
                   f"CurveZMQ handshake with the server key{self._where()}")

    def _where(self) -> str:
        return f" in {self.keys.path}" if self.keys is not None and self.keys.path else ""

    def explain(self, error: errors.CortexError) -> errors.CortexError:
        """`error` (a call that heard nothing: Unavailable or Timeout) as Unavailable
        with its cause when the monitor knows it."""
        problem = self.read()
        if problem is None and not self.connected and not self.succeeded:
            problem = f"timeout: no connection to {self.endpoint} (nothing listening there?)"
        if problem is None:
            return error
        return errors.Unavailable(f"{problem} ({error})")

    def close(self) -> None:
        self._monitor.close(linger=0)


# pyzmq's send_multipart / recv_multipart combine flags as enum.Flag objects on every
# frame and look options up through enums: a third of the broker's time went there. The
# Cython socket's own methods with plain ints do the same work in half the time.
_Base = next(c for c in zmq.Socket.__mro__ if c.__module__.startswith("zmq.backend"))
_send, _recv, _get, _set = _Base.send, _Base.recv, _Base.get, _Base.set
_MORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_RCVTIMEO = int(zmq.RCVTIMEO)
_FOREVER_MS = -1
_MAX_WAIT_MS = 2**31 - 1


def send_frames(sock: zmq.Socket, frames: list, block: bool = False) -> None:
    """Send one multipart message; without `block`, raise zmq.Again rather than wait
    (libzmq sends a multipart message whole or not at all)."""
    flags = 0 if block else _NOBLOCK
    for frame in frames[:-1]:
        _send(sock, frame, _MORE | flags)
    _send(sock, frames[-1], flags)


def has_message(sock: zmq.Socket) -> bool:
    """Is a message waiting? Asking also re-arms the socket's fd (ZMQ_FD signals only
    "look again"), so an event loop watching that fd does not spin."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


def recv_frames(sock: zmq.Socket) -> list[bytes] | None:
    """One waiting multipart message, or None.

    Received straight away, never asked about first: asking (ZMQ_EVENTS) makes libzmq
    check its command pipe, a poll() and a getpid() per message, where a receive that
    finds a message makes none and only the last, empty one (zmq.Again) pays once per
    batch. That receive also re-arms the socket's fd, as asking would. Frames rather
    than bytes: a frame knows whether more follow (RCVMORE is an option lookup)."""
    try:
        frame = _recv(sock, _NOBLOCK, False)
    except zmq.Again:
        return None
    parts = [frame.bytes]
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False)
        parts.append(frame.bytes)
    return parts


def recv_with_first(sock: zmq.Socket) -> tuple[list[bytes], zmq.Frame] | None:
    """As `recv_frames`, with the first frame kept whole for its metadata (a ROUTER's
    routing id frame carries the connection's descriptor and any ZAP User-Id)."""
    try:
        first = _recv(sock, _NOBLOCK, False)
    except zmq.Again:
        return None
    parts, frame = [first.bytes], first
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False)
        parts.append(frame.bytes)
    return parts, first


class TimedReceiver:
    """Blocking receives with a deadline on one socket: a receive timeout (RCVTIMEO)
    costs the caller one wait on the socket, where a poll first would cost several."""

    def __init__(self, sock: zmq.Socket):
        self.socket = sock
        self._timeout_ms: int | None = None  # the RCVTIMEO set last (set only on change)

    def within(self, seconds: float | None) -> list[bytes] | None:
        """One multipart message, waiting at most `seconds` (None: as long as it takes),
        or None."""
        ms = poll_ms(seconds)
        ms = _FOREVER_MS if ms is None else min(ms, _MAX_WAIT_MS)
        sock = self.socket
        if ms != self._timeout_ms:
            _set(sock, _RCVTIMEO, ms)
            self._timeout_ms = ms
        try:
            frame = _recv(sock, 0, False)
        except zmq.Again:
            return None
        # Frames rather than bytes: a frame knows whether more follow, where asking the
        # socket (RCVMORE) costs an option lookup per frame.
        parts = [frame.bytes]
        while frame.more:
            frame = _recv(sock, _NOBLOCK, False)
            parts.append(frame.bytes)
        return parts


def parse_or_drop(parts: list, owner, source: str) -> wire.Message | None:
    """The message in `parts`, or None when it breaks the envelope (counted in
    `owner.dropped` and logged)."""
    try:
        return wire.parse(parts)
    except wire.ProtocolError as e:
        owner.dropped += 1
        log.warning("dropped a malformed message from %s: %s", source, e)
        return None


def poll_ms(seconds: float | None) -> int | None:
    """A zmq poll timeout from seconds: rounded up, because pyzmq truncates a float to
    whole milliseconds and a deadline 0.4 ms away would make the loop spin until it."""
    if seconds is None:
        return None
    return max(0, math.ceil(seconds * 1000))


def unique_name(prefix: str) -> str:
    host = _socket.gethostname().split(".")[0][:16] or "host"
    return f"{prefix}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class BusLink:
    """A DEALER to the broker that says hello and keeps the two-way heartbeat.

    The owner polls `socket`, passes what it receives to `accept()` (which consumes
    control traffic and returns the rest), and calls `tick()` from its loop; `tick()`
    returns the seconds until it needs to be called again.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, name: str, role: str,
                 interval: float = wire.HEARTBEAT_INTERVAL, heartbeat: bool = True,
                 secret: str | None = None, keys: CurveKeys | None = None):
        if not wire.valid_name(name):
            raise ValueError(f"invalid peer name {name!r}")
        self.name = name
        self.role = role
        self.interval = interval
        self.heartbeat = heartbeat
        self.secret = secret  # the suite's own processes prove themselves with it
        self.socket = make_socket(ctx, zmq.DEALER)
        use_keys(self.socket, keys)
        # On tcp a monitor tells why a handshake failed (the caller names it).
        self.handshake = HandshakeWatch(self.socket, endpoint, keys) \
            if locate.is_tcp(endpoint) else None
        self._told: str | None = None
        self.socket.connect(endpoint)
        now = time.monotonic()
        self.last_heard = now
        self.next_beat = now + interval
        # How long until the broker's next beat, as its last beat said (quiet peers are
        # beaten less often); the normal interval until one says otherwise.
        self.spacing = interval
        self.welcomed = False
        self.refused: str | None = None  # why the broker refused our HELLO, if it did
        self.dropped = 0  # malformed messages received and dropped
        self.busy = False  # a task was taken since our last beat (`working`)
        self.hello()

    def hello(self) -> None:
        body = {"role": self.role, "name": self.name, "version": wire.VERSION}
        if self.secret is not None:
            body["secret"] = self.secret
        self.send(wire.HELLO, wire.BROKER, HELLO_CORR, body)

    def send(self, type_: bytes, peer: bytes, corr: bytes = b"", body=None) -> bool:
        """Send without blocking; False when the outgoing queue is full."""
        try:
            send_frames(self.socket, wire.frames(type_, peer, corr, body))
            return True
        except zmq.Again:
            return False

    def accept(self, parts: list) -> wire.Message | None:
        """Consume control messages; return anything else for the owner."""
        msg = parse_or_drop(parts, self, "the broker")
        if msg is None:
            return None
        self.last_heard = now = time.monotonic()
        if msg.type == wire.HEARTBEAT:
            if msg.peer == wire.BROKER:
                self.spacing = self._announced_spacing(msg.body) if msg.body else self.interval
            beating = self.heartbeat and self.welcomed
            if beating or msg.corr:
                # Answered at once: the broker hears all its peers in one burst after its
                # own beat, not at as many moments as it has peers (each one a wake-up),
                # and the peer wakes once per interval, not twice. Our own timer only
                # fires if the broker falls silent. A probe's token (corr) is echoed by
                # every peer, clients too: it proves to the broker that we read all it
                # sent before the probe, which is how it bounds what waits for us.
                self.send(wire.HEARTBEAT, wire.BROKER, msg.corr, self._busy_body())
            if beating:
                self.next_beat = now + self.spacing * ANSWERED_BEAT_SLACK
            return None
        if msg.type == wire.WELCOME:
            self.welcomed, self.refused = True, None
            return None
        if msg.type == wire.ERROR and msg.corr == HELLO_CORR and msg.peer == wire.BROKER:
            try:
                self.refused = str(msg.decoded().get("message", "refused"))[:300]
            except wire.ProtocolError:
                self.refused = "refused"
            log.warning("the broker refused %s %s: %s", self.role, self.name, self.refused)
            return None
        if msg.type == wire.WHO:
            # The broker restarted and lost its table: introduce ourselves again.
            self.welcomed = False
            self.hello()
            return None
        return msg

    def working(self) -> None:
        """A worker took a task: its beats say so, as its calls through the broker would
        (the broker beats a peer without calls less often, and finds it lost later). A
        peer the broker thinks quiet says it at once, once per beat."""
        if not self.busy:
            self.busy = True
            if self.spacing > self.interval and self.welcomed:
                self.send(wire.HEARTBEAT, wire.BROKER, b"", BUSY_BODY)

    def _busy_body(self) -> bytes:
        busy, self.busy = self.busy, False
        return BUSY_BODY if busy else b""

    def _announced_spacing(self, body: bytes) -> float:
        """The seconds a quiet peer's beat says the next is away: at least our interval,
        at most MAX_BEAT_SPACING_MS; anything unreadable means the normal interval."""
        try:
            next_ms = wire.field_int(wire.decode_body(body), "next_ms", lo=1,
                                     hi=wire.MAX_BEAT_SPACING_MS)
        except wire.ProtocolError as e:
            self.dropped += 1
            log.warning("ignored a malformed heartbeat from the broker: %s", e)
            return self.interval
        return max(self.interval, next_ms / 1000)

    def receive(self) -> wire.Message | None:
        """Receive one message without blocking (None if none or it was control traffic)."""
        parts = recv_frames(self.socket)
        return None if parts is None else self.accept(parts)

    @property
    def broker_alive(self) -> bool:
        return time.monotonic() - self.last_heard < self.spacing * wire.HEARTBEAT_LIVENESS

    def tick(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if not self.heartbeat:
            return 3600.0
        if now >= self.next_beat:
            self.send(wire.HEARTBEAT, wire.BROKER, b"", self._busy_body())
            self.next_beat = now + self.interval
            self._tell_handshake_problem()
            if not self.broker_alive or not self.welcomed:
                # Silent broker, or no WELCOME yet (refused while a predecessor still
                # held our name, or the HELLO was lost): say hello again.
                self.hello()
        return max(0.0, self.next_beat - now)

    def _tell_handshake_problem(self) -> None:
        problem = self.handshake.read() if self.handshake is not None else None
        if problem is not None and problem != self._told:
            log.warning("%s %s cannot join: %s", self.role, self.name, problem)
        self._told = problem

    def explain(self, error: errors.CortexError) -> errors.CortexError:
        """A call's `Unavailable` with the handshake's cause when there is one."""
        return self.handshake.explain(error) if self.handshake is not None else error

    def close(self) -> None:
        try:
            self.send(wire.BYE, wire.BROKER)
        finally:
            if self.handshake is not None:
                self.handshake.close()
            self.socket.close(linger=LINGER_MS)
