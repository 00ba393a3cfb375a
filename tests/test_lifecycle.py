"""Nothing left running (issue 14, cases 3, 4 and 7, and a crash-looping group): on the
real suite.

These tests run twice in CI: as they are, and with CORTEX_PORTABLE=1 (the Linux-only
process calls switched off, what macOS has), so the portable fallbacks keep the same
guarantees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from cortex.protocol import Client
from cortex.services.control import Suite
from cortex.services.runtime import lineage

from .conftest import (
    jsonl_events_of,
    pid_alive,
    short_home,
    suite_config,
    wait_for,
    write_config,
)

# A Python handler (in the worker's own process) starting a child in a new session.
PY_HANDLER = '''
import subprocess, time

def detach(ctx):
    subprocess.Popen(["sleep", "1003"], start_new_session=True)
    seconds = float((ctx.payload or {}).get("seconds", 0))
    if ctx.cancelled.wait(seconds):
        raise RuntimeError("cancelled")
    return {"detached": True}

def broken_at_start(ctx):
    return {}
'''


def _config(workers: int, extra: str = "") -> str:
    return suite_config(workers, ("echo", "sleep", "detach", "pydetach"), extra=(
            # A command detaching a grandchild in a new session, output not redirected:
            # the grandchild holds the command's stdout.
            '[handlers]\ndetach = { command = ["sh", "-c", "setsid sleep 1002 & echo {}"] }\n'
            'pydetach = "h9handlers:detach"\n' + extra))


def start(suites, workers: int = 2, extra: str = "", module: str = PY_HANDLER):
    home = short_home()
    (home / "h9handlers.py").write_text(module)  # found by the workers on PYTHONPATH
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(home), *filter(None, [before])])
    write_config(home, _config(workers, extra))

    suite = Suite(home)
    entry = (suite, set())
    suites.suites.append(entry)
    try:
        suite.start(attached=True, timeout=90)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    entry[1].update(suite.pids())
    return suite


def of_home(home) -> list[psutil.Process]:
    """Live processes carrying the home's suite tag."""
    return lineage.tagged(lineage.SUITE_TAG, str(home))


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def sleepers(home, seconds: str) -> list[psutil.Process]:
    found = []
    for proc in of_home(home):
        try:
            if proc.cmdline()[:2] == ["sleep", seconds]:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.heavy  # slow: real processes started, killed and restarted
def test_a_tasks_detached_processes_end_with_it(suites):
    suite = start(suites)
    with Client(suite.home, timeout=60) as c:
        wait_for(lambda: len(c.workers()) == 2, 60, "two registered workers")
        # The command's grandchild holds its stdout: the task still ends when the command
        # does (well before its 60 s timeout), and the grandchild is gone.
        shell = c.submit("detach", "setsid grandchild", timeout=60, retries=0)
        done = c.wait(shell["id"], timeout=50)
        assert done["state"] == "completed", done
        wait_for(lambda: not sleepers(suite.home, "1002"), 10, "the setsid sleep to end")
        # A Python handler's new-session child ends when its task does.
        py = c.submit("pydetach", "new session", timeout=60, retries=0)
        assert c.wait(py["id"], timeout=50)["state"] == "completed"
        wait_for(lambda: not sleepers(suite.home, "1003"), 10, "the new-session child to end")
        # ... and when it is cancelled.
        run = c.submit("pydetach", "cancelled", payload={"seconds": 120}, timeout=200,
                       retries=0)
        wait_for(lambda: sleepers(suite.home, "1003"), 30, "the child to start")
        c.cancel(run["id"])
        wait_for(lambda: not sleepers(suite.home, "1003"), 15, "the child of a cancelled task")
        # ... and when it times out.
        late = c.submit("pydetach", "times out", payload={"seconds": 120}, timeout=2,
                        retries=0)
        assert c.wait(late["id"], timeout=60)["state"] in ("failed", "dead")
        wait_for(lambda: not sleepers(suite.home, "1003"), 15, "the child of a timed-out task")
        # ... and at `cortex down`, with a task still running.
        c.submit("pydetach", "down", payload={"seconds": 120}, timeout=200, retries=0)
        wait_for(lambda: sleepers(suite.home, "1003"), 30, "the child to start")
    suite.stop()
    assert not of_home(suite.home), lineage.describe(of_home(suite.home))


def test_a_timed_out_handler_is_ended_promptly(suites):
    """TERM, then KILL after at most a second: the worker is gone long before the
    five-second grace that a finishing worker would get."""
    suite = start(suites, workers=1)
    with Client(suite.home, timeout=60) as c:
        wait_for(lambda: len(c.workers()) == 1, 60, "a registered worker")
        task = c.submit("sleep", "sleeps past its timeout", payload={"seconds": 60},
                        timeout=1, retries=0)
        running = wait_for(lambda: (t := c.status(task["id"]))["worker"] and t, 30,
                           "dispatch")
        pid = next(w["pid"] for w in c.call("pool", "pool.status")["workers"]
                   if w["name"] == running["worker"])
        assert c.wait(task["id"], timeout=30)["state"] in ("failed", "dead")
        # Polled with a deadline shorter than the grace a stop gives the task in hand.
        wait_for(lambda: not pid_alive(pid), 4.5, "the timed-out worker to be killed")
    events = [e for e in jsonl_events_of(suite.home)
              if e["type"] in ("worker.stopping", "worker.killed", "worker.exited")
              and e.get("worker") == running["worker"]]
    stopping = next(e for e in events if e["type"] == "worker.stopping")
    assert stopping["data"]["grace"] <= 1.0, stopping


@pytest.mark.heavy  # slow: real processes started, killed and restarted
def test_kill_9_of_supervisord_then_up_and_down(suites):
    """One generation: services die with their supervisord; `up` ends what is left of an
    earlier start of the home and says so; `down` leaves nothing and says what it
    killed."""
    suite = start(suites)
    env = {**os.environ, "CORTEX_HOME": str(suite.home)}
    sup = suite.supervisord_pid()
    programs = psutil.Process(sup).children()
    os.kill(sup, signal.SIGKILL)
    suite.proc.wait()
    # Each program sees its supervisord go (death signal, or its watcher) and stops.
    wait_for(lambda: not [p for p in programs if alive(p)], 60,
             "the orphaned services to stop")
    # An orphan of an earlier generation, made by hand: a process of the home that no
    # supervisord owns.
    stray = subprocess.Popen(["sleep", "1004"], env={**env, lineage.SUITE_TAG: str(suite.home)},
                             start_new_session=True)
    try:
        up = subprocess.run([sys.executable, "-m", "cortex.services.cli", "--home",
                             str(suite.home), "up", "--timeout", "90"],
                            capture_output=True, text=True, timeout=200, env=env)
        assert up.returncode == 0, up.stderr
        assert f"{stray.pid} (sleep 1004)" in up.stderr, up.stderr
        assert stray.wait(timeout=30) is not None
        # The new generation answers, and every program of it comes to RUNNING (supervisord
        # says so once a program has lived its startsecs, which can be just after `up`).
        wait_for(lambda: all(p["statename"] == "RUNNING" for p in suite.processes()
                             if p["name"] != "dashboard"), 30, "every program RUNNING")
        # A leftover the new supervisord does not own: `down` ends it and says so.
        stray2 = subprocess.Popen(["sleep", "1005"],
                                  env={**env, lineage.SUITE_TAG: str(suite.home)},
                                  start_new_session=True)
        began = time.monotonic()
        down = subprocess.run([sys.executable, "-m", "cortex.services.cli", "--home",
                               str(suite.home), "down"],
                              capture_output=True, text=True, timeout=200, env=env)
        took = time.monotonic() - began
        assert down.returncode == 0, down.stderr
        assert f"{stray2.pid} (sleep 1005)" in down.stderr, down.stderr
        assert stray2.wait(timeout=30) is not None
        print(f"cortex down after kill -9 + up: {took:.2f} s")
    finally:
        for proc in (stray,):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not of_home(suite.home), lineage.describe(of_home(suite.home))


def test_a_crash_looping_group_is_shown_with_its_last_error(suites):
    """The handler imports (`cortex up` checks that), but its workers die at start (a
    file they read is missing, simulated for the workers of one group only): `cortex
    status` shows the group crashing with the first lines of its traceback."""
    broken = PY_HANDLER + (
        "\nimport os\nif os.environ.get('CORTEX_WORKER', '').startswith('w-broken'):\n"
        "    raise FileNotFoundError('settings.json: no such file (broken on purpose)')\n")
    suite = start(suites, workers=1, module=broken, extra=(
        'fragile = "h9handlers:broken_at_start"\n'
        '[pool.groups.broken]\ncount = 1\ntypes = ["fragile"]\n'))
    with Client(suite.home, timeout=60) as c:
        crashing = wait_for(lambda: c.call("pool", "pool.status")["crashing"].get("broken"),
                            60, "the broken group to be seen crashing")
        assert "FileNotFoundError: settings.json" in crashing["error"], crashing
        assert "Traceback" in crashing["error"], crashing
    out = subprocess.run([sys.executable, "-m", "cortex.services.cli", "--home",
                          str(suite.home), "status"], capture_output=True, text=True,
                         timeout=60)
    assert "broken" in out.stdout and "FileNotFoundError: settings.json" in out.stdout, \
        out.stdout
    exits = [e for e in jsonl_events_of(suite.home)
             if e["type"] == "worker.exited" and e["data"].get("code")]
    assert any("FileNotFoundError" in e["data"].get("error", "") for e in exits), exits
    # A task of that type says why no worker comes, in its status and `cortex task show`.
    with Client(suite.home, timeout=60) as c:
        task = c.submit("fragile", "waits for a group that cannot start")
        status = wait_for(lambda: (s := c.status(task["id"]))["waiting_detail"] and s, 60,
                          "the queued task's waiting detail")
        assert status["waiting"] == "worker" and status["state"] == "queued"
        assert status["waiting_detail"]["crash_looping"] == "broken"
        assert "FileNotFoundError: settings.json" in status["waiting_detail"]["last_error"]
        shown = subprocess.run([sys.executable, "-m", "cortex.services.cli", "--home",
                                str(suite.home), "task", "show", task["id"]],
                               capture_output=True, text=True, timeout=60)
        c.cancel(task["id"])
    assert "crash_looping" in shown.stdout and "broken" in shown.stdout, shown.stdout
