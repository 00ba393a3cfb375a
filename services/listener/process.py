"""supervisord event listener: process state changes into the Cortex event stream.

    python -m cortex.services.listener --home DIR

supervisord runs it as ``[eventlistener:supervisor-events]`` (events=PROCESS_STATE) and
talks to it over stdin/stdout (the eventlistener protocol): we write ``READY\\n``; it
sends one header line (``ver:3.0 server:supervisor serial:21 pool:supervisor-events
poolserial:10 eventname:PROCESS_STATE_EXITED len:71``) then a payload of ``len``
characters (``processname:ledger groupname:ledger from_state:RUNNING expected:0
pid:123``); we answer ``RESULT 2\\nOK`` and are READY again. supervisord sends nothing
else until then, so stdout carries only the protocol (logs go to stderr).

Each PROCESS_STATE_<STATE> becomes an event ``supervisor.process_<state>`` (source
``supervisor``) with data ``{name, group, from_state, pid, expected, tries}``, sent to
the event router through an `EventPublisher` (kept until acknowledged, re-sent after a
silence). The answer to supervisord never waits for the router: sends never block, and
events wait in the publisher while the router is down. Events not yet acknowledged are
written to ``state/supervisor-events.json`` before supervisord hears OK, so a listener
killed or restarted re-sends them (under their original ids: the router de-duplicates).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import zmq

from cortex.protocol import locate
from cortex.protocol.peer import own_keys, poll_ms
from cortex.protocol.publisher import EventPublisher
from cortex.services.runtime.durable import remove_temp_files
from cortex.services.runtime.entry import serve
from cortex.services.runtime.journal import read_snapshot, write_snapshot
from cortex.services.runtime.process import start_process, suite_secret

log = logging.getLogger("cortex.supervisor-events")

READY = b"READY\n"
OK = b"RESULT 2\nOK"
MAX_HEADER = 8192  # a header line longer than this is garbage
MAX_PAYLOAD = 1 << 20
STATE_FILE = "supervisor-events.json"


class ProtocolError(Exception):
    pass


def parse_tokens(text: str) -> dict[str, str]:
    """``a:1 b:2`` -> {"a": "1", "b": "2"} (a value may itself contain ':')."""
    out = {}
    for token in text.split():
        key, sep, value = token.partition(":")
        if sep:
            out[key] = value
    return out


def _payload_end(buf: bytes | bytearray, start: int, chars: int) -> int | None:
    """Offset after `chars` UTF-8 characters from `start`, or None if not all arrived.

    supervisord's ``len`` counts the characters of the payload string, which it then
    encodes as UTF-8: for ASCII the same as bytes, not for names with accents.
    """
    if chars == 0:
        return start
    end = start + chars
    if len(buf) < end:
        return None
    counted = sum(1 for b in buf[start:end] if b & 0xC0 != 0x80)
    i = end
    while counted < chars:
        if i >= len(buf):
            return None
        if buf[i] & 0xC0 != 0x80:
            counted += 1
        i += 1
    while i < len(buf) and buf[i] & 0xC0 == 0x80:  # the last character's tail
        i += 1
    return i


class EventParser:
    """Incremental parser of what supervisord writes to a listener's stdin."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.header: dict[str, str] | None = None
        self.need = 0

    def feed(self, data: bytes) -> list[tuple[dict[str, str], str]]:
        """Add bytes; return the complete (header, payload) pairs now available."""
        self.buf += data
        out = []
        while True:
            if self.header is None:
                nl = self.buf.find(b"\n")
                if nl < 0:
                    if len(self.buf) > MAX_HEADER:
                        self.buf.clear()
                        raise ProtocolError("header line too long")
                    return out
                line = bytes(self.buf[:nl]).decode("utf-8", "replace")
                del self.buf[:nl + 1]
                header = parse_tokens(line)
                try:
                    need = int(header["len"])
                except (KeyError, ValueError):
                    raise ProtocolError(f"header without a valid len: {line[:200]!r}") from None
                if not 0 <= need <= MAX_PAYLOAD:
                    raise ProtocolError(f"payload length out of range: {need}")
                self.header, self.need = header, need
            end = _payload_end(self.buf, 0, self.need)
            if end is None:
                return out
            payload = bytes(self.buf[:end]).decode("utf-8", "replace")
            del self.buf[:end]
            out.append((self.header, payload))
            self.header = None


def to_event(header: dict[str, str], payload: str) -> tuple[str, dict] | None:
    """(event type, data) for a PROCESS_STATE_* notification, None for anything else."""
    name = header.get("eventname", "")
    prefix = "PROCESS_STATE_"
    if not name.startswith(prefix) or len(name) == len(prefix):
        return None
    fields = parse_tokens(payload.split("\n", 1)[0])

    def integer(key: str) -> int | None:
        try:
            return int(fields[key])
        except (KeyError, ValueError):
            return None

    expected = integer("expected")
    data = {
        "name": fields.get("processname"),
        "group": fields.get("groupname"),
        "from_state": fields.get("from_state"),
        "pid": integer("pid"),
        "expected": None if expected is None else bool(expected),
    }
    tries = integer("tries")
    if tries is not None:
        data["tries"] = tries
    if header.get("serial"):
        data["serial"] = integer_or_none(header["serial"])
    return f"supervisor.process_{name[len(prefix):].lower()}", data


def integer_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


class SupervisorListener:
    """The loop: answer supervisord at once, forward to the router in the background."""

    def __init__(self, stdin_fd: int, stdout, publisher: EventPublisher,
                 state_path: Path | None = None) -> None:
        self.stdin_fd = stdin_fd
        self.stdout = stdout  # binary, written then flushed
        self.publisher = publisher
        self.state_path = state_path
        self.parser = EventParser()
        self.stopping = False
        self.forwarded = 0
        self.ignored = 0
        self._saved_unacked = -1
        self.wake_r, self._wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- persistence of unacknowledged events ---------------------------------------------
    def load_state(self) -> None:
        if self.state_path is None:
            return
        remove_temp_files(self.state_path.parent, self.state_path.name)
        snap, why = read_snapshot(self.state_path)
        if why:
            log.error("%s unreadable (%s): starting without it", self.state_path, why)
        events = [e for e in (snap or {}).get("unacked_events", []) if isinstance(e, dict)]
        if events:
            log.info("re-sending %d events of an earlier run", len(events))
            self.publisher.requeue(events)

    def save_state(self, force: bool = False) -> None:
        if self.state_path is None:
            return
        n = self.publisher.unacked
        if n == self._saved_unacked and not force:
            return
        try:
            write_snapshot(self.state_path, {"unacked_events": self.publisher.unacked_events(),
                                             "written_at": time.time()})
            self._saved_unacked = n
        except OSError as e:
            log.error("cannot save unacknowledged events: %s", e)

    # -- protocol -------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        self.stdout.write(data)
        self.stdout.flush()

    def handle(self, header: dict[str, str], payload: str) -> None:
        converted = to_event(header, payload)
        if converted is None:
            self.ignored += 1
            return
        type_, data = converted
        self.publisher.emit(type_, data)
        self.publisher.flush()  # NOBLOCK: never waits for the router
        self.forwarded += 1
        log.info("%s %s (from %s, pid %s, expected %s)", type_, data["name"],
                 data["from_state"], data["pid"], data["expected"])

    def on_input(self, data: bytes) -> None:
        try:
            events = self.parser.feed(data)
        except ProtocolError as e:
            # Out of step with supervisord: say so and start over with a fresh READY.
            log.error("protocol error: %s", e)
            self.parser = EventParser()
            self.write(b"RESULT 4\nFAIL" + READY)
            return
        for header, payload in events:
            try:
                self.handle(header, payload)
            except Exception:  # noqa: BLE001 - one bad event must not stop supervisord's
                log.exception("could not forward %s", header.get("eventname"))
            self.save_state()  # on disk before supervisord hears OK (a small file, rare)
            self.write(OK + READY)

    def request_stop(self, *_args) -> None:
        self.stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def run(self, max_turns: int | None = None) -> None:
        poller = zmq.Poller()
        poller.register(self.stdin_fd, zmq.POLLIN)
        poller.register(self.publisher.socket, zmq.POLLIN)
        poller.register(self.wake_r.fileno(), zmq.POLLIN)
        self.write(READY)
        turns = 0
        while not self.stopping:
            turns += 1
            if max_turns is not None and turns > max_turns:
                break
            timeout = self.publisher.tick(time.monotonic())
            ready = dict(poller.poll(poll_ms(timeout)))
            if self.publisher.socket in ready:
                self.publisher.on_message()
            if self.wake_r.fileno() in ready:
                try:
                    while self.wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            if self.stdin_fd in ready:
                data = os.read(self.stdin_fd, 65536)
                if not data:
                    log.info("stdin closed: supervisord is gone")
                    break
                self.on_input(data)
            self.save_state()
        self.finish()

    def finish(self, grace: float = 0.1) -> None:
        """Give the router a moment to acknowledge, then keep the rest for next time."""
        deadline = time.monotonic() + grace
        self.publisher.flush()
        while self.publisher.unacked and time.monotonic() < deadline:
            if self.publisher.socket.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                self.publisher.on_message()
        self.save_state(force=True)

    def close(self) -> None:
        self.publisher.close()
        self.wake_r.close()
        self._wake_w.close()


class ListenerProcess:
    """The listener as supervisord runs it: stdin/stdout to supervisord, a publisher to
    the event router, and its unacknowledged events kept under state/."""

    def __init__(self, home=None):
        logging.basicConfig(
            level=os.environ.get("CORTEX_LOG_LEVEL", "INFO"), stream=sys.stderr,
            format="%(asctime)s supervisor-events[%(process)d] %(levelname)s %(message)s")
        self.home = locate.find_home(home)
        start_process(self.home)  # a private umask; a bad configuration: exit 8
        self.ctx = zmq.Context()
        endpoint = locate.endpoints(self.home)["events_in"]
        publisher = EventPublisher(self.ctx, endpoint, "supervisor", time.time_ns(),
                                   secret=suite_secret(self.home),
                                   keys=own_keys(self.home, endpoint))
        self.listener = SupervisorListener(sys.stdin.fileno(), sys.stdout.buffer, publisher,
                                           self.home / "state" / STATE_FILE)

    def run(self) -> None:
        listener = self.listener
        signal.set_wakeup_fd(listener._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, listener.request_stop)
        signal.signal(signal.SIGINT, listener.request_stop)
        listener.load_state()
        log.info("forwarding supervisord process events for %s", self.home)
        try:
            listener.run()
        finally:
            signal.set_wakeup_fd(-1)
            listener.close()
            self.ctx.term()
            log.info("stopped: %d events forwarded, %d ignored", listener.forwarded,
                     listener.ignored)


def main(argv=None) -> None:
    serve("cortex-supervisor-events", __doc__, ListenerProcess, argv)
