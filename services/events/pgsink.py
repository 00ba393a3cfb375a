"""PostgreSQL sink for events: the queryable copy of the JSONL log (DESIGN.md, "Events").

JSONL (services/eventlog.py) is the exact record; PostgreSQL gets a *sanitised* copy,
written in batches, idempotently (``ON CONFLICT (id) DO NOTHING``), from a thread of
its own so the event router's loop never waits on the database.

Why it is built this way (see PITFALLS.md):

* 11 - a hung server hangs the client, even under ``statement_timeout``. Every
  database operation runs in the sink thread under a client-side deadline: a watchdog
  thread shuts the connection's socket down when an operation overruns, which makes the
  blocked libpq call fail at once; the sink reconnects with backoff.
* 12 - NUL in text, ``\\u0000`` in jsonb and out-of-range numbers fail a whole batch.
  ``sanitize`` fixes them before batching; a batch that still fails is bisected, the
  good rows go in and each bad row is quarantined to a JSONL file with the reason.
* The backlog is bounded in memory (`max_memory_events`); beyond that, and for whatever
  is left at ``close``, events go to JSONL spool files in `spool_dir`, which this sink
  (or the next one on the same directory) backfills when the database is reachable.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from cortex.services.runtime.eventlog import dumps_event
from cortex.services.runtime.pgevents import COLUMNS as _COLUMNS
from cortex.services.runtime.pgevents import cut_socket as _cut_socket

__all__ = [
    "MIGRATIONS",
    "PgSink",
    "apply_migrations",
    "sanitize",
]

# ---------------------------------------------------------------------------- schema

# Append-only: a released migration is never edited, only followed by a new one.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE IF NOT EXISTS cortex_events (
                id     text PRIMARY KEY,
                source text,
                epoch  bigint,
                seq    bigint,
                ts     timestamptz,
                type   text,
                trace  text,
                task   text,
                worker text,
                data   jsonb NOT NULL DEFAULT '{}'::jsonb
            )""",
            "CREATE INDEX IF NOT EXISTS cortex_events_ts ON cortex_events (ts)",
            "CREATE INDEX IF NOT EXISTS cortex_events_type_ts ON cortex_events (type, ts)",
            "CREATE INDEX IF NOT EXISTS cortex_events_task_ts ON cortex_events (task, ts)"
            " WHERE task IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS cortex_events_worker_ts ON cortex_events (worker, ts)"
            " WHERE worker IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS cortex_events_trace ON cortex_events (trace)"
            " WHERE trace IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS cortex_events_source_seq"
            " ON cortex_events (source, epoch, seq)",
        ],
    ),
]
_MIGRATION_LOCK = 0x636F_7274_6578  # "cortex": serialises concurrent migrators
_TEXT_FIELDS = ("id", "source", "type", "trace", "task", "worker")


def apply_migrations(conn: psycopg.Connection) -> int:
    """Bring the schema to the newest version; return it. Safe to run twice or concurrently."""
    with conn.transaction():
        # Taken before anything else so two sinks starting together apply each step once.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS cortex_schema_version ("
            " version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM cortex_schema_version").fetchone()
        current = row[0] if row else 0
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            for stmt in statements:
                conn.execute(stmt)
            conn.execute("INSERT INTO cortex_schema_version (version) VALUES (%s)", (version,))
            current = version
    return current


# ---------------------------------------------------------------------------- sanitising

_BIGINT_MIN, _BIGINT_MAX = -(2**63), 2**63 - 1
# timestamptz range Python can also represent: years 1..9999.
_TS_MIN, _TS_MAX = -62_135_596_800.0, 253_402_300_799.0
_REPLACEMENT = "\ufffd"


def _clean_str(s: str) -> str:
    # NUL becomes U+FFFD (the Unicode replacement character) rather than the literal
    # text "\\u0000": unambiguous, and the exact value is still in the JSONL record.
    if "\x00" in s:
        s = s.replace("\x00", _REPLACEMENT)
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates cannot be sent as UTF-8
            # UTF-16 round trip: joins valid pairs, turns lone halves into U+FFFD.
            s = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return s


def _clean_json(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, int):
        return value if _BIGINT_MIN <= value <= _BIGINT_MAX else str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if depth > 100:  # jsonb and the server's stack have depth limits; keep it as text
        return _clean_str(orjson.dumps(value, default=str).decode()[:10_000])
    if isinstance(value, dict):
        return {_clean_str(str(k)): _clean_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean_json(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return _clean_str(bytes(value).decode("utf-8", "replace"))
    return _clean_str(str(value))


def sanitize(event: dict) -> dict:
    """An event-shaped copy of `event` that PostgreSQL accepts.

    * text fields: ``None`` stays ``None``, anything else becomes ``str``; NUL -> U+FFFD,
      lone surrogates -> U+FFFD;
    * ``epoch``/``seq``: ints within bigint, else ``None``;
    * ``ts``: a finite unix time within years 1..9999, else ``None``;
    * ``data`` (any depth): NUL -> U+FFFD in strings and keys, ints beyond bigint ->
      decimal strings, NaN/±inf -> "NaN"/"Infinity"/"-Infinity", bytes -> text, other
      objects -> ``str()``; a non-dict ``data`` is wrapped as ``{"value": data}``.

    Keys outside the event shape are dropped (the JSONL record keeps them).
    """
    out: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        v = event.get(name)
        out[name] = None if v is None else _clean_str(v if isinstance(v, str) else str(v))
    for name in ("epoch", "seq"):
        v = event.get(name)
        ok = isinstance(v, int) and not isinstance(v, bool) and _BIGINT_MIN <= v <= _BIGINT_MAX
        out[name] = v if ok else None
    ts = event.get("ts")
    ok = isinstance(ts, int | float) and not isinstance(ts, bool) and _TS_MIN <= ts <= _TS_MAX
    out["ts"] = float(ts) if ok else None
    data = event.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        data = {"value": data}
    out["data"] = _clean_json(data)
    return out


def _jsonb_dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def _row(clean: dict) -> tuple:
    if not clean["id"]:
        raise ValueError("event has no id")
    ts = clean["ts"]
    when = None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)
    return (
        clean["id"], clean["source"], clean["epoch"], clean["seq"], when, clean["type"],
        clean["trace"], clean["task"], clean["worker"], Jsonb(clean["data"], dumps=_jsonb_dumps),
    )  # fmt: skip


# ---------------------------------------------------------------------------- the sink


class _Transient(Exception):
    """The database is unreachable, slow or otherwise not taking writes right now."""


class _SpoolReader:
    """Position in the spool file being backfilled."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0


class PgSink:
    """Copies events into PostgreSQL from a background thread; never blocks the caller.

    ``offer`` queues events (memory up to `max_memory_events`, then spool files); the
    thread writes batches of up to `batch_size` events (up to ten times that while
    backfilling), waiting at most `batch_interval` s for a batch to fill. Each database
    operation must finish within `deadline` s or its connection is cut.
    """

    def __init__(
        self,
        url: str,
        spool_dir: str | os.PathLike,
        batch_size: int = 100,
        batch_interval: float = 0.25,
        deadline: float = 5.0,
        max_memory_events: int = 100_000,
        quarantine_path: str | os.PathLike | None = None,
    ) -> None:
        self.url = url
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.quarantine_path = Path(quarantine_path or self.spool_dir / "quarantine.jsonl")
        self.batch_size = max(1, batch_size)
        self.max_batch = self.batch_size * 10
        self.batch_interval = batch_interval
        self.deadline = deadline
        self.max_memory_events = max_memory_events

        self._cond = threading.Condition()  # guards everything below up to the counters
        self._mem: deque[dict] = deque()
        self._spool_fh = None  # spool file offers are appended to (never read while open)
        self._spool_path: Path | None = None
        self._spool_events = self._count_spooled()
        self._reader: _SpoolReader | None = None
        self._prefer_spool = False
        self._closing = False
        self._closed = False
        self._close_deadline = 0.0

        self._stop = threading.Event()  # interrupts backoff waits at close
        self._conn: psycopg.Connection | None = None
        self._wd_cond = threading.Condition()
        self._op_deadline: float | None = None
        self._wd_stop = False

        self.written = 0  # events confirmed present in PostgreSQL
        self.inserted = 0  # of those, rows this sink inserted (the rest were replays)
        self.quarantined = 0
        self.dropped = 0  # could not even be spooled (spool disk full)
        self.batches = 0
        self.reconnects = 0
        self.last_error: str | None = None

        self._watchdog = threading.Thread(target=self._watch, name="pgsink-watchdog", daemon=True)
        self._thread = threading.Thread(target=self._run, name="pgsink", daemon=True)
        self._watchdog.start()
        self._thread.start()

    # -- caller side -----------------------------------------------------------------

    def offer(self, events: Iterable[dict]) -> None:
        """Queue events for PostgreSQL. Never blocks on the database, never raises."""
        events = list(events)
        if not events:
            return
        with self._cond:
            room = self.max_memory_events - len(self._mem) if not self._closed else 0
            if room >= len(events):
                self._mem.extend(events)
            else:
                room = max(room, 0)
                self._mem.extend(events[:room])
                self._spool(events[room:], sync=self._closed)
            self._cond.notify()

    def lag(self) -> int:
        """Events offered (or found spooled) and not yet confirmed in PostgreSQL."""
        with self._cond:
            return len(self._mem) + self._spool_events

    def stats(self) -> dict:
        with self._cond:
            return {
                "written": self.written,
                "inserted": self.inserted,
                "lag": len(self._mem) + self._spool_events,
                "memory": len(self._mem),
                "spooled": self._spool_events,
                "quarantined": self.quarantined,
                "dropped": self.dropped,
                "batches": self.batches,
                "reconnects": self.reconnects,
                "last_error": self.last_error,
                "connected": self._conn is not None and not self._conn.closed,
            }

    def close(self, timeout: float = 5.0) -> None:
        """Flush what can be flushed within `timeout` s, spool the rest, stop the threads."""
        if self._closed:
            return
        with self._cond:
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._stop.set()
        self._thread.join(max(0.0, timeout) + 0.5)
        if self._thread.is_alive():
            self._cut_connection()  # unstick a hung call so the thread can end
            self._thread.join(1.0)
        with self._cond:
            self._closed = True
            if self._mem:
                self._spool(list(self._mem), sync=True)
                self._mem.clear()
            self._close_spool_file(sync=True)
        with self._wd_cond:
            self._wd_stop = True
            self._wd_cond.notify()
        self._watchdog.join(1.0)
        if not self._thread.is_alive() and self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def __enter__(self) -> PgSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- spool files (called with self._cond held) ------------------------------------

    def _spool_files(self) -> list[Path]:
        return sorted(self.spool_dir.glob("spool-*.jsonl"))

    def _count_spooled(self) -> int:
        n = 0
        for p in self._spool_files():
            with contextlib.suppress(OSError):
                n += p.read_bytes().count(b"\n")
        return n

    def _spool(self, events: list[dict], sync: bool = False) -> None:
        try:
            if self._spool_fh is None:
                name = f"spool-{time.time_ns():020d}-{os.getpid()}.jsonl"
                self._spool_path = self.spool_dir / name
                self._spool_fh = open(self._spool_path, "ab")  # noqa: SIM115 - kept open
            self._spool_fh.write(b"".join(dumps_event(e) for e in events))
            self._spool_fh.flush()
            if sync:
                os.fdatasync(self._spool_fh.fileno())
            self._spool_events += len(events)
        except OSError as exc:
            # Nowhere left to keep them: count the loss (JSONL still has every event).
            self.dropped += len(events)
            self.last_error = f"spool: {exc}"
            self._close_spool_file(sync=False)

    def _close_spool_file(self, sync: bool) -> None:
        if self._spool_fh is None:
            return
        with contextlib.suppress(OSError):
            if sync:
                self._spool_fh.flush()
                os.fdatasync(self._spool_fh.fileno())
            self._spool_fh.close()
        self._spool_fh = None
        self._spool_path = None

    def _read_spool_batch(self) -> tuple[list[dict], int, int] | None:
        """(events, end offset, lines consumed) from the oldest closed spool file."""
        if self._reader is None:
            files = [p for p in self._spool_files() if p != self._spool_path]
            if not files and self._spool_path is not None and self._spool_events:
                self._close_spool_file(sync=False)  # new offers start a new file
                files = self._spool_files()
            if not files:
                return None
            self._reader = _SpoolReader(files[0])
        r = self._reader
        events: list[dict] = []
        lines = 0
        try:
            with open(r.path, "rb") as f:
                f.seek(r.offset)
                offset = r.offset
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # torn tail of a crashed writer: never completed
                    offset += len(line)
                    lines += 1
                    with contextlib.suppress(orjson.JSONDecodeError):
                        ev = orjson.loads(line)
                        if isinstance(ev, dict):
                            events.append(ev)
                    if len(events) >= self.max_batch:
                        break
        except FileNotFoundError:
            self._reader = None
            return None
        if not lines:
            # File fully consumed (or only a torn tail left): it is done.
            with contextlib.suppress(OSError):
                r.path.unlink()
            self._reader = None
            return self._read_spool_batch()
        return events, offset, lines

    # -- the sink thread ---------------------------------------------------------------

    def _next_batch(self) -> tuple[list[dict], str, Any] | None:
        """Wait for work; None when closing and nothing (or no time) is left."""
        with self._cond:
            while True:
                if self._closing and time.monotonic() >= self._close_deadline:
                    return None
                has_spool = self._spool_events > 0
                if self._mem or has_spool:
                    break
                if self._closing:
                    return None
                self._cond.wait()  # idle: nothing runs when nothing happens
            if self._mem and not self._closing and len(self._mem) < self.batch_size:
                # Give the batch a moment to fill.
                end = time.monotonic() + self.batch_interval
                while len(self._mem) < self.batch_size and not self._closing:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            # Alternate memory and spool so neither starves while both hold events.
            use_spool = self._spool_events > 0 and (self._prefer_spool or not self._mem)
            self._prefer_spool = not self._prefer_spool
            if use_spool:
                got = self._read_spool_batch()
                if got is not None:
                    events, offset, lines = got
                    return events, "spool", (offset, lines)
                self._spool_events = 0  # the files vanished: nothing left to count
                if not self._mem:
                    return [], "mem", 0
            batch = list(islice(self._mem, self.max_batch))
            return batch, "mem", len(batch)

    def _confirm(self, source: str, token: Any) -> None:
        with self._cond:
            if self._closed:
                return  # close() already spooled the backlog; replays are harmless
            if source == "mem":
                for _ in range(token):
                    self._mem.popleft()
            elif self._reader is not None:
                offset, lines = token
                self._reader.offset = offset
                self._spool_events = max(0, self._spool_events - lines)
                with contextlib.suppress(OSError):
                    if offset >= self._reader.path.stat().st_size:
                        # Fully backfilled (closed files never grow): remove it now.
                        self._reader.path.unlink()
                        self._reader = None

    def _run(self) -> None:
        backoff = 0.0
        while True:
            got = self._next_batch()
            if got is None:
                break
            batch, source, token = got
            try:
                if batch:
                    self._write(batch)
                self._confirm(source, token)
                backoff = 0.0
            except _Transient as exc:
                self.last_error = str(exc)
                self._disconnect()
                if self._closing:
                    break  # no retries once closing: the backlog gets spooled
                backoff = min(5.0, max(0.1, backoff * 2))
                self._stop.wait(backoff * random.uniform(0.8, 1.2))
        self._disconnect()

    # -- database I/O (sink thread only) ---------------------------------------------

    @contextlib.contextmanager
    def _deadline(self):
        with self._wd_cond:
            self._op_deadline = time.monotonic() + self.deadline
            self._wd_cond.notify()
        try:
            yield
        finally:
            with self._wd_cond:
                self._op_deadline = None

    def _watch(self) -> None:
        with self._wd_cond:
            while not self._wd_stop:
                if self._op_deadline is None:
                    self._wd_cond.wait()
                    continue
                left = self._op_deadline - time.monotonic()
                if left > 0:
                    self._wd_cond.wait(left)
                    continue
                self._op_deadline = None
                self._cut_connection()

    def _cut_connection(self) -> None:
        conn = self._conn
        if conn is not None:
            _cut_socket(conn)

    def _connect(self) -> psycopg.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self.reconnects += 1
        try:
            # connect_timeout bounds connecting; the watchdog bounds everything after.
            conn = psycopg.connect(
                self.url, connect_timeout=max(2, math.ceil(self.deadline)), autocommit=False
            )
        except psycopg.Error as exc:
            raise _Transient(f"connect: {exc}") from exc
        self._conn = conn
        try:
            with self._deadline():
                # Server-side limit too, so a merely slow query is cancelled cleanly.
                conn.execute(
                    sql.SQL("SET statement_timeout = {}").format(int(self.deadline * 1000))
                )
                conn.commit()
                apply_migrations(conn)
                conn.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS cortex_events_stage"
                    " (LIKE cortex_events) ON COMMIT DELETE ROWS"
                )
                conn.commit()
        except psycopg.Error as exc:
            raise _Transient(f"setup: {exc}") from exc
        return conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _write(self, events: list[dict]) -> None:
        conn = self._connect()
        rows: list[tuple[dict, tuple]] = []
        bad: list[tuple[dict, str]] = []
        for ev in events:
            try:
                rows.append((ev, _row(sanitize(ev))))
            except Exception as exc:  # noqa: BLE001 - any unexpected value is one bad row
                bad.append((ev, f"sanitize: {exc!r}"))
        self._insert_bisect(conn, rows, bad)
        # Quarantine only once the whole batch is settled: a transient failure above
        # retries the batch, which would otherwise quarantine the same rows twice.
        for ev, reason in bad:
            self._quarantine(ev, reason)
        self.batches += 1
        self.written += len(events) - len(bad)
        self.last_error = None

    def _insert_bisect(
        self, conn: psycopg.Connection, rows: list[tuple[dict, tuple]], bad: list
    ) -> None:
        """Insert `rows`; on a row-level error split until the culprits are isolated."""
        if not rows:
            return
        try:
            self.inserted += self._insert(conn, [r for _, r in rows])
            return
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not self._is_row_error(conn, exc):
                raise _Transient(f"write: {exc}") from exc
            error = exc
        if len(rows) == 1:
            bad.append((rows[0][0], f"{type(error).__name__}: {error}"))
            return
        mid = len(rows) // 2
        self._insert_bisect(conn, rows[:mid], bad)
        self._insert_bisect(conn, rows[mid:], bad)

    @staticmethod
    def _is_row_error(conn: psycopg.Connection, exc: Exception) -> bool:
        """True if the rows are at fault (bisect them), False if the database is."""
        if conn.closed or conn.broken:
            return False
        state = getattr(exc, "sqlstate", None)
        if state:
            # 22 data exception, 23 integrity violation, 54 program limit (e.g. an
            # index row too large). Everything else (disk full, cancelled, shutting
            # down, missing table...) is the server's state: retry later.
            return state[:2] in ("22", "23", "54")
        return not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)

    def _insert(self, conn: psycopg.Connection, rows: list[tuple]) -> int:
        cols = ", ".join(_COLUMNS)
        with self._deadline(), conn.transaction(), conn.cursor() as cur:
            with cur.copy(f"COPY cortex_events_stage ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(
                f"INSERT INTO cortex_events ({cols}) SELECT {cols} FROM cortex_events_stage"
                " ON CONFLICT (id) DO NOTHING"
            )
            return max(cur.rowcount, 0)

    def _quarantine(self, event: dict, reason: str) -> None:
        record = {"quarantined_at": time.time(), "reason": reason, "event": event}
        try:
            with open(self.quarantine_path, "ab") as f:
                f.write(dumps_event(record))
                f.flush()
                os.fdatasync(f.fileno())
        except OSError as exc:
            self.last_error = f"quarantine: {exc}"
        self.quarantined += 1
