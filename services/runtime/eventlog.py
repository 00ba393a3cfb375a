"""Append-only JSONL event log: the embedded, `cat`/`jq`-readable record of every event.

Layout of the events directory (docs/architecture.md, "State on disk"):

    events-YYYYMMDD-NNN.jsonl      one event per line, UTC day of *writing*, NNN from 001
    events-YYYYMMDD-NNN.jsonl.idx  index: one JSON line per flushed stretch (see below)
    events-YYYYMMDD-NNN.jsonl.pos  sequence checkpoint written when the file is closed
    .lock                          flock held by the one live writer

Index lines look like ``{"offset": 0, "end": 81234, "first_ts": .., "last_ts": ..,
"count": 250, "tasks": ["t1", ...]}``. ``tasks`` is ``null`` when the stretch saw more
than `INDEX_MAX_TASKS` distinct tasks (then the stretch can never be skipped by task).
The index is only an optimisation (see `eventread.py`, which reads it).

Serialisation: orjson, one line per event. orjson refuses integers outside the 64-bit
range, so such integers (anywhere in the event) are written as decimal *strings*; a
reader gets ``"1180591620717411303424"`` back for ``2**70``. Other values orjson cannot
encode (bytes, sets, custom objects) are written as their ``str()``.

A full disk arrives as a short write, not an exception (docs/pitfalls.md): the writer
never appends blindly. It remembers the last good size of the file, writes each flush
with ``pwrite`` at that offset, and on any failure truncates back to it and keeps the
buffer, so a corrupt half-line can never end up in the middle of a file.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from cortex.services.runtime.durable import fsync_dir, write_atomic
from cortex.services.runtime.eventread import (
    MiB,
    as_float,
    list_event_files,
    parse_name,
    read_events,
    read_index,
)
from cortex.services.runtime.sequences import SeqTracker, event_key

__all__ = [
    "EventLogError",
    "EventLogWriter",
    "RingBuffer",
    "SeqTracker",
    "dumps_event",
    "list_event_files",
    "read_events",
]

INDEX_EVERY = 1000  # at most this many events per index line
INDEX_MAX_TASKS = 64  # beyond this a stretch is marked "tasks": null (unknown)
# Out-of-order seqs the tracker keeps per stream; the router never acknowledges past a
# hole and publishers re-send a stuck head within a second, so this only caps memory.
MAX_PENDING_SEQS = 1_000_000
_ORJSON_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what orjson accepts


class EventLogError(Exception):
    """The event log cannot be written; ``code`` is the stable error code for replies."""

    def __init__(self, message: str, code: str = "events_unwritable") -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------- encoding


def _fix_for_orjson(value: Any) -> Any:
    """Copy of `value` with out-of-range ints turned into strings (orjson refuses them)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if _INT_MIN <= value <= _INT_MAX else str(value)
    if isinstance(value, dict):
        return {k: _fix_for_orjson(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_fix_for_orjson(v) for v in value]
    return value


def _default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return str(value)


def dumps_event(event: dict) -> bytes:
    """One JSONL line (with its newline) for `event`; never raises for JSON-ish input."""
    try:
        return orjson.dumps(event, default=_default, option=_ORJSON_OPTS)
    except TypeError:
        # Only the rare event with a huge int pays for the copy.
        return orjson.dumps(_fix_for_orjson(event), default=_default, option=_ORJSON_OPTS)


# ---------------------------------------------------------------------------- writing


class _Stretch:
    """Index bookkeeping for the events buffered since the last index line."""

    __slots__ = ("first_ts", "last_ts", "count", "tasks", "start", "end")

    def __init__(self, start: int) -> None:
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.count = 0
        self.tasks: set[str] | None = set()
        self.start = start  # offset in the buffer where this stretch begins
        self.end = start

    def add(self, ev: dict, nbytes: int) -> None:
        ts = as_float(ev.get("ts"))
        if ts is not None:
            # min/max, not first/last: sources' clocks and resends interleave.
            self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
            self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
        task = ev.get("task")
        if self.tasks is not None and isinstance(task, str):
            self.tasks.add(task)
            if len(self.tasks) > INDEX_MAX_TASKS:
                self.tasks = None
        self.count += 1
        self.end += nbytes

    def line(self, base: int) -> bytes:
        return orjson.dumps(
            {
                "offset": base + self.start,
                "end": base + self.end,
                "first_ts": self.first_ts,
                "last_ts": self.last_ts,
                "count": self.count,
                "tasks": sorted(self.tasks) if self.tasks is not None else None,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )


class EventLogWriter:
    """Buffered, rotating JSONL writer. One per directory (held with an flock).

    ``append`` only buffers; ``flush`` writes the buffer with one ``pwrite`` and, unless
    ``fsync="off"``, one ``fdatasync``. ("always" and "group" both sync every flush:
    group commit is the caller choosing to flush once per batch of appends.)

    A file is rotated when it has reached `max_bytes` (so a file exceeds it by at most one
    flush) or when the UTC day of `clock()` changes.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_bytes: int = 64 * MiB,
        fsync: str = "group",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if fsync not in ("always", "group", "off"):
            raise ValueError(f"fsync must be always, group or off, not {fsync!r}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.clock = clock
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise EventLogError(
                f"another writer holds {self.directory}/.lock", code="events_locked"
            ) from None
        self._buf: list[bytes] = []
        self._pending: set[tuple[str, int, int]] = set()  # (source, epoch, seq) buffered
        self._stretches: list[_Stretch] = [_Stretch(0)]
        self._path: Path | None = None
        self._fd: int | None = None
        self._idx_fd: int | None = None
        self._size = 0  # last good size of the current file
        self._day = ""
        # Sequence state of everything written (the one tracker of the directory),
        # checkpointed to .pos at rotation so a restart only replays the newest file.
        self.tracker = SeqTracker.recover(self.directory, MAX_PENDING_SEQS)
        self.events_written = 0

    # -- public API ------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Events appended but not yet durably written."""
        return sum(s.count for s in self._stretches)

    def seen(self, event: dict) -> bool:
        """Is `event` (by source, epoch, seq) already written or waiting to be?"""
        key = event_key(event)
        return key is not None and (key in self._pending or self.tracker.seen(*key))

    def append(self, events: Iterable[dict]) -> None:
        for ev in events:
            line = dumps_event(ev)
            self._buf.append(line)
            key = event_key(ev)
            if key is not None:
                self._pending.add(key)
            st = self._stretches[-1]
            if st.count >= INDEX_EVERY:
                st = _Stretch(st.end)
                self._stretches.append(st)
            st.add(ev, len(line))

    def flush(self) -> None:
        """Write and (per policy) sync the buffer; raise EventLogError and keep it on failure."""
        if not self._buf:
            return
        data = b"".join(self._buf)
        try:
            self._ensure_file()
            self._write_at(data, self._size)
        except OSError as exc:
            self._undo()
            raise EventLogError(
                f"cannot write events to {self._path or self.directory}: {exc}"
            ) from exc
        base = self._size
        self._size += len(data)
        self._write_index(base)
        for key in sorted(self._pending):
            self.tracker.observe(*key)
        self.events_written += self.buffered
        self._buf.clear()
        self._pending.clear()
        self._stretches = [_Stretch(0)]

    def close(self) -> None:
        """Flush (best effort: errors propagate) and release the files and the lock."""
        try:
            self.flush()
        finally:
            self._close_file(checkpoint=False)
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> EventLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------

    def _ensure_file(self) -> None:
        day = time.strftime("%Y%m%d", time.gmtime(self.clock()))
        if self._fd is not None and day == self._day and self._size < self.max_bytes:
            return
        if self._fd is not None:
            self._close_file(checkpoint=True)
        # Continue the newest file of the day if it still has room (e.g. after a restart).
        todays = [p for p in list_event_files(self.directory) if p.name[7:15] == day]
        if todays:
            last = todays[-1]
            n = parse_name(last.name)[1]
            closed = (last.parent / (last.name + ".pos")).exists()
            if closed or last.stat().st_size >= self.max_bytes:
                n += 1
        else:
            n = 1
        path = self.directory / f"events-{day}-{n:03d}.jsonl"
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            good = self._last_newline(path, size)
            if good != size:
                os.ftruncate(fd, good)  # torn tail from a crash: drop the half line
            idx_fd = os.open(path.parent / (path.name + ".idx"), os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._idx_fd, self._path, self._size, self._day = fd, idx_fd, path, good, day
        self._repair_index()
        if created:
            fsync_dir(self.directory)

    @staticmethod
    def _last_newline(path: Path, size: int) -> int:
        if size == 0:
            return 0
        with open(path, "rb") as f:
            pos = size
            while pos > 0:
                step = min(65536, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    return pos - step + i + 1
                pos -= step
        return 0

    def _repair_index(self) -> None:
        """Keep only the trusted prefix of the index so our new lines extend it."""
        assert self._path is not None and self._idx_fd is not None
        entries, covered = read_index(self._path, self._size)
        blob = b"".join(orjson.dumps(e, option=orjson.OPT_APPEND_NEWLINE) for e in entries)
        if os.fstat(self._idx_fd).st_size != len(blob):
            os.ftruncate(self._idx_fd, 0)
            os.pwrite(self._idx_fd, blob, 0)
        self._idx_size = len(blob)
        self._idx_covered = covered

    def _write_at(self, data: bytes, offset: int) -> None:
        assert self._fd is not None
        if os.fstat(self._fd).st_size != offset:
            os.ftruncate(self._fd, offset)  # leftovers of an earlier failed write
        view = memoryview(data)
        done = 0
        while done < len(data):
            n = os.pwrite(self._fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, "short write")
            done += n
        if self.fsync != "off":
            os.fdatasync(self._fd)

    def _undo(self) -> None:
        """Truncate back to the last good size; the buffer stays for a later retry."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            pass  # _write_at truncates again before the next write

    def _write_index(self, base: int) -> None:
        # Only stretches that tile on from what the index already covers are recorded;
        # otherwise leave the range uncovered (readers then scan it). Best effort: the
        # data is already durable and the index is only a shortcut.
        if self._idx_fd is None or self._idx_covered != base:
            return
        blob = b"".join(s.line(base) for s in self._stretches if s.count)
        try:
            n = os.pwrite(self._idx_fd, blob, self._idx_size)
        except OSError:
            n = -1
        if n == len(blob):
            self._idx_size += n
            self._idx_covered = self._size
        else:
            try:
                os.ftruncate(self._idx_fd, self._idx_size)
            except OSError:
                self._idx_covered = -1  # stop extending a possibly damaged index

    def _close_file(self, checkpoint: bool) -> None:
        if self._fd is None:
            return
        path = self._path
        for fd in (self._fd, self._idx_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = self._idx_fd = None
        self._path = None
        if checkpoint and path is not None:
            # Rotation: the file is complete, so checkpoint the sequence state after it.
            doc = self.tracker._dump()
            doc["file"] = path.name
            try:
                write_atomic(path.parent / (path.name + ".pos"), orjson.dumps(doc))
            except OSError:
                pass  # recovery then replays this file too: slower, still correct


# ---------------------------------------------------------------------------- ring buffer


class RingBuffer:
    """The last `capacity` events, for `cortex tail` and the dashboard."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._items: deque[dict] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._items)

    def append(self, event: dict) -> None:
        self._items.append(event)

    def extend(self, events: Iterable[dict]) -> None:
        self._items.extend(events)

    def recent(self, n: int, type_pattern: str | None = None) -> list[dict]:
        """Up to `n` newest events (matching the glob), oldest first."""
        if n <= 0:
            return []
        if type_pattern is None:
            return list(self._items)[-n:]
        out: list[dict] = []
        for ev in reversed(self._items):
            t = ev.get("type")
            if isinstance(t, str) and fnmatch.fnmatchcase(t, type_pattern):
                out.append(ev)
                if len(out) >= n:
                    break
        out.reverse()
        return out
