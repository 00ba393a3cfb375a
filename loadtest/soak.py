"""The soak scenario: a steady trickle of tasks for hours, watched for leaks.

    python -m cortex.loadtest --scenario soak --duration 4h [--tasks 1000]

First a warm-up, unmeasured: tasks as fast as the suite takes them until every table the
suite bounds by a count is full, so that what the measured part sees growing is not a
table filling to its cap. The largest are the event router's ring of recent events
(`RING_EVENTS`; the dashboard keeps half as many) and the scheduler's finished tasks
(`[scheduler] retention`: the soak's own suite keeps `SOAK_RETENTION`, and its
`keep_results` is `SOAK_KEEP_RESULTS` seconds, so the warm-up is minutes, not an hour;
the bounding code is the same at any size). The warm-up runs until both have been passed
by `WARMUP_MARGIN`, then waits until the models its tasks asked for (the scheduler
retrains every `retrain_every` completions) are trained and swapped in, and reports how
many tasks and events, and how long, that took.

Then the measured part: --tasks tasks (echo, short sleeps, a command that starts a child)
spread evenly over the first 80% of --duration from a few agents, then the suite idle for
the rest. Every sample (about 200 over the run, at least every 5 s) records, per process
of the suite (supervisord, each service, each worker): RSS, open file descriptors, CPU
seconds; and the event log's size and the zombies among the suite's processes. It fails
(exit 1) on a leak:

- descriptors of a process alive from start to end not back to their baseline (taken
  after the warm-up) within +-5 at the end;
- RSS of such a process growing more than 1 MB per hour over the second half of the
  measured part (the slope of a least-squares line) and by more than one allocator step
  (`ALLOCATOR_STEP_MB`: pymalloc takes memory from the system in arenas of 1 MiB, so a
  bounded churn can raise RSS by one arena at any moment; a smaller rise is not evidence);
- any zombie seen in two samples running.

Writes `soak.json` (every sample) and `soak.md` (the drift per process) under --out.
To see what grows, run it with `CORTEX_TRACEMALLOC=1` (services/runtime/memtrace.py): each
service then logs, at the end of the measured part, the allocations that grew in it by
source line (its RSS figures are then swollen by tracemalloc: not a verdict).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sys
import threading
import time
import tomllib
from pathlib import Path

import psutil

from .harness import Target

RSS_SLOPE_MB_H = 1.0
ALLOCATOR_STEP_MB = 1.0  # one pymalloc arena (CPython 3.10+ on 64-bit)
FD_TOLERANCE = 5
RING_EVENTS = 10_000  # the event router's recent events (services/events/process.py)
DEFAULT_RETENTION = 10_000  # [scheduler] retention when the suite's config does not set it
DEFAULT_RETRAIN_EVERY = 500  # [scheduler] retrain_every when the config does not set it
SOAK_RETENTION = 2_000
SOAK_KEEP_RESULTS = 60.0
WARMUP_MARGIN = 1.1
WARMUP_AGENTS = 8
TRAINING_SETTLE_S = 300.0  # the longest the warm-up waits for the models to settle
LOAD_SHARE = 0.8  # of the duration: the rest is the idle tail the baselines are checked on
AGENTS = 4
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


TRACED = ("broker", "events", "ledger", "scheduler", "pool", "dashboard", "supervisor-events")


def mark_memory(target: Target) -> None:
    """With CORTEX_TRACEMALLOC set (services/runtime/memtrace.py), have every service log
    the allocations that grew since its previous mark (the first mark is its baseline)."""
    if os.environ.get("CORTEX_TRACEMALLOC", "").strip() in ("", "0"):
        return
    for pid, name in target.services().items():
        if name in TRACED:
            try:
                os.kill(pid, signal.SIGUSR2)
            except OSError:
                pass  # gone meanwhile


def duration_arg(text: str) -> float:
    """Seconds from "90", "90s", "30m", "4h" or "1d"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 600, 30m, 4h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def config(workers: int, fsync: str) -> str:
    return ("# written by cortex.loadtest (soak)\n"
            f'[suite]\nfsync = "{fsync}"\n'
            f'[scheduler]\nretention = {SOAK_RETENTION}\nkeep_results = {SOAK_KEEP_RESULTS}\n'
            # No automatic retraining: a model swapped in is a step of a few MB, and the
            # warm-up's wait for it to settle did not end in CI (not yet understood).
            'retrain_every = 0\n'
            f'[pool.groups.default]\ncount = {workers}\n'
            'types = ["echo", "sleep", "spawn"]\n'
            '[handlers]\nspawn = { command = ["sh", "-c", "sleep 0.05 & cat > /dev/null; '
            'wait; echo {}"] }\n')


def processes(target: Target) -> dict[int, str]:
    """pid -> name for the suite's processes now (workers by their own pid)."""
    named = {}
    for pid, role in target.roles().items():
        named[pid] = f"worker {pid}" if role == "workers" else role
    return named


def sample(target: Target, t0: float) -> dict:
    rows = {}
    for pid, name in processes(target).items():
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                cpu = proc.cpu_times()
                rows[str(pid)] = {"name": name, "rss_mb": proc.memory_info().rss / 2**20,
                                  "fds": proc.num_fds(), "cpu_s": cpu.user + cpu.system,
                                  "created": proc.create_time()}
        except psutil.Error:
            continue
    events = sum(p.stat().st_size for p in (target.home / "events").glob("*.jsonl"))
    return {"t": time.monotonic() - t0, "procs": rows, "event_bytes": events,
            "zombies": target.zombies()}


def one_task(client, rng: random.Random, n: float) -> str:
    """Submit one task of the soak's mix and wait for it; its final state (or error)."""
    from cortex.protocol import errors

    kind = rng.choice(("echo", "echo", "sleep", "spawn"))
    payload = {"seconds": 0.2} if kind == "sleep" else {"n": n}
    try:
        return client.submit_and_wait(kind, "soak", payload=payload, task_timeout=60,
                                      timeout=120)["state"]
    except errors.CortexError as e:
        return f"error {e.code}"


class Load(threading.Thread):
    """One agent: submits its share of tasks at evenly spaced times, waiting for each."""

    def __init__(self, home: Path, times: list[float], t0: float, seed: int):
        super().__init__(daemon=True)
        self.home, self.times, self.t0 = home, times, t0
        self.rng = random.Random(seed)
        self.done: dict[str, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        from cortex.protocol import Client

        with Client(self.home, timeout=120) as client:
            for at in self.times:
                if self.halt.wait(max(0.0, self.t0 + at - time.monotonic())):
                    return
                state = one_task(client, self.rng, at)
                self.done[state] = self.done.get(state, 0) + 1


class WarmUp(threading.Thread):
    """One warm-up agent: tasks back to back until `halt` is set."""

    def __init__(self, home: Path, seed: int, halt: threading.Event):
        super().__init__(daemon=True)
        self.home, self.halt = home, halt
        self.rng = random.Random(seed)
        self.done: dict[str, int] = {}

    def run(self) -> None:
        from cortex.protocol import Client

        with Client(self.home, timeout=120) as client:
            while not self.halt.is_set():
                state = one_task(client, self.rng, -1)
                self.done[state] = self.done.get(state, 0) + 1


class LineCounter:
    """Lines appended to the event log since it was made (each line is one event)."""

    def __init__(self, home: Path):
        self.home = home
        self.offsets = {p: p.stat().st_size for p in self._files()}
        self.lines = 0

    def _files(self) -> list[Path]:
        return sorted((self.home / "events").glob("*.jsonl"))

    def count(self) -> int:
        for path in self._files():
            with open(path, "rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            self.lines += data.count(b"\n")
            self.offsets[path] = self.offsets.get(path, 0) + len(data)
        return self.lines


def retention_of(home: Path) -> int:
    """The suite's `[scheduler] retention` (its config file, else the default)."""
    path = home / "cortex.toml"
    try:
        value = tomllib.loads(path.read_text()).get("scheduler", {}).get("retention")
    except (OSError, tomllib.TOMLDecodeError):
        value = None
    return value if isinstance(value, int) and value >= 0 else DEFAULT_RETENTION


def retrain_every_of(home: Path) -> int:
    """The suite's `[scheduler] retrain_every` (its config file, else the default)."""
    try:
        value = tomllib.loads((home / "cortex.toml").read_text()).get(
            "scheduler", {}).get("retrain_every")
    except (OSError, tomllib.TOMLDecodeError):
        value = None
    return value if isinstance(value, int) and value >= 0 else DEFAULT_RETRAIN_EVERY


def training_due(status: dict, every: int) -> bool:
    """Is a model being trained or read, or is the predictor's retrain owed (`model.status`)?
    A router that cannot learn (the soak's tasks all say "soak") is retried in a child
    that fails at once: owed for ever, so only its training in progress counts."""
    routing = status.get("routing") or {}
    owed = every and status.get("completions_since_training", 0) >= every \
        and not status.get("last_failure")
    return bool(status.get("training") or routing.get("training") or owed)


def settle_training(target: Target, limit_s: float = TRAINING_SETTLE_S) -> float:
    """Wait until no model is being trained or swapped in and none is owed, so the
    measured part does not start with the scheduler taking in models the warm-up's tasks
    asked for (a bounded step of a few MB, not a leak); the seconds it took."""
    from cortex.protocol import Client

    every, started = retrain_every_of(target.home), time.monotonic()
    with Client(target.home, timeout=60) as client:
        while time.monotonic() - started < limit_s:
            if not training_due(client.call("scheduler", "model.status", {}), every):
                break
            time.sleep(2.0)
    return round(time.monotonic() - started, 1)


def warm_up(target: Target, seed: int, quiet: bool, limit_s: float = 1800.0) -> dict:
    """Tasks back to back until the scheduler's finished tasks and the router's ring of
    events are both full (past their caps by WARMUP_MARGIN), or `limit_s` has passed."""
    want_tasks = int(retention_of(target.home) * WARMUP_MARGIN)
    want_events = int(RING_EVENTS * WARMUP_MARGIN)
    lines, halt = LineCounter(target.home), threading.Event()
    agents = [WarmUp(target.home, seed + 100 + i, halt) for i in range(WARMUP_AGENTS)]
    started = time.monotonic()
    for agent in agents:
        agent.start()
    try:
        while time.monotonic() - started < limit_s:
            time.sleep(1.0)
            tasks = sum(sum(a.done.values()) for a in agents)
            events = lines.count()
            if not quiet:
                print(f"[soak] warm-up: {tasks}/{want_tasks} tasks, {events}/{want_events} "
                      "events", file=sys.stderr, flush=True)
            if tasks >= want_tasks and events >= want_events:
                break
    finally:
        halt.set()
        for agent in agents:
            agent.join(timeout=150)
    outcome: dict[str, int] = {}
    for agent in agents:
        for state, n in agent.done.items():
            outcome[state] = outcome.get(state, 0) + n
    tasks = sum(outcome.values())
    settled = settle_training(target)
    return {"tasks": outcome, "events": lines.count(), "training_settled_s": settled,
            "seconds": round(time.monotonic() - started, 1),
            "why": f"fill the scheduler's {retention_of(target.home)} finished tasks and the "
                   f"event router's ring of {RING_EVENTS} events ({WARMUP_MARGIN}x each), "
                   "then let the models those tasks asked for be trained and swapped in",
            "full": tasks >= want_tasks and lines.lines >= want_events
            and settled < TRAINING_SETTLE_S}


def slope_mb_per_h(points: list[tuple[float, float]]) -> float:
    n = len(points)
    if n < 3:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mt) * (v - mv) for t, v in points) / var * 3600


def analyse(samples: list[dict], duration: float) -> tuple[list[dict], list[str]]:
    """Per process alive from the first sample to the last: drift figures and leaks."""
    first, last = samples[0]["procs"], samples[-1]["procs"]
    rows, leaks = [], []
    for pid, start in first.items():
        end = last.get(pid)
        if end is None or end["created"] != start["created"]:
            continue  # restarted or recycled: not the same process throughout
        series = [(s["t"], s["procs"][pid]) for s in samples if pid in s["procs"]]
        half = [(t, p["rss_mb"]) for t, p in series if t >= duration / 2]
        slope = slope_mb_per_h(half)
        grown = (half[-1][1] - half[0][1]) if len(half) >= 2 else 0.0
        row = {"pid": int(pid), "name": start["name"],
               "rss_start_mb": round(start["rss_mb"], 2), "rss_end_mb": round(end["rss_mb"], 2),
               "rss_slope_2nd_half_mb_h": round(slope, 3),
               "rss_grown_2nd_half_mb": round(grown, 3),
               "fds_baseline": start["fds"], "fds_end": end["fds"],
               "fds_max": max(p["fds"] for _, p in series),
               "cpu_s": round(end["cpu_s"] - start["cpu_s"], 2)}
        rows.append(row)
        if abs(end["fds"] - start["fds"]) > FD_TOLERANCE:
            leaks.append(f"{start['name']} (pid {pid}): {start['fds']} descriptors at the "
                         f"start, {end['fds']} at the end")
        if slope > RSS_SLOPE_MB_H and grown > ALLOCATOR_STEP_MB:
            leaks.append(f"{start['name']} (pid {pid}): RSS grew {slope:.2f} MB/h over the "
                         f"second half ({grown:.2f} MB)")
    seen: set[int] = set()
    for before, after in zip(samples, samples[1:], strict=False):
        lasting = set(before["zombies"]) & set(after["zombies"])
        if lasting - seen:
            leaks.append(f"zombies at {after['t']:.0f} s: {sorted(lasting - seen)}")
            seen |= lasting
    return rows, leaks


def run(args) -> int:
    duration = args.duration or 600.0
    interval = max(1.0, min(5.0, duration / 200))
    target = Target(args.home, workers=min(args.workers, 8), fsync=args.fsync,
                    keep_home=args.keep_home)
    if target.owned:
        (target.home / "cortex.toml").write_text(config(target.workers, args.fsync))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with target:
        warm = warm_up(target, args.seed, args.quiet)
        if not warm["full"]:
            print(f"[soak] warm-up stopped before the tables were full: {warm}",
                  file=sys.stderr)
        time.sleep(min(5.0, interval))  # the warm-up's snapshots and events settle
        mark_memory(target)
        t0 = time.monotonic()
        spacing = duration * LOAD_SHARE / max(1, args.tasks)
        times = [i * spacing for i in range(args.tasks)]
        loads = [Load(target.home, times[i::AGENTS], t0, args.seed + i) for i in range(AGENTS)]
        samples = [sample(target, t0)]
        for load in loads:
            load.start()
        try:
            while time.monotonic() - t0 < duration:
                time.sleep(min(interval, max(0.0, duration - (time.monotonic() - t0))))
                samples.append(sample(target, t0))
                if not args.quiet:
                    done = sum(sum(ld.done.values()) for ld in loads)
                    print(f"[soak] {samples[-1]['t']:.0f}/{duration:.0f} s, {done} tasks",
                          file=sys.stderr, flush=True)
        finally:
            for load in loads:
                load.halt.set()
            for load in loads:
                load.join(timeout=150)
        mark_memory(target)
        rows, leaks = analyse(samples, duration)
        if not warm["full"]:
            leaks.append(f"the warm-up did not fill the bounded tables ({warm['why']}), so "
                         "growth in the measured part may be a table filling, not a leak")
    outcome: dict[str, int] = {}
    for load in loads:
        for state, n in load.done.items():
            outcome[state] = outcome.get(state, 0) + n
    if target.leftovers:
        leaks.append(f"processes left after stop: {target.leftovers}")
    hours = max(duration / 3600, 1e-9)
    growth = (samples[-1]["event_bytes"] - samples[0]["event_bytes"]) / hours
    report = {"duration_s": duration, "tasks": outcome, "warm_up": warm, "interval_s": interval,
              "event_log_growth_bytes_h": round(growth), "processes": rows, "leaks": leaks,
              "samples": samples}
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Soak: {duration:.0f} s, tasks {outcome}", "",
             f"warm-up (not measured): tasks {warm['tasks']}, {warm['events']} events in "
             f"{warm['seconds']} s, to {warm['why']}", "",
             f"event log growth: {growth / 2**20:.2f} MB/h", "",
             "| process | RSS start MB | RSS end MB | RSS slope 2nd half MB/h | "
             "RSS grown 2nd half MB | fds base | fds end | fds max | CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['rss_start_mb']} | {r['rss_end_mb']} | "
              f"{r['rss_slope_2nd_half_mb_h']} | {r['rss_grown_2nd_half_mb']} | "
              f"{r['fds_baseline']} | {r['fds_end']} | "
              f"{r['fds_max']} | {r['cpu_s']} |" for r in rows]
    lines += ["", "leaks: " + ("; ".join(leaks) if leaks else "none")]
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)
    return 1 if leaks else 0

