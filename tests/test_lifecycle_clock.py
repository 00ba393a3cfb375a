"""Clock jumps (issue 14, case 6): the wall clock of every process of the suite is moved
25 h ahead mid-run, then back, with libfaketime; running tasks neither time out at the
jump nor is any submit refused after it, because every duration is measured on the
monotonic clock (which libfaketime is told to leave alone)."""

from __future__ import annotations

import glob
import os
import time

import pytest

from cortex.protocol import Client

from .conftest import short_home, suite_config, wait_for, write_config


def libfaketime() -> str | None:
    found = glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + \
        glob.glob("/usr/lib/faketime/libfaketime.so.1")
    return found[0] if found else None


@pytest.mark.heavy
def test_a_wall_clock_jump_neither_times_out_running_tasks_nor_refuses_submits(suites):
    lib = libfaketime()
    if lib is None:
        pytest.skip("libfaketime is not installed (apt-get install faketime: .ci/run does)")
    home = short_home()
    offset = home / "faketime"
    offset.write_text("+0\n")
    write_config(home, suite_config(4, ("sleep", "echo"), snapshot_interval=None))
    faked = {"LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": str(offset),
             "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}
    before = {k: os.environ.get(k) for k in faked}
    os.environ.update(faked)  # the suite's processes inherit it (not this one: no preload)
    try:
        from cortex.services.control import Suite

        suite = Suite(home)
        entry = (suite, set())
        suites.suites.append(entry)
        suite.start(attached=True, timeout=120)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    entry[1].update(suite.pids())
    with Client(suite.home, timeout=60) as c:
        wait_for(lambda: len(c.workers()) == 4, 60, "four workers")
        wall_before = c.call("scheduler", "scheduler.status").get("now") or time.time()
        running = [c.submit("sleep", f"across the jump {i}", payload={"seconds": 6},
                            timeout=60, retries=0)["id"] for i in range(4)]
        wait_for(lambda: all(c.status(t)["state"] == "running" for t in running), 30,
                 "four running tasks")
        offset.write_text("+25h\n")  # the wall clock jumps a day ahead
        done = [c.wait(t, timeout=60) for t in running]
        assert [d["state"] for d in done] == ["completed"] * 4, done
        # The jump was seen by the suite: its timestamps are a day ahead.
        assert done[0]["times"]["completed"] > wall_before + 86000, done[0]["times"]
        running = [c.submit("sleep", f"before going back {i}", payload={"seconds": 6},
                            timeout=60, retries=0)["id"] for i in range(4)]
        wait_for(lambda: all(c.status(t)["state"] == "running" for t in running), 30,
                 "four running tasks")
        offset.write_text("+0\n")  # and back: dispatch times now lie in the future
        accepted = c.submit("echo", "submitted after the clock went back")
        assert accepted["state"] == "queued"
        assert c.wait(accepted["id"], timeout=60)["state"] == "completed"
        done = [c.wait(t, timeout=60) for t in running]
        assert [d["state"] for d in done] == ["completed"] * 4, done
