"""The soak scenario: a steady trickle of tasks for hours, watched for leaks.

    python -m cortex.loadtest --scenario soak --duration 4h [--tasks 1000]

Spreads --tasks tasks (echo, short sleeps, a command that starts a child) evenly over the
first 80% of --duration from a few agents, then lets the suite sit idle for the rest.
Every sample (about 200 over the run, at least every 5 s) records, per process of the
suite (supervisord, each service, each worker): RSS, open file descriptors, CPU seconds;
and the event log's size and the zombies among the suite's processes. It fails (exit 1)
on a leak:

- descriptors of a process alive from start to end not back to their baseline (after
  the warm-up) within +-5 at the end;
- RSS of such a process growing more than 1 MB per hour over the second half (the slope
  of a least-squares line), and by more than 1 MB in all; a run under an hour cannot tell
  that from warm-up (caches, allocator arenas), so there only growth above 5 MB counts;
- any zombie seen in two samples running.

Writes `soak.json` (every sample) and `soak.md` (the drift per process) under --out.
"""

from __future__ import annotations

import json
import random
import re
import sys
import threading
import time
from pathlib import Path

import psutil

from .harness import Target

RSS_SLOPE_MB_H = 1.0
RSS_NOISE_MB = 1.0
RSS_NOISE_SHORT_MB = 5.0  # runs under an hour
FD_TOLERANCE = 5
LOAD_SHARE = 0.8  # of the duration: the rest is the idle tail the baselines are checked on
AGENTS = 4
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_arg(text: str) -> float:
    """Seconds from "90", "90s", "30m", "4h" or "1d"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 600, 30m, 4h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def config(workers: int, fsync: str) -> str:
    return ("# written by cortex.loadtest (soak)\n"
            f'[suite]\nfsync = "{fsync}"\n'
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


class Load(threading.Thread):
    """One agent: submits its share of tasks at evenly spaced times, waiting for each."""

    def __init__(self, home: Path, times: list[float], t0: float, seed: int):
        super().__init__(daemon=True)
        self.home, self.times, self.t0 = home, times, t0
        self.rng = random.Random(seed)
        self.done: dict[str, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        from cortex.protocol import Client, errors

        with Client(self.home, timeout=120) as client:
            for at in self.times:
                if self.halt.wait(max(0.0, self.t0 + at - time.monotonic())):
                    return
                kind = self.rng.choice(("echo", "echo", "sleep", "spawn"))
                payload = {"seconds": 0.2} if kind == "sleep" else {"n": at}
                try:
                    task = client.submit_and_wait(kind, "soak", payload=payload,
                                                  task_timeout=60, timeout=120)
                    state = task["state"]
                except errors.CortexError as e:
                    state = f"error {e.code}"
                self.done[state] = self.done.get(state, 0) + 1


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
    noise = RSS_NOISE_MB if duration >= 3600 else RSS_NOISE_SHORT_MB
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
               "fds_baseline": start["fds"], "fds_end": end["fds"],
               "fds_max": max(p["fds"] for _, p in series),
               "cpu_s": round(end["cpu_s"] - start["cpu_s"], 2)}
        rows.append(row)
        if abs(end["fds"] - start["fds"]) > FD_TOLERANCE:
            leaks.append(f"{start['name']} (pid {pid}): {start['fds']} descriptors at the "
                         f"start, {end['fds']} at the end")
        if slope > RSS_SLOPE_MB_H and grown > noise:
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
        from cortex.protocol import Client

        with Client(target.home, timeout=60) as client:  # warm-up: every type once
            for kind in ("echo", "sleep", "spawn"):
                client.submit_and_wait(kind, "soak warm-up", payload={"seconds": 0},
                                       timeout=60)
        time.sleep(min(5.0, interval))  # the warm-up's snapshots and events settle
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
        rows, leaks = analyse(samples, duration)
    outcome: dict[str, int] = {}
    for load in loads:
        for state, n in load.done.items():
            outcome[state] = outcome.get(state, 0) + n
    if target.leftovers:
        leaks.append(f"processes left after stop: {target.leftovers}")
    hours = max(duration / 3600, 1e-9)
    growth = (samples[-1]["event_bytes"] - samples[0]["event_bytes"]) / hours
    report = {"duration_s": duration, "tasks": outcome, "interval_s": interval,
              "event_log_growth_bytes_h": round(growth), "processes": rows, "leaks": leaks,
              "samples": samples}
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Soak: {duration:.0f} s, tasks {outcome}", "",
             f"event log growth: {growth / 2**20:.2f} MB/h", "",
             "| process | RSS start MB | RSS end MB | RSS slope 2nd half MB/h | fds base | "
             "fds end | fds max | CPU s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['rss_start_mb']} | {r['rss_end_mb']} | "
              f"{r['rss_slope_2nd_half_mb_h']} | {r['fds_baseline']} | {r['fds_end']} | "
              f"{r['fds_max']} | {r['cpu_s']} |" for r in rows]
    lines += ["", "leaks: " + ("; ".join(leaks) if leaks else "none")]
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)
    return 1 if leaks else 0

