"""A worker's or client's end of the scheduler's direct line (the scheduler's end, and
why there is one: services/runtime/direct.py).

The scheduler offers the line through the bus (to a worker, `worker.direct {token}`; a
client asks for it, `line.open`); the peer connects a DEALER to `run/work.sock`, says
HELLO with its name, role and the token, and once WELCOMEd sends everything for the
scheduler on it, and hears the scheduler's orders and answers on it. A WHO or a refused
HELLO (the scheduler restarted, forgot an idle client, or the token is stale) closes the
line: the peer goes back to the bus and asks again later.
"""

from __future__ import annotations

import time

import zmq

from . import locate, wire
from .peer import LINGER_MS, make_socket, parse_or_drop, recv_frames, send_frames

SCHEDULER = b"scheduler"
HELLO_CORR = b"direct-hello"
LINE_PATIENCE = 5.0  # seconds a HELLO may go unanswered before the worker asks again


class DirectLink:
    def __init__(self, ctx: zmq.Context, endpoint: str, name: str, token: str,
                 role: str = "worker"):
        self.socket = make_socket(ctx, zmq.DEALER)
        self.socket.connect(endpoint)
        self.welcomed = False
        self.closed = False  # refused or told WHO: the owner drops it
        self.dropped = 0
        send_frames(self.socket, wire.frames(wire.HELLO, SCHEDULER, HELLO_CORR, {
            "role": role, "name": name, "version": wire.VERSION, "token": token}))

    def send_frames(self, frames: list) -> bool:
        """Send a message meant for the scheduler; False when the line cannot take it
        (not welcomed yet, or its queue is full): send it over the bus."""
        if not self.welcomed:
            return False
        try:
            send_frames(self.socket, frames)
            return True
        except zmq.Again:
            return False

    def receive(self) -> wire.Message | None:
        """One message from the scheduler, or None (none waits, or it was the line's
        own: WELCOME, WHO, a refused HELLO)."""
        parts = recv_frames(self.socket)
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
        """`bye`: tell the scheduler first (a client closing), so it forgets us now."""
        if bye and self.welcomed:
            try:
                send_frames(self.socket, wire.frames(wire.BYE, SCHEDULER))
            except zmq.ZMQError:
                pass
        self.socket.close(linger=LINGER_MS if bye else 0)


class SchedulerLine:
    """A worker's use of the line: offered, taken, dropped. Registers the link's socket
    with the worker's pollers while there is one."""

    def __init__(self, ctx: zmq.Context, bus_endpoint: str, name: str,
                 pollers: tuple[zmq.Poller, ...]):
        self.endpoint = locate.direct_endpoint(bus_endpoint)  # None: not on this machine
        self.ctx, self.name, self.pollers = ctx, name, pollers
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
        self.link = DirectLink(self.ctx, self.endpoint, self.name, token)
        self.since = time.monotonic()
        for poller in self.pollers:
            poller.register(self.link.socket, zmq.POLLIN)

    def drop(self) -> None:
        """Back to the bus alone (the scheduler restarted, or refused the line)."""
        if self.link is not None:
            for poller in self.pollers:
                poller.unregister(self.link.socket)
            self.link.close()
            self.link = None

    def send(self, type_: bytes, corr: bytes, body: dict) -> bool:
        return self.on and self.link.send_frames(wire.frames(type_, SCHEDULER, corr, body))

    def send_frames(self, frames: list) -> bool:
        return self.on and frames[2] == SCHEDULER and self.link.send_frames(frames)

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
