"""What every service process shares: its home, settings, lock, signals and logging."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import zmq

from cortex.protocol import locate
from cortex.services.runtime import lineage, memtrace
from cortex.services.runtime import settings as config

SUBDIRS = ("run", "state", "wal", "events", "logs", "models")


def suite_secret(home: Path) -> str:
    """The suite's secret, made now if the suite has none yet (the first process to ask
    publishes it whole with a hard link, so no one reads it half written; `cortex up`
    makes a new one at every start). The file is 0600 in the 0700 run/: only the
    owner's processes can read it. The client library never does."""
    path = locate.secret_path(home)
    for _ in range(3):
        try:
            secret = path.read_text().strip()
            if secret:
                return secret
            path.unlink(missing_ok=True)  # empty: a torn write from an older version
        except FileNotFoundError:
            pass
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process published first: read theirs
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def new_suite_secret(home: Path) -> None:
    """A new secret for a new start of the suite (`cortex up`)."""
    locate.secret_path(home).unlink(missing_ok=True)
    suite_secret(home)


PRIVATE_UMASK = 0o077  # what the suite makes is its owner's alone: 0700 dirs, 0600 files


def private_umask() -> None:
    """Every process of the suite (services, workers, the CLI, supervisord) makes files
    for its owner alone, whatever umask it was started with: tasks' payloads, results
    and the configuration are nobody else's to read."""
    os.umask(PRIVATE_UMASK)


def prepare_home(home: Path) -> None:
    """Create the home and its directories, the owner's alone (run/'s sockets accept
    anyone who can reach them: the directory is the lock)."""
    private_umask()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    for sub in SUBDIRS:
        (home / sub).mkdir(mode=0o700, exist_ok=True)
    for path in (home, *(home / sub for sub in SUBDIRS)):
        _owner_only(path)


def make_private(home: Path) -> int:
    """Take group and other permissions off everything under the home (made before the
    suite set its umask, or by hand): `cortex init` and `cortex up` call it. Symlinks are
    left alone (their targets are not ours to change). Returns how many were changed."""
    changed = 0
    for root, dirs, files in os.walk(home):
        for name in [*dirs, *files]:
            changed += _owner_only(Path(root) / name)
    return changed + _owner_only(home)


def _owner_only(path: Path) -> int:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    if stat.S_ISLNK(info.st_mode) or not info.st_mode & 0o077:
        return 0
    try:
        os.chmod(path, stat.S_IMODE(info.st_mode) & 0o700)
    except (FileNotFoundError, PermissionError):
        return 0  # gone meanwhile, or another owner's: nothing of ours
    return 1


def start_process(home: Path) -> config.Settings:
    """What a process of the suite does first: a private umask, the home's directories,
    then its settings (a ConfigError ends it with exit 8, see `entry.serve`)."""
    prepare_home(home)
    return config.load(home)


def join_generation(home: Path, name: str) -> None:
    """One generation of the suite at a time: a program of supervisord dies with it (a
    TERM, so it stops cleanly), and one that finds its supervisord gone already exits."""
    supervisor = lineage.supervisord_parent(home)
    if supervisor == 0:
        raise SystemExit(f"{name}: the supervisord that started me is gone")
    if supervisor:
        lineage.die_with_parent(supervisor, signal.SIGTERM)


class ServiceRuntime:
    """Start-up and shut-down chores of one service; the service keeps its own loop."""

    def __init__(self, name: str, home=None):
        self.name = name
        self.home = locate.find_home(home)
        join_generation(self.home, name)
        logging.basicConfig(
            level=os.environ.get("CORTEX_LOG_LEVEL", "INFO"), stream=sys.stderr,
            format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s")
        self.log = logging.getLogger(f"cortex.{name}")
        self.settings = start_process(self.home)
        self.endpoints = locate.endpoints(self.home)
        # One live process per service: a second binder of an ipc path silently steals it.
        self._lock = open(self.home / "run" / f"{name}.lock", "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{name}: another {name} is running for {self.home}") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()
        self.stopping = False
        self.started = time.time()
        self.epoch = time.time_ns()
        # Signals wake the poll loop through this socket pair, so a stop is immediate.
        self.wake_r, self._wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.memory = memtrace.from_environment(self.log)  # None unless CORTEX_TRACEMALLOC
        self.ctx = zmq.Context()

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True  # the loop notices and stops cleanly

    def drain_wakeups(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def remove_socket(self, endpoint: str) -> None:
        """libzmq leaves ipc socket files behind: remove the ones we bound."""
        if endpoint.startswith("ipc://"):
            try:
                os.unlink(endpoint[len("ipc://"):])
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if self.memory is not None:
            self.memory.mark()
        signal.set_wakeup_fd(-1)
        self.wake_r.close()
        self._wake_w.close()
        self.ctx.term()
        self._lock.close()
