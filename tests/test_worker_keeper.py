"""A worker runs its handler on the thread that runs it, with no hand-off; a handler that
runs long has the bus kept by the worker's keeper thread: the broker's heartbeats, the
scheduler's task heartbeats, the report of its start, a request for more tokens and what
it posts are all served while it runs, so its task ends on its first attempt. Here with
a worker of our own in this process (an external type), on a real suite whose heartbeats
are short (0.5 s on the bus, 1 s task heartbeats: silent 3 s, a worker is lost)."""

from __future__ import annotations

import threading

import pytest

from cortex.protocol import Client
from cortex.protocol import worker as worker_module
from cortex.protocol.worker import Worker

from .conftest import jsonl_events_of, suite_config, wait_for

LONG = 60


@pytest.fixture
def probe_suite(suites):
    config = suite_config(1, ("echo",), tables='[types]\nexternal = ["probe"]\ngrace = 0\n')
    return suites.start(config=config)


class OwnWorker:
    """A Worker serving `handler` for "probe" in a thread of this process."""

    def __init__(self, home, handler):
        self.worker = Worker("probe", handler, home=home, install_signals=False,
                             heartbeat=1.0)
        self.thread = threading.Thread(target=self.worker.run, name="own-worker")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.worker.stop()
        self.thread.join(LONG)
        assert not self.thread.is_alive(), "the worker did not stop"
        assert not self.worker._keeper.is_alive(), "its keeper did not stop"


def events_of(home, task_id: str) -> list[dict]:
    return [e for e in jsonl_events_of(home) if e.get("task") == task_id]


def test_the_handler_runs_on_the_thread_that_runs_the_worker(probe_suite):
    seen = []

    def handler(ctx):
        seen.append(threading.current_thread())
        return ctx.payload

    with OwnWorker(probe_suite.home, handler) as own, \
            Client(probe_suite.home, timeout=LONG) as c:
        for i in range(3):
            task = c.submit("probe", f"short {i}", payload=i)
            assert c.wait(task["id"], timeout=LONG)["result"] == i
        assert seen == [own.thread] * 3


def test_a_long_handler_keeps_its_worker_and_its_first_attempt(probe_suite):
    """4 s: longer than the broker's silence limit (1.5 s) and the scheduler's (3 s).
    Without the keeper the worker would be lost and its task run again."""
    def handler(ctx):
        ctx.cancelled.wait(4.0)
        ctx.progress(1.0, "all but done")  # posted last: it must come before the end
        return "slept"

    with OwnWorker(probe_suite.home, handler), Client(probe_suite.home, timeout=LONG) as c:
        task = c.submit("probe", "long", payload=None, retries=0)
        # Reported started while it runs, and running all along.
        wait_for(lambda: c.status(task["id"])["state"] == "running", LONG, "running")
        done = c.wait(task["id"], timeout=LONG)
        assert done["state"] == "completed" and done["result"] == "slept"
        assert done["attempt"] == 1
        workers = c.workers()
        assert [w["state"] for w in workers if w["types"] == ["probe"]] == ["idle"]
    kinds = [e["type"] for e in events_of(probe_suite.home, task["id"])]
    assert "task.retry" not in kinds and "task.lost" not in kinds
    assert kinds.index("task.started") < kinds.index("task.progress") \
        < kinds.index("task.completed")


def test_a_long_handler_gets_more_tokens_while_it_runs(suites):
    """A request for more tokens from the handler wakes the keeper, which asks the
    ledger and hands the answer back before the handler gives up waiting (5 s)."""
    config = suite_config(1, ("echo",), tables='[types]\nexternal = ["probe"]\ngrace = 0\n')
    suite = suites.start(config=config)
    granted = []

    def handler(ctx):
        ctx.use_tokens(ctx.reserved)  # all it reserved
        ctx.use_tokens(500)  # more: the ledger is asked while the handler waits
        granted.append(ctx.reserved)
        return ctx.tokens_used

    with OwnWorker(suite.home, handler), Client(suite.home, timeout=LONG) as c:
        task = c.submit("probe", "tokens", payload=None, tokens=1000, retries=0)
        done = c.wait(task["id"], timeout=LONG)
        assert done["state"] == "completed", done
        assert done["result"] == 1500 and granted and granted[0] >= 1500


def test_a_recall_that_came_while_the_handler_ran_is_read_before_the_next_task(
        probe_suite, monkeypatch):
    """A short handler leaves the bus to the worker's own thread, which reads it once the
    handler returns. The order of a prefetched low task and its recall (a critical task
    came) both wait there meanwhile; read before the next task is chosen, the recall
    gives the low task back, and the critical task runs first. Here the keeper is kept
    off the bus (as for any handler shorter than STARTED_DELAY) while the first handler
    is held open until the recall has been sent."""
    monkeypatch.setattr(worker_module, "STARTED_DELAY", 3600.0)
    entered, gate = threading.Event(), threading.Event()
    order = []

    def handler(ctx):
        order.append(ctx.payload)
        if ctx.payload == "first":
            entered.set()
            gate.wait(LONG)
        return ctx.payload

    home = probe_suite.home
    with OwnWorker(home, handler), Client(home, timeout=LONG) as c:
        first = c.submit("probe", "first", payload="first", retries=0)
        assert entered.wait(LONG), "the first task never started"
        low = c.submit("probe", "low", payload="low", priority="low", retries=0)
        wait_for(lambda: c.status(low["id"])["prefetched"], LONG, "the low task prefetched")
        critical = c.submit("probe", "urgent", payload="critical", priority="critical",
                            retries=0)
        # Sent in the turn that emitted its event; the event is logged ~20 ms later.
        wait_for(lambda: any(e["type"] == "task.recall" for e in events_of(home, low["id"])),
                 LONG, "the recall sent")
        gate.set()
        done = {name: c.wait(task["id"], timeout=LONG)
                for name, task in (("first", first), ("critical", critical), ("low", low))}
    assert order == ["first", "critical", "low"]
    assert {d["state"] for d in done.values()} == {"completed"}
    assert done["low"]["attempt"] == 1  # given back unstarted: no attempt spent
    wait_for(lambda: any(e["type"] == "task.recalled" for e in events_of(home, low["id"])),
             LONG, "the low task given back")
