"""A cap on the connections a listening socket accepts, so running out of file
descriptors refuses connections instead of aborting the process (libzmq aborts the
whole process when an ipc listener hits EMFILE).

A thread reads the socket's monitor: every accepted connection is counted, every
disconnect uncounted, and a connection accepted past the cap is shut down at once (a
`shutdown()` on a duplicate of its descriptor: libzmq sees end-of-file and closes it
cleanly). The peer's library reconnects later; by then room may have come back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import threading

import zmq

from cortex.protocol.peer import recv_monitor_event

log = logging.getLogger(__name__)

HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
RESERVE_FDS = 256  # descriptors kept for files, journals and outgoing connections


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def default_cap() -> int:
    """Half the descriptors this process may open, less a reserve (at least 16): room
    for a burst of connections faster than the monitor can refuse them."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft // 2 - RESERVE_FDS)


class SocketMonitor(threading.Thread):
    """A thread reading one listening socket's monitor (libzmq allows one per socket) and
    handing each event to `on_event`; `stop()` before the socket closes."""

    def __init__(self, sock: zmq.Socket, events: int, name: str):
        super().__init__(name=name, daemon=True)
        self._sock = sock
        self._monitor = sock.get_monitor_socket(events | zmq.EVENT_MONITOR_STOPPED)
        self.start()

    def watches(self, sock: zmq.Socket) -> bool:
        return self._sock is sock

    def on_event(self, kind: int, value: int) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            while True:
                try:
                    kind, value = recv_monitor_event(self._monitor)
                except zmq.ZMQError:
                    return
                if kind == zmq.EVENT_MONITOR_STOPPED:
                    return
                self.on_event(kind, value)
        finally:
            self._monitor.close(linger=0)

    def stop(self) -> None:
        """Before the socket closes: end the monitor (the thread exits on its own)."""
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self.join(timeout=2)


class ConnectionGuard(SocketMonitor):
    """Counts the connections `sock` accepted and refuses those past `cap`."""

    def __init__(self, sock: zmq.Socket, cap: int, label: str):
        self.cap = cap
        self.label = label
        self.open = 0
        self.refused = 0
        self.handshake_failed = 0  # on tcp with CURVE: plaintext, unknown or wrong keys
        super().__init__(sock, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED,
                         f"connections-{label}")

    def on_event(self, kind: int, value: int) -> None:
        if kind & HANDSHAKE_FAILED:
            self.handshake_failed += 1
        elif kind == zmq.EVENT_DISCONNECTED:
            self.open = max(0, self.open - 1)
        elif kind == zmq.EVENT_ACCEPTED:
            self.open += 1
            if self.open > self.cap:
                self.refused += 1
                shut_connection(value)
                if self.refused in (1, 100, 10_000):
                    log.warning("%s: %d connections, above the cap of %d: refusing "
                                "(%d refused so far)", self.label, self.open, self.cap,
                                self.refused)

    def status(self) -> dict:
        return {"open": self.open, "cap": self.cap, "refused": self.refused,
                "handshake_failed": self.handshake_failed}


def shut_connection(fd: int) -> None:
    """Close a connection libzmq holds, from its descriptor: libzmq sees end-of-file."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    with contextlib.suppress(OSError):
        dup.shutdown(socket.SHUT_RDWR)
    dup.close()
