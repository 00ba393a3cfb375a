"""`events.query` pages: every matching event once, in (ts, id) order (or its reverse with
`newest`), each page fitting one bus message; and the client's plan that follows them."""

from __future__ import annotations

import random

import msgpack
import pytest

from cortex.protocol import Client, wire
from cortex.protocol.calls import Session, drive
from cortex.protocol.operations import Plans
from cortex.services.events.history import key, parse_cursor, query_page
from cortex.services.runtime.eventlog import EventLogWriter

from .conftest import wait_for
from .pg import pg_server, postgres_url  # noqa: F401 - fixtures

KIB = 1024
T0 = 1_700_000_000.0


def write_log(directory, events: list[dict]) -> None:
    writer = EventLogWriter(directory, fsync="off", clock=lambda: T0)
    try:
        writer.append(events)
        writer.flush()
    finally:
        writer.close()


def logged(n: int, size: int) -> list[dict]:
    """`n` events whose file order is not their time order, some sharing a ts."""
    rng = random.Random(7)
    events = [{"id": f"s:1:{i}", "source": "s", "epoch": 1, "seq": i,
               "ts": T0 + (i // 3) + rng.choice((0.0, 0.0, 2.5)), "type":
               "task.completed" if i % 4 else "task.created", "task": f"t{i}",
               "data": {"blob": "x" * size}} for i in range(n)]
    rng.shuffle(events)
    return events


def every_page(directory, newest: bool, limit: int = 5000, **filters) -> list[list[dict]]:
    filters = {"since": None, "until": None, "task": None, "type_pattern": None,
               "worker": None, "text": None} | filters
    pages, after = [], None
    while True:
        page = query_page(directory, "", filters, limit, newest, after)
        assert len(msgpack.packb(page)) < wire.MAX_MESSAGE_BYTES
        assert "partial" not in page
        pages.append(page["events"])
        if not page["more"]:
            return pages
        after = parse_cursor(page["cursor"])


@pytest.mark.parametrize("newest", [False, True])
def test_a_query_past_one_message_comes_back_whole_across_pages_in_order(tmp_path, newest):
    events = logged(60, 90 * KIB)  # about 5.3 MiB
    write_log(tmp_path, events)
    pages = every_page(tmp_path, newest)
    got = [e for page in pages for e in page]
    assert len(pages) >= 6 and all(pages)
    assert [e["id"] for e in got] == [e["id"] for e in sorted(events, key=key,
                                                                reverse=newest)]


def test_pages_honour_the_limit_and_the_filters(tmp_path):
    events = logged(40, 100)
    write_log(tmp_path, events)
    pages = every_page(tmp_path, False, limit=7, type_pattern="task.comp*")
    got = [e["id"] for page in pages for e in page]
    wanted = sorted((e for e in events if e["type"] == "task.completed"), key=key)
    assert got == [e["id"] for e in wanted] and max(map(len, pages)) == 7
    since = wanted[10]["ts"]
    later = [e["id"] for page in every_page(tmp_path, True, limit=4, since=since)
             for e in page]
    assert later == [e["id"] for e in sorted(events, key=key, reverse=True)
                     if e["ts"] >= since]


def test_an_empty_log_and_a_bad_cursor(tmp_path):
    (tmp_path / "events").mkdir()
    assert every_page(tmp_path / "events", False) == [[]]
    for bad in ("", "x/y", "nan/a", "inf/a", "12.5"):
        with pytest.raises(wire.ProtocolError) as caught:
            parse_cursor(bad)
        assert caught.value.code == "bad_request"
    assert parse_cursor("12.5/s:1:2") == (12.5, "s:1:2")


def test_the_clients_plan_follows_the_pages_up_to_its_limit(tmp_path):
    events = logged(50, 60 * KIB)
    write_log(tmp_path / "log", events)
    asked = []

    def serve(request):
        body = request.body
        asked.append(body)
        filters = {"since": body.get("since"), "until": body.get("until"),
                   "task": body.get("task"), "type_pattern": body.get("type"),
                   "worker": body.get("worker"), "text": body.get("text")}
        return query_page(tmp_path / "log", "", filters, body["limit"], body["newest"],
                          parse_cursor(body.get("after")))

    plans = Plans(Session(tmp_path), "agent")
    whole = drive(plans.query_events(), serve)
    assert [e["id"] for e in whole["events"]] == [e["id"] for e in sorted(events, key=key)]
    assert not whole["more"] and len(asked) >= 3 and "after" not in asked[0]
    asked.clear()
    cut = drive(plans.query_events(limit=20, newest=True), serve)
    assert [e["id"] for e in cut["events"]] == [
        e["id"] for e in sorted(events, key=key, reverse=True)[:20]]
    assert cut["more"] and asked[0]["limit"] == 20


@pytest.mark.heavy  # a real suite, large events
def test_a_live_query_of_large_events_pages_through_the_client(suite):
    with Client(suite.home, timeout=60) as c:
        ids = [c.submit("echo", "big", payload="r" * 400_000)["id"] for _ in range(6)]
        for task_id in ids:
            c.wait(task_id, timeout=120)
        found = wait_for(lambda: (r := c.query_events(type="task.completed"))
                         and set(ids) <= {e["task"] for e in r["events"]} and r, 60,
                         "the completed events")
        raw = c.call("events", "events.query", {"type": "task.completed"})
    got = [e["id"] for e in found["events"]]
    assert len(set(got)) == len(got) and not found["more"]
    assert [key(e) for e in found["events"]] == sorted(key(e) for e in found["events"])
    assert raw["more"] and len(raw["events"]) < 6  # one message could not hold them


@pytest.mark.postgres
def test_postgres_pages_with_the_same_order_and_cursor(tmp_path, postgres_url):  # noqa: F811
    import uuid

    import psycopg
    from psycopg.types.json import Jsonb

    from cortex.services.events.pgschema import apply_migrations
    from tests.pg import fresh_database

    url = fresh_database(postgres_url, f"t_{uuid.uuid4().hex[:12]}")
    events = [e | {"id": f"{'AbC'[i % 3]}:{i}", "trace": None, "worker": None}
              for i, e in enumerate(logged(45, 100))]  # ids whose order a locale changes
    with psycopg.connect(url) as conn:
        apply_migrations(conn)
        for e in events:
            conn.execute("INSERT INTO cortex_events (id, source, epoch, seq, ts, type, task,"
                         " data) VALUES (%s, %s, %s, %s, to_timestamp(%s), %s, %s, %s)",
                         (e["id"], e["source"], e["epoch"], e["seq"], e["ts"], e["type"],
                          e["task"], Jsonb(e["data"])))
    filters = {"since": None, "until": None, "task": None, "type_pattern": None,
               "worker": None, "text": None}
    for newest in (False, True):
        got, after = [], None
        while True:
            page = query_page(None, url, filters, 4, newest, after)
            assert page["source"] == "postgres" and len(page["events"]) <= 4
            got += page["events"]
            if not page["more"]:
                break
            after = parse_cursor(page["cursor"])
        assert [e["id"] for e in got] == [e["id"] for e in sorted(events, key=key,
                                                                    reverse=newest)]
