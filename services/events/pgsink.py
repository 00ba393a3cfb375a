"""PostgreSQL sink for events: the queryable copy of the JSONL log.

JSONL (services/runtime/eventlog.py) is the exact record; PostgreSQL gets a *sanitised*
copy (`pgschema.py`), written in batches, idempotently (``ON CONFLICT (id) DO
NOTHING``), from a thread of its own so the event router's loop never waits on the
database.

The sink keeps no backlog of its own: it follows the log from a saved position
(`logcursor.py`), so what the database has not confirmed is still in the JSONL files and
nothing is lost when the database is down or hung, nor when the router is killed. The
router only tells it that the log grew.

Every database operation runs under a client-side deadline: a hung server hangs the
client even under ``statement_timeout`` (docs/pitfalls.md, "PostgreSQL"), so a watchdog
thread shuts the connection's socket down when an operation overruns, which makes the
blocked libpq call fail at once; the sink reconnects with backoff. A batch that fails on
its rows is bisected: the good rows go in and each bad row is quarantined to a JSONL
file with the reason.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from pathlib import Path

import psycopg
from psycopg import sql

from cortex.protocol.backoff import Backoff
from cortex.services.events.logcursor import LogCursor, Position
from cortex.services.events.pgschema import MIGRATIONS, apply_migrations, row, sanitize
from cortex.services.runtime.eventlog import dumps_event
from cortex.services.runtime.pgevents import COLUMNS as _COLUMNS
from cortex.services.runtime.pgevents import cut_socket as _cut_socket

__all__ = ["MIGRATIONS", "PgSink", "apply_migrations", "sanitize"]

SAVE_EVERY = 1.0  # seconds between saves of the position (a crash re-reads at most this)


class _Transient(Exception):
    """The database is unreachable, slow or otherwise not taking writes right now."""


class PgSink:
    """Copies the JSONL log of `events_dir` into PostgreSQL from a background thread.

    The position is kept in `cursor_path`; without one the copy starts at the log's end
    as it is now (`from_start=True`: at its beginning). The thread reads up to
    `batch_size` events at a time, waiting at most `batch_interval` s for more to be
    written; each database operation must finish within `deadline` s or its connection
    is cut.
    """

    def __init__(
        self,
        url: str,
        events_dir: str | os.PathLike,
        cursor_path: str | os.PathLike,
        batch_size: int = 1000,
        batch_interval: float = 0.25,
        deadline: float = 5.0,
        quarantine_path: str | os.PathLike | None = None,
        from_start: bool = False,
    ) -> None:
        self.url = url
        self.log = LogCursor(events_dir, cursor_path)
        self.quarantine_path = Path(quarantine_path or Path(cursor_path).with_name(
            "pg-quarantine.jsonl"))
        self.batch_size = max(1, batch_size)
        self.batch_interval = batch_interval
        self.deadline = deadline

        saved = self.log.load()
        if saved is None:
            saved = Position("", 0) if from_start else self.log.end()
            self.log.save(saved)
        self._position = saved
        self._saved_at = time.monotonic()
        self._cond = threading.Condition()  # guards _behind, _closing
        self._behind = self.log.count_after(saved)  # events in the log, not yet confirmed
        self._closing = False

        self._stop = threading.Event()  # interrupts backoff waits at close
        self._conn: psycopg.Connection | None = None
        self._wd_cond = threading.Condition()
        self._op_deadline: float | None = None
        self._wd_stop = False

        self.written = 0  # events confirmed present in PostgreSQL
        self.inserted = 0  # of those, rows this sink inserted (the rest were replays)
        self.quarantined = 0
        self.unreadable = 0  # lines of the log that are not events
        self.batches = 0
        self.reconnects = 0
        self.last_error: str | None = None

        self._watchdog = threading.Thread(target=self._watch, name="pgsink-watchdog", daemon=True)
        self._thread = threading.Thread(target=self._run, name="pgsink", daemon=True)
        self._watchdog.start()
        self._thread.start()

    # -- caller side -----------------------------------------------------------------

    def written_to_log(self, count: int) -> None:
        """The log grew by `count` events. Never blocks on the database, never raises."""
        if count <= 0:
            return
        with self._cond:
            self._behind += count
            self._cond.notify()

    def lag(self) -> int:
        """Events in the log not yet confirmed in PostgreSQL."""
        with self._cond:
            return self._behind

    def stats(self) -> dict:
        with self._cond:
            behind = self._behind
        return {
            "written": self.written,
            "inserted": self.inserted,
            "lag": behind,
            "position": {"file": self._position.file, "offset": self._position.offset},
            "quarantined": self.quarantined,
            "unreadable": self.unreadable,
            "batches": self.batches,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "connected": self._conn is not None and not self._conn.closed,
        }

    def close(self, timeout: float = 5.0) -> None:
        """Copy what can be copied within `timeout` s, save the position, stop the threads.
        What is left stays in the log for the next sink."""
        if self._closing:
            return
        with self._cond:
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(max(0.0, timeout))
        self._stop.set()
        if self._thread.is_alive():
            self._cut_connection()  # unstick a hung call so the thread can end
            self._thread.join(1.0)
        with self._wd_cond:
            self._wd_stop = True
            self._wd_cond.notify()
        self._watchdog.join(1.0)
        self._save(force=True)
        if not self._thread.is_alive() and self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def __enter__(self) -> PgSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the sink thread ---------------------------------------------------------------

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._saved_at < SAVE_EVERY:
            return
        try:
            self.log.save(self._position)
            self._saved_at = now
        except OSError as exc:
            self.last_error = f"saving the position: {exc}"

    def _wait_for_events(self) -> bool:
        """Wait until the log holds unconfirmed events; False when it is time to stop."""
        with self._cond:
            while True:
                if self._closing and (self._behind == 0
                                      or time.monotonic() >= self._close_deadline):
                    return False
                if self._behind > 0:
                    break
                self._cond.wait()  # idle: nothing runs when nothing happens
            if not self._closing and self._behind < self.batch_size:
                # Give the batch a moment to fill.
                end = time.monotonic() + self.batch_interval
                while self._behind < self.batch_size and not self._closing:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
        return True

    def _run(self) -> None:
        retry = Backoff(base=0.1, cap=5.0)
        while self._wait_for_events():
            batch = self.log.read(self._position, self.batch_size)
            if not batch.lines:
                # Counted but not readable yet (a write still under way): look again soon.
                if self._stop.wait(self.batch_interval):
                    break
                continue
            try:
                if batch.events:
                    self._write(batch.events)
            except _Transient as exc:
                self.last_error = str(exc)
                self._disconnect()
                if self._stop.wait(retry.next()):
                    break  # closing: what is left stays in the log
                continue
            retry.reset()
            self.unreadable += batch.unreadable
            self._position = batch.end
            with self._cond:
                self._behind = max(0, self._behind - batch.lines)
            self._save()
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
                rows.append((ev, row(sanitize(ev))))
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
