"""The pool process: starts, reaps, restarts and stops the worker processes.

    python -m cortex.services.pool [--home DIR]

Each worker is a child in its own process group with a parent-death signal, so it dies
with the pool even on kill -9; a restarted pool also ends leftovers of its predecessor
(pids recorded in run/workers.pids). Only the reap says a worker exited. SIGTERM: every
worker finishes its task in hand, then the pool exits once all are reaped.
Requests: pool.status (REQUEST); pool.kill {worker, pid, reason, grace} (NOTIFY, from the
scheduler: TERM the worker's process group, KILL after the grace period).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import psutil

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.loop import BusService

PR_SET_PDEATHSIG = 1
STOP_GRACE = 25.0  # seconds workers get to finish their task on shutdown
RESTART_BACKOFF_CAP = 5.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    name: str
    group: str
    slot: int
    pid: int
    started: float
    proc: psutil.Process | None = None
    kill_at: float | None = None  # monotonic time for SIGKILL after a TERM
    reason: str = ""
    extra: bool = False  # surge/autoscaled worker: not restarted when it exits


class Pool(BusService):
    name = "pool"
    snapshot_name = "worker-pool.json"  # journal: only its events, so none is lost

    def __init__(self, home=None):
        super().__init__(home)
        self.pidfile = self.rt.home / "run" / "workers.pids"
        self.children: dict[int, Child] = {}
        self._popen: dict = {}  # pid -> Popen, reaped by our own waitpid
        self.restart_due: list[tuple[float, str, int]] = []  # (when, group, slot)
        self.failures: dict[tuple[str, int], int] = {}
        self.spawned = 0
        # SIGCHLD wakes the poll loop (the runtime's wake-up socket): reaping is immediate.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.open_journal()
        self.end_leftovers()
        for group in self.settings.groups:
            for slot in range(group.count):
                self.spawn(group.name, slot)

    # -- children -------------------------------------------------------------------------
    def end_leftovers(self) -> None:
        """Kill workers a previous pool left (e.g. it was killed before their death signal
        could act), identified by pid and start time so a reused pid is never hit."""
        try:
            rows = json.loads(self.pidfile.read_text())
        except (OSError, ValueError):
            return
        for row in rows if isinstance(rows, list) else []:
            try:
                proc = psutil.Process(int(row["pid"]))
                if abs(proc.create_time() - float(row["created"])) < 0.5:
                    os.killpg(proc.pid, signal.SIGKILL)
                    self.log.warning("ended leftover worker %s (pid %d)", row.get("name"),
                                     proc.pid)
            except (psutil.Error, KeyError, ValueError, TypeError, ProcessLookupError,
                    PermissionError):
                continue

    def record_pids(self) -> None:
        rows = []
        for child in self.children.values():
            try:
                created = child.proc.create_time() if child.proc else 0
            except psutil.Error:
                continue
            rows.append({"pid": child.pid, "name": child.name, "created": created})
        tmp = self.pidfile.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, self.pidfile)

    def spawn(self, group: str, slot: int, extra: bool = False) -> Child:
        import subprocess

        self.spawned += 1
        name = f"w-{group}-{slot}-{os.getpid() % 100000}-{self.spawned}"[:wire.MAX_NAME_BYTES]
        cmd = [sys.executable, "-m", "cortex.services.pool.worker", "--home", str(self.rt.home),
               "--group", group, "--name", name]
        if extra:  # surge/autoscaled: retires by itself when idle, not restarted
            cmd += ["--idle-exit", str(self.group(group).idle_exit)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                close_fds=True)
        child = Child(name, group, slot, proc.pid, time.time(), extra=extra)
        try:
            child.proc = psutil.Process(proc.pid)
        except psutil.Error:
            pass
        self._popen[proc.pid] = proc  # keep the Popen so Python does not warn or reap it
        self.children[proc.pid] = child
        self.record_pids()
        self.emit("worker.spawned", {"pid": proc.pid, "group": group, "slot": slot,
                                     "extra": extra}, worker=name)
        return child

    def group(self, name: str):
        return next(g for g in self.settings.groups if g.name == name)

    def scale(self, fx: Effects, task_type: str, add: int, reason: dict) -> None:
        """Start up to `add` extra workers of a group taking `task_type`, within its max."""
        for group in self.settings.groups:
            if task_type not in group.types:
                continue
            live = sum(1 for c in self.children.values() if c.group == group.name)
            room = max(0, group.max - live)
            started = [self.spawn(group.name, group.count + live + i, extra=True).name
                       for i in range(min(add, room))]
            fx.emit("pool.scaled", {"group": group.name, "type": task_type,
                                    "requested": add, "started": len(started),
                                    "workers": live + len(started), "max": group.max,
                                    "reason": reason})
            return
        fx.emit("pool.scale_refused", {"type": task_type, "reason": "no group takes this type"})

    def reap(self, fx: Effects, now: float) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._popen.pop(pid, None)
            child = self.children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            fx.sends.append((b"scheduler", wire.NOTIFY, b"", {
                "op": "worker.exited", "name": child.name, "pid": pid, "code": code}))
            fx.emit("worker.exited", {"pid": pid, "code": code, "reason": child.reason,
                                      "uptime": time.time() - child.started},
                    worker=child.name)
            if self.rt.stopping or (child.extra and code == 0):
                continue  # an extra worker retiring when idle is scaling down
            # Clean exits (recycling) restart at once; crashes back off, capped.
            key = (child.group, child.slot)
            fails = 0 if code == 0 or child.reason else self.failures.get(key, 0) + 1
            self.failures[key] = fails
            delay = 0.0 if fails == 0 else min(0.1 * 2 ** fails, RESTART_BACKOFF_CAP)
            self.restart_due.append((time.monotonic() + delay, child.group, child.slot))
        self.record_pids()

    def kill(self, child: Child, reason: str, grace: float) -> None:
        """TERM the worker's whole process group; KILL it after `grace` seconds."""
        child.reason = child.reason or reason
        try:
            os.killpg(child.pid, signal.SIGTERM)
            os.killpg(child.pid, signal.SIGCONT)  # a stopped worker must run to see the TERM
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        child.kill_at = deadline if child.kill_at is None else min(child.kill_at, deadline)

    # -- service hooks ----------------------------------------------------------------------
    def handle(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        op = body.get("op")
        if msg.type == wire.NOTIFY and op == "pool.kill":
            name = body.get("worker")
            grace = wire.field_number(body, "grace", lo=0, hi=600, required=False, default=5.0)
            for child in self.children.values():
                if child.name == name:
                    self.log.warning("killing %s (pid %d): %s", name, child.pid,
                                     body.get("reason"))
                    self.kill(child, str(body.get("reason", "requested")), grace)
        elif msg.type == wire.NOTIFY and op == "pool.scale":
            add = wire.field_int(body, "add", lo=1, hi=100)
            self.scale(fx, wire.field_str(body, "type", max_len=64), add,
                       body.get("reason") if isinstance(body.get("reason"), dict) else {})
        elif msg.type == wire.REQUEST and op == "pool.status":
            fx.reply(msg.peer, msg.corr, self.describe() | {"pid": os.getpid(),
                                                             "started": self.rt.started})
        elif msg.type == wire.REQUEST:
            raise wire.ProtocolError("unknown_type", f"unknown operation {op!r}")

    def describe(self) -> dict:
        workers = []
        for child in sorted(self.children.values(), key=lambda c: (c.group, c.slot)):
            row = {"name": child.name, "group": child.group, "slot": child.slot,
                   "pid": child.pid, "started": child.started, "extra": child.extra}
            try:
                with child.proc.oneshot():
                    row["rss_mb"] = round(child.proc.memory_info().rss / 2**20, 1)
                    row["cpu_s"] = round(sum(child.proc.cpu_times()[:2]), 2)
            except (psutil.Error, AttributeError):
                pass
            workers.append(row)
        return {"workers": workers, "spawned": self.spawned,
                "groups": {g.name: g.count for g in self.settings.groups}}

    def on_tick(self, fx: Effects, now: float) -> float:
        mono = time.monotonic()
        self.reap(fx, now)
        timeout = 1.0
        for child in self.children.values():
            if child.kill_at is not None:
                if mono >= child.kill_at:
                    try:
                        os.killpg(child.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    child.kill_at = None
                else:
                    timeout = min(timeout, child.kill_at - mono)
        for item in list(self.restart_due):
            when, group, slot = item
            if mono >= when:
                self.restart_due.remove(item)
                self.spawn(group, slot)
            else:
                timeout = min(timeout, when - mono)
        return timeout

    def snapshot(self) -> dict:
        return self.describe()

    def shutdown(self) -> None:
        """Every worker finishes its task, then exits; no child is left unreaped."""
        self.log.info("stopping %d workers", len(self.children))
        for child in list(self.children.values()):
            self.kill(child, "shutdown", STOP_GRACE)
        fx = Effects()
        while self.children:
            self.reap(fx, time.time())
            mono = time.monotonic()
            for child in self.children.values():
                if child.kill_at is not None and mono >= child.kill_at:
                    try:
                        os.killpg(child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    child.kill_at = None
            if self.children:
                self.poller.poll(100)  # SIGCHLD cuts this short
                self.rt.drain_wakeups()
        self.flush(fx)
        self.record_pids()
        super().shutdown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="cortex-pool", description=__doc__)
    parser.add_argument("--home", help="suite home (default: $CORTEX_HOME or ./.cortex)")
    Pool(parser.parse_args(argv).home).run()

