"""A worker's or client's end of the scheduler's direct line (the scheduler's end, and
why there is one: services/runtime/direct.py).

The scheduler offers the line through the bus (to a worker, `worker.direct {token}`; a
client asks for it, `line.open`); the peer connects to `run/work.sock` (a Unix
`SOCK_SEQPACKET` socket: one datagram per message, no library thread in between), says
HELLO with its name, role and the token, and once WELCOMEd sends everything for the
scheduler on it, and hears the scheduler's orders and answers on it. A WHO, a refused
HELLO or the end of the connection (the scheduler restarted, forgot an idle client, or
the token is stale) closes the line: the peer goes back to the bus and asks again later.

A datagram is a message's six frames packed as one msgpack array of byte strings. One
that cannot go on the line (too large for the socket's buffer, or the buffer full) goes
over the bus instead.
"""

from __future__ import annotations

import errno
import mmap
import select
import socket
import time

import msgpack
import zmq

from . import locate, wire
from .peer import parse_or_drop, poll_ms

SCHEDULER = b"scheduler"
HELLO_CORR = b"direct-hello"
LINE_PATIENCE = 5.0  # seconds a HELLO may go unanswered before the worker asks again
# The largest datagram: a message at the envelope's limit and its framing. Received into
# a mapped buffer that costs memory only for the pages a message touches.
MAX_DATAGRAM = wire.MAX_MESSAGE_BYTES + 4096
_BYTES_ONLY = frozenset({bytes})


def pack(frames: list) -> bytes:
    return msgpack.packb(frames)


def unpack(data) -> list[bytes]:
    """The frames of one datagram; ProtocolError when it is not an array of byte strings."""
    try:
        parts = msgpack.unpackb(data)
    except Exception:  # msgpack's errors (ExtraData, FormatError, ValueError, ...)
        parts = None
    if type(parts) is not list or not _BYTES_ONLY.issuperset(map(type, parts)):
        raise wire.ProtocolError("bad_request", "a datagram on the direct line is an array "
                                                "of byte strings")
    return parts


def line_socket() -> socket.socket:
    """A non-blocking SOCK_SEQPACKET socket whose buffer holds the largest message (the
    kernel caps it at net.core.wmem_max: a larger message then goes over the bus)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_DATAGRAM)
    return sock


class Datagrams:
    """Receiving on one line socket: into a buffer of MAX_DATAGRAM, read without
    blocking; b"" is the end of the connection."""

    def __init__(self):
        self._buffer = memoryview(mmap.mmap(-1, MAX_DATAGRAM))

    def read(self, sock: socket.socket):
        """A view of the next datagram (valid until the next read), b"" at the end of the
        connection, None when none waits."""
        for _ in range(2):
            try:
                n = sock.recv_into(self._buffer)
            except BlockingIOError:
                return None
            except ConnectionResetError:
                # The peer closed with our messages unread in its end: the kernel says so
                # once, before what it sent us first, which is still there to read.
                continue
            except OSError:
                return b""
            return self._buffer[:n] if n else b""
        return b""


class DirectLink:
    def __init__(self, endpoint: str, name: str, token: str, role: str = "worker"):
        self.welcomed = False
        self.closed = False  # refused, told WHO, or the connection ended: the owner drops it
        self.dropped = 0
        self._datagrams = Datagrams()
        self._next: list | None = None  # frames read by `pending`, not yet received
        self.socket = line_socket()
        self._poll = select.poll()
        try:
            # Non-blocking: a full backlog refuses at once, and we stay on the bus.
            self.socket.connect(str(locate.ipc_path(endpoint)))
            self.socket.send(pack(wire.frames(wire.HELLO, SCHEDULER, HELLO_CORR, {
                "role": role, "name": name, "version": wire.VERSION, "token": token})))
        except OSError:
            self.closed = True
        self._poll.register(self.socket, select.POLLIN)

    def send_frames(self, frames: list) -> bool:
        """Send a message meant for the scheduler; False when the line cannot take it
        (not welcomed yet, too large, its buffer full, or closed): send it over the bus."""
        if not self.welcomed or self.closed:
            return False
        try:
            self.socket.send(pack(frames))
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if e.errno != errno.EMSGSIZE:
                self.closed = True  # the scheduler is gone
            return False

    def _read(self) -> list | None:
        """The frames of the next datagram, or None (none waits, malformed, or the
        connection ended: then `closed`)."""
        parts, self._next = self._next, None
        if parts is not None:
            return parts
        data = self._datagrams.read(self.socket)
        if data is None:
            return None
        if not data:
            self.closed = True
            return None
        try:
            return unpack(data)
        except wire.ProtocolError:
            self.dropped += 1
            return None

    def pending(self) -> bool:
        """Whether a message waits (read ahead, without blocking)."""
        if self._next is None:
            self._next = self._read()
        return self._next is not None

    def within(self, seconds: float | None) -> list | None:
        """The frames of one message, waiting at most `seconds` (None: as long as it
        takes), or None (none came, or the connection ended: `closed`)."""
        if self._next is None and not self.closed and not self._poll.poll(poll_ms(seconds)):
            return None
        return self._read()

    def receive(self) -> wire.Message | None:
        """One message from the scheduler, or None (none waits, or it was the line's
        own: WELCOME, WHO, a refused HELLO)."""
        parts = self._read()
        return None if parts is None else self.accept(parts)

    def accept(self, parts: list) -> wire.Message | None:
        """A received message for the owner, or None (the line's own, or malformed)."""
        msg = parse_or_drop(parts, self, "the scheduler's direct line")
        if msg is None:
            return None
        if msg.peer != SCHEDULER:
            self.dropped += 1
            return None
        if msg.type == wire.WELCOME:
            self.welcomed = True
            return None
        if msg.type == wire.WHO or (msg.type == wire.ERROR and not self.welcomed):
            self.welcomed, self.closed = False, True
            return None
        return msg

    def close(self, bye: bool = False) -> None:
        """`bye`: tell the scheduler first (a client closing), so it forgets us now (the
        connection's end says as much, a moment later)."""
        if bye and self.welcomed and not self.closed:
            try:
                self.socket.send(pack(wire.frames(wire.BYE, SCHEDULER)))
            except OSError:
                pass
        self.socket.close()



class SchedulerLine:
    """A worker's use of the line: offered, taken, dropped. Registers the link's socket
    with the worker's pollers while there is one."""

    def __init__(self, bus_endpoint: str, name: str, pollers: tuple):
        self.endpoint = locate.direct_endpoint(bus_endpoint)  # None: not on this machine
        self.name, self.pollers = name, pollers
        self.link: DirectLink | None = None
        self.since = 0.0

    @property
    def on(self) -> bool:
        return self.link is not None and self.link.welcomed

    def take(self, token) -> None:
        """The scheduler offers the line: say HELLO on it with the token."""
        if self.endpoint is None or not isinstance(token, str) or not 0 < len(token) <= 64:
            return
        self.drop()
        link = DirectLink(self.endpoint, self.name, token)
        if link.closed:  # no one listens (the scheduler restarting): offered again later
            link.close()
            return
        self.link, self.since = link, time.monotonic()
        for poller in self.pollers:
            poller.register(link.socket, zmq.POLLIN)

    def drop(self) -> None:
        """Back to the bus alone (the scheduler restarted, or refused the line)."""
        if self.link is not None:
            for poller in self.pollers:
                poller.unregister(self.link.socket)
            self.link.close()
            self.link = None

    def send(self, type_: bytes, corr: bytes, body: dict) -> bool:
        return self.on and self._sent(self.link.send_frames(
            wire.frames(type_, SCHEDULER, corr, body)))

    def send_frames(self, frames: list) -> bool:
        return self.on and frames[2] == SCHEDULER and self._sent(self.link.send_frames(frames))

    def _sent(self, sent: bool) -> bool:
        if not sent and self.link.closed:
            self.drop()  # the scheduler is gone: the next ready asks for a new offer
        return sent

    def pending(self) -> bool:
        return self.link is not None and self.link.pending()

    def receive(self) -> wire.Message | None:
        link = self.link
        if link is None:
            return None
        msg = link.receive()
        if link.closed:
            self.drop()  # the next ready or task heartbeat asks for a new offer
            return None
        return msg

    def asking(self, body: dict) -> dict:
        """A report's body, saying that we can take the line when we are not on it (a
        HELLO unanswered for LINE_PATIENCE is given up)."""
        if self.link is not None and not self.link.welcomed \
                and time.monotonic() - self.since > LINE_PATIENCE:
            self.drop()
        if self.endpoint is not None and self.link is None:
            body["direct"] = True
        return body
