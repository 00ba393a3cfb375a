"""A raw peer on a live suite's bus, for the trust tests: it says HELLO with the role
(and, for a service, the suite's secret) it is given, then sends whatever the test asks,
bodies the client library would never build included."""

from __future__ import annotations

import itertools
import time

import zmq

from cortex.protocol import locate, wire
from cortex.protocol.peer import make_socket, unique_name


class RawPeer:
    def __init__(self, home, role: str, name: str | None = None, secret: bool = False):
        self.home = home
        self.role = role
        self.name = name or unique_name(f"trust-{role}")
        self.secret = locate.secret_path(home).read_text().strip() if secret else None
        self.socket = make_socket(zmq.Context.instance(), zmq.DEALER)
        self.socket.connect(f"ipc://{home}/run/bus.sock")
        self.corrs = (f"c{i}".encode() for i in itertools.count())
        self.welcome = self.hello()

    def hello(self, timeout: float = 20.0) -> dict:
        """The broker's answer to our HELLO: WELCOME's body, or the ERROR's."""
        body = {"role": self.role, "name": self.name, "version": wire.VERSION}
        if self.secret is not None:
            body["secret"] = self.secret
        self.socket.send_multipart(wire.frames(wire.HELLO, wire.BROKER, b"hello", body))
        msg = self.receive(lambda m: m.type in (wire.WELCOME, wire.ERROR), timeout)
        return {"type": msg.type.decode(), **msg.decoded()}

    def beat(self) -> None:
        """A heartbeat, so the broker keeps a worker or service peer alive."""
        self.socket.send_multipart(wire.frames(wire.HEARTBEAT, wire.BROKER))

    def receive(self, wanted, timeout: float) -> wire.Message:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(min(left, 0.3) * 1000):
                if left <= 0:
                    raise AssertionError(f"{self.name}: nothing wanted within {timeout} s")
                self.beat()
                continue
            msg = wire.parse(self.socket.recv_multipart())
            if msg.type == wire.HEARTBEAT and msg.corr:  # a probe: echo it, as links do
                self.socket.send_multipart(wire.frames(wire.HEARTBEAT, wire.BROKER, msg.corr))
                continue
            if msg.type == wire.WHO:  # the broker forgot us (silent too long): say it again
                self.hello()
                continue
            if wanted(msg):
                return msg

    def request(self, dest: str, body, timeout: float = 30.0) -> tuple[bytes, dict]:
        """(REPLY or ERROR, its body) for one REQUEST."""
        corr = next(self.corrs)
        self.beat()
        self.socket.send_multipart(wire.frames(wire.REQUEST, dest.encode(), corr, body))
        msg = self.receive(lambda m: m.type in (wire.REPLY, wire.ERROR) and m.corr == corr,
                           timeout)
        return msg.type, msg.decoded()

    def notify(self, dest: str, body) -> None:
        self.beat()
        self.socket.send_multipart(wire.frames(wire.NOTIFY, dest.encode(), b"", body))

    def close(self) -> None:
        try:
            self.socket.send_multipart(wire.frames(wire.BYE, wire.BROKER))
        finally:
            self.socket.close(linger=100)
