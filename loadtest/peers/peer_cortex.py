"""Cortex as a contender in the peer benchmark (the same workloads as Dramatiq, Celery,
RQ, Ray and the bare pyzmq broker), through the public client only.

    PEERS="dramatiq zmq_lb cortex" CONTENDER=$PWD/loadtest/peers/peer_cortex.py \\
        bash <peer benchmark folder>/run_all.sh

The benchmark's `run_all.sh` runs from its own folder, which holds its `common.py`; the
benchmark's venv needs Cortex installed first (`<venv>/bin/pip install <this checkout>`).
Every workload gets a fresh suite (all five services, journals with fsync "group",
20 pooled workers of one task type whose handler is the benchmark's `handle_task`).

The benchmark's `submit` returns once the system has the task and its `wait` gets the
result: here `Client.submit` (acknowledged once journaled) then `Client.wait`, two round
trips, as the other peers do. `PEER_CORTEX_COMBINED=1` runs both in one round trip
(`submit_and_wait`: what a closed-loop agent would call), so `submit` returns the
finished task: right for W0-W2, but W3's flood then never builds a backlog.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

BENCH = Path(os.environ.get("PEERS_DIR") or os.getcwd())  # run_all.sh runs from there
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402 - the benchmark's own harness

TASK_TYPE = "work"
COMBINED = os.environ.get("PEER_CORTEX_COMBINED") == "1"


def work(ctx):
    """The pooled workers' handler: the benchmark's one handler, on the task's payload."""
    return common.handle_task(ctx.payload)


class CortexClient:
    """One benchmark client process drives 25 threads; a Cortex Client is one bus peer
    and not thread-safe, so each thread gets its own."""

    def __init__(self):
        self.home = os.environ["CORTEX_HOME"]
        self.local = threading.local()
        self.all = []
        self.lock = threading.Lock()

    def client(self):
        from cortex.protocol import Client

        c = getattr(self.local, "client", None)
        if c is None:
            c = self.local.client = Client(self.home, timeout=120)
            with self.lock:
                self.all.append(c)
        return c

    def submit(self, task):
        if COMBINED:  # the finished task: wait only reads it
            return self.client().submit_and_wait(TASK_TYPE, payload=task,
                                                 priority=task["prio"], retries=0,
                                                 timeout=120)
        return self.client().submit(TASK_TYPE, payload=task, priority=task["prio"],
                                    retries=0)["id"]

    def wait(self, done, timeout):
        if not COMBINED:
            done = self.client().wait(done, timeout=timeout)
        if done["state"] != "completed":
            raise RuntimeError(f"task {done['id']} {done['state']}: {done.get('error')}")
        return done["result"]

    def close(self):
        with self.lock:
            for c in self.all:
                c.close()


def make_client():
    return CortexClient()


# The peers queue without bound; W3 floods 2,000 tasks of one type, past the default
# admission limit (500 queued per type, then queue_full, which the benchmark counts as
# lost): the limit is raised to hold the flood, as an operator expecting one would.
CONFIG = """[suite]
fsync = "group"
[scheduler]
max_queue_per_type = 10000
[pool.groups.default]
count = {workers}
max = {workers}
types = ["{task_type}"]
[handlers]
{task_type} = "peer_cortex:work"
"""


class Peer:
    name = "cortex"
    client_module = "peer_cortex"
    settings = {
        "suite": "broker, scheduler, ledger, event router, pool under supervisord; ipc:// "
                 "endpoints; journals with fsync = group; events to JSONL",
        "workers": "20 pooled worker processes of one task type (no surge: max = count)",
        "client": "cortex.protocol.Client per client thread: " + (
            "submit_and_wait(type, payload, priority, retries=0), one round trip"
            if COMBINED else "submit(type, payload, priority, retries=0), then wait(id): "
            "two round trips"),
        "priority": "the task's prio as the Cortex priority",
        "admission": "[scheduler] max_queue_per_type = 10000 (default 500), to hold W3's "
                     "flood of 2,000",
    }

    def setup(self, ctx):
        self.run_dir = Path(ctx["run_dir"])
        self.suites = []

    def start(self, ctx, n_workers):
        from cortex.services.control import Suite

        home = self.run_dir / f"home{len(self.suites)}"
        home.mkdir(parents=True, exist_ok=True)
        (home / "cortex.toml").write_text(CONFIG.format(workers=n_workers,
                                                        task_type=TASK_TYPE))
        here = str(Path(__file__).resolve().parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (here, str(BENCH), os.environ.get("PYTHONPATH", "")) if p)
        os.environ["PEERS_EXEC_DIR"] = ctx["exec_dir"]
        os.environ["CORTEX_HOME"] = str(home)  # read by the client processes
        suite = Suite(home)
        self.suites.append(suite)  # counted before it starts: a failed start is a new home
        try:
            suite.start(attached=True, timeout=120)
        except Exception:
            suite.stop()  # a suite that never became ready is not left behind
            raise
        return [suite.proc]

    def reset(self):
        pass

    def extra_pids(self):
        return []

    def teardown(self):
        for suite in self.suites:
            suite.stop()

    def versions(self):
        return common.pkg_versions("cortex-agents", "pyzmq", "msgpack", "supervisor")


if __name__ == "__main__":
    wls, out, run_dir = common.main_args("cortex.json")
    common.run_peer(Peer(), wls, out, run_dir)
