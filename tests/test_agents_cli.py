"""`cortex worker MODULE --concurrency 3` on a live suite (issue 17, test 3): tasks
complete on three processes, a crashed process is restarted, a failing function's
traceback is stored with its task and shown by `cortex task show`, and SIGTERM stops
the runner and its processes."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from cortex.protocol import Client
from tests.conftest import wait_for
from tests.test_agents_suite import (  # noqa: F401 - `runners`'s helpers, one definition
    MODULE,
    alive,
    children,
    serving,
    whoami_pids,
)


@pytest.mark.heavy  # slow: real processes started, killed and restarted
def test_cortex_worker_serves_restarts_and_keeps_the_traceback(suites, tmp_path):
    (tmp_path / "h11demo.py").write_text(MODULE)
    suite = suites.start(workers=1)
    home = suite.home
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        runner = subprocess.Popen([sys.executable, "-m", "cortex.services.cli", "worker",
                                   "h11demo", "--concurrency", "3", "--home", str(home)],
                                  cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    kids: set[int] = set()
    try:
        with Client(home) as client:
            first = wait_for(lambda: len(children(runner)) == 3 and children(runner), 60,
                             "three agent processes")
            kids |= first
            wait_for(lambda: serving(client, first), 60, "the three to register")
            assert whoami_pids(client, 6, 1.0) == first  # every one of the three took work

            failed = client.wait(client.submit("demo.fail", "x", payload={"why": "no reason"},
                                               retries=0)["id"], timeout=60)
            assert failed["state"] == "failed"
            assert 'raise ValueError(f"cannot do it: {why}")' in failed["error"]["traceback"]

            crashed = client.wait(client.submit("demo.crash", "x", retries=0)["id"],
                                  timeout=60)
            assert crashed["error"]["category"] == "worker_lost"
            after = wait_for(lambda: len(children(runner)) == 3 and children(runner) != first
                             and children(runner), 60, "the crashed process to be restarted")
            kids |= after
            assert len(first - after) == 1
            wait_for(lambda: serving(client, after), 60, "the restarted one to register")
            assert whoami_pids(client, 6, 1.0) == after

        shown = subprocess.run([sys.executable, "-m", "cortex.services.cli", "task", "show",
                                failed["id"], "--home", str(home)], capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "traceback:" in shown.stdout
        assert 'raise ValueError(f"cannot do it: {why}")' in shown.stdout
        assert "h11demo.py" in shown.stdout

        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 0
        wait_for(lambda: not any(alive(p) for p in kids), 30, "the agents to exit")
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait(timeout=30)
