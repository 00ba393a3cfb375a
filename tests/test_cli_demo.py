"""`cortex demo` (cortex.loadtest.demo): on a suite it attached to, it leaves nothing of
its own queued or running when it times out or is interrupted, and leaves the suite
running when it succeeds; from a clean home it starts and stops a suite of its own.

The attached suite has one worker (no surge, no autoscaling): a long task on it holds
every demo task in the queue, so timing out or interrupting the demo is certain, not a
race."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from cortex.loadtest import demo
from cortex.protocol import Client
from cortex.services.cli.registry import Exit
from cortex.services.control import Suite, reap_orphans

from .conftest import SuiteRunner, short_home, suite_config, wait_for

CLI = [sys.executable, "-m", "cortex.services.cli"]
ONE_WORKER = suite_config(1, snapshot_interval=None, task_heartbeat=None, pool="max = 1\n")


@pytest.fixture(scope="module")
def one_worker_suite():
    runner = SuiteRunner()
    try:
        yield runner.start(config=ONE_WORKER)
    finally:
        problems = runner.stop_all()
        assert not problems, "; ".join(problems)


@pytest.fixture
def busy_worker(one_worker_suite):
    """The suite's only worker busy with a long task until the test ends."""
    with Client(one_worker_suite.home, timeout=10) as c:
        task = c.submit("sleep", "holds the only worker", payload={"seconds": 600})
        wait_for(lambda: c.status(task["id"])["state"] == "running", 30, "the blocker running")
        yield task
        c.cancel(task["id"])
        c.wait(task["id"], timeout=30)


def demo_tasks(client: Client, final: bool | None = None) -> list[dict]:
    tasks = [t for t in client.list_tasks(limit=10_000) if t["agent"].startswith("demo-")]
    return tasks if final is None else [t for t in tasks if t["final"] == final]


def test_a_timed_out_demo_cancels_what_it_submitted(one_worker_suite, busy_worker):
    with Client(one_worker_suite.home, timeout=10) as c:
        before = {t["id"] for t in demo_tasks(c)}
    said: list[str] = []
    outcome = demo.run_demo(one_worker_suite.home, tasks=12, agents=3, timeout=2.0,
                            say=said.append)
    assert outcome == demo.TIMED_OUT, said
    assert "timed out: cancelling what the demo submitted and is not finished" in said
    with Client(one_worker_suite.home, timeout=10) as c:
        submitted = [t for t in demo_tasks(c) if t["id"] not in before]
        assert submitted and all(t["state"] == "cancelled" for t in submitted)
        assert f"cancelled {len(submitted)} tasks" in said
        assert c.status(busy_worker["id"])["state"] == "running"  # not the demo's
    assert said[-1] == "demo TIMED OUT"


def test_an_interrupted_demo_cancels_what_it_submitted(one_worker_suite, busy_worker):
    with Client(one_worker_suite.home, timeout=10) as c:
        before = {t["id"] for t in demo_tasks(c)}
        proc = subprocess.Popen([*CLI, "--home", str(one_worker_suite.home), "demo",
                                 "--tasks", "40", "--agents", "4", "--timeout", "600"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: [t for t in demo_tasks(c, final=False) if t["id"] not in before],
                     60, "the demo's tasks queued")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == Exit.INTERRUPTED, out + err
        assert "interrupted: cancelling" in out and "Traceback" not in err
        assert out.rstrip().endswith("demo INTERRUPTED")
        assert demo_tasks(c, final=False) == []
        assert c.status(busy_worker["id"])["state"] == "running"


def test_an_attached_demo_succeeds_and_leaves_the_suite_running(one_worker_suite):
    done = subprocess.run([*CLI, "--home", str(one_worker_suite.home), "demo", "--tasks",
                           "30", "--agents", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for words in ("30 of 30 submitted, 30 finished", "completed 30", "match", "demo OK"):
        assert words in done.stdout, done.stdout
    assert "starting the suite" not in done.stdout
    assert all(Suite(one_worker_suite.home).ping().values())


@pytest.mark.heavy
def test_the_readme_demo_from_a_clean_home_starts_and_stops_its_own_suite():
    """The README's first command, on the embedded defaults (no cortex.toml)."""
    home = short_home()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    try:
        done = subprocess.run([*CLI, "demo", "--tasks", "40"], cwd=home, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "demo OK" in done.stdout
        assert done.stdout.rstrip().endswith("suite stopped, nothing left running")
        reap_orphans()
        assert Suite(home / ".cortex").pids() == []
    finally:
        Suite(home / ".cortex").stop(timeout=30)
        reap_orphans()
        shutil.rmtree(home, ignore_errors=True)
