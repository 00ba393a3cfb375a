"""What one no-op task costs: routed messages by hop, event batches, syscalls by process.

    python -m cortex.loadtest.count --tasks 1000 --agents 10 --workers 4
    python -m cortex.loadtest.count --mode submit-wait --no-strace --json out.json

Starts a fresh suite, warms it up (every worker has run a task), then runs `--tasks`
no-op tasks (`echo`) from `--agents` closed-loop agents in a child process, and reads
what the suite counted meanwhile: the broker's flows (messages routed from one peer to
another, by type; services by name, other peers by role: `broker.status` "flows") and
the event router's fan-in (`events.status` "fan_in": EVENTS batches, events and ACKs
per publisher). With strace installed (and ptrace allowed) every process of the suite
and the agents' process is traced with `strace -c -f` over the run: syscalls per task by
process. strace slows what it traces: messages per task are exact, rates are not (this
tool measures counts, never speed). `--mode one` submits and waits in one call
(`submit_and_wait`), `submit-wait` as two (`submit`, then `wait`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cortex.protocol import Client

from .harness import Target

TASK_TYPE = "echo"


def drive(home: str, tasks: int, agents: int, mode: str, tokens: int = 0, *,
          task_type: str = TASK_TYPE, payload=None) -> int:
    """The agents: `agents` threads, each with its own Client, share `tasks` tasks of
    `task_type` (no-ops; each reserving `tokens` from the ledger); how many failed."""
    counts = [tasks // agents + (1 if i < tasks % agents else 0) for i in range(agents)]
    payload = {"x": 1} if payload is None else payload
    failed: list[str] = []

    def agent(n: int) -> None:
        with Client(home, timeout=120) as client:
            for _ in range(n):
                if mode == "one":
                    task = client.submit_and_wait(task_type, payload=payload, retries=0,
                                                  tokens=tokens)
                else:
                    task = client.wait(client.submit(task_type, payload=payload,
                                                     retries=0, tokens=tokens)["id"])
                if task["state"] != "completed":
                    failed.append(task["id"])

    threads = [threading.Thread(target=agent, args=(n,)) for n in counts if n]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(failed)


def flows(home: str) -> tuple[dict, dict, dict]:
    """(broker flows {(from, to, type): n}, fan-in {publisher: {batches, events, acks}},
    the scheduler's direct line's flows {(from, to, type): n}). A client of its own each
    time: one that kept asking would take the line, and its asks would count there."""
    with Client(home, timeout=30) as client:
        status = client.call("broker", "broker.status")
        routed = {(f["from"], f["to"], f["type"]): f["count"]
                  for f in status.get("flows", [])}
        line = client.call("scheduler", "scheduler.status").get("direct_line") or {}
        direct = {(f["from"], f["to"], f["type"]): f["count"] for f in line.get("flows", [])}
        return routed, client.call("events", "events.status").get("fan_in", {}), direct


def settled_flows(home: str, timeout: float = 10.0) -> tuple[dict, dict, dict]:
    """`flows` at a moment when nothing is in flight: every request routed so far has had
    its reply routed, and the router's fan-in has not moved since the sample before. A
    lease settle caught between its request and its reply would otherwise count one hop in
    the run and the other outside it. Past `timeout` the last sample stands."""
    deadline = time.monotonic() + timeout
    previous = None
    while True:
        routed, fan_in, direct = flows(home)
        # At least one answer per request: a followed submit has two (calls.py).
        answered = all(n <= routed.get((dst, src, "REPLY"), 0) + routed.get((dst, src, "ERROR"), 0)
                       for (src, dst, type_), n in routed.items()
                       if type_ == "REQUEST" and dst != "broker")  # it answers its own
        if (answered and fan_in == previous) or time.monotonic() > deadline:
            return routed, fan_in, direct
        previous = fan_in
        time.sleep(0.05)


def on_line(home: str, workers: int, timeout: float = 10.0) -> int:
    """Wait until every worker has taken the scheduler's direct line (each takes it as it
    first reports); how many have, when they all have or at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        with Client(home, timeout=30) as client:
            line = client.call("scheduler", "scheduler.status").get("direct_line") or {}
        if line.get("workers", 0) >= workers or time.monotonic() > deadline:
            return line.get("workers", 0)
        time.sleep(0.05)


def start_strace(pids: dict[int, str], out: Path) -> list[tuple[subprocess.Popen, Path, str]]:
    traces = []
    for pid, role in pids.items():
        path = out / f"strace-{role}-{pid}.txt"
        proc = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        traces.append((proc, path, role))
    time.sleep(1.0)  # strace attaches to every thread before the measured run starts
    return traces


def stop_strace(traces) -> dict[str, dict]:
    """role -> {calls, by_syscall {name: calls}} summed over its processes."""
    by_role: dict[str, dict] = {}
    for proc, _, _ in traces:
        proc.send_signal(signal.SIGINT)  # strace detaches and writes its summary
    for proc, path, role in traces:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        row = by_role.setdefault(role, {"calls": 0, "by_syscall": {}})
        for name, calls in parse_strace(path.read_text() if path.exists() else ""):
            if name == "total":
                row["calls"] += calls
            else:
                row["by_syscall"][name] = row["by_syscall"].get(name, 0) + calls
    return by_role


def parse_strace(text: str) -> list[tuple[str, int]]:
    """(syscall, calls) rows of a `strace -c` summary, the "total" row included."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[3].isdigit():
            try:
                float(parts[0])
            except ValueError:
                continue
            rows.append((parts[-1], int(parts[3])))
    return rows


def hop_table(before: dict, after: dict, tasks: int) -> list[dict]:
    rows = []
    for key in sorted(set(after) | set(before)):
        n = after.get(key, 0) - before.get(key, 0)
        if n:
            src, dst, type_ = key
            rows.append({"from": src, "to": dst, "type": type_, "messages": n,
                         "per_task": round(n / tasks, 3)})
    return rows


def fan_in_table(before: dict, after: dict, tasks: int) -> list[dict]:
    rows = []
    for source in sorted(after):
        a, b = after[source], before.get(source, {})
        delta = {k: a.get(k, 0) - b.get(k, 0) for k in ("batches", "events", "acks")}
        if any(delta.values()):
            rows.append({"publisher": source, **delta,
                         **{f"{k}_per_task": round(v / tasks, 3) for k, v in delta.items()}})
    return rows


def markdown(result: dict) -> str:
    tasks = result["tasks"]
    lines = [f"no-op tasks: {tasks} ({result['mode']}, {result.get('tokens', 0)} tokens each, "
             f"{result['agents']} agents, "
             f"{result['workers']} workers), {result['failed']} not completed", "",
             "| from | to | type | per task |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['from']} | {r['to']} | {r['type']} | {r['per_task']} |"
              for r in result["routed"]]
    lines.append(f"| **all routed** | | | **{result['routed_per_task']}** |")
    lines += ["", "| scheduler's direct line: from | to | type | per task |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {r['from']} | {r['to']} | {r['type']} | {r['per_task']} |"
              for r in result["direct"]]
    lines.append(f"| **all direct** | | | **{result['direct_per_task']}** |")
    lines += ["", "| publisher → events | batches/task | events/task | acks/task |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {r['publisher']} | {r['batches_per_task']} | {r['events_per_task']} | "
              f"{r['acks_per_task']} |" for r in result["fan_in"]]
    if result.get("syscalls"):
        lines += ["", "| process | syscalls/task | top syscalls (per task) |",
                  "| --- | --- | --- |"]
        for role, row in sorted(result["syscalls"].items()):
            top = sorted(row["by_syscall"].items(), key=lambda kv: -kv[1])[:4]
            lines.append(f"| {role} | {round(row['calls'] / tasks, 2)} | " + ", ".join(
                f"{k} {round(v / tasks, 2)}" for k, v in top) + " |")
        total = sum(r["calls"] for r in result["syscalls"].values())
        lines.append(f"| **all** | **{round(total / tasks, 2)}** | |")
    else:
        lines += ["", f"syscalls: {result.get('syscalls_note', 'not counted')}"]
    return "\n".join(lines)


def run(args) -> dict:
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        return _count(args, out)
    with tempfile.TemporaryDirectory(prefix="cxcount-") as scratch:  # nothing left behind
        return _count(args, Path(scratch))


def _count(args, out: Path) -> dict:
    """`run` with strace's summaries written to `out`."""
    strace = shutil.which("strace") if not args.no_strace else None
    with Target(None, workers=args.workers, fsync="group") as target:
        home = str(target.home)
        drive(home, max(args.workers * 4, args.agents), args.agents, "one",
              args.tokens)  # warm-up
        on_line(home, args.workers)
        before = settled_flows(home)
        agents = subprocess.Popen(
            [sys.executable, "-c", "import sys, os; from cortex.loadtest.count import "
             "drive; os.read(0, 1); sys.exit(min(1, drive(*sys.argv[1:2], "
             "*map(int, sys.argv[2:4]), sys.argv[4], int(sys.argv[5]))))",
             home, str(args.tasks), str(args.agents), args.mode, str(args.tokens)],
            stdin=subprocess.PIPE)
        traces = []
        try:
            if strace:
                pids = {pid: role for pid, role in target.roles().items()
                        if role != "supervisord"}
                pids[agents.pid] = "agents"
                traces = start_strace(pids, out)
            began = time.monotonic()
            agents.stdin.write(b"g")  # go: the tracers are attached
            agents.stdin.close()
            failed = agents.wait()
            wall = time.monotonic() - began
        finally:
            syscalls = stop_strace(traces) if traces else {}
            if agents.poll() is None:
                agents.kill()
                agents.wait()
        after = settled_flows(home)  # the last events have reached the router
    routed = hop_table(before[0], after[0], args.tasks)
    hops = [r for r in routed if r["type"] != "HEARTBEAT"]
    direct = hop_table(before[2], after[2], args.tasks)
    result = {"tasks": args.tasks, "agents": args.agents, "workers": args.workers,
              "mode": args.mode, "tokens": args.tokens, "failed": failed, "wall_s": round(wall, 3),
              "routed": routed,
              "routed_per_task": round(sum(r["messages"] for r in hops) / args.tasks, 3),
              "direct": direct,
              "direct_per_task": round(sum(r["messages"] for r in direct) / args.tasks, 3),
              "fan_in": fan_in_table(before[1], after[1], args.tasks), "syscalls": syscalls}
    if not strace:
        result["syscalls_note"] = ("skipped (--no-strace)" if args.no_strace
                                   else "skipped: strace is not installed")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cortex.loadtest.count", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--mode", choices=("one", "submit-wait"), default="one")
    p.add_argument("--tokens", type=int, default=0,
                   help="tokens each task reserves (0: none; the ledger is not asked)")
    p.add_argument("--no-strace", action="store_true", help="count messages only")
    p.add_argument("--out", help="keep strace's raw summaries in this folder (default: a "
                                 "temporary one, removed at the end)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.tasks < 1 or args.agents < 1 or args.workers < 1 or args.tokens < 0:
        p.error("--tasks, --agents and --workers must be at least 1, --tokens at least 0")
    result = run(args)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
