"""`cortex status`: its queue line counts the same queued tasks as its tasks line, those
held out of the dispatch queue (waiting for tokens, a retry, cpu or memory) included; and
a suite just started (supervisord's first second) is healthy once its services answer."""

from __future__ import annotations

import json
import subprocess
import sys

from cortex.protocol import Client
from cortex.services.cli.status import _scheduler_lines, problems

from .conftest import wait_for

BASE = ('[suite]\nfsync = "off"\nheartbeat_interval = 0.5\nsnapshot_interval = 2.0\n'
        '[dashboard]\nenabled = false\n[scheduler]\ntask_heartbeat = 1.0\n')


def _report(**scheduler) -> dict:
    return {"workers": {}, "queue": None, "tasks": None, "counters": None} | scheduler


def test_the_queue_line_gives_every_reason_a_queued_task_waits_for():
    lines = _scheduler_lines(_report(
        queue={"critical": 0, "high": 1, "medium": 2, "low": 0},
        tasks={"queued": 3, "running": 1},
        queued_by_reason={"worker": 1, "tokens": 1, "backoff": 1}))
    queue = next(line for line in lines if line.startswith("queue"))
    assert "high 1  medium 2" in queue
    assert "(waiting for: worker 1, tokens 1, backoff 1)" in queue
    idle = _scheduler_lines(_report(queue=dict.fromkeys(("critical", "high", "medium", "low"),
                                                        0), queued_by_reason={}))
    assert "(waiting for: nothing)" in next(line for line in idle if line.startswith("queue"))


def _status(home) -> dict:
    done = subprocess.run([sys.executable, "-m", "cortex.services.cli", "--home", str(home),
                           "status", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_service_that_answers_while_supervisord_still_says_starting_is_up():
    def report(state, alive, helper="RUNNING"):
        service = {"state": state, "alive": alive}
        return {"services": dict.fromkeys(("broker", "events", "ledger", "scheduler",
                                           "pool"), {"state": "RUNNING", "alive": True})
                | {"broker": service},
                "helpers": {"supervisor-events": {"state": helper, "started": True,
                                                  "exit_code": None}}}

    assert problems(report("STARTING", True, helper="STARTING")) == []
    assert problems(report("STARTING", False)) == ["broker is STARTING"]
    assert problems(report("BACKOFF", True)) == ["broker is BACKOFF"]
    assert problems(report("RUNNING", True, helper="BACKOFF")) == [
        "supervisor-events is BACKOFF"]


def test_right_after_up_the_status_is_healthy(suites):
    suite = suites.start(config=BASE)  # returns once every service answers on the bus
    status = _status(suite.home)  # exit 0: healthy, within supervisord's first second too
    assert status["healthy"] and status["problems"] == []


def test_a_task_waiting_for_tokens_is_in_the_queue_line_as_in_the_tasks_line(suites):
    suite = suites.start(config=BASE + (
        '[ledger]\nbudget = 1000\nwindow = "rolling:3600"\n'
        '[pool.groups.default]\ncount = 2\ntypes = ["simulated_agent"]\n'))
    with Client(suite.home, timeout=60) as c:
        holder = c.submit("simulated_agent", "holds 700", tokens=700,
                          payload={"tokens": 1, "seconds": 120})
        wait_for(lambda: c.status(holder["id"])["state"] == "running", 30, "the holder")
        task = c.submit("simulated_agent", "must wait", tokens=500, payload={"tokens": 1})
        wait_for(lambda: c.status(task["id"])["waiting"] == "tokens", 30, "a token wait")
        status = _status(suite.home)
        # Held out of the dispatch queue until the ledger can give it tokens, it is
        # still a queued task: counted by the queue line as by the tasks line.
        assert status["tasks"]["queued"] == 1, status["tasks"]
        assert sum(status["queue"].values()) == 1, status["queue"]
        assert status["queue"]["medium"] == 1
        assert status["queued_by_reason"] == {"tokens": 1}
        c.cancel(task["id"])
        c.cancel(holder["id"])
