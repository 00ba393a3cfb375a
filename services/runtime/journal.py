"""Write-ahead journal and snapshot store for the stateful services.

A service loop appends records, calls `commit()` once per iteration and only then
acknowledges anything ("journal first, then acknowledge"). On restart it loads its
snapshot, then `replay(after_lsn=<lsn stored in the snapshot>)`.

Journal format, one record per line so an operator can `cat`/`grep` it:

    <crc32 of the json bytes, 8 hex chars> <json of the record with an "lsn" key>\\n

Recovery never raises on bad content (a crash at start-up becomes a permanent FATAL
under supervisord): a torn tail is cut off, a corrupt middle record is skipped and reported
(`ReplayReport.damage` says where, and what the damaged line still shows); what to do about
it is the service loop's choice (it halts: runtime/recovery.py).

Two segments: at each snapshot the journal is rotated (`rotate()`): the current file becomes
`NAME.wal.prev` and the one before is dropped. So the journal always reaches back to the
snapshot before the last one, and losing the newest snapshot loses nothing: the previous
snapshot plus both segments rebuild the same state.

Repairing a damaged journal (the service names this command when it halts):

    python -m cortex.services.runtime.journal repair --home HOME SERVICE

moves each damaged line out of the journal into `wal/SERVICE.wal.damaged` (with its file
and offset), prints what they held, and leaves the good records in place.
"""

from __future__ import annotations

import errno
import fcntl
import os
import zlib
from dataclasses import dataclass, field

import orjson

from cortex.services.runtime.durable import fsync_dir, write_atomic

FSYNC_POLICIES = ("always", "group", "off")
PREVIOUS_SUFFIX = ".prev"  # the segment before the current one
DAMAGED_SUFFIX = ".damaged"  # lines a repair moved out of the journal
SALVAGE_BYTES = 300  # of a damaged line, shown to the operator

_SNAPSHOT_OPTS = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


class JournalError(Exception):
    """The journal cannot be opened or written; nothing in the failed commit is durable."""

    code = "journal_error"


@dataclass
class ReplayReport:
    records: int = 0
    torn_tail: bool = False
    corrupt: list[str] = field(default_factory=list)
    skipped_before_lsn: int = 0
    tail: list[str] = field(default_factory=list)  # what was cut off when torn_tail (for logs)
    # One entry per damaged record before the last good one: file, offset, why, the last
    # good lsn before it and what the line still shows (its first SALVAGE_BYTES).
    damage: list[dict] = field(default_factory=list)
    first_lsn: int | None = None  # lsn of the first record above after_lsn (None: none)


def _parse(line: bytes) -> tuple[dict | None, str]:
    """One journal line (without its newline) -> (record, "") or (None, why it is bad)."""
    if len(line) < 11 or line[8:9] != b" ":  # shortest good line: "xxxxxxxx {}"
        return None, "malformed line"
    body = line[9:]
    if line[:8] != b"%08x" % zlib.crc32(body):
        return None, "checksum mismatch"
    try:
        record = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, "invalid JSON"
    lsn = record.get("lsn") if isinstance(record, dict) else None
    if type(lsn) is not int:  # bool is an int subclass: exclude it
        return None, "no integer lsn"
    return record, ""


class Journal:
    def __init__(self, path: str | os.PathLike, fsync: str = "group"):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}, not {fsync!r}")
        self.path = os.fspath(path)
        self.fsync = fsync
        self._fd: int | None = None
        self._offset = 0  # end of the last durable-or-written good record
        self._next_lsn = 1
        self._buffer: list[bytes] = []
        self._dirty_tail = False  # a failed truncate left bytes past _offset
        self._unsynced = False  # written under "group" with sync=False, not yet fdatasynced

    @property
    def pending(self) -> int:
        return len(self._buffer)

    @property
    def last_lsn(self) -> int:
        return self._next_lsn - 1

    def fileno(self) -> int:
        """The open segment's descriptor, for a sync made elsewhere (runtime/syncer.py)."""
        if self._fd is None:
            raise JournalError("journal not open: call replay() first")
        return self._fd

    @property
    def previous_path(self) -> str:
        return self.path + PREVIOUS_SUFFIX

    def replay(self, after_lsn: int = 0) -> tuple[list[dict], ReplayReport]:
        """Open for append and return the good records with lsn > after_lsn, in order
        (the previous segment's, then the current one's)."""
        if self._fd is not None:
            raise JournalError("journal already opened; replay() runs once per Journal")
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise JournalError(f"cannot open journal {self.path}: {e}") from e
        try:
            # A second live writer would interleave with ours and corrupt the file.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with open(fd, "rb", closefd=False) as f:
                data = f.read()
            previous = _read_if_there(self.previous_path)
        except OSError as e:
            os.close(fd)
            raise JournalError(f"cannot lock/read journal {self.path}: {e}") from e

        report = ReplayReport()
        scan = _Scan(after_lsn, report)
        if previous:
            # Closed whole at its rotation: anything bad in it, even at its end, is damage.
            scan.segment(self.previous_path, previous, tail_is_damage=True)
        good_end = scan.segment(self.path, data, tail_is_damage=False)
        records = scan.records
        report.records = len(records)
        self._buffer, self._dirty_tail = [], False  # a reopened Journal starts clean
        if good_end < len(data):
            # Cut the torn tail so the next append never follows garbage (docs/pitfalls.md).
            report.torn_tail = True
            try:
                os.ftruncate(fd, good_end)
                os.fsync(fd)
            except OSError:
                self._dirty_tail = True  # retried before the first write
        fsync_dir(directory)  # make a newly created file's name durable
        self._fd = fd
        self._offset = good_end
        self._next_lsn = scan.max_lsn + 1
        return records, report

    def append(self, record: dict) -> int:
        """Buffer one record in memory; returns its lsn (any "lsn" key given is replaced)."""
        if self._fd is None:
            raise JournalError("journal not open: call replay() first")
        lsn = self._next_lsn
        body = orjson.dumps({**record, "lsn": lsn})  # raises before the lsn is consumed
        self._buffer.append(b"%08x %b\n" % (zlib.crc32(body), body))
        self._next_lsn = lsn + 1
        return lsn

    def commit(self, sync: bool = True) -> int:
        """Write the buffered records; returns how many. Raises JournalError on I/O failure.

        Under "group", `sync=False` writes without fdatasync (a killed process loses
        nothing written; a power cut may): for turns that acknowledge nothing. The next
        commit with sync=True syncs those records too."""
        if self._fd is None:
            raise JournalError("journal not open: call replay() first")
        if not self._buffer:
            if sync and self._unsynced:
                try:
                    os.fdatasync(self._fd)
                except OSError as e:
                    raise JournalError(f"journal sync failed: {e}") from e
                self._unsynced = False
            return 0
        done = 0
        try:
            if self._dirty_tail:
                os.ftruncate(self._fd, self._offset)
                self._dirty_tail = False
            if self.fsync == "always":
                for line in self._buffer:
                    self._write(line)
                    os.fdatasync(self._fd)
                    self._offset += len(line)
                    done += 1
            else:
                data = b"".join(self._buffer)
                self._write(data)
                if self.fsync == "group":
                    if sync:
                        os.fdatasync(self._fd)
                    self._unsynced = not sync
                self._offset += len(data)
                done = len(self._buffer)
        except OSError as e:
            # Records already synced under "always" stay written; the rest stay pending.
            del self._buffer[:done]
            try:
                os.ftruncate(self._fd, self._offset)
            except OSError:
                self._dirty_tail = True
            raise JournalError(f"journal commit failed after {done} records: {e}") from e
        self._buffer.clear()
        return done

    def _write(self, data: bytes) -> None:
        # os.pwrite at our own offset: a short write (seen on ENOSPC) is not an exception.
        view = memoryview(data)
        offset = self._offset
        while view:
            n = os.pwrite(self._fd, view, offset)
            if n <= 0:
                raise OSError(errno.ENOSPC, "short write")
            view = view[n:]
            offset += n

    def compact(self) -> None:
        """Empty the journal; call right after a snapshot covering last_lsn is durable."""
        self.commit()
        # A crash or failure here is harmless: replay(after_lsn) skips covered records.
        try:
            os.ftruncate(self._fd, 0)
            self._offset = 0
            self._dirty_tail = False
            os.fdatasync(self._fd)
        except OSError as e:
            raise JournalError(f"journal compaction failed: {e}") from e

    def rotate(self) -> None:
        """Start a new segment; call right after a snapshot covering last_lsn is durable.
        The current file becomes the previous segment (the one before is dropped), so the
        records since the previous snapshot are kept: that snapshot can stand in for a
        lost newest one. A crash at any step leaves segments replay reads correctly."""
        self.commit()
        try:
            if os.path.exists(self.previous_path):
                os.unlink(self.previous_path)
            os.rename(self.path, self.previous_path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise JournalError(f"journal rotation failed: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise JournalError(f"cannot lock the new journal segment: {e}") from e
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        os.close(self._fd)
        self._fd = fd
        self._offset = 0
        self._dirty_tail = False
        self._unsynced = False

    def close(self) -> None:
        """Commit what is pending (best effort: raises if that fails) and release the file."""
        if self._fd is None:
            return
        try:
            self.commit()
        finally:
            os.close(self._fd)  # also drops the flock
            self._fd = None


def _read_if_there(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


class _Scan:
    """Reads segments in order, keeping the good records above `after_lsn` and noting
    every bad line. A bad line followed by a good record is damage, unless that record
    is covered by the snapshot (so was the bad line: it only costs a warning); bad lines
    at the end of the last segment are a torn tail; at the end of a closed segment
    (`tail_is_damage`), damage."""

    def __init__(self, after_lsn: int, report: ReplayReport):
        self.after_lsn = after_lsn
        self.max_lsn = after_lsn
        self.report = report
        self.records: list[dict] = []

    def segment(self, name: str, data: bytes, tail_is_damage: bool) -> int:
        """Scan one segment; returns the offset past its last good record."""
        report = self.report
        bad: list[tuple[int, str, bytes]] = []
        good_end = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl == -1:  # last write never finished its line
                bad.append((pos, f"incomplete record ({len(data) - pos} bytes)", data[pos:]))
                break
            record, why = _parse(data[pos:nl])
            lsn = record["lsn"] if record is not None else 0
            if record is not None and self.after_lsn < lsn <= self.max_lsn:
                record, why = None, f"lsn {lsn} not above {self.max_lsn}"  # never reorder
            if record is None:
                bad.append((pos, why, data[pos:nl]))
            else:
                for off, why_bad, line in bad:
                    if lsn <= self.after_lsn:  # before a covered record: covered too
                        report.corrupt.append(f"{name} offset {off}: {why_bad} "
                                              f"(covered by the snapshot)")
                    else:
                        self._damaged(name, off, why_bad, line)
                bad = []
                good_end = nl + 1
                if lsn <= self.after_lsn:
                    report.skipped_before_lsn += 1
                else:
                    if report.first_lsn is None:
                        report.first_lsn = lsn
                    self.records.append(record)
                self.max_lsn = max(self.max_lsn, lsn)
            pos = nl + 1
        for off, why, line in bad:
            if tail_is_damage:
                self._damaged(name, off, why, line)
            else:
                report.tail.append(f"offset {off}: {why}")
        return good_end

    def _damaged(self, name: str, offset: int, why: str, line: bytes) -> None:
        self.report.corrupt.append(f"{name} offset {offset}: {why}")
        self.report.damage.append({
            "file": name, "offset": offset, "why": why, "after_lsn": self.max_lsn,
            "shows": line[:SALVAGE_BYTES].decode(errors="replace")})


def snapshot_bytes(data: dict) -> bytes:
    """A snapshot's file content: pretty JSON, keys sorted, for an operator to read."""
    return orjson.dumps(data, option=_SNAPSHOT_OPTS) + b"\n"


def write_snapshot(path: str | os.PathLike, data: dict) -> None:
    """Atomically and durably replace `path` with pretty JSON."""
    write_atomic(path, snapshot_bytes(data))


def read_snapshot(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """(data, None) if good, (None, None) if missing, (None, reason) if unusable. Never raises."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot read snapshot {path}: {e}"
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return None, f"snapshot {path} is not valid JSON: {e}"
    if not isinstance(data, dict):
        return None, f"snapshot {path} holds a {type(data).__name__}, not an object"
    return data, None


def repair(path: str | os.PathLike) -> list[dict]:
    """Move the damaged lines of a journal's segments into `path.damaged` (appended, each
    after a line naming its file and offset); returns what was moved. Refuses (JournalError)
    while a service holds the journal."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise JournalError(f"cannot open journal {path}: {e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise JournalError(f"{path} is held by a running service that is not halted") \
                from None
        scan = _Scan(0, ReplayReport())
        segments = [(p, _read_if_there(p)) for p in (path + PREVIOUS_SUFFIX, path)]
        for name, data in segments:
            scan.segment(name, data, tail_is_damage=name != path)
        damage = scan.report.damage
        with open(path + DAMAGED_SUFFIX, "ab") as out:
            for name, data in segments:
                cut = sorted(d["offset"] for d in damage if d["file"] == name)
                if not cut:
                    continue
                kept, pos = [], 0
                for offset in cut:
                    end = data.find(b"\n", offset)
                    end = len(data) if end == -1 else end + 1
                    kept.append(data[pos:offset])
                    out.write(f"# {name} offset {offset}\n".encode() + data[offset:end])
                    pos = end
                kept.append(data[pos:])
                out.flush()
                os.fsync(out.fileno())
                write_atomic(name, b"".join(kept), mode=0o644)
        return damage
    finally:
        os.close(fd)


def main(argv=None) -> None:
    import argparse

    from cortex.protocol import locate

    parser = argparse.ArgumentParser(prog="python -m cortex.services.runtime.journal",
                                     description="Repair a service's damaged journal.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("repair", help="move damaged records out of SERVICE's journal")
    rep.add_argument("--home", help="suite home (default: $CORTEX_HOME or ./.cortex)")
    rep.add_argument("service", help="scheduler, ledger, pool, ...")
    args = parser.parse_args(argv)
    path = locate.find_home(args.home) / "wal" / f"{os.path.basename(args.service)}.wal"
    if not path.exists():
        raise SystemExit(f"no journal {path}")
    try:
        moved = repair(path)
    except JournalError as e:
        raise SystemExit(f"not repaired: {e}") from None
    if not moved:
        print(f"{path}: no damaged record")
        return
    for d in moved:
        print(f"moved {d['file']} offset {d['offset']} ({d['why']}; after lsn "
              f"{d['after_lsn']}) to {path}{DAMAGED_SUFFIX}:\n  {d['shows'][:200]}")
    print(f"{len(moved)} damaged record(s) set aside: what they held is lost to the "
          f"service (the event log may tell the story of the tasks named above); the "
          f"halted service restarts by itself and recovers the rest")


if __name__ == "__main__":
    main()
