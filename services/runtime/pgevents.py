"""Reading the events PostgreSQL holds (`cortex events query`, the CLI's trace): the
event router's sink writes them, anyone with the URL may read them.

psycopg is imported by this module alone, and only when PostgreSQL is configured."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import socket
import threading
from typing import Any

import psycopg
from psycopg import sql

COLUMNS = ("id", "source", "epoch", "seq", "ts", "type", "trace", "task", "worker", "data")


def cut_socket(conn: psycopg.Connection) -> None:
    """Make a libpq call blocked in another thread fail now: shut its socket down.

    Closing the fd would not wake the waiting thread; shutdown on a duplicate of it does
    (the reader sees EOF at once and psycopg raises OperationalError).
    """
    try:
        s = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except (OSError, psycopg.Error):
        return
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


def _glob_to_like(pattern: str) -> str:
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _as_timestamp(value: float | dt.datetime) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromtimestamp(float(value), dt.UTC)


def query_events(
    url: str,
    since: float | dt.datetime | None = None,
    until: float | dt.datetime | None = None,
    task: str | None = None,
    type_pattern: str | None = None,
    worker: str | None = None,
    text: str | None = None,
    limit: int | None = 1000,
    newest_first: bool = False,
    timeout: float = 10.0,
    after: tuple[float, str] | None = None,
) -> list[dict]:
    """Events from PostgreSQL matching every given filter, ordered by ts then id.

    Same filters as ``eventlog.read_events``: ``since <= ts < until``, ``type_pattern``
    a glob, ``text`` a case-insensitive substring of the data or the type. Values come
    back as stored (sanitised); ``ts`` is a unix float. ``after``: a page's cursor (ts,
    id): only the events past it in the order asked.
    """
    where: list[sql.Composable] = []
    params: list[Any] = []
    if since is not None:
        where.append(sql.SQL("ts >= %s"))
        params.append(_as_timestamp(since))
    if until is not None:
        where.append(sql.SQL("ts < %s"))
        params.append(_as_timestamp(until))
    for column, value in (("task", task), ("worker", worker)):
        if value is not None:
            where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if type_pattern is not None:
        where.append(sql.SQL("type LIKE %s"))
        params.append(_glob_to_like(type_pattern))
    if text:
        where.append(sql.SQL("(data::text ILIKE %s OR type ILIKE %s)"))
        like = "%" + "".join("\\" + c if c in "%_\\" else c for c in text) + "%"
        params += [like, like]
    if after is not None:
        where.append(sql.SQL('(extract(epoch FROM ts)::float8, id COLLATE "C") {} (%s, %s)')
                     .format(sql.SQL("<" if newest_first else ">")))
        params += [after[0], after[1]]
    order = "DESC" if newest_first else "ASC"
    query = sql.SQL(
        "SELECT id, source, epoch, seq, extract(epoch FROM ts)::float8, type, trace, task,"
        " worker, data FROM cortex_events {where}"
        ' ORDER BY ts {order} NULLS FIRST, id COLLATE "C" {order}'
        " {limit}"
    ).format(
        where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
        order=sql.SQL(order),
        limit=sql.SQL("LIMIT {}").format(int(limit)) if limit is not None else sql.SQL(""),
    )
    with psycopg.connect(url, connect_timeout=max(2, math.ceil(timeout))) as conn:
        # statement_timeout cannot interrupt a hung server (docs/pitfalls.md): a timer cuts
        # the socket if the query is still running after `timeout`.
        timer = threading.Timer(timeout, cut_socket, (conn,))
        timer.daemon = True
        timer.start()
        try:
            conn.execute(sql.SQL("SET statement_timeout = {}").format(int(timeout * 1000)))
            rows = conn.execute(query, params).fetchall()
        finally:
            timer.cancel()
    return [dict(zip(COLUMNS, row, strict=True)) for row in rows]
