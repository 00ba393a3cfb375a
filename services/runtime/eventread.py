"""Reading the JSONL event log: the files in write order, their index, and queries.

The layout of the events directory and the index format are described in
`eventlog.py`, which writes them. Readers trust an index only while its entries tile the
file contiguously from offset 0 and stay inside it; any byte range it does not cover is
read in full, so a lost, torn or stale index costs speed, never events.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

MiB = 1024 * 1024
FILE_RE = re.compile(r"^events-(\d{8})-(\d{3,})\.jsonl$")


def as_float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
        return float(value)
    return None


def time_order(event: dict) -> tuple[float, str]:
    """The history's order: (ts, id), a missing or non-finite ts as 0."""
    ts = event.get("ts")
    ts = float(ts) if isinstance(ts, int | float) and math.isfinite(ts) else 0.0
    return ts, str(event.get("id") or "")


def parse_name(name: str) -> tuple[str, int] | None:
    m = FILE_RE.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def list_event_files(directory: str | os.PathLike) -> list[Path]:
    """Event files in write order (sorted by day, then numerically by NNN)."""
    d = Path(directory)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    keyed = [(k, n) for n in names if (k := parse_name(n)) is not None]
    return [d / n for _, n in sorted(keyed)]


def read_index(path: Path, file_size: int) -> tuple[list[dict], int]:
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


@dataclass(slots=True)
class Counters:
    corrupt: int = 0
    torn: int = 0
    stretches_skipped: int = 0
    files_skipped: int = 0


def iter_file(path: Path, start: int, end: int | None, counters: Counters) -> Iterator[Any]:
    """Parsed lines of path[start:end]; a final line without newline is torn and skipped."""
    for line in _iter_lines(path, start, end, counters):
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            counters.corrupt += 1


def _iter_lines(path: Path, start: int, end: int | None, counters: Counters) -> Iterator[bytes]:
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
    counters = Counters()
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
            entries, covered = read_index(path, size)
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
        first, last = as_float(e.get("first_ts")), as_float(e.get("last_ts"))
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
        ts = as_float(ev.get("ts"))
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
