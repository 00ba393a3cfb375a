"""A reading position in the JSONL event log, kept on disk: how far PostgreSQL has it.

The PostgreSQL copy follows the log instead of keeping a backlog of its own: whatever the
database has not confirmed is still in the JSONL files, after the cursor. So a database
down for hours, a router killed mid-batch or a full memory lose nothing; the cost of a
crash is re-reading (and idempotently re-inserting) what came after the last saved
position.

Only complete lines are read: the writer cuts a torn tail before it writes on, and a
file is never appended to once a newer one exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import orjson

from cortex.services.runtime.durable import remove_temp_files, write_atomic
from cortex.services.runtime.eventread import list_event_files, parse_name


@dataclass(frozen=True, slots=True)
class Position:
    file: str  # an events-YYYYMMDD-NNN.jsonl name ("" before the first file)
    offset: int  # bytes of that file already read


@dataclass(slots=True)
class Batch:
    events: list[dict]
    end: Position  # where the next read starts once these are confirmed
    lines: int  # complete lines consumed (events plus unreadable lines)
    unreadable: int  # lines that are not JSON objects


def _key(name: str) -> tuple[str, int]:
    return parse_name(name) or ("", -1)


class LogCursor:
    def __init__(self, directory: str | os.PathLike, path: str | os.PathLike):
        self.directory = Path(directory)
        self.path = Path(path)

    # -- the saved position -----------------------------------------------------------
    def load(self) -> Position | None:
        """The saved position; None if there is none (or it cannot be read)."""
        remove_temp_files(self.path.parent, self.path.name)
        try:
            doc = orjson.loads(self.path.read_bytes())
            position = Position(str(doc["file"]), int(doc["offset"]))
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return position if position.offset >= 0 else None

    def save(self, position: Position) -> None:
        write_atomic(self.path, orjson.dumps({"file": position.file,
                                              "offset": position.offset}))

    def end(self) -> Position:
        """The end of the log as it is now."""
        files = list_event_files(self.directory)
        if not files:
            return Position("", 0)
        try:
            return Position(files[-1].name, files[-1].stat().st_size)
        except OSError:
            return Position(files[-1].name, 0)

    # -- reading ----------------------------------------------------------------------
    def _files_from(self, position: Position) -> list[Path]:
        start = _key(position.file)
        return [p for p in list_event_files(self.directory) if _key(p.name) >= start]

    def read(self, position: Position, max_events: int) -> Batch:
        """Up to `max_events` events after `position` (an empty batch at the end)."""
        events: list[dict] = []
        lines = unreadable = 0
        end = position
        for path in self._files_from(position):
            offset = end.offset if path.name == end.file else 0
            try:
                with open(path, "rb") as f:
                    if offset > os.fstat(f.fileno()).st_size:
                        offset = 0  # the file was replaced: read it again (inserts are idempotent)
                    f.seek(offset)
                    for line in f:
                        if not line.endswith(b"\n"):
                            break  # still being written
                        offset += len(line)
                        lines += 1
                        try:
                            event = orjson.loads(line)
                        except orjson.JSONDecodeError:
                            event = None
                        if isinstance(event, dict):
                            events.append(event)
                        else:
                            unreadable += 1
                        if len(events) >= max_events:
                            return Batch(events, Position(path.name, offset), lines, unreadable)
            except FileNotFoundError:
                continue  # removed by hand: go on with the next one
            end = Position(path.name, offset)
        return Batch(events, end, lines, unreadable)

    def count_after(self, position: Position) -> int:
        """Complete lines after `position`: the events the copy is behind by."""
        count = 0
        for path in self._files_from(position):
            offset = position.offset if path.name == position.file else 0
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    while chunk := f.read(1 << 20):
                        count += chunk.count(b"\n")
            except OSError:
                continue
        return count
