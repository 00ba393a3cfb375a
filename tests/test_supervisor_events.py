"""supervisord process state changes in the event stream (services/supervisor_listener.py).

The protocol with a fake supervisord (pipes), and for real: a service killed -9 shows up
as supervisor events in the JSONL, in a `cortex tail` started before the kill, and in
PostgreSQL when it is configured.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import zmq

from cortex.protocol import wire
from cortex.protocol.peer import make_socket
from cortex.protocol.publisher import EventPublisher
from cortex.services.listener.process import (
    OK,
    READY,
    EventParser,
    ProtocolError,
    SupervisorListener,
    to_event,
)

from .conftest import jsonl_events_of as jsonl_events
from .conftest import wait_for
from .pg import fresh_database, pg_server, postgres_url  # noqa: F401 (fixtures)


def envelope(eventname: str, payload: str, serial: int = 1) -> bytes:
    """What supervisord writes (len counts characters, see supervisor/process.py)."""
    return (f"ver:3.0 server:supervisor serial:{serial} pool:supervisor-events "
            f"poolserial:{serial} eventname:{eventname} len:{len(payload)}\n{payload}").encode()


# -- parsing ---------------------------------------------------------------------------


def test_parser_handles_split_and_joined_input():
    p1 = "processname:ledger groupname:ledger from_state:RUNNING expected:0 pid:4242"
    p2 = "processname:ledger groupname:ledger from_state:EXITED tries:0"
    data = envelope("PROCESS_STATE_EXITED", p1, 7) + envelope("PROCESS_STATE_STARTING", p2, 8)
    parser = EventParser()
    got = []
    for i in range(len(data)):  # one byte at a time
        got += parser.feed(data[i:i + 1])
    assert [(h["eventname"], h["serial"], p) for h, p in got] == [
        ("PROCESS_STATE_EXITED", "7", p1), ("PROCESS_STATE_STARTING", "8", p2)]
    assert EventParser().feed(data) == got  # all at once
    assert parser.buf == bytearray() and parser.header is None


def test_parser_counts_characters_not_bytes():
    payload = "processname:dépôt groupname:dépôt from_state:STARTING pid:12"
    parser = EventParser()
    data = envelope("PROCESS_STATE_RUNNING", payload) + b"ver:3.0 eventname:X len:0\n"
    got = parser.feed(data[:-5]) + parser.feed(data[-5:])
    assert got[0][1] == payload
    assert got[1] == ({"ver": "3.0", "eventname": "X", "len": "0"}, "")


@pytest.mark.parametrize("garbage", [b"no length here\n", b"eventname:X len:-3\n",
                                     b"eventname:X len:abc\n", b"x" * 10_000])
def test_parser_refuses_garbage(garbage):
    with pytest.raises(ProtocolError):
        EventParser().feed(garbage)


@pytest.mark.parametrize("eventname, payload, type_, data", [
    ("PROCESS_STATE_STARTING", "processname:ledger groupname:ledger from_state:BACKOFF tries:2",
     "supervisor.process_starting",
     {"name": "ledger", "group": "ledger", "from_state": "BACKOFF", "pid": None,
      "expected": None, "tries": 2}),
    ("PROCESS_STATE_RUNNING", "processname:pool groupname:pool from_state:STARTING pid:99",
     "supervisor.process_running",
     {"name": "pool", "group": "pool", "from_state": "STARTING", "pid": 99, "expected": None}),
    ("PROCESS_STATE_BACKOFF", "processname:a groupname:g from_state:STARTING tries:1",
     "supervisor.process_backoff",
     {"name": "a", "group": "g", "from_state": "STARTING", "pid": None, "expected": None,
      "tries": 1}),
    ("PROCESS_STATE_STOPPING", "processname:a groupname:a from_state:RUNNING pid:5",
     "supervisor.process_stopping",
     {"name": "a", "group": "a", "from_state": "RUNNING", "pid": 5, "expected": None}),
    ("PROCESS_STATE_EXITED", "processname:a groupname:a from_state:RUNNING expected:0 pid:5",
     "supervisor.process_exited",
     {"name": "a", "group": "a", "from_state": "RUNNING", "pid": 5, "expected": False}),
    ("PROCESS_STATE_EXITED", "processname:a groupname:a from_state:STOPPING expected:1 pid:5",
     "supervisor.process_exited",
     {"name": "a", "group": "a", "from_state": "STOPPING", "pid": 5, "expected": True}),
    ("PROCESS_STATE_FATAL", "processname:a groupname:a from_state:BACKOFF",
     "supervisor.process_fatal",
     {"name": "a", "group": "a", "from_state": "BACKOFF", "pid": None, "expected": None}),
    ("PROCESS_STATE_UNKNOWN", "processname:a groupname:a from_state:RUNNING",
     "supervisor.process_unknown",
     {"name": "a", "group": "a", "from_state": "RUNNING", "pid": None, "expected": None}),
    ("PROCESS_STATE_STOPPED", "processname:a groupname:a from_state:STOPPING pid:5",
     "supervisor.process_stopped",
     {"name": "a", "group": "a", "from_state": "STOPPING", "pid": 5, "expected": None}),
])
def test_every_process_state_becomes_an_event(eventname, payload, type_, data):
    got_type, got = to_event({"eventname": eventname, "serial": "3"}, payload)
    assert got_type == type_
    assert got == {**data, "serial": 3}


def test_other_events_are_not_forwarded():
    assert to_event({"eventname": "TICK_5"}, "when:123") is None
    assert to_event({"eventname": "PROCESS_STATE"}, "") is None


# -- the loop, with a fake supervisord on pipes ----------------------------------------


class FakeSupervisord:
    """Pipes standing in for supervisord: we write the listener's stdin, read its stdout."""

    def __init__(self):
        self.in_r, self.in_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.stdout = os.fdopen(out_w, "wb")
        self.buf = b""

    def send(self, data: bytes) -> None:
        os.write(self.in_w, data)

    def expect(self, token: bytes, timeout: float = 5.0) -> float:
        """Wait for `token` from the listener; return how long it took."""
        start = time.monotonic()
        while token not in self.buf:
            left = timeout - (time.monotonic() - start)
            if left <= 0 or not select.select([self.out_r], [], [], left)[0]:
                raise AssertionError(f"no {token!r} from the listener; got {self.buf!r}")
            self.buf += os.read(self.out_r, 4096)
        self.buf = self.buf[self.buf.index(token) + len(token):]
        return time.monotonic() - start

    def close(self):
        os.close(self.in_w)
        os.close(self.out_r)
        self.stdout.close()
        os.close(self.in_r)


@pytest.fixture
def endpoint():
    d = Path(tempfile.mkdtemp(prefix="cxl", dir="/tmp"))
    yield f"ipc://{d}/events-in.sock"
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def start_listener(ctx, endpoint, fake, state_path=None):
    publisher = EventPublisher(ctx, endpoint, "supervisor", time.time_ns())
    listener = SupervisorListener(fake.in_r, fake.stdout, publisher, state_path)
    listener.load_state()
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    return listener, thread


def stop_listener(listener, thread):
    listener.request_stop()
    thread.join(5)
    assert not thread.is_alive()
    listener.close()


EXITED = "processname:ledger groupname:ledger from_state:RUNNING expected:0 pid:4242"


def test_answers_at_once_with_no_router_and_delivers_when_it_comes(endpoint, tmp_path):
    ctx = zmq.Context()
    fake = FakeSupervisord()
    state = tmp_path / "supervisor-events.json"
    listener, thread = start_listener(ctx, endpoint, fake, state)
    try:
        fake.expect(READY)
        # No router at all: every event is still answered at once.
        for serial in range(1, 21):
            fake.send(envelope("PROCESS_STATE_EXITED", EXITED, serial))
            assert fake.expect(OK) < 1.0
            fake.expect(READY)
        fake.send(envelope("TICK_5", "when:1", 21))  # not ours: answered, not forwarded
        fake.expect(OK + READY)
        assert listener.forwarded == 20 and listener.ignored == 1
        wait_for(lambda: state.exists() and len(json.loads(state.read_text())
                                                 ["unacked_events"]) == 20, 5, "kept on disk")
        # Now a router: it gets the backlog on the next resend, and acknowledges it.
        router = make_socket(ctx, zmq.ROUTER)
        router.bind(endpoint)
        got = {}
        deadline = time.monotonic() + 10
        while len(got) < 20 and time.monotonic() < deadline:
            if not router.poll(200):
                continue
            sender, *frames = router.recv_multipart()
            for ev in wire.parse(frames).decoded()["events"]:
                got[ev["seq"]] = ev
                upto = max(got)
            router.send_multipart([sender, *wire.frames(wire.ACK, b"events", b"", {
                "source": "supervisor", "epoch": ev["epoch"], "upto": upto})])
        assert sorted(got) == list(range(1, 21))
        ev = got[1]
        assert ev["type"] == "supervisor.process_exited" and ev["source"] == "supervisor"
        assert ev["id"] == f"supervisor:{ev['epoch']}:1"
        assert ev["data"] == {"name": "ledger", "group": "ledger", "from_state": "RUNNING",
                              "pid": 4242, "expected": False, "serial": 1}
        wait_for(lambda: listener.publisher.unacked == 0, 5, "acknowledged")
        wait_for(lambda: json.loads(state.read_text())["unacked_events"] == [], 5,
                 "the state file emptied")
        router.close(linger=0)
    finally:
        stop_listener(listener, thread)
        fake.close()
        ctx.term()


def test_unacknowledged_events_survive_a_listener_restart(endpoint, tmp_path):
    ctx = zmq.Context()
    state = tmp_path / "supervisor-events.json"
    fake = FakeSupervisord()
    listener, thread = start_listener(ctx, endpoint, fake, state)
    try:
        fake.expect(READY)
        fake.send(envelope("PROCESS_STATE_EXITED", EXITED, 1))
        fake.expect(OK + READY)
    finally:
        stop_listener(listener, thread)
        fake.close()
    kept = json.loads(state.read_text())["unacked_events"]
    assert [e["type"] for e in kept] == ["supervisor.process_exited"]
    # A new incarnation re-sends it first, under its original id.
    router = make_socket(ctx, zmq.ROUTER)
    router.bind(endpoint)
    fake = FakeSupervisord()
    listener, thread = start_listener(ctx, endpoint, fake, state)
    try:
        assert router.poll(5000)
        _sender, *frames = router.recv_multipart()
        events = wire.parse(frames).decoded()["events"]
        assert [e["id"] for e in events] == [kept[0]["id"]]
    finally:
        stop_listener(listener, thread)
        fake.close()
        router.close(linger=0)
        ctx.term()


def test_a_protocol_error_is_answered_with_fail_and_ready(endpoint):
    ctx = zmq.Context()
    fake = FakeSupervisord()
    listener, thread = start_listener(ctx, endpoint, fake)
    try:
        fake.expect(READY)
        fake.send(b"garbage without a length\n")
        fake.expect(b"RESULT 4\nFAIL" + READY)
        fake.send(envelope("PROCESS_STATE_EXITED", EXITED, 2))
        fake.expect(OK + READY)
        assert listener.forwarded == 1
    finally:
        stop_listener(listener, thread)
        fake.close()
        ctx.term()


# -- for real --------------------------------------------------------------------------


def supervisor_events(home, name: str) -> list[dict]:
    return [e for e in jsonl_events(home)
            if e["type"].startswith("supervisor.") and e["data"].get("name") == name]


def crash_and_restart(events: list[dict], old_pid: int) -> bool:
    """An unexpected exit of `old_pid`, then RUNNING again under another pid."""
    exited = [i for i, e in enumerate(events) if e["type"] == "supervisor.process_exited"
              and e["data"]["pid"] == old_pid and e["data"]["expected"] is False]
    return bool(exited) and any(
        e["type"] == "supervisor.process_running" and e["data"]["pid"] not in (None, old_pid)
        for e in events[exited[0]:])


class TailReader:
    """`cortex tail --json` in a subprocess, its lines collected by a thread."""

    def __init__(self, home, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cortex.services.cli", "--home", str(home), "tail",
             "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            if line.strip():
                self.lines.append(json.loads(line))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(5)
        return self.proc.stderr.read()


def test_service_killed_shows_in_jsonl_and_in_tail(suites):
    suite = suites.start(workers=1)
    # The services' starts were seen: the listener starts first (priority 5).
    for name in ("broker", "events", "ledger", "scheduler", "pool"):
        wait_for(lambda n=name: any(e["type"] == "supervisor.process_running"
                                    for e in supervisor_events(suite.home, n)), 20,
                 f"{name}'s start in the event stream")
    listener = {p["name"]: p for p in suite.processes()}["supervisor-events"]
    assert listener["statename"] == "RUNNING"
    # --count counts live events only; --last covers a subscription still on its way.
    tail = TailReader(suite.home, "--type", "supervisor.", "--last", "100", "--count", "3")
    time.sleep(1.0)  # let it start and subscribe (--last covers a late one anyway)
    old = {p["name"]: p for p in suite.processes()}["ledger"]["pid"]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: crash_and_restart(supervisor_events(suite.home, "ledger"), old), 30,
             "ledger's crash and restart in the JSONL")
    try:
        wait_for(lambda: crash_and_restart(
            [e for e in tail.lines if e["data"].get("name") == "ledger"], old), 30,
            "ledger's crash and restart in `cortex tail`")
    finally:
        err = tail.stop()
    assert "Traceback" not in err
    assert all(e["type"].startswith("supervisor.") for e in tail.lines)
    exited = next(e for e in tail.lines if e["type"] == "supervisor.process_exited")
    assert exited["source"] == "supervisor"
    assert exited["data"]["group"] == "ledger" and exited["data"]["from_state"] == "RUNNING"
    suites.seen(suite)


@pytest.mark.heavy  # a service killed or restarted: CI's second pass
@pytest.mark.postgres
def test_service_killed_shows_in_postgres(suites, postgres_url):  # noqa: F811
    import psycopg

    url = fresh_database(postgres_url, f"sup_{uuid.uuid4().hex[:12]}")
    suite = suites.start(workers=1, extra=f"[events]\npostgres_url = {json.dumps(url)}\n")
    # The suite answers before supervisord calls its programs RUNNING (startsecs=1, seen
    # on its next turn): a kill before that is a start that failed (BACKOFF), not a crash.
    old = wait_for(lambda: (p := {x["name"]: x for x in suite.processes()}["scheduler"])
                   ["statename"] == "RUNNING" and p["pid"], 20, "the scheduler RUNNING")
    os.kill(old, signal.SIGKILL)

    def in_db():
        with psycopg.connect(url, connect_timeout=5) as conn:
            try:
                rows = conn.execute(
                    "SELECT type, data FROM cortex_events WHERE source = 'supervisor'"
                    " AND data->>'name' = 'scheduler' ORDER BY seq").fetchall()
            except psycopg.errors.UndefinedTable:  # the router has not made its table yet
                return None
        return crash_and_restart([{"type": t, "data": d} for t, d in rows], old)

    wait_for(in_db, 30, "the scheduler's crash and restart in PostgreSQL")
    suites.seen(suite)

