"""A journal sync that stalls (a loaded or failing disk) holds back the scheduler's replies,
and the run orders riding on them, for as long as it lasts. The workers waiting for them
could not run, or speak of, what had not reached them: none is judged silent, none said
to have lost its task, no task fails for it, and judging resumes once the stall is over.

The suite test stalls the scheduler's real `fdatasync` from inside its process (a
`sitecustomize` on its PYTHONPATH blocks the call while a flag file exists); the state
tests drive the same rule with a simulated clock.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

from cortex.protocol import Client
from cortex.services.scheduler.reports import DISPATCH_GRACE
from cortex.services.scheduler.tasks import State
from cortex.services.scheduler.watch import WATCH_INTERVAL

from .conftest import jsonl_events_of, suite_config, wait_for
from .test_scheduling import HB, Sim, kills, running

STALL_HOOK = '''
import os, sys, time
if any("cortex.services.scheduler" in a for a in sys.orig_argv):
    _sync, _flag = os.fdatasync, os.environ["CX_TEST_STALL_FLAG"]
    def _stalling(fd):
        if os.path.exists(_flag):
            open(_flag + ".seen", "w").close()
            while os.path.exists(_flag):
                time.sleep(0.02)  # the disk hangs while the flag is there
        return _sync(fd)
    os.fdatasync = _stalling
'''


def test_a_stalled_journal_sync_costs_no_task_and_blames_no_worker(suites, tmp_path,
                                                                   monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(STALL_HOOK)
    flag = tmp_path / "stall"
    before = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *filter(None, [before])]))
    monkeypatch.setenv("CX_TEST_STALL_FLAG", str(flag))
    # Heartbeats of 0.5 s: silence is judged after 1.5 s, an idle worker says so every
    # 0.5 s; the stall below outlasts both, and DISPATCH_GRACE, twice over.
    suite = suites.start(suite_config(4, fsync="group", task_heartbeat=0.5))
    stop = threading.Event()
    states: Counter = Counter()
    lock = threading.Lock()

    def agent() -> None:
        with Client(suite.home, timeout=60) as c:
            while not stop.is_set():
                task = c.submit_and_wait("sleep", payload={"seconds": 0.02}, retries=0,
                                         timeout=60)
                with lock:
                    states[task["state"]] += 1

    agents = [threading.Thread(target=agent) for _ in range(8)]
    for t in agents:
        t.start()
    try:
        wait_for(lambda: sum(states.values()) >= 50, 60, "tasks flowing")
        flag.touch()
        wait_for((tmp_path / "stall.seen").exists, 30, "the scheduler's sync stalled")
        stalled = max(2 * DISPATCH_GRACE, 6 * 0.5)
        time.sleep(stalled)  # the fault's length: the disk hangs this long
        done_before = sum(states.values())
        flag.unlink()
        wait_for(lambda: sum(states.values()) >= done_before + 50, 60,
                 "tasks flowing again after the stall")
    finally:
        flag.unlink(missing_ok=True)
        stop.set()
        for t in agents:
            t.join(timeout=90)
    assert set(states) == {"completed"}, states
    kinds = Counter(e["type"] for e in jsonl_events_of(suite.home))
    assert kinds["task.failed"] == kinds["task.retry"] == kinds["worker.lost"] == 0, kinds
    assert kinds["worker.killed"] == 0, kinds


# -- the rule, on the scheduler's state ------------------------------------------------------

def test_an_idle_ready_during_a_stall_keeps_the_task_it_could_not_have_received():
    sim = Sim()
    task = sim.add()
    sim.ready("w1")  # given the task; the reply carrying its order is held by the stall
    sim.now += DISPATCH_GRACE + 1
    sim.state.orders_left_at = sim.now.mono  # still stalled: nothing has left
    sim.ready("w1")
    assert task.state is State.DISPATCHED and task.attempt == 1
    sim.now += DISPATCH_GRACE - 0.1  # the stall ended as the clock stood above
    sim.ready("w1")  # crossed the order that has just left
    assert task.state is State.DISPATCHED and task.attempt == 1
    sim.now += 0.2  # long enough since it left: the order was lost after all
    sim.ready("w1")
    assert task.state is State.QUEUED and task.attempt == 2
    assert task.error["category"] == "worker_lost"


def test_silence_counts_from_the_end_of_a_stall():
    sim = Sim()
    task = running(sim)
    sim.now += 10
    sim.state.orders_left_at = sim.now.mono  # a stall ended just now
    assert kills(sim.tick(3 * HB)) == []  # three heartbeats since it ended: not yet
    assert task.state is State.RUNNING
    fx = sim.tick(WATCH_INTERVAL)  # the next scan: silent since the stall ended
    assert kills(fx)[0]["reason"] == "silent"
    assert task.state is State.QUEUED and task.error["category"] == "worker_lost"
