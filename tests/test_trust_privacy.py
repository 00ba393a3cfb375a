"""Private by default: another local user (`nobody`) reads no file of a running suite's
home and gets only refusals from its sockets and ports.

The home sits under a 0755 directory (pytest's own temporary directory is 0700 and
would hide a world-readable file), and the test first proves that `nobody` can read a
planted 0644 file there: the probe can see what a careless home would show.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - loaded here: nobody cannot read the stdlib's files
import json
import os
import pwd
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from cortex.services.control import Suite

from .conftest import SuiteRunner, suite_config, wait_for, write_config

pytestmark = pytest.mark.processes


def as_nobody(probe, *args) -> dict:
    """Run `probe(*args)` in a forked child that has become `nobody` (no groups), and
    return what it returned (a JSON-able dict)."""
    user = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, probe, report, exit without cleanup
        code = 0
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            out = json.dumps(probe(*args)).encode()
            with os.fdopen(write, "wb") as f:
                f.write(out)
        except BaseException:  # noqa: BLE001 - any failure is reported by the exit code
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the probe as nobody failed"
    return json.loads(data)


def read_files(paths: list[str]) -> dict:
    """Which of `paths` this user could open, read or list."""
    readable = []
    for path in paths:
        try:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                with open(path, "rb") as f:
                    f.read(1)
            readable.append(path)
        except OSError:
            pass
    return {"readable": readable}


def connect_sockets(paths: list[str], urls: list[str]) -> dict:
    """Which unix sockets accepted a connection, and what each URL answered."""
    accepted = []
    for path in paths:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(path)
            accepted.append(path)
        except OSError:
            pass
        finally:
            s.close()
    answers = {}
    for url in urls:  # http://127.0.0.1:PORT/PATH, asked by hand (no imports as nobody)
        hostport, _, path = url.removeprefix("http://").partition("/")
        host, _, port = hostport.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(f"GET /{path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n".encode())
                answers[url] = int(s.recv(64).split()[1])
        except (OSError, IndexError, ValueError) as e:
            answers[url] = f"refused: {e}"
    return {"accepted": accepted, "answers": answers}


@pytest.mark.heavy  # slow: real processes started, killed and restarted
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_nobody_reads_no_file_of_the_home_and_is_refused_by_every_socket():
    parent = Path(tempfile.mkdtemp(prefix="cxp", dir="/tmp"))
    runner = SuiteRunner()
    try:
        os.chmod(parent, 0o755)
        planted = parent / "planted.txt"
        planted.write_text("anyone may read this\n")
        os.chmod(planted, 0o644)
        assert as_nobody(read_files, [str(planted)])["readable"] == [str(planted)], \
            "the probe cannot even read a world-readable file: it would prove nothing"

        home = parent / "h"
        home.mkdir(mode=0o755)
        write_config(home, suite_config(1, ("echo",), snapshot_interval=None,
                                        task_heartbeat=None, dashboard=True))
        os.chmod(home / "cortex.toml", 0o644)  # as a careless editor would leave it
        suite = Suite(home)
        runner.suites.append((suite, set()))
        suite.start(attached=True, timeout=60)
        runner.seen(suite)
        from cortex.protocol import Client

        with Client(home, timeout=30) as c:
            task = c.submit("echo", "secret description", payload={"secret": "payload"})
            assert c.wait(task["id"], timeout=30)["state"] == "completed"
        wait_for(lambda: list((home / "events").glob("*.jsonl")), 30, "the event log")

        everything = [home, *sorted(home.rglob("*"))]
        files = [p for p in everything if not p.is_socket()]
        assert len(files) > 10
        for path in files:  # as the owner sees them: 0700 directories, 0600 files
            mode = stat.S_IMODE(path.lstat().st_mode)
            if not path.is_symlink():
                assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
        assert as_nobody(read_files, [str(p) for p in files])["readable"] == []

        sockets = [str(p) for p in everything if p.is_socket()]
        assert {"bus.sock", "events-in.sock", "events.sock", "work.sock"} <= {
            Path(p).name for p in sockets}
        urls = []
        for name in ("metrics.url", "dashboard.url"):
            if (home / "run" / name).exists():
                url = (home / "run" / name).read_text().strip()
                # What nobody would try: the address without any token it cannot read.
                urls.append(url.split("?")[0].split("#")[0])
        probed = as_nobody(connect_sockets, sockets, urls)
        assert probed["accepted"] == [], probed
        for url, answer in probed["answers"].items():
            assert answer in (401, 403) or str(answer).startswith("refused"), (url, answer)
        assert probed["answers"], "no metrics or dashboard endpoint was probed"
    finally:
        problems = runner.stop_all()
        shutil.rmtree(parent, ignore_errors=True)
    assert not problems, problems
