"""PgSink against a real PostgreSQL (started by tests/pg.py; skipped if none can start).

The sink copies a JSONL log from a saved position; these tests write the log as the
event router does (EventLogWriter, then `written_to_log`)."""

from __future__ import annotations

import base64
import math
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson
import psycopg
import pytest

# `tests` is not a package; make `tests.pg` importable however pytest was launched.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortex.services.events.pgsink import PgSink, apply_migrations, sanitize  # noqa: E402
from cortex.services.runtime.eventlog import EventLogWriter  # noqa: E402
from cortex.services.runtime.pgevents import query_events  # noqa: E402
from tests.pg import fresh_database, pg_server, postgres_url  # noqa: E402, F401

pytestmark = pytest.mark.postgres

T0 = 1_732_770_000.0


def ev(n: int, **kw) -> dict:
    e = {
        "id": f"test:{n}",
        "source": "test",
        "epoch": 1,
        "seq": n,
        "ts": T0 + n,
        "type": "task.created",
        "trace": None,
        "task": None,
        "worker": None,
        "data": {"n": n},
    }
    e.update(kw)
    return e


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` until true or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        pause.wait(0.05)


class Log:
    """A JSONL event log in `directory`, written as the event router writes it."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.writer = EventLogWriter(directory, fsync="off")

    def write(self, events: list[dict], sink: PgSink | None = None) -> None:
        self.writer.append(events)
        self.writer.flush()
        if sink is not None:
            sink.written_to_log(len(events))

    def sink(self, url: str, **kw) -> PgSink:
        """A sink following this log from its beginning (or its saved position)."""
        return PgSink(url, self.directory, self.directory.parent / "pg-position.json",
                      from_start=True, **kw)


@pytest.fixture
def log(tmp_path):
    log = Log(tmp_path / "events")
    yield log
    log.writer.close()


@pytest.fixture
def db_url(postgres_url):  # noqa: F811 - the imported fixture
    """A fresh database per test, so counts are exact."""
    return fresh_database(postgres_url, f"t_{uuid.uuid4().hex[:12]}")


def rows(url: str, where: str = "true") -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT id, task, data FROM cortex_events WHERE {where}").fetchall()


def count_ids(url: str, ids: list[str]) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        got = conn.execute(
            "SELECT id, count(*) FROM cortex_events WHERE id = ANY(%s) GROUP BY id", (ids,)
        ).fetchall()
    return dict(got)


def test_migrations_twice_and_concurrently(db_url):
    with psycopg.connect(db_url) as conn:
        assert apply_migrations(conn) == 1
        assert apply_migrations(conn) == 1
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            with psycopg.connect(db_url) as c:
                apply_migrations(c)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT version FROM cortex_schema_version").fetchall() == [(1,)]
        idx = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes").fetchall()}
    assert {"cortex_events_type_ts", "cortex_events_task_ts", "cortex_events_worker_ts"} <= idx


def test_batches_and_idempotent_replay(db_url, log, tmp_path):
    events = [ev(i) for i in range(1, 1001)]
    sink = log.sink(db_url, batch_size=100, batch_interval=0.05)
    try:
        for i in range(0, 1000, 50):
            log.write(events[i : i + 50], sink)
        wait_until(lambda: sink.lag() == 0, 30, "first copy")
        log.write(events[:10] + events[:10], sink)  # duplicates inside one batch too
        wait_until(lambda: sink.lag() == 0, 30, "duplicates")
        st = sink.stats()
    finally:
        sink.close(5)
    assert st["inserted"] == 1000 and st["written"] == 1020
    assert 10 <= st["batches"] <= 60 and st["connected"] and st["quarantined"] == 0
    # A replay of the whole log (a lost position) inserts nothing twice.
    (tmp_path / "pg-position.json").unlink()
    with log.sink(db_url) as again:
        wait_until(lambda: again.lag() == 0, 30, "replay")
        assert again.stats()["inserted"] == 0 and again.stats()["written"] == 1020
    ids = [e["id"] for e in events]
    assert count_ids(db_url, ids) == dict.fromkeys(ids, 1)


def test_sanitize_fixes_every_refused_value():
    e = ev(
        1,
        task="t\x00ask",
        worker=42,
        data={"s": "a\x00b", "k\x00": 1, "big": 2**70, "neg": -(2**63) - 1, "ok": 2**63 - 1,
              "nan": math.nan, "inf": math.inf, "ninf": -math.inf, "deep": {"l": [b"by\x00tes"]},
              "sur": "x\ud800y"},
    )  # fmt: skip
    s = sanitize(e)
    assert s["task"] == "t\ufffdask" and s["worker"] == "42"
    d = s["data"]
    assert d["s"] == "a\ufffdb" and d["k\ufffd"] == 1
    assert d["big"] == str(2**70) and d["neg"] == str(-(2**63) - 1) and d["ok"] == 2**63 - 1
    assert (d["nan"], d["inf"], d["ninf"]) == ("NaN", "Infinity", "-Infinity")
    assert d["deep"] == {"l": ["by\ufffdtes"]} and d["sur"] == "x\ufffdy"
    assert e["data"]["s"] == "a\x00b"  # the input is not modified
    bad = sanitize({"id": "x", "seq": 2**64, "epoch": True, "ts": math.nan, "data": [1]})
    assert bad["seq"] is None and bad["epoch"] is None and bad["ts"] is None
    assert bad["data"] == {"value": [1]}


def test_refused_values_are_stored_not_quarantined(db_url, log):
    events = [
        ev(1, task="nul\x00task"),
        ev(2, data={"s": "\x00", "nested": {"x\x00": ["\x00"]}}),
        ev(3, data={"big": 2**70}),
        ev(4, data={"f": math.nan}),
        ev(5, ts=math.inf, seq=2**70),
    ]
    with log.sink(db_url, batch_interval=0.01) as sink:
        log.write(events, sink)
        wait_until(lambda: sink.lag() == 0, 30, "events stored")
        assert sink.stats()["quarantined"] == 0
    got = {r[0]: (r[1], r[2]) for r in rows(db_url)}
    assert got["test:1"][0] == "nul\ufffdtask"
    assert got["test:2"][1] == {"s": "\ufffd", "nested": {"x\ufffd": ["\ufffd"]}}
    assert got["test:3"][1] == {"big": str(2**70)}
    assert got["test:4"][1] == {"f": None}  # JSON has no NaN: the log holds null
    assert "test:5" in got


def test_row_that_still_fails_is_quarantined(db_url, log, tmp_path):
    # Nothing sanitize can fix: an indexed text value larger than a btree entry allows
    # (random hex does not compress), so PostgreSQL refuses it with error class 54.
    huge = ev(26, type=base64.b64encode(os.urandom(9000)).decode())
    events = [ev(i) for i in range(1, 26)] + [huge] + [ev(i) for i in range(27, 51)]
    qfile = tmp_path / "bad.jsonl"
    with log.sink(db_url, batch_size=100, quarantine_path=qfile) as sink:
        log.write(events, sink)
        wait_until(lambda: sink.lag() == 0, 30, "batch settled")
        st = sink.stats()
    assert st["quarantined"] == 1 and st["written"] == 49 and st["inserted"] == 49
    assert len(rows(db_url)) == 49
    (line,) = qfile.read_bytes().splitlines()
    record = orjson.loads(line)
    assert record["event"]["id"] == "test:26"
    assert "index row" in record["reason"]


def test_query_events_filters(db_url, log):
    events = [
        ev(1, type="task.created", task="a", trace="tr-a"),
        ev(2, type="worker.spawned", worker="w1"),
        ev(3, type="task.completed", task="a", worker="w1", data={"msg": "All GOOD 100%"}),
        ev(4, type="ledger.reserved", data={"tokens": 5}),
        ev(5, type="task_x", task="b"),
    ]
    with log.sink(db_url, batch_interval=0.01) as sink:
        log.write(events, sink)
        wait_until(lambda: sink.lag() == 0, 30, "events stored")

    def seqs(**kw) -> list[int]:
        return [e["seq"] for e in query_events(db_url, **kw)]

    assert seqs() == [1, 2, 3, 4, 5]
    assert seqs(since=T0 + 2, until=T0 + 4) == [2, 3]
    assert seqs(task="a") == [1, 3]
    assert seqs(type_pattern="task.*") == [1, 3]  # "_" in task_x is not a wildcard
    assert seqs(worker="w1") == [2, 3]
    assert seqs(text="all good 100%") == [3]
    assert seqs(limit=2) == [1, 2]
    assert seqs(limit=2, newest_first=True) == [5, 4]
    (one,) = query_events(db_url, task="a", type_pattern="*.completed")
    assert one == {**events[2], "ts": T0 + 3}


DEAD_URL = "postgresql://postgres@/postgres?host=/nonexistent-cortex&port=1"


def test_the_backlog_is_the_log_and_the_next_sink_copies_it(db_url, log, tmp_path):
    events = [ev(i) for i in range(1, 351)]
    sink = log.sink(DEAD_URL, batch_interval=0.01)
    log.write(events, sink)  # telling the sink never waits on the database
    wait_until(lambda: sink.stats()["last_error"] is not None, 30, "the error noticed")
    assert sink.lag() == 350
    sink.close(0.5)
    # Nothing confirmed, so the saved position is still the start of the log.
    position = orjson.loads((tmp_path / "pg-position.json").read_bytes())
    assert position == {"file": "", "offset": 0}

    with log.sink(db_url) as again:
        assert again.lag() == 350  # counted from the log at start
        wait_until(lambda: again.lag() == 0, 30, "the backlog copied")
    ids = [e["id"] for e in events]
    assert count_ids(db_url, ids) == dict.fromkeys(ids, 1)


def test_a_first_sink_starts_at_the_end_of_the_log(db_url, log, tmp_path):
    """Without a saved position (PostgreSQL newly configured) the history is not copied;
    everything written from then on is."""
    log.write([ev(i) for i in range(1, 11)])
    with PgSink(db_url, log.directory, tmp_path / "pg-position.json",
                batch_interval=0.01) as sink:
        assert sink.lag() == 0
        log.write([ev(i) for i in range(11, 21)], sink)
        wait_until(lambda: sink.lag() == 0, 30, "new events copied")
    assert sorted(r[0] for r in rows(db_url)) == sorted(f"test:{i}" for i in range(11, 21))


# The outage tests share the session's server; each restores it whatever happens.


def test_database_down_then_backfill(db_url, log, pg_server):  # noqa: F811
    sink = log.sink(db_url, batch_interval=0.01, deadline=2.0)
    try:
        log.write([ev(0)], sink)
        wait_until(lambda: sink.lag() == 0, 30, "first event")
        pg_server.stop()
        try:
            events = [ev(i) for i in range(1, 501)]
            for i in range(0, 500, 50):
                log.write(events[i : i + 50], sink)
            wait_until(lambda: sink.stats()["last_error"] is not None, 30, "error noticed")
            st = sink.stats()
            assert st["lag"] > 0 and not st["connected"]
        finally:
            pg_server.start()
        wait_until(lambda: sink.lag() == 0, 60, "backfill after restart")
        assert sink.stats()["connected"]
    finally:
        sink.close(5)
    ids = [e["id"] for e in events]
    assert count_ids(db_url, ids) == dict.fromkeys(ids, 1)


def test_hung_database_hits_the_client_deadline(db_url, log, pg_server):  # noqa: F811
    sink = log.sink(db_url, batch_interval=0.01, deadline=1.0)
    try:
        log.write([ev(0)], sink)
        wait_until(lambda: sink.lag() == 0, 30, "first event")
        pg_server.pause()  # SIGSTOP: sockets stay open, nothing answers
        try:
            log.write([ev(i) for i in range(1, 101)], sink)
            wait_until(lambda: sink.stats()["last_error"] is not None, 20, "deadline to fire")
            assert sink.lag() == 100
        finally:
            pg_server.resume()
        wait_until(lambda: sink.lag() == 0, 60, "backfill after resume")
    finally:
        sink.close(5)
    ids = [f"test:{i}" for i in range(101)]
    assert count_ids(db_url, ids) == dict.fromkeys(ids, 1)


def test_close_with_database_hung_ends_within_timeout(db_url, log, pg_server):  # noqa: F811
    # The operation deadline is far past the test's own timeout: close() returns only
    # because it gives up on the hung call, not because the watchdog cut it.
    sink = log.sink(db_url, batch_interval=0.01, deadline=3600.0)
    log.write([ev(0)], sink)
    wait_until(lambda: sink.lag() == 0, 30, "first event")
    pg_server.pause()
    try:
        log.write([ev(i) for i in range(1, 51)], sink)
        sink.close(1.0)  # returns while the database is still frozen
        assert pg_server.paused()
    finally:
        pg_server.resume()
    with log.sink(db_url) as again:  # from the saved position: the 50 are still behind
        assert again.lag() == 50
        wait_until(lambda: again.lag() == 0, 30, "the rest copied")
    ids = [f"test:{i}" for i in range(51)]
    assert count_ids(db_url, ids) == dict.fromkeys(ids, 1)
