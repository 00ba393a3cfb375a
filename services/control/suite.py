"""Starting, checking and stopping a whole suite through supervisord.

Used by the CLI (`cortex up/down/status`), the tests and the load-test harness, so there
is one way to do it. `start(attached=True)` keeps supervisord as our child (tests, demo,
load tests: we reap it); otherwise it daemonizes as usual.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from importlib import resources
from pathlib import Path

import psutil

from cortex.protocol import errors
from cortex.protocol.client import Client
from cortex.services.runtime import lineage
from cortex.services.runtime.process import (
    PRIVATE_UMASK,
    make_private,
    new_suite_secret,
    prepare_home,
)
from cortex.services.runtime.settings import DEFAULT_HANDLERS, ConfigError
from cortex.services.runtime.settings import load as load_settings

SERVICES = ("broker", "events", "ledger", "scheduler", "pool")
LEFTOVER_GRACE = 10.0  # seconds an earlier generation's services get to stop (snapshot)
PR_SET_CHILD_SUBREAPER = 36
SHIPPED_HANDLERS = frozenset(DEFAULT_HANDLERS.values())


class SuiteError(Exception):
    code = "suite_error"


# Run in a child interpreter by `check_handlers`: imports each "module:function" handler
# (a JSON map of task type -> spec on stdin) and prints what failed, as JSON.
_IMPORT_HANDLERS = """
import importlib, json, shutil, sys
failed = {}
for task_type, spec in json.load(sys.stdin).items():
    try:
        if isinstance(spec, dict):
            if shutil.which(spec["command"][0]) is None:
                raise FileNotFoundError(f"no program {spec['command'][0]!r}")
            continue
        module, _, attr = spec.partition(":")
        if not callable(getattr(importlib.import_module(module), attr)):
            raise TypeError(f"{spec} is not callable")
    except BaseException as e:
        failed[task_type] = f"{type(e).__name__}: {e}"
print(json.dumps(failed))
"""


def check_handlers(handlers: dict, python: str, cwd: Path, timeout: float = 60.0) -> None:
    """Import every configured handler in a child process (what a worker does at its
    start), so `cortex up` fails with the import error instead of reporting success
    while a group's workers crash-loop. ConfigError names the first that failed.
    Handlers shipped with this package, for this interpreter, need no child: they import
    wherever the package does (and a start costs one interpreter less)."""
    import json

    if python == sys.executable and all(
            isinstance(spec, str) and spec in SHIPPED_HANDLERS for spec in handlers.values()):
        return
    try:
        done = subprocess.run([python, "-c", _IMPORT_HANDLERS], input=json.dumps(handlers),
                              capture_output=True, text=True, timeout=timeout, cwd=cwd)
        failed = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        raise ConfigError(f"[handlers]: could not check the handlers with {python}: {e}"
                          ) from None
    if failed:
        task_type, why = sorted(failed.items())[0]
        spec = handlers[task_type]
        shown = spec if isinstance(spec, str) else " ".join(spec["command"])
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise ConfigError(f"[handlers] {task_type} = {shown!r} cannot be loaded: "
                          f"{why.splitlines()[0][:300] if why else why}{more}")


def config_path() -> Path:
    """The supervisord.conf shipped with the package (the repo root links to it)."""
    return Path(str(resources.files("cortex.services.control") / "supervisord.conf"))


def become_subreaper() -> None:
    """Adopt orphaned descendants (a daemonized supervisord) so we can reap them, even
    where PID 1 does not."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)
    except (OSError, AttributeError):
        pass


def reap_orphans() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def zombies(pids) -> list[int]:
    """Those of `pids` that are zombies (exited, not reaped)."""
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.Error:
            pass
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Suite:
    def __init__(self, home: Path, python: str | None = None):
        self.home = Path(home).absolute()
        self.python = python or sys.executable
        self.conf = config_path()
        self.proc: subprocess.Popen | None = None
        # What `start` / `stop` had to end ("pid (command)"), for the CLI to say so.
        self.ended_earlier: list[str] = []
        self.killed: list[str] = []

    @property
    def env(self) -> dict:
        # The suite tag: every process of this home (services, workers, what handlers
        # start, even in a new session) inherits it, so none can be overlooked.
        return {**os.environ, "CORTEX_HOME": str(self.home), "CORTEX_PYTHON": self.python,
                "CORTEX_DASHBOARD": "true" if self.dashboard_enabled() else "false",
                lineage.SUITE_TAG: str(self.home)}

    def lock_holders(self) -> list[int]:
        """Pids of live processes holding a service lock of this home (run/NAME.lock)."""
        import fcntl

        held = []
        for path in sorted((self.home / "run").glob("*.lock")):
            try:
                with open(path, "r+") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        continue  # nobody holds it
                    except BlockingIOError:
                        held.append(int(f.read().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        return [p for p in held if _alive(p)]

    def leftovers(self) -> list[psutil.Process]:
        """Live processes of this home that no live supervisord of it owns: an earlier
        generation's services and workers (orphaned by a killed supervisord), what their
        handlers left, found by the suite tag and by the service locks."""
        found = {p.pid: p for p in lineage.tagged(lineage.SUITE_TAG, str(self.home))}
        for pid in self.lock_holders():
            try:
                found.setdefault(pid, psutil.Process(pid))
            except psutil.Error:
                continue
        sup = self.supervisord_pid()
        if sup:
            try:
                owned = {sup, *(c.pid for c in psutil.Process(sup).children(recursive=True))}
            except psutil.Error:
                owned = {sup}
            for pid in owned:
                found.pop(pid, None)
        found.pop(os.getpid(), None)
        return list(found.values())

    def end_leftovers(self, grace: float) -> list[str]:
        """End the leftovers (TERM, KILL after `grace`); returns what was ended."""
        procs = self.leftovers()
        if not procs:
            return []
        ended = lineage.describe(lineage.with_descendants(procs))
        lineage.end(procs, grace)
        reap_orphans()
        return ended

    def supervisord_pid(self) -> int | None:
        try:
            pid = int((self.home / "run" / "supervisord.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def rpc(self):
        from supervisor.xmlrpc import SupervisorTransport

        url = f"unix://{self.home}/run/supervisor.sock"
        return xmlrpc.client.ServerProxy("http://127.0.0.1",
                                         transport=SupervisorTransport(None, None, url))

    def processes(self) -> list[dict]:
        """supervisord's view of the five: name, statename, pid, start time."""
        try:
            return self.rpc().supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Error) as e:
            raise SuiteError(f"supervisord is not running for {self.home}") from e

    def start(self, attached: bool = False, timeout: float = 60.0) -> None:
        prepare_home(self.home)
        if self.supervisord_pid():
            raise SuiteError(f"the suite is already running for {self.home}")
        # One generation at a time: what an earlier supervisord of this home left running
        # would answer for us and hold the service locks against our services.
        self.ended_earlier = self.end_leftovers(LEFTOVER_GRACE)
        if self.leftovers():
            raise SuiteError("processes of an earlier start of this home would not end: "
                             + ", ".join(lineage.describe(self.leftovers())))
        # A bad configuration or an unloadable handler would only crash-loop: refuse now.
        check_handlers(load_settings(self.home).handlers, self.python, self.home)
        make_private(self.home)  # what was made before (or by hand) is the owner's alone
        for stale in ("supervisor.sock", "supervisord.pid", "dashboard.url"):
            (self.home / "run" / stale).unlink(missing_ok=True)
        new_suite_secret(self.home)  # this start's proof for the suite's own processes
        cmd = [self.python, "-m", "supervisor.supervisord", "-c", str(self.conf)]
        if attached:
            self.proc = subprocess.Popen([*cmd, "-n"], env=self.env, start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         umask=PRIVATE_UMASK)
        else:
            done = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                                  umask=PRIVATE_UMASK)
            if done.returncode != 0:
                raise SuiteError(f"supervisord did not start: {done.stderr.strip()[-500:]}")
        began = time.monotonic()
        self.wait_ready(timeout)
        # Ready is also supervisord's word: the services answer within its first second,
        # which it counts as STARTING, and what `supervisorctl status` says after a start
        # should agree with what the start said.
        self.wait_past_starting(min(3.0, max(0.0, timeout - (time.monotonic() - began))))

    def ping(self, timeout: float = 2.0) -> dict[str, bool]:
        """Does each service answer on the bus?"""
        answers = {}
        with Client(self.home, timeout=timeout) as client:
            for service, op in (("broker", "broker.status"), ("events", "events.status"),
                                ("ledger", "ledger.status"), ("scheduler", "scheduler.status"),
                                ("pool", "pool.status")):
                try:
                    client.call(service, op, timeout=timeout)
                    answers[service] = True
                except errors.CortexError:
                    answers[service] = False
        return answers

    def dashboard_enabled(self) -> bool:
        try:
            return load_settings(self.home).dashboard.enabled
        except ConfigError:
            return False  # the services refuse the config and say why

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        # supervisord starts the programs on its first turn, a second after it starts
        # unless woken: wake it as soon as its socket is there.
        sock = self.home / "run" / "supervisor.sock"
        while not sock.exists() and time.monotonic() < deadline and (
                self.proc is None or self.proc.poll() is None):
            time.sleep(0.02)  # waiting for another process to create a file
        self.poke()
        answers: dict[str, bool] = {}
        # The dashboard is a client, not a service: it is ready once its URL is written.
        dashboard = self.dashboard_enabled()
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise SuiteError(f"supervisord exited with {self.proc.returncode}; "
                                 f"see {self.home}/logs/supervisord.log")
            answers = self.ping(timeout=min(2.0, max(0.2, deadline - time.monotonic())))
            if dashboard:
                answers["dashboard"] = (self.home / "run" / "dashboard.url").exists()
            if all(answers.values()):
                return
            # Before the bus socket exists every call fails at once, and the dashboard's
            # URL file is another process's to write: nothing to poll, so pause.
            time.sleep(0.05)
        missing = [s for s, ok in answers.items() if not ok] or list(SERVICES)
        raise SuiteError(f"not answering on the bus after {timeout:.0f} s: "
                         f"{', '.join(missing)} (logs in {self.home}/logs/)")

    def wait_past_starting(self, timeout: float = 3.0) -> bool:
        """Until supervisord counts no program as STARTING (its first `startsecs`), so that
        `supervisorctl status` right after a start says RUNNING; whether it got there
        within `timeout` (a program still STARTING then is for `cortex status` to show)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(p.get("statename") != "STARTING" for p in self.processes()):
                    return True
            except SuiteError:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)  # supervisord's own state: polled with a deadline

    def pids(self) -> list[int]:
        """Every live process of the suite: supervisord, services, workers."""
        pids = []
        sup = self.supervisord_pid()
        if sup:
            pids.append(sup)
            try:
                pids += [p.pid for p in psutil.Process(sup).children(recursive=True)]
            except psutil.Error:
                pass
        try:
            import json
            rows = json.loads((self.home / "run" / "workers.pids").read_text())
            pids += [int(r["pid"]) for r in rows]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return sorted({p for p in pids if _alive(p)})

    def poke(self) -> None:
        """Wake supervisord's loop, which otherwise acts only every second when nothing
        happens (docs/pitfalls.md, "supervisord"): it starts the programs on its first
        turn, notices that a program exited only when something wakes it after the exit,
        and stops one program at a time. So while it starts or stops the suite, a poke
        per short while lets each step follow the previous one at once."""
        try:
            self.rpc().supervisor.getState()
        except (OSError, xmlrpc.client.Error):
            pass  # shutting down answers with a fault: the wake-up is all we wanted

    @staticmethod
    def _stop_rest_at_once(programs: dict[str, int]) -> dict[str, int]:
        """supervisord stops one program at a time, each on a turn of its loop. The pool
        goes first (its workers finish their tasks while the others still listen); once
        it is gone, TERM the others together (a shutting-down supervisord restarts none).
        Returns what is still to be signalled."""
        if not programs or _alive(programs.get("pool", 0)):
            return programs
        for pid in programs.values():
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        return {}

    def stop(self, timeout: float = 90.0) -> None:
        """Stop everything and return only when no process of the suite is left;
        `self.killed` names what had to be killed (or ended without its supervisord)."""
        self.killed = []
        if not self.supervisord_pid():  # nothing would stop them: end them ourselves
            self.killed += self.end_leftovers(LEFTOVER_GRACE)
        before = self.pids()
        try:
            programs = {row["name"]: row["pid"] for row in self.processes() if row.get("pid")}
        except SuiteError:
            programs = {}
        try:
            self.rpc().supervisor.shutdown()
        except (OSError, xmlrpc.client.Error):
            pass  # not running (or already stopping): fall through to the checks
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            programs = self._stop_rest_at_once(programs)
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    self.poke()
                    continue
            left = [p for p in before if _alive(p)] + self.pids()
            if not left:
                break
            reap_orphans()
            self.poke()
            time.sleep(0.05)  # a CLI waiting for other processes to exit: nothing to poll
        for pid in set(before + self.pids()):
            if _alive(pid):  # past the deadline: kill what we know by pid
                try:
                    self.killed += lineage.describe([psutil.Process(pid)])
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, psutil.Error):
                    pass
        if self.proc is not None:
            self.proc.wait()
        reap_orphans()
        # Whatever escaped its process group and its parent (a handler's setsid child).
        self.killed += self.end_leftovers(grace=1.0)
        run = self.home / "run"
        for leftover in [*run.glob("*.sock"), run / "dashboard.url"]:
            leftover.unlink(missing_ok=True)
