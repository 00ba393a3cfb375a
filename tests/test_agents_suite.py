"""The agent runner (`python -m cortex.protocol.agents MODULE --concurrency 3`) on a live
suite: tasks complete on three processes, a crashed process is restarted, a task past its
timeout ends its process (restarted too), a failing function's traceback and category
reach the task, SIGTERM lets the task in hand finish, and killing the runner leaves no
process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from cortex.protocol import Client
from cortex.services.control import reap_orphans
from tests.conftest import module_suite, pid_alive, wait_for

MODULE = '''
import os
import threading

from cortex.protocol.agents import agent


@agent("demo.whoami")
def whoami(ctx, seconds=0.0):
    ctx.cancelled.wait(seconds)
    return {"pid": os.getpid()}


@agent("demo.fail")
def fail(ctx, why):
    raise ValueError(f"cannot do it: {why}")


class Refused(Exception):
    category = "refused_by_policy"


@agent("demo.refuse")
def refuse(ctx):
    raise Refused("not on weekends")


@agent("demo.crash")
def crash(ctx):
    os._exit(3)


@agent("demo.stuck")
def stuck(ctx):
    threading.Event().wait(300)   # deaf to cancels: only ending the process stops it
'''


def alive(pid: int) -> bool:
    reap_orphans()  # children of a killed runner are re-parented to the test: reap them
    return pid_alive(pid)


def children(runner: subprocess.Popen) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(runner.pid).children()
                if p.status() != psutil.STATUS_ZOMBIE}
    except psutil.NoSuchProcess:
        return set()


def serving(client: Client, pids: set[int]) -> bool:
    """The scheduler knows an idle demo worker for each of `pids`."""
    workers = client.workers()
    ready = {w["pid"] for w in workers if "demo.whoami" in w["types"] and w["state"] == "idle"}
    return pids <= ready


def whoami_pids(client: Client, n: int, seconds: float) -> set[int]:
    ids = [client.submit("demo.whoami", "who", payload={"seconds": seconds})["id"]
           for _ in range(n)]
    done = [client.wait(i, timeout=120) for i in ids]
    assert all(t["state"] == "completed" for t in done), [t.get("error") for t in done]
    return {t["result"]["pid"] for t in done}


@pytest.fixture
def runners(tmp_path):
    (tmp_path / "h6demo.py").write_text(MODULE)
    started: list[subprocess.Popen] = []

    def start(home, concurrency):
        log_path = tmp_path / f"runner-{len(started)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "cortex.protocol.agents", "h6demo",
                                     "--concurrency", str(concurrency), "--home", str(home)],
                                    cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log_path
        started.append(proc)
        return proc

    yield start
    for proc in started:  # every runner this test started, and its processes, ended
        kids = children(proc)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for pid in kids:
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)
        wait_for(lambda kids=kids: not any(alive(p) for p in kids), 30, "the agents to end")


@pytest.fixture(scope="module")
def agents_suite():
    """Shared: each test's agents are its own processes (told apart by pid), ended at its
    end; the suite's services are left alone."""
    yield from module_suite(workers=1)


@pytest.mark.heavy  # a service killed or restarted: CI's second pass
def test_agents_run_on_three_processes_restart_and_report(agents_suite, runners):
    suite = agents_suite
    runner = runners(suite.home, 3)
    with Client(suite.home) as client:
        first = wait_for(lambda: len(children(runner)) == 3 and children(runner), 60,
                         "three agent processes")
        wait_for(lambda: serving(client, first), 60, "the three to register")
        assert whoami_pids(client, 6, 1.0) == first  # every one of the three took work

        # A failing function: category and message on the task, the traceback sent.
        failed = client.wait(client.submit("demo.fail", "x", payload={"why": "no reason"},
                                           retries=0)["id"], timeout=60)
        assert failed["state"] == "failed"
        assert failed["error"]["category"] == "handler_error"
        assert "ValueError: cannot do it: no reason" in failed["error"]["message"]
        refused = client.wait(client.submit("demo.refuse", "x", retries=0)["id"], timeout=60)
        assert refused["error"]["category"] == "refused_by_policy"
        misfit = client.wait(client.submit("demo.fail", "x", payload={"wy": 1},
                                           retries=0)["id"], timeout=60)
        assert misfit["error"]["category"] == "bad_request"
        log = runner.log_path.read_text()
        assert 'raise ValueError(f"cannot do it: {why}")' in log and "h6demo.py" in log
        if "traceback" in failed["error"]:  # kept once the scheduler stores it
            assert 'raise ValueError(f"cannot do it: {why}")' in failed["error"]["traceback"]

        # A crash: the process is restarted, and the three serve again.
        crashed = client.wait(client.submit("demo.crash", "x", retries=0)["id"], timeout=60)
        assert crashed["state"] == "failed" and crashed["error"]["category"] == "worker_lost"
        after_crash = wait_for(lambda: len(children(runner)) == 3
                               and children(runner) != first and children(runner), 60,
                               "the crashed process to be restarted")
        assert len(first - after_crash) == 1  # one died, two carried on
        wait_for(lambda: serving(client, after_crash), 60, "the restarted one to register")
        assert whoami_pids(client, 6, 1.0) == after_crash
        assert "exited with 3" in runner.log_path.read_text()

        # A task past its timeout that ignores everything: its process is ended, restarted.
        stuck = client.submit("demo.stuck", "x", retries=0, timeout=1.0)
        assert client.wait(stuck["id"], timeout=60)["error"]["category"] == "timeout"
        wait_for(lambda: len(children(runner)) == 3 and children(runner) != after_crash,
                 60, "the stuck process to be ended and restarted")

        # SIGTERM: the task in hand finishes, then everything stops.
        last = children(runner)
        wait_for(lambda: serving(client, last), 60, "all three to serve again")
        slow = client.submit("demo.whoami", "last", payload={"seconds": 2.0})
        wait_for(lambda: client.status(slow["id"])["state"] == "running", 30, "it to run")
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 0
        assert client.wait(slow["id"], timeout=30)["state"] == "completed"
        assert not any(alive(p) for p in last)


def test_killing_the_runner_leaves_no_agent_behind(agents_suite, runners):
    suite = agents_suite
    runner = runners(suite.home, 2)
    kids = wait_for(lambda: len(children(runner)) == 2 and children(runner), 60,
                    "two agent processes")
    with Client(suite.home) as client:
        wait_for(lambda: serving(client, kids), 60, "them to register")
    runner.kill()
    runner.wait(timeout=30)
    started = time.monotonic()
    wait_for(lambda: not any(alive(p) for p in kids), 30, "the orphaned agents to exit")
    print(f"\nagents gone {time.monotonic() - started:.2f} s after their runner was killed")
