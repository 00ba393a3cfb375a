"""Load-generating agents: threads, each with its own `Client`, optionally spread over
several processes (the GIL caps one Python process at about one core of client work).

An agent follows an `AgentPlan`: a list of `Job`s and a mode:

- ``closed``: submit, wait for the result, submit the next (optionally pausing `think` s);
- ``open``: submit each job at its own offset from t0 (`Job.at`), whatever came back, and
  collect results between submissions (a held ``task.wait`` on the oldest pending task);
- ``flood``: submit every job back to back, then wait for all of them.

Every task becomes one record (a plain dict, see `new_record`) carrying the client-side
wall-clock times around the calls and the task's own server-side times.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cortex.protocol import Client, errors

FINAL_STATES = ("completed", "failed", "cancelled", "dead")


@dataclass
class Job:
    type: str
    description: str = ""
    priority: str = "medium"
    tokens: int = 0
    payload: Any = None
    timeout: float | None = None
    retries: int | None = None
    at: float = 0.0  # open loop: seconds after t0 when it is due
    tag: str = ""  # which part of a scenario it belongs to (e.g. "flood", "critical")


@dataclass
class AgentPlan:
    name: str
    jobs: list[Job]
    mode: str = "closed"  # closed | open | flood
    think: float = 0.0  # closed loop: pause between tasks
    gate: str | None = None  # wait for this sync event before starting
    signal: str | None = None  # count this latch down once every job is submitted


@dataclass
class Options:
    call_timeout: float = 30.0  # per bus call (the client re-sends while it lasts)
    wait_timeout: float = 120.0  # per task, from submit ack to final
    submit_attempts: int = 3  # a submit that timed out is re-sent (same idempotency key)
    deadline: float | None = None  # closed/flood loops: stop submitting after t0 + this


@dataclass
class Sync:
    """Gates between agent groups (threads mode only)."""

    events: dict[str, threading.Event] = field(default_factory=dict)
    latches: dict[str, list] = field(default_factory=dict)  # name -> [count, lock]

    def latch(self, name: str, count: int) -> None:
        self.events[name] = threading.Event()
        self.latches[name] = [count, threading.Lock()]
        if count <= 0:
            self.events[name].set()

    def count_down(self, name: str) -> None:
        slot = self.latches[name]
        with slot[1]:
            slot[0] -= 1
            if slot[0] <= 0:
                self.events[name].set()


class Progress:
    """Tasks finished and recent coordination latencies, for the live line."""

    def __init__(self):
        self.lock = threading.Lock()
        self.done = 0
        self.recent: deque = deque(maxlen=5000)
        self.fresh: list = []

    def add(self, n: int, latencies) -> None:
        with self.lock:
            self.done += n
            self.recent.extend(latencies)
            self.fresh.extend(latencies)

    def take(self) -> tuple[int, list]:
        with self.lock:
            fresh, self.fresh = self.fresh, []
            done, self.done = self.done, 0
        return done, fresh


def new_record(job: Job, agent: str) -> dict:
    return {"tag": job.tag, "type": job.type, "priority": job.priority, "agent": agent,
            "due": None, "t_submit": None, "t_ack": None, "t_seen": None, "id": None,
            "code": None, "state": None, "category": None, "attempt": None,
            "created": None, "dispatched": None, "started": None, "ended": None,
            "tokens_used": 0, "worker": None, "duration": None, "predicted": None,
            "actual": None, "ran_as": None, "routing": None}


def fill_final(rec: dict, task: dict) -> None:
    times = task.get("times") or {}
    rec["state"] = task.get("state")
    rec["attempt"] = task.get("attempt")
    rec["worker"] = task.get("worker")
    rec["tokens_used"] = task.get("tokens_used") or 0
    rec["predicted"] = task.get("predicted")  # what the scheduler expected, and from where
    rec["actual"] = task.get("actual")
    rec["ran_as"] = task.get("type")  # an `auto` task: the type the scheduler chose
    rec["routing"] = task.get("routing")
    rec["created"] = times.get("created", rec["created"])
    rec["dispatched"] = times.get("dispatched")
    rec["started"] = times.get("started")
    rec["ended"] = times.get(str(task.get("state")))
    error = task.get("error") or {}
    rec["category"] = error.get("category") if rec["state"] != "completed" else None


class _Agent:
    def __init__(self, home, plan: AgentPlan, t0: float, opts: Options, progress: Progress,
                 sync: Sync | None):
        self.home, self.plan, self.t0, self.opts = home, plan, t0, opts
        self.progress, self.sync = progress, sync
        self.records: list[dict] = []
        self.client: Client | None = None
        # Keys without a syscall each (uuid4 per submit was a fifth of an agent's time).
        self._key_prefix = uuid.uuid4().hex
        self._keys = itertools.count(1)

    # -- one task ------------------------------------------------------------------------
    def submit(self, job: Job) -> dict:
        rec = new_record(job, self.plan.name)
        self.records.append(rec)
        key = f"{self._key_prefix}-{next(self._keys):x}"
        rec["t_submit"] = time.time()
        for _ in range(max(1, self.opts.submit_attempts)):
            try:
                # An open-loop agent polls its oldest task with held waits of its own
                # between submits: a followed task's end would come twice.
                task = self.client.submit(job.type, job.description, priority=job.priority,
                                          tokens=job.tokens, timeout=job.timeout,
                                          retries=job.retries, payload=job.payload,
                                          idempotency_key=key,
                                          follow=self.plan.mode != "open")
            except (errors.Timeout, errors.Unavailable) as e:
                rec["code"] = e.code
                continue
            except errors.CortexError as e:
                rec["code"] = e.code
                rec["t_ack"] = time.time()
                return rec
            rec["t_ack"] = time.time()
            rec["code"] = None
            rec["id"] = task["id"]
            rec["created"] = (task.get("times") or {}).get("created")
            if task.get("final"):
                self.finish(rec, task)
            return rec
        return rec

    def finish(self, rec: dict, task: dict) -> None:
        rec["t_seen"] = time.time()
        fill_final(rec, task)
        coord = None
        if rec["started"] is not None:
            coord = (rec["started"] - rec["t_submit"]) * 1000
        self.progress.add(1, [coord] if coord is not None else [])

    def wait(self, rec: dict) -> None:
        try:
            task = self.client.wait(rec["id"], timeout=self.opts.wait_timeout)
        except errors.NotFound:
            rec["state"] = "not_found"
            return
        except errors.CortexError:
            rec["state"] = "unfinished"
            return
        self.finish(rec, task)

    def poll(self, rec: dict, hold: float) -> bool:
        """One held wait on `rec`'s task; True when it is final."""
        try:
            task = self.client.call("scheduler", "task.wait", {"id": rec["id"], "hold": hold},
                                    timeout=hold + self.opts.call_timeout,
                                    resend_after=hold + 1.0)
        except errors.NotFound:
            rec["state"] = "not_found"
            return True
        except errors.CortexError:
            return False
        if task.get("final"):
            self.finish(rec, task)
            return True
        return False

    # -- the loops -----------------------------------------------------------------------
    def expired(self) -> bool:
        return self.opts.deadline is not None and time.time() > self.t0 + self.opts.deadline

    def run(self) -> None:
        self.client = Client(self.home, timeout=self.opts.call_timeout, agent=self.plan.name)
        try:
            if self.plan.gate and self.sync is not None:
                self.sync.events[self.plan.gate].wait(self.opts.wait_timeout)
            getattr(self, f"run_{self.plan.mode}")()
        finally:
            if self.plan.signal and self.sync is not None:
                self.sync.count_down(self.plan.signal)
            self.client.close()

    def run_closed(self) -> None:
        for job in self.plan.jobs:
            if self.expired():
                break
            rec = self.submit(job)
            if rec["id"] is not None and rec["state"] is None:
                self.wait(rec)
            if self.plan.think:
                time.sleep(self.plan.think)  # the agent "thinks" between tasks

    def run_flood(self) -> None:
        sent = []
        for job in self.plan.jobs:
            if self.expired():
                break
            rec = self.submit(job)
            if rec["id"] is not None and rec["state"] is None:
                sent.append(rec)
        if self.plan.signal and self.sync is not None:
            self.sync.count_down(self.plan.signal)
            self.plan.signal = None
        for rec in sent:
            self.wait(rec)

    def run_open(self) -> None:
        pending: deque = deque()
        for job in self.plan.jobs:
            due = self.t0 + job.at
            while True:
                left = due - time.time()
                if left <= 0:
                    break
                if pending:
                    if self.poll(pending[0], min(left, 5.0)):
                        pending.popleft()
                else:
                    time.sleep(left)  # open loop: nothing to do until the next task is due
            rec = self.submit(job)
            rec["due"] = due
            if rec["id"] is not None and rec["state"] is None:
                pending.append(rec)
        while pending:
            self.wait(pending.popleft())


def run_group(home, plans: list[AgentPlan], t0: float, opts: Options, progress: Progress,
              sync: Sync | None = None) -> list[dict]:
    """Run each plan in its own thread; returns every record once all are done."""
    agents = [_Agent(home, plan, t0, opts, progress, sync) for plan in plans]
    threads = [threading.Thread(target=a.run, name=a.plan.name, daemon=True) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [rec for a in agents for rec in a.records]


def _child(home, plans, opts, out, go, t0_value) -> None:
    """An agent process: report ready, wait for the start, run, send back the records."""
    progress = Progress()
    stop = threading.Event()

    def report():
        while not stop.wait(0.25):
            n, fresh = progress.take()
            if n:
                out.put(("progress", n, fresh))

    out.put(("ready", os.getpid()))
    go.wait()
    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        records = run_group(home, plans, t0_value.value, opts, progress)
    finally:
        stop.set()
        reporter.join()
    n, fresh = progress.take()
    if n:
        out.put(("progress", n, fresh))
    out.put(("records", records))


def run_agents(home, plans: list[AgentPlan], opts: Options, progress: Progress,
               processes: int = 0, sync: Sync | None = None) -> tuple[float, list[dict]]:
    """Run every plan; `processes` > 1 spreads the agents over that many child processes
    (round robin), each running its share as threads. Returns (t0, records)."""
    if processes <= 1 or len(plans) < 2:
        t0 = time.time()
        return t0, run_group(home, plans, t0, opts, progress, sync)
    if sync is not None and sync.events:
        raise ValueError("gated plans need threads mode (processes <= 1)")
    ctx = mp.get_context("spawn")  # never fork a process holding zmq sockets
    out = ctx.Queue()
    go = ctx.Event()
    t0_value = ctx.Value("d", 0.0)
    shares = [plans[i::processes] for i in range(processes)]
    children = [ctx.Process(target=_child, args=(str(home), share, opts, out, go, t0_value),
                            daemon=True) for share in shares if share]
    for child in children:
        child.start()
    ready = 0
    while ready < len(children):
        try:
            kind, *_ = out.get(timeout=60)
        except queue.Empty:
            raise RuntimeError("agent processes did not start in 60 s") from None
        ready += kind == "ready"
    # A small margin lets every child leave go.wait() before the first open-loop job is due.
    t0 = time.time() + 0.05
    t0_value.value = t0
    go.set()
    records: list[dict] = []
    finished = 0
    while finished < len(children):
        try:
            kind, *rest = out.get(timeout=1.0)
        except queue.Empty:
            if not any(c.is_alive() for c in children):
                raise RuntimeError("agent processes died without results") from None
            continue
        if kind == "progress":
            progress.add(rest[0], rest[1])
        elif kind == "records":
            records.extend(rest[0])
            finished += 1
    for child in children:
        child.join(timeout=10)
    return t0, records

