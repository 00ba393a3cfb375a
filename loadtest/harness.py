"""The instrument around the agents: the suite under test, a resource sampler, and the
measurements taken after each scenario (latencies, losses, duplicates, zombies, tokens,
events, CPU and memory).

`Target` owns (or attaches to) one suite; `Sampler` watches its processes every
`interval` seconds with psutil and polls the scheduler and ledger; `measure()` turns the
agents' records plus what the suite says about itself into one scenario result (a plain
dict whose keys are documented in loadtest/__init__.py).
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import psutil

from cortex.protocol import Client, errors
from cortex.services.control import Suite, SuiteError, become_subreaper, reap_orphans, zombies

from .agents import FINAL_STATES, fill_final
from .cpu import cpu_by_role
from .suiteconfig import own_config, tcp_bus


# -- statistics ---------------------------------------------------------------------------
def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(values) -> dict:
    """count, mean, p50, p95, p99, max of `values` (milliseconds in, milliseconds out)."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    return {"count": len(xs), "mean": round(sum(xs) / len(xs), 4),
            "p50": round(percentile(xs, 50), 4), "p95": round(percentile(xs, 95), 4),
            "p99": round(percentile(xs, 99), 4), "max": round(xs[-1], 4)}


def cpu_per_task(cpu_s: dict, agents_cpu_s: float, completed: int) -> dict:
    """Milliseconds of CPU per completed task by process (role), the agents (the harness
    and its agent processes) among them, and `suite`: the suite's own processes (model
    training, which is not work done for tasks, left out)."""
    if not completed:
        return {}
    per = {role: round(1000 * s / completed, 4) for role, s in sorted(cpu_s.items())}
    per["agents"] = round(1000 * agents_cpu_s / completed, 4)
    per["suite"] = round(1000 * sum(s for role, s in cpu_s.items()
                                    if role != "model-training") / completed, 4)
    return per


# -- the suite under test -------------------------------------------------------------------
class Target:
    """The suite a load test drives: its own (started in a temporary home, stopped at the
    end, checked for leftovers) or an existing one (`home`), which is left running."""

    def __init__(self, home: str | None = None, workers: int = 20, fsync: str = "group",
                 extra_types=(), keep_home: bool = False, postgres_url: str = "",
                 configure=None, tcp: bool = False):
        """`configure(home)`: (handlers, sections) for own_config, written into a home of
        our own (the mixed scenario's shares); `tcp`: the suite on tcp with CurveZMQ."""
        self.owned = home is None
        self.workers = workers
        self.keep_home = keep_home
        if self.owned:
            become_subreaper()
            self.home = Path(tempfile.mkdtemp(prefix="cxlt", dir="/tmp"))
            more, sections = configure(self.home) if configure else ({}, "")
            (self.home / "cortex.toml").write_text(own_config(
                workers, fsync, extra_types, postgres_url, more, sections,
                tcp_bus() if tcp else ""))
            if tcp:  # the suite's key pair, made as a user would (`cortex keys make`)
                subprocess.run([sys.executable, "-m", "cortex.services.cli", "--home",
                                str(self.home), "keys", "make"], check=True,
                               capture_output=True, timeout=60)
        else:
            self.home = Path(home).absolute()
        self.suite = Suite(self.home)
        self.seen_pids: set[int] = set()
        self.leftovers: list[int] = []
        self.start_s: float | None = None

    def __enter__(self):
        if self.owned:
            started = time.monotonic()
            try:
                self.suite.start(attached=True, timeout=90)
            except BaseException:
                # __exit__ is not called when __enter__ fails: a suite that never became
                # ready would be left running (supervisord reparented to init).
                self.__exit__(None, None, None)
                raise
            self.start_s = time.monotonic() - started
        else:
            self.suite.wait_ready(timeout=30)
        self.seen_pids.update(self.suite.pids())
        return self

    def __exit__(self, *exc):
        if not self.owned:
            return
        self.seen_pids.update(self.suite.pids())
        self.suite.stop()
        reap_orphans()
        self.leftovers = sorted(p for p in self.seen_pids if _exists(p))
        if not self.keep_home and not self.leftovers:
            shutil.rmtree(self.home, ignore_errors=True)

    def services(self) -> dict[int, str]:
        """pid -> service name for the five (and supervisord), from supervisord."""
        roles = {}
        sup = self.suite.supervisord_pid()
        if sup:
            roles[sup] = "supervisord"
        try:
            for row in self.suite.processes():
                if row.get("pid"):
                    roles[int(row["pid"])] = row["name"]
        except SuiteError:
            pass
        return roles

    def roles(self) -> dict[int, str]:
        """pid -> role for every live process of the suite (workers are "workers")."""
        roles = self.services()
        # The pool's children are the workers; the scheduler's child is the model trainer
        # (counted apart: it is not work done for tasks).
        children_role = {"pool": "workers", "scheduler": "model-training"}
        for pid, name in list(roles.items()):
            if name in children_role:
                try:
                    for child in psutil.Process(pid).children(recursive=True):
                        roles[child.pid] = children_role[name]
                except psutil.Error:
                    pass
        for pid in self.suite.pids():
            roles.setdefault(pid, "workers")
        self.seen_pids.update(roles)
        return roles

    def worker_pids(self) -> list[int]:
        return [p for p, r in self.roles().items() if r == "workers"]

    def zombies(self) -> list[int]:
        """Zombies among every pid the suite ever had and the children of its processes
        (and of this harness)."""
        pids = set(self.seen_pids) | set(self.suite.pids())
        for pid in list(pids) + [os.getpid()]:
            try:
                pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                pass
        return zombies(pids)

    def kill(self, pid: int) -> bool:
        try:
            os.kill(pid, signal.SIGKILL)
            return True
        except ProcessLookupError:
            return False


def _exists(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- sampling --------------------------------------------------------------------------------
class Sampler(threading.Thread):
    """Samples CPU and RSS of every suite process, the queue depth, the scheduler's
    counters and the ledger every `interval` seconds."""

    def __init__(self, target: Target, interval: float = 0.5):
        super().__init__(name="sampler", daemon=True)
        self.target = target
        self.interval = interval
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.procs: dict[int, psutil.Process] = {}
        self.client: Client | None = None
        self.reset()

    def reset(self) -> None:
        self.first_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.role_of: dict[int, str] = {}
        self.peak_rss: dict[str, float] = {}
        self.peak_total_rss = 0.0
        self.peak_worker_rss = 0.0
        self.timeline: list[dict] = []
        self.over_allocated = 0
        self.max_workers_seen = 0

    def run(self) -> None:
        self.client = Client(self.target.home, timeout=2.0, name=f"loadtest-sampler-{os.getpid()}")
        try:
            while not self.halt.wait(self.interval):
                self.sample()
        finally:
            self.client.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)

    def begin(self) -> None:
        with self.lock:
            self.reset()
        self.sample(bus=False)

    def end(self) -> dict:
        self.sample(bus=False)
        with self.lock:
            cpu: dict[str, float] = {}
            for pid, last in self.last_cpu.items():
                role = self.role_of[pid]
                cpu[role] = cpu.get(role, 0.0) + last - self.first_cpu[pid]
            return {"cpu_s": {k: round(v, 3) for k, v in sorted(cpu.items())},
                    "peak_rss_mb": {k: round(v, 1) for k, v in sorted(self.peak_rss.items())},
                    "workers_peak_rss_mb": round(self.peak_worker_rss, 1),
                    "suite_peak_rss_mb": round(self.peak_total_rss, 1),
                    "timeline": list(self.timeline),
                    "over_allocated_samples": self.over_allocated}

    def sample(self, bus: bool = True) -> None:
        roles = self.target.roles()
        now = time.time()
        rss_by_role: dict[str, float] = {}
        total = 0.0
        with self.lock:
            for pid, role in roles.items():
                proc = self.procs.get(pid)
                try:
                    if proc is None:
                        proc = self.procs[pid] = psutil.Process(pid)
                    with proc.oneshot():
                        times = proc.cpu_times()
                        cpu = times.user + times.system
                        rss = proc.memory_info().rss / 2**20
                except psutil.Error:
                    self.procs.pop(pid, None)
                    continue
                self.role_of[pid] = role
                self.first_cpu.setdefault(pid, cpu)
                self.last_cpu[pid] = cpu
                rss_by_role[role] = rss_by_role.get(role, 0.0) + rss
                if role != "workers":
                    self.peak_rss[role] = max(self.peak_rss.get(role, 0.0), rss)
                total += rss
            self.peak_worker_rss = max(self.peak_worker_rss, rss_by_role.get("workers", 0.0))
            self.peak_total_rss = max(self.peak_total_rss, total)
            self.max_workers_seen = max(self.max_workers_seen,
                                        sum(1 for r in roles.values() if r == "workers"))
        if not bus or self.client is None:
            return
        row = {"t": now, "rss_mb": round(total, 1), "queue": None, "completed": None}
        try:
            status = self.client.call("scheduler", "scheduler.status", timeout=1.0)
            # Every queued task, whatever it waits for (the priority queue alone leaves
            # out those held back for cpu, memory or tokens).
            row["queue"] = status.get("states", {}).get("queued", 0)
            counters = status.get("counters", {})
            row["completed"] = counters.get("completed", 0) + counters.get("failed", 0)
        except errors.CortexError:
            pass
        try:
            for b in self.client.budget().get("budgets", []):
                if b.get("reserved", 0) + b.get("committed", 0) > b.get("limit", 0):
                    with self.lock:
                        self.over_allocated += 1
        except errors.CortexError:
            pass
        with self.lock:
            self.timeline.append(row)


MODELS_PATIENCE = 60.0  # seconds the idle probe waits for a due model training to end


def models_busy(client: Client) -> bool:
    """Is a model training running, or due and waiting for its lull (the predictor's or
    the router's)? Either is work the suite has to do, not idling."""
    status = client.call("scheduler", "model.status", timeout=5)
    return any(part.get("training") or part.get("waiting_for_lull")
               for part in (status, status.get("routing") or {}))


def idle_cpu(target: Target, seconds: float = 3.0, settle: float = 2.0,
             client: Client | None = None) -> dict:
    """CPU of the whole suite over a quiet period (after `settle` s of nothing), as a
    fraction of one core, in total and by role. With `client`, first the end of a model
    training the load made due (it starts in the lull after the load): how long that took
    is reported (`models_s`), and `models_busy` if it had not ended within the patience."""
    waited, busy = 0.0, False
    if client is not None:
        began = time.monotonic()
        try:
            while (busy := models_busy(client)) and \
                    time.monotonic() - began < MODELS_PATIENCE:
                time.sleep(0.5)  # polling the scheduler's own account, with a deadline
        except errors.CortexError:
            busy = False  # not asked: measured as it is
        waited = time.monotonic() - began
    time.sleep(settle)  # let the last work drain before the quiet period starts
    by_role = cpu_by_role(target.roles(), seconds)  # the quiet period being measured
    used = sum(by_role.values())
    return {"seconds": seconds, "cpu_s": round(used, 4),
            "fraction_of_core": round(used / seconds, 5),
            "by_role": {k: round(v / seconds, 5) for k, v in sorted(by_role.items())},
            "models_s": round(waited, 2), "models_busy": busy}


def memory(target: Target) -> dict:
    """RSS and PSS (shared pages split between their users) of the suite right now, MB."""
    rss = pss = 0.0
    for pid in target.roles():
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss / 2**20
        pss += getattr(info, "pss", info.rss) / 2**20
    return {"rss_mb": round(rss, 1), "pss_mb": round(pss, 1)}


# -- the suite's own accounts ---------------------------------------------------------------
def bus_snapshot(client: Client) -> dict:
    """Counters we diff across a scenario: events, ledger, scheduler."""
    snap = {"events": {}, "ledger_committed": None, "scheduler": {}}
    try:
        snap["events"] = client.call("events", "events.status", timeout=5)
    except errors.CortexError:
        pass
    try:
        rows = client.budget().get("budgets", [])
        snap["ledger_committed"] = sum(r.get("committed", 0) for r in rows
                                       if r.get("scope") == "global")
    except errors.CortexError:
        pass
    try:
        snap["scheduler"] = client.call("scheduler", "scheduler.status", timeout=5)
    except errors.CortexError:
        pass
    return snap


def event_offsets(home: Path) -> dict[str, int]:
    return {p: os.path.getsize(p) for p in glob.glob(str(home / "events" / "*.jsonl"))}


def new_event_lines(home: Path, offsets: dict[str, int]):
    """The non-blank JSONL lines appended since `offsets` (from event_offsets)."""
    for path in sorted(glob.glob(str(home / "events" / "*.jsonl"))):
        with open(path, "rb") as f:
            f.seek(offsets.get(path, 0))
            for line in f:
                if line.strip():
                    yield line


def parse_event(line: bytes) -> dict | None:
    """One JSONL line as an event, or None if it is torn or not JSON."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None


TASK_ENDS = ("task.completed", "task.failed", "task.dead")


def read_new_events(home: Path, offsets: dict[str, int]) -> tuple[int, list[dict]]:
    """(lines, task events) appended to the JSONL files since `offsets`: the ends of
    tasks (TASK_ENDS) and every `task.waiting`."""
    lines = 0
    found = []
    for line in new_event_lines(home, offsets):
        lines += 1
        if b'"task.' not in line:
            continue
        event = parse_event(line)
        if event is not None and (event.get("type") in TASK_ENDS
                                  or event.get("type") == "task.waiting"):
            found.append(event)
    return lines, found


def waiting_summary(events: list[dict], ids: set) -> tuple[dict, list]:
    """How many of these tasks waited, and why (from their task.waiting events), and the
    (time, reason) series the timeline chart draws."""
    by_reason: dict[str, dict] = {}
    waited: set = set()
    series = []
    for e in events:
        if e.get("type") != "task.waiting" or e.get("task") not in ids:
            continue
        reason = str((e.get("data") or {}).get("reason", "unknown"))
        row = by_reason.setdefault(reason, {"events": 0, "tasks": set()})
        row["events"] += 1
        row["tasks"].add(e["task"])
        waited.add(e["task"])
        if isinstance(e.get("ts"), int | float):
            series.append((e["ts"], reason))
    return ({"tasks": len(waited),
             "by_reason": {k: {"events": v["events"], "tasks": len(v["tasks"])}
                           for k, v in sorted(by_reason.items())}}, sorted(series))


def settle_events(client: Client, timeout: float = 15.0) -> dict:
    """Wait until the event router has written all it received and publishers have
    nothing unacknowledged, so the JSONL count is final."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status = client.call("events", "events.status", timeout=2)
            sched = client.call("scheduler", "scheduler.status", timeout=2)
        except errors.CortexError:
            time.sleep(0.2)  # a restarting service: poll again shortly
            continue
        key = (status.get("received"), status.get("written"))
        if status.get("written") == status.get("received") and not status.get("buffered") \
                and not sched.get("events_unacked") and key == last:
            return status
        last = key
        time.sleep(0.2)  # the router flushes on its own clock; poll its status
    return {}


def resolve_unfinished(client: Client, records: list[dict], grace: float) -> None:
    """Give tasks the agents did not see finish a last chance; what stays unfinished is
    lost."""
    deadline = time.monotonic() + grace
    for rec in records:
        if rec["id"] is None or rec["state"] in FINAL_STATES or rec["state"] == "not_found":
            continue
        left = max(0.5, deadline - time.monotonic())
        try:
            task = client.wait(rec["id"], timeout=left)
            fill_final(rec, task)
            rec["late"] = True
        except errors.NotFound:
            rec["state"] = "not_found"
        except errors.CortexError:
            rec["state"] = "unfinished"


# -- one scenario's result ------------------------------------------------------------------
def measure(name: str, target: Target, records: list[dict], t0: float, t_end: float,
            before: dict, after: dict, offsets: dict, sampler_out: dict, agents: int,
            processes: int, harness_cpu_s: float, extra: dict | None = None,
            settle: dict | None = None) -> dict:
    planned = len(records)
    accepted = [r for r in records if r["id"] is not None]
    rejected = Counter(r["code"] or "unknown" for r in records if r["id"] is None)
    states = Counter(r["state"] or "unfinished" for r in accepted)
    lost = [r for r in accepted if r["state"] not in FINAL_STATES]

    lines, task_events = read_new_events(target.home, offsets)
    ids = {r["id"] for r in accepted}
    waiting, waiting_series = waiting_summary(task_events, ids)
    final_events = [e for e in task_events if e.get("type") in TASK_ENDS]
    completions = Counter(e.get("task") for e in final_events
                          if e.get("type") == "task.completed" and e.get("task") in ids)
    duplicated = sorted(t for t, n in completions.items() if n > 1)
    duration = {}
    for e in final_events:
        d = (e.get("data") or {}).get("duration")
        if e.get("task") in ids and isinstance(d, int | float):
            duration[e["task"]] = duration.get(e["task"], 0.0) + d

    done = [r for r in accepted if r["state"] in FINAL_STATES]
    completed = [r for r in done if r["state"] == "completed"]
    seen = [r for r in done if r["t_seen"] is not None]
    first_attempt = [r for r in done if r["attempt"] == 1 and r["started"] is not None]
    ms = 1000.0
    lat = {
        "submit": summarize((r["t_ack"] - r["t_submit"]) * ms for r in accepted
                            if r["t_ack"] is not None),
        "coordination": summarize((r["started"] - r["t_submit"]) * ms for r in first_attempt),
        "coordination_idle": summarize(
            (r["started"] - r["t_submit"]) * ms for r in first_attempt
            if r["dispatched"] is not None and r["dispatched"] == r["created"]),
        "queue_wait": summarize((r["dispatched"] - r["created"]) * ms for r in first_attempt
                                if r["dispatched"] is not None and r["created"] is not None),
        "end_to_end": summarize((r["t_seen"] - r["t_submit"]) * ms for r in seen
                                if r["state"] == "completed"),
    }
    starts = [r["t_submit"] for r in records if r["t_submit"] is not None]
    ends = [r["t_seen"] for r in seen]
    wall = (max(ends) - min(starts)) if starts and ends else max(t_end - t0, 1e-9)
    wall = max(wall, 1e-9)

    # Utilisation: handler run time (from the event log, else from the task's times) over
    # workers x the span from the first handler start to the last handler end.
    run_times = []
    spans = []
    for r in done:
        if r["started"] is None:
            continue
        d = duration.get(r["id"])
        if d is None and r["ended"] is not None:
            d = max(0.0, r["ended"] - r["started"])
        if d is not None:
            run_times.append(d)
            spans.append((r["started"], r["started"] + d))
    util = {"overall": None, "steady": None, "busy_s": round(sum(run_times), 3)}
    workers = target.workers
    if spans and workers:
        lo = min(s for s, _ in spans)
        hi = max(e for _, e in spans)
        if hi > lo:
            util["overall"] = round(sum(run_times) / (workers * (hi - lo)), 4)
            # Steady state: the middle 80 % of that span (ramp-up and drain left out).
            a, b = lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo)
            busy = sum(max(0.0, min(e, b) - max(s, a)) for s, e in spans)
            util["steady"] = round(busy / (workers * (b - a)), 4)

    tokens_reported = sum(r["tokens_used"] or 0 for r in done)
    committed = None
    if after.get("ledger_committed") is not None and before.get("ledger_committed") is not None:
        committed = after["ledger_committed"] - before["ledger_committed"]
    token_error = None
    if committed is not None:
        token_error = 0.0 if tokens_reported == committed else round(
            100.0 * (committed - tokens_reported) / max(tokens_reported, 1), 4)

    ev_b, ev_a = before.get("events") or {}, after.get("events") or {}
    received = (ev_a.get("received", 0) - ev_b.get("received", 0)) if ev_a and ev_b else None
    written = (ev_a.get("written", 0) - ev_b.get("written", 0)) if ev_a and ev_b else None
    events = {"received": received, "written": written, "jsonl_lines": lines,
              "missing": (received - lines) if received is not None else None,
              "gaps": (ev_a.get("gaps", 0) - ev_b.get("gaps", 0)) if ev_a and ev_b else None,
              "duplicates": (ev_a.get("duplicates", 0) - ev_b.get("duplicates", 0))
              if ev_a and ev_b else None,
              "per_s": round(lines / wall, 1), "settled": bool(settle)}

    failures = Counter(r["category"] or r["state"] for r in done if r["state"] != "completed")
    timeline = sampler_out.pop("timeline", [])
    result = {
        "scenario": name,
        "agents": agents,
        "workers": workers,
        "agent_processes": processes,
        "wall_s": round(wall, 4),
        "tasks": {"planned": planned,
                  "submitted": sum(1 for r in records if r["t_submit"] is not None),
                  "accepted": len(accepted), "rejected": sum(rejected.values()),
                  "completed": len(completed), "failed": states.get("failed", 0),
                  "dead": states.get("dead", 0), "cancelled": states.get("cancelled", 0),
                  "lost": len(lost), "duplicated": len(duplicated),
                  "retried": sum(1 for r in done if (r["attempt"] or 1) > 1),
                  "seen_late": sum(1 for r in accepted if r.get("late"))},
        "throughput": round(len(completed) / wall, 2),
        "completion_rate": round(len(completed) / planned, 5) if planned else None,
        "latency_ms": lat,
        "utilization": util,
        "failures": dict(sorted(failures.items())),
        "rejections": dict(sorted(rejected.items())),
        "zombies": None,  # filled by the caller after its scan
        "tokens": {"reported": tokens_reported, "ledger_committed": committed,
                   "error_pct": token_error,
                   "over_allocated_samples": sampler_out.pop("over_allocated_samples", 0)},
        "events": events,
        "waiting": waiting,
        "resources": {**sampler_out, "harness_cpu_s": round(harness_cpu_s, 3),
                      "cpu_ms_per_task": cpu_per_task(sampler_out.get("cpu_s") or {},
                                                      harness_cpu_s, len(completed))},
        "lost_ids": [r["id"] for r in lost][:50],
        "duplicated_ids": duplicated[:50],
    }
    if extra:
        result.update(extra)
    result["_series"] = {"timeline": timeline, "records": records, "t0": t0,
                         "waiting": waiting_series}
    return result
