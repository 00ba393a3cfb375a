"""The demo behind `cortex demo`: a small mixed workload, end to end, through the public
client only.

Starts a suite in the home when none runs there (and stops it afterwards, leaving
nothing behind); several agents submit echo, sleep and simulated_agent tasks of mixed
priorities and token budgets at once; results are counted as they arrive, in whatever
order the tasks end (from the live event stream, checked against each task's status
when the stream goes quiet); the summary compares the tokens handlers used with what the
ledger committed. Attached to a suite that was already running, the demo leaves nothing
of its own behind: whatever it submitted and is not finished when it is interrupted or
runs out of time is cancelled.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from cortex.protocol import Client, errors
from cortex.protocol.vocabulary import FINAL_STATES, PRIORITIES
from cortex.services.control import Suite, become_subreaper

BUS_TIMEOUT = 10.0  # seconds one call may take
RECONCILE_EVERY = 5.0  # seconds between status checks of tasks the event stream missed
QUIET = 1.0  # seconds without a task event before those checks are made at once
FINAL_EVENTS = {f"task.{state}" for state in FINAL_STATES}
SWEEP_STATES = ("queued", "dispatched", "running")

OK, FAILED, TIMED_OUT, INTERRUPTED = "ok", "failed", "timed out", "interrupted"


def workload(n: int, seed: int) -> list[dict]:
    """`n` task specs: echo, sleep and simulated_agent, priorities and tokens mixed."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        priority = rng.choices(PRIORITIES, weights=(5, 20, 50, 25))[0]
        kind = rng.choices(("echo", "sleep", "simulated_agent"), weights=(4, 2, 4))[0]
        if kind == "echo":
            spec = {"payload": {"n": i, "text": f"hello {i}"}, "tokens": 0}
        elif kind == "sleep":
            spec = {"payload": {"seconds": round(rng.uniform(0.01, 0.1), 3)}, "tokens": 0}
        else:
            used = rng.randint(100, 3000)
            spec = {"payload": {"seconds": round(rng.uniform(0.02, 0.2), 3), "tokens": used,
                                "steps": rng.randint(1, 5)},
                    "tokens": used + rng.randint(0, 500)}
        tasks.append({"type": kind, "description": f"demo {kind} #{i}", "priority": priority,
                      **spec})
    return tasks


def run_demo(home: Path, tasks: int = 200, agents: int = 8, seed: int = 1,
             timeout: float = 120.0, say: Callable[[str], None] = print,
             specs: list[dict] | None = None) -> str:
    """Run the demo in `home`, starting (and then stopping) a suite if none runs there.
    Returns OK, FAILED, TIMED_OUT or INTERRUPTED. `specs` replaces the workload."""
    suite = Suite(home)
    started_here = suite.supervisord_pid() is None
    try:
        if started_here:
            become_subreaper()
            say(f"starting the suite in {home} …")
            began = time.monotonic()
            suite.start(attached=True, timeout=60.0)
            say(f"suite up in {time.monotonic() - began:.1f}s")
        demo = Demo(home, specs if specs is not None else workload(tasks, seed), agents,
                    timeout, say)
        return demo.run()
    finally:
        if started_here:
            say("stopping the suite …")
            suite.stop()
            left = suite.pids()
            say("suite stopped, nothing left running" if not left
                else f"processes still alive: {left}")


class Demo:
    def __init__(self, home: Path, specs: list[dict], agents: int, timeout: float,
                 say: Callable[[str], None]):
        self.home = home
        self.specs = specs
        self.agents = max(1, min(agents, len(specs) or 1))
        self.timeout = timeout
        self.say = say
        self.run_id = uuid.uuid4().hex[:8]
        self.names = [f"demo-{self.run_id}-{i}" for i in range(self.agents)]
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.submitted: list[str] = []  # in submit order, for the summary
        self.known: set[str] = set()  # the same ids, to look up
        self.finished: set[str] = set()  # submitted and seen final
        self.early: set[str] = set()  # seen final before its submit returned here
        self.problems: list[str] = []

    # -- submitting ----------------------------------------------------------------------
    def agent(self, index: int) -> None:
        share = self.specs[index::self.agents]
        try:
            with Client(self.home, timeout=BUS_TIMEOUT, agent=self.names[index]) as client:
                for n, spec in enumerate(share):
                    if self.stop.is_set():
                        return
                    task = client.submit(spec["type"], spec["description"],
                                         priority=spec["priority"], tokens=spec["tokens"],
                                         payload=spec["payload"],
                                         idempotency_key=f"{self.names[index]}-{n}")
                    with self.lock:
                        self.submitted.append(task["id"])
                        self.known.add(task["id"])
                        if task["id"] in self.early:
                            self.finished.add(task["id"])
        except errors.CortexError as e:
            with self.lock:
                self.problems.append(f"agent {index}: {e} [{e.code}]")

    # -- counting --------------------------------------------------------------------------
    def saw_final(self, task_id: str) -> None:
        with self.lock:
            if task_id in self.known:
                self.finished.add(task_id)
            else:
                self.early.add(task_id)

    def outstanding(self) -> list[str]:
        with self.lock:
            return [t for t in self.submitted if t not in self.finished]

    def reconcile(self, client: Client) -> None:
        """Ask for the status of every task not yet seen final: a subscriber can miss
        events (joining late, or dropped when it falls behind)."""
        for task_id in self.outstanding():
            if client.status(task_id).get("final"):
                with self.lock:
                    self.finished.add(task_id)

    def all_done(self, submitters: list[threading.Thread]) -> bool:
        with self.lock:
            finished_all = len(self.finished) == len(self.submitted)
        return finished_all and not any(t.is_alive() for t in submitters)

    def show_progress(self, marks: list[int]) -> None:
        done = len(self.finished)
        while marks and done >= marks[0]:
            self.say(f"  {marks.pop(0):,} of {len(self.specs):,} finished …")

    def collect(self, client: Client, submitters: list[threading.Thread], deadline: float
                ) -> bool:
        """Count results as they arrive until every submitted task is final (True) or
        the deadline passes (False)."""
        total = len(self.specs)
        marks = [total * q // 4 for q in (1, 2, 3)]
        while True:
            next_check = min(deadline, time.monotonic() + RECONCILE_EVERY)
            for event in client.subscribe("task.", timeout=QUIET):
                if event.get("type") in FINAL_EVENTS and event.get("task"):
                    self.saw_final(event["task"])
                    self.show_progress(marks)
                    if self.all_done(submitters):
                        return True
                if time.monotonic() >= next_check:
                    break
            self.reconcile(client)
            self.show_progress(marks)
            if self.all_done(submitters):
                return True
            if time.monotonic() >= deadline:
                return False

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> str:
        with Client(self.home, timeout=BUS_TIMEOUT) as client:
            events_before = client.call("events", "events.status").get("written", 0)
            self.say(f"running {len(self.specs)} tasks from {self.agents} agents …")
            began = time.monotonic()
            submitters = [threading.Thread(target=self.agent, args=(i,), daemon=True)
                          for i in range(self.agents)]
            outcome = OK
            try:  # from the first submitter on: a Ctrl-C at any point cancels what it sent
                for t in submitters:
                    t.start()
                if not self.collect(client, submitters, began + self.timeout):
                    outcome = TIMED_OUT
            except KeyboardInterrupt:
                outcome = INTERRUPTED
            elapsed = time.monotonic() - began
            if outcome != OK:
                self.say(f"{outcome}: cancelling what the demo submitted and is not finished")
                self.stop.set()
                for t in submitters:
                    if t.ident is not None:  # started before the interrupt
                        t.join(BUS_TIMEOUT + 5.0)
                self.say(f"cancelled {self.cancel_leftovers(client)} tasks")
            results = [client.status(task_id) for task_id in list(self.submitted)]
            committed, mismatches = settle_tokens(client, results, time.monotonic() + 15.0)
            events_after = client.call("events", "events.status").get("written", 0)
        ok = self.report(results, elapsed, committed, mismatches, events_after - events_before)
        if outcome == OK and not ok:
            outcome = FAILED
        self.say(f"demo {'OK' if outcome == OK else outcome.upper()}")
        return outcome

    def cancel_leftovers(self, client: Client) -> int:
        """Cancel every task of ours not finished: the ones we know, then any the
        scheduler lists for our agents (a submit whose reply never came back)."""
        count = 0
        for task_id in self.outstanding():
            if client.cancel(task_id).get("state") == "cancelled":
                count += 1
        for agent in self.names:
            for state in SWEEP_STATES:
                listed = client.call("scheduler", "task.list",
                                     {"state": state, "agent": agent, "limit": 10_000})
                for task in listed.get("tasks", []):
                    # Checked here too: a scheduler that ignores the filter must not make
                    # the demo cancel anyone else's work.
                    ours = task.get("agent") == agent and task.get("state") == state
                    if ours and client.cancel(task["id"]).get("state") == "cancelled":
                        count += 1
        return count

    def report(self, results: list[dict], elapsed: float, committed: int,
               mismatches: list[str], events: int) -> bool:
        states: dict[str, int] = {}
        for task in results:
            states[task["state"]] = states.get(task["state"], 0) + 1
        used = sum(t.get("tokens_used") or 0 for t in results)
        starts, ends = [], []
        for task in results:
            times = task.get("times") or {}
            if task["state"] == "completed" and "created" in times:
                if "started" in times:
                    starts.append(times["started"] - times["created"])
                ends.append(times["completed"] - times["created"])
        say = self.say
        say("")
        say(f"tasks      {len(results)} of {len(self.specs)} submitted, "
            f"{sum(1 for t in results if t.get('final'))} finished in {elapsed:.1f}s "
            f"({len(results) / max(elapsed, 1e-9):.0f}/s): "
            + ", ".join(f"{s} {n}" for s, n in sorted(states.items())))
        say(f"tokens     used {used:,} (reported by handlers), committed {committed:,} "
            f"(ledger): {'match' if not mismatches and used == committed else 'MISMATCH'}")
        say(f"events     {events:,} written to JSONL")
        if ends:
            say(f"latency    submit→start p50 {pct(starts, 50)} p95 {pct(starts, 95)}; "
                f"submit→done p50 {pct(ends, 50)} p95 {pct(ends, 95)}")
        for problem in self.problems + mismatches:
            say(f"problem    {problem}")
        return (len(results) == len(self.specs) and not self.problems and not mismatches
                and used == committed and all(t.get("final") for t in results))


def settle_tokens(client: Client, tasks: list[dict], deadline: float) -> tuple[int, list[str]]:
    """(tokens the ledger committed for `tasks`, mismatches): every token a task used must
    be committed and nothing may stay reserved. Settling is asynchronous (the scheduler
    tells the ledger after the task ends), so look again until all match or `deadline`."""
    pending = {t["id"]: t for t in tasks if (t.get("tokens") or 0) > 0
               or (t.get("tokens_used") or 0) > 0}
    committed: dict[str, int] = {}
    while True:
        for task_id, task in list(pending.items()):
            rec = client.call("ledger", "ledger.task", {"task": task_id}).get("reservation")
            used = task.get("tokens_used") or 0
            if rec is None:
                if used == 0:
                    del pending[task_id]  # never reserved (e.g. cancelled while queued)
                continue
            if rec.get("reserved") == 0 and (rec.get("used") or 0) == used:
                committed[task_id] = rec.get("used") or 0
                del pending[task_id]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)  # waiting for the scheduler's commits to reach the ledger
    mismatches = []
    for task_id, task in pending.items():
        rec = client.call("ledger", "ledger.task", {"task": task_id}).get("reservation")
        mismatches.append(f"task {task_id}: used {task.get('tokens_used')}, ledger: {rec}")
    return sum(committed.values()), mismatches


def pct(values: list[float], p: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return _duration(values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return _duration(cuts[p - 1])


def _duration(secs: float) -> str:
    secs = max(0.0, secs)
    return f"{secs * 1000:.0f}ms" if secs < 1 else f"{secs:.1f}s"
