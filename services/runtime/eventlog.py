"""Append-only JSONL event log: the embedded, `cat`/`jq`-readable record of every event.

Layout of the events directory (see DESIGN.md, "State on disk"):

    events-YYYYMMDD-NNN.jsonl      one event per line, UTC day of *writing*, NNN from 001
    events-YYYYMMDD-NNN.jsonl.idx  index: one JSON line per flushed stretch (see below)
    events-YYYYMMDD-NNN.jsonl.pos  sequence checkpoint written when the file is closed
    .lock                          flock held by the one live writer

Index lines look like ``{"offset": 0, "end": 81234, "first_ts": .., "last_ts": ..,
"count": 250, "tasks": ["t1", ...]}``. ``tasks`` is ``null`` when the stretch saw more
than `INDEX_MAX_TASKS` distinct tasks (then the stretch can never be skipped by task).
The index is only an optimisation: readers trust it only while its entries tile the file
contiguously from offset 0 and stay inside the file; any byte range it does not cover is
read in full. So a lost, torn or stale index costs speed, never events.

Serialisation: orjson, one line per event. orjson refuses integers outside the 64-bit
range, so such integers (anywhere in the event) are written as decimal *strings*; a
reader gets ``"1180591620717411303424"`` back for ``2**70``. Other values orjson cannot
encode (bytes, sets, custom objects) are written as their ``str()``.

Pitfall 10 (ENOSPC arrives as a short write, not an exception): the writer never
appends blindly. It remembers the last good size of the file, writes each flush with
``pwrite`` at that offset, and on any failure truncates back to it and keeps the
buffer, so a corrupt half-line can never end up in the middle of a file.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "EventLogError",
    "EventLogWriter",
    "RingBuffer",
    "SeqTracker",
    "dumps_event",
    "list_event_files",
    "read_events",
    "recover_positions",
]

MiB = 1024 * 1024
INDEX_EVERY = 1000  # at most this many events per index line
INDEX_MAX_TASKS = 64  # beyond this a stretch is marked "tasks": null (unknown)
_FILE_RE = re.compile(r"^events-(\d{8})-(\d{3,})\.jsonl$")
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


def _as_float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
        return float(value)
    return None


# ---------------------------------------------------------------------------- files


def _parse_name(name: str) -> tuple[str, int] | None:
    m = _FILE_RE.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def list_event_files(directory: str | os.PathLike) -> list[Path]:
    """Event files in write order (sorted by day, then numerically by NNN)."""
    d = Path(directory)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    keyed = [(k, n) for n in names if (k := _parse_name(n)) is not None]
    return [d / n for _, n in sorted(keyed)]


def _read_index(path: Path, file_size: int) -> tuple[list[dict], int]:
    """Trusted index entries for `path` and the offset up to which they cover the file.

    Entries are trusted only while they tile the file contiguously from 0 (a stale entry
    left after a truncation, or a torn line, ends the trusted prefix).
    """
    try:
        raw = (path.parent / (path.name + ".idx")).read_bytes()
    except OSError:
        return [], 0
    entries: list[dict] = []
    covered = 0
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            e = orjson.loads(line)
            start, end, count = int(e["offset"]), int(e["end"]), int(e["count"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            break
        if start != covered or not (start < end <= file_size) or count < 0:
            break
        entries.append(e)
        covered = end
    return entries, covered


# ---------------------------------------------------------------------------- sequences


@dataclass(slots=True)
class _Stream:
    pos: int = 0  # highest seq with every seq 1..pos seen (or given up on)
    top: int = 0  # highest seq seen
    extra: set[int] = field(default_factory=set)  # seen seqs above pos + 1


class SeqTracker:
    """Per (source, epoch) sequence bookkeeping: de-duplication and gap detection.

    ``observe`` returns "duplicate" for a seq already seen, "gap" for a new seq that
    reveals missing seqs below it, and "new" otherwise (including a late seq that fills
    a hole). ``gaps`` is the number of seqs currently known to be missing (it drops when
    a late seq fills a hole); ``duplicates`` counts duplicates seen.

    Memory is bounded: a stream keeps at most `max_pending` out-of-order seqs; beyond
    that the lowest hole is given up on (stays counted in ``gaps``, and a seq from it
    arriving later is then reported as a duplicate).
    """

    def __init__(
        self, positions: dict[tuple[str, int], int] | None = None, max_pending: int = 4096
    ) -> None:
        self._streams: dict[tuple[str, int], _Stream] = {}
        self.max_pending = max_pending
        self.gaps = 0
        self.duplicates = 0
        for key, pos in (positions or {}).items():
            self._streams[key] = _Stream(pos=pos, top=pos)

    @classmethod
    def recover(cls, directory: str | os.PathLike, max_pending: int = 4096) -> SeqTracker:
        """Tracker holding everything already in the JSONL files of `directory`."""
        return _recover_tracker(Path(directory), max_pending)

    def observe(self, source: str, epoch: int, seq: int) -> str:
        key = (source, epoch)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream()
        if seq <= st.pos or seq in st.extra:
            self.duplicates += 1
            return "duplicate"
        if seq > st.top:
            missing = seq - st.top - 1
            self.gaps += missing
            st.top = seq
            result = "gap" if missing else "new"
        else:
            self.gaps -= 1  # a late arrival filling a known hole
            result = "new"
        if seq == st.pos + 1:
            st.pos = seq
            self._absorb(st)
        else:
            st.extra.add(seq)
            if len(st.extra) > self.max_pending:
                # Give up on the lowest hole so memory stays bounded.
                st.pos = min(st.extra)
                st.extra.discard(st.pos)
                self._absorb(st)
        return result

    @staticmethod
    def _absorb(st: _Stream) -> None:
        while st.extra and st.pos + 1 in st.extra:
            st.extra.discard(st.pos + 1)
            st.pos += 1

    def position(self, source: str, epoch: int) -> int:
        """Highest contiguous seq of (source, epoch); 0 if never seen."""
        st = self._streams.get((source, epoch))
        return st.pos if st else 0

    def highest(self, source: str, epoch: int) -> int:
        st = self._streams.get((source, epoch))
        return st.top if st else 0

    def positions(self) -> dict[tuple[str, int], int]:
        return {k: st.pos for k, st in self._streams.items()}

    # Checkpoint form used by the writer's .pos files.
    def _dump(self) -> dict:
        return {
            "gaps": self.gaps,
            "streams": [
                [s, e, st.pos, st.top, sorted(st.extra)] for (s, e), st in self._streams.items()
            ],
        }

    @classmethod
    def _load(cls, doc: dict, max_pending: int) -> SeqTracker:
        t = cls(max_pending=max_pending)
        t.gaps = int(doc["gaps"])
        for s, e, pos, top, extra in doc["streams"]:
            t._streams[(str(s), int(e))] = _Stream(int(pos), int(top), {int(x) for x in extra})
        return t


def _event_key(ev: Any) -> tuple[str, int, int] | None:
    if not isinstance(ev, dict):
        return None
    s, e, q = ev.get("source"), ev.get("epoch"), ev.get("seq")
    if isinstance(s, str) and type(e) is int and type(q) is int:
        return s, e, q
    return None


def _recover_tracker(directory: Path, max_pending: int) -> SeqTracker:
    files = list_event_files(directory)
    tracker = SeqTracker(max_pending=max_pending)
    start = 0
    # The newest closed file with a valid checkpoint covers itself and everything before.
    for i in range(len(files) - 1, -1, -1):
        try:
            doc = orjson.loads((files[i].parent / (files[i].name + ".pos")).read_bytes())
            if doc.get("file") != files[i].name:
                continue
            tracker = SeqTracker._load(doc, max_pending)
            start = i + 1
            break
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    for path in files[start:]:
        for ev in _iter_file(path, 0, None, _Counters()):
            key = _event_key(ev)
            if key is not None:
                tracker.observe(*key)
    return tracker


def recover_positions(directory: str | os.PathLike) -> dict[tuple[str, int], int]:
    """Highest contiguous seq per (source, epoch) in the event files of `directory`.

    Reads the newest ``.pos`` checkpoint (written when a file is closed) and replays only
    the files after it, so normally only the current file is parsed. For exact
    de-duplication after a restart (including seqs seen above a hole) prefer
    ``SeqTracker.recover(directory)``, which is built by the same replay.
    """
    return _recover_tracker(Path(directory), 4096).positions()


# ---------------------------------------------------------------------------- reading


@dataclass(slots=True)
class _Counters:
    corrupt: int = 0
    torn: int = 0
    stretches_skipped: int = 0
    files_skipped: int = 0


def _iter_file(path: Path, start: int, end: int | None, counters: _Counters) -> Iterator[Any]:
    """Parsed lines of path[start:end]; a final line without newline is torn and skipped."""
    for line in _iter_lines(path, start, end, counters):
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            counters.corrupt += 1


def _iter_lines(path: Path, start: int, end: int | None, counters: _Counters) -> Iterator[bytes]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - generator keeps it open across yields
    except OSError:
        return
    with f:
        f.seek(start)
        remaining = None if end is None else end - start
        tail = b""
        while remaining is None or remaining > 0:
            chunk = f.read(MiB if remaining is None else min(MiB, remaining))
            if not chunk:
                break
            if remaining is not None:
                remaining -= len(chunk)
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                if line:
                    yield line
        if tail:
            counters.torn += 1


def read_events(
    directory: str | os.PathLike,
    since: float | None = None,
    until: float | None = None,
    task: str | None = None,
    type_pattern: str | None = None,
    worker: str | None = None,
    text: str | None = None,
    limit: int | None = None,
    stats: dict | None = None,
) -> Iterator[dict]:
    """Events matching every given filter, in file order.

    ``since <= ts < until``; ``type_pattern`` is a glob ("task.*"); ``text`` is a
    case-insensitive substring of the raw JSON line. Torn last lines and corrupt lines
    are skipped; pass a dict as `stats` to get their counts ("corrupt", "torn") and how
    much the index let us skip ("stretches_skipped", "files_skipped").
    """
    counters = _Counters()
    needle = text.lower().encode() if text else None
    matched = 0
    try:
        if limit is not None and limit <= 0:
            return
        for path in list_event_files(directory):
            try:
                size = path.stat().st_size
            except OSError:
                continue
            entries, covered = _read_index(path, size)
            ranges = _wanted_ranges(entries, covered, size, since, until, task, counters)
            if not ranges and size:
                counters.files_skipped += 1
            for start, end in ranges:
                for line in _iter_lines(path, start, end, counters):
                    if needle is not None and needle not in line.lower():
                        continue
                    try:
                        ev = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        counters.corrupt += 1
                        continue
                    if not isinstance(ev, dict):
                        counters.corrupt += 1
                        continue
                    if not _matches(ev, since, until, task, type_pattern, worker):
                        continue
                    yield ev
                    matched += 1
                    if limit is not None and matched >= limit:
                        return
    finally:
        if stats is not None:
            stats.update(
                corrupt=counters.corrupt,
                torn=counters.torn,
                stretches_skipped=counters.stretches_skipped,
                files_skipped=counters.files_skipped,
            )


def _wanted_ranges(entries, covered, size, since, until, task, counters) -> list[tuple[int, int]]:
    """Byte ranges of one file that may hold matching events (merged where adjacent)."""
    ranges: list[tuple[int, int]] = []

    def add(a: int, b: int) -> None:
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))

    for e in entries:
        first, last = _as_float(e.get("first_ts")), _as_float(e.get("last_ts"))
        tasks = e.get("tasks")
        skip = not e.get("count")
        if since is not None or until is not None:
            if first is None or last is None:
                skip = True  # no event in it has a usable ts, so none can match
            elif (since is not None and last < since) or (until is not None and first >= until):
                skip = True
        if task is not None and isinstance(tasks, list) and task not in tasks:
            skip = True
        if skip:
            counters.stretches_skipped += 1
        else:
            add(int(e["offset"]), int(e["end"]))
    if covered < size:
        add(covered, size)  # not covered by the index: read it all
    return ranges


def _matches(ev: dict, since, until, task, type_pattern, worker) -> bool:
    if since is not None or until is not None:
        ts = _as_float(ev.get("ts"))
        if ts is None or (since is not None and ts < since) or (until is not None and ts >= until):
            return False
    if task is not None and ev.get("task") != task:
        return False
    if worker is not None and ev.get("worker") != worker:
        return False
    if type_pattern is not None:
        t = ev.get("type")
        if not isinstance(t, str) or not fnmatch.fnmatchcase(t, type_pattern):
            return False
    return True


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
        ts = _as_float(ev.get("ts"))
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
        self._buf_bytes = 0
        self._keys: list[tuple[str, int, int]] = []  # (source, epoch, seq) of buffered events
        self._stretches: list[_Stretch] = [_Stretch(0)]
        self._path: Path | None = None
        self._fd: int | None = None
        self._idx_fd: int | None = None
        self._size = 0  # last good size of the current file
        self._day = ""
        # Sequence state of everything written, checkpointed to .pos at rotation so a
        # restart only replays the newest file.
        self._tracker = _recover_tracker(self.directory, 1_000_000)  # see events.py
        self.events_written = 0

    # -- public API ------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Events appended but not yet durably written."""
        return sum(s.count for s in self._stretches)

    @property
    def current_file(self) -> Path | None:
        return self._path

    def append(self, events: Iterable[dict]) -> None:
        for ev in events:
            line = dumps_event(ev)
            self._buf.append(line)
            self._buf_bytes += len(line)
            key = _event_key(ev)
            if key is not None:
                self._keys.append(key)
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
            self._ensure_file(len(data))
            self._write_at(data, self._size)
        except OSError as exc:
            self._undo()
            raise EventLogError(
                f"cannot write events to {self._path or self.directory}: {exc}"
            ) from exc
        base = self._size
        self._size += len(data)
        self._write_index(base)
        for key in self._keys:
            self._tracker.observe(*key)
        self.events_written += self.buffered
        self._buf.clear()
        self._keys.clear()
        self._buf_bytes = 0
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

    def _ensure_file(self, incoming: int) -> None:
        day = time.strftime("%Y%m%d", time.gmtime(self.clock()))
        if self._fd is not None and day == self._day and self._size < self.max_bytes:
            return
        if self._fd is not None:
            self._close_file(checkpoint=True)
        # Continue the newest file of the day if it still has room (e.g. after a restart).
        todays = [p for p in list_event_files(self.directory) if p.name[7:15] == day]
        if todays:
            last = todays[-1]
            n = _parse_name(last.name)[1]
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
            _fsync_dir(self.directory)

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
        entries, covered = _read_index(self._path, self._size)
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
            doc = self._tracker._dump()
            doc["file"] = path.name
            try:
                _atomic_write(path.parent / (path.name + ".pos"), orjson.dumps(doc))
            except OSError:
                pass  # recovery then replays this file too: slower, still correct


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / (path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, "short write")
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
