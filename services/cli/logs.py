"""`cortex logs SERVICE [--follow]`: a service's log under <home>/logs/, like `tail`."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .argtypes import name, non_negative_int
from .reach import home_of
from .registry import CliError, Exit, arg, command, did_you_mean
from .render import emit

FOLLOW_POLL = 0.25  # seconds between looks at a followed file
BLOCK = 64 * 1024


def log_names(logs: Path) -> list[str]:
    """The logs there are: `<name>.log` for each service, helper and supervisord."""
    try:
        return sorted(p.name[: -len(".log")] for p in logs.glob("*.log") if p.is_file())
    except OSError:
        return []


def last_lines(path: Path, count: int) -> tuple[list[str], int]:
    """The last `count` lines of a file (all with count 0) and the offset of its end,
    reading from the end in blocks rather than the whole file."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        if count == 0:
            f.seek(0)
            data = f.read(end)
        else:
            data, start = b"", end
            while start > 0 and data.count(b"\n") <= count:
                start = max(0, start - BLOCK)
                f.seek(start)
                data = f.read(min(BLOCK, end - start)) + data
    lines = data.decode(errors="replace").splitlines()
    return (lines[-count:] if count else lines), end


@command("logs",
         arg("service", type=name, metavar="SERVICE",
             help="broker, events, ledger, scheduler, pool, supervisor-events, supervisord "
                  "(any <name>.log under <home>/logs/)"),
         arg("--lines", "-n", type=non_negative_int, default=50, metavar="N",
             help="show the last N lines first (default 50; 0 shows the whole log)"),
         arg("--follow", "-f", action="store_true",
             help="keep printing lines as they are written, across rotations, until Ctrl-C"))
def cmd_logs(args):
    """Show a service's log from <home>/logs/ (works with the suite stopped too).

    Every line is escaped for the terminal, as all text output is. --follow keeps
    reading as the file grows, and from the start of the new file when supervisord
    rotates it; Ctrl-C stops it (exit 0).
    """
    logs = home_of(args) / "logs"
    path = logs / f"{args.service}.log"
    if not path.is_file():
        known = log_names(logs)
        if not known:
            raise CliError(Exit.NOT_FOUND, f"no logs in {logs} (has the suite run here?)")
        raise CliError(Exit.USAGE, f"no log named {args.service!r} in {logs}"
                                   f"{did_you_mean(args.service, known)} (there are: "
                                   f"{', '.join(known)})")
    lines, offset = last_lines(path, args.lines)
    for line in lines:
        emit(line)
    if args.follow:
        try:
            follow(path, offset)
        except KeyboardInterrupt:
            pass
    return Exit.OK


def follow(path: Path, offset: int) -> None:
    """Print what is appended to `path` from `offset` on; when the file is replaced
    (rotated) or cut shorter, go on from the start of the new one."""
    handle = path.open("rb")
    handle.seek(offset)
    identity = os.fstat(handle.fileno()).st_ino
    pending = b""
    try:
        while True:
            chunk = handle.read(BLOCK)
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    emit(line.decode(errors="replace"))
                continue
            try:
                current = path.stat()
            except FileNotFoundError:
                current = None  # between the rename and the new file: look again
            if current is not None and (current.st_ino != identity
                                        or current.st_size < handle.tell()):
                pending += handle.read()  # written to the old file just before it moved
                for line in pending.splitlines():
                    emit(line.decode(errors="replace"))
                pending = b""
                handle.close()
                handle = path.open("rb")
                identity = os.fstat(handle.fileno()).st_ino
                continue
            time.sleep(FOLLOW_POLL)  # a file has nothing to wait on portably: poll it
    finally:
        handle.close()
