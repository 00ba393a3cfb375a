"""The pool process: starts, reaps, restarts and stops the worker processes.

    python -m cortex.services.pool [--home DIR]

Each worker is a child in its own process group with a parent-death signal (or, without
the Linux calls, a thread watching our pid), so it dies with the pool even on kill -9; a
restarted pool also ends leftovers of its predecessor (pids recorded in
run/workers.pids). Only the reap says a worker exited. The pool is a child subreaper and
tags each worker's environment (`CORTEX_WORKER`): what a worker's handlers left running,
even in a new session, is found and ended when the worker exits. A worker's stderr comes
through the pool (into its log), and the pool keeps its tail: a group whose workers keep
crashing is shown with its last error. SIGTERM: every worker finishes its task in hand,
then the pool exits once all are reaped.
Requests: pool.status (REQUEST); pool.kill {worker, pid, reason, grace} (NOTIFY, from the
scheduler: TERM the worker's process group, KILL after the grace period, at most
KILL_GRACE: a timed-out or cancelled handler ends promptly).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import zmq

from cortex.protocol import backoff, wire
from cortex.services.pool import forking
from cortex.services.pool.children import Child, ChildState, Emit, transition
from cortex.services.runtime import lineage
from cortex.services.runtime.durable import remove_temp_files, write_atomic
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.entry import serve
from cortex.services.runtime.loop import BusService, serves

STOP_GRACE = 25.0  # seconds workers get to finish their task on shutdown
KILL_GRACE = 1.0  # at most, between TERM and KILL of a worker the scheduler gave up on
STDERR_TAIL = 8192  # bytes of each worker's stderr kept for its last error
ERROR_LINES = 12  # lines of that tail shown as a crashing group's last error
CRASHING_AFTER = 2  # consecutive failed starts of a slot that make its group "crashing"
RESTART_BACKOFF_BASE = 0.2  # seconds before restarting a worker that crashed once
RESTART_BACKOFF_CAP = 5.0


def _worker_preexec(pool: int):
    def arm() -> None:  # runs in the child between fork and exec
        os.setsid()
        lineage.arm_in_child(pool, signal.SIGKILL)
    return arm


def last_lines(tail: bytes, n: int = ERROR_LINES) -> str:
    """The last `n` lines of a stderr tail, from a traceback's start if one is there."""
    text = tail.decode(errors="replace").rstrip()
    start = text.rfind("Traceback (most recent call last)")
    lines = (text[start:] if start >= 0 else text).splitlines()
    return "\n".join(lines[-n:] if start < 0 else lines[:1] + lines[1:][-(n - 1):])


class Pool(BusService):
    name = "pool"
    snapshot_name = "worker-pool.json"  # journal: only its events, so none is lost
    halt_on_damage = False  # no state to lose: a damaged record costs events, not tasks

    def __init__(self, home=None):
        super().__init__(home)
        self.pidfile = self.rt.home / "run" / "workers.pids"
        remove_temp_files(self.pidfile.parent, self.pidfile.name)
        self.children: dict[int, Child] = {}
        self._popen: dict = {}  # pid -> Popen, reaped by our own waitpid
        self.restart_due: list[tuple[float, str, int]] = []  # (when, group, slot)
        self.failures: dict[tuple[str, int], int] = {}
        self.spawned = 0
        self.stderr: dict[int, int] = {}  # a worker's stderr pipe -> its pid
        self.stderr_files: dict[int, object] = {}  # the pipe's file (closed once, at EOF)
        self.tails: dict[int, bytearray] = {}  # pid -> the end of what it wrote there
        self.last_error: dict[str, dict] = {}  # group -> its last failed worker's exit
        self.subreaper = lineage.become_subreaper()
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
        write_atomic(self.pidfile, json.dumps(rows).encode())

    def spawn(self, group: str, slot: int, extra: bool = False) -> Child:
        self.spawned += 1
        name = f"w-{group}-{slot}-{os.getpid() % 100000}-{self.spawned}"[:wire.MAX_NAME_BYTES]
        args = ["--home", str(self.rt.home), "--group", group, "--name", name]
        if extra:  # surge/autoscaled: retires by itself when idle, not restarted
            args += ["--idle-exit", str(self.group(group).idle_exit)]
        child = Child(name, group, slot, time.time(), extra=extra)
        if forking.can_fork():  # shares the pool's imported code (forking.py)
            pid, stderr = forking.fork_worker(args, {lineage.WORKER_TAG: name}, os.getpid())
            self._popen[pid] = None  # ours until reaped
        else:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cortex.services.pool.worker", *args],
                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                preexec_fn=_worker_preexec(os.getpid()), close_fds=True,
                env={**os.environ, lineage.WORKER_TAG: name})
            pid, stderr = proc.pid, proc.stderr
            self._popen[pid] = proc  # keep the Popen so Python does not warn or reap it
        child.pid = pid
        fd = stderr.fileno()
        os.set_blocking(fd, False)
        self.stderr[fd] = pid
        self.stderr_files[fd] = stderr
        self.tails[pid] = bytearray()
        self.poller.register(fd, zmq.POLLIN)
        try:
            child.proc = psutil.Process(pid)
        except psutil.Error:
            pass
        self.children[pid] = child
        self.record_pids()
        transition(child, ChildState.RUNNING, self.emit, group=group, slot=slot, extra=extra)
        return child

    def read_stderr(self, fd: int) -> None:
        """Forward what a worker wrote to stderr into our log, keeping its tail; at its
        end, close it."""
        pid = self.stderr[fd]
        tail = self.tails.setdefault(pid, bytearray())
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                # EOF: the worker and whatever inherited its stderr are gone.
                self.poller.unregister(fd)
                self.stderr_files.pop(fd).close()
                del self.stderr[fd]
                if pid not in self._popen:
                    self.tails.pop(pid, None)  # reaped already: nobody will ask for it
                return
            try:
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            except (OSError, ValueError):
                pass
            tail += chunk
            del tail[:-STDERR_TAIL]

    def stderr_tail(self, pid: int) -> bytes:
        """What an exited worker last wrote (read to the end); forgotten after."""
        for fd, owner in list(self.stderr.items()):
            if owner == pid:
                self.read_stderr(fd)
        return bytes(self.tails.pop(pid, b""))

    def on_sockets(self, ready: dict, fx: Effects) -> None:
        for fd in [fd for fd in self.stderr if fd in ready]:
            self.read_stderr(fd)

    def end_left_by(self, child: Child) -> None:
        """End what the worker's handlers left running (tagged with its name)."""
        left = lineage.tagged_below(lineage.WORKER_TAG, child.name, os.getpid())
        if left:
            self.log.warning("worker %s exited: ending what it left running: %s", child.name,
                             ", ".join(lineage.describe(left)))
            lineage.end(left, KILL_GRACE)

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
        reaped = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.children.get(pid)
            if child is None:  # an adopted orphan of some handler
                self._popen.pop(pid, None)
                continue
            tail = self.stderr_tail(pid)
            self._popen.pop(pid, None)
            del self.children[pid]
            reaped = True
            code = os.waitstatus_to_exitcode(status)
            self.end_left_by(child)
            error = last_lines(tail) if code != 0 and not child.reason else ""
            key = (child.group, child.slot)
            fails = 0 if code == 0 or child.reason else self.failures.get(key, 0) + 1
            # A crash-looping group's types: their queued tasks say why no worker comes.
            crashing = (error or f"exited with {code}") if fails >= CRASHING_AFTER else ""
            fx.sends.append((b"scheduler", wire.NOTIFY, b"", {
                "op": "worker.exited", "name": child.name, "pid": pid, "code": code,
                "group": child.group, "types": list(self.group(child.group).types),
                "crashing": crashing[-2000:]}))
            transition(child, ChildState.EXITED, fx.emit, code=code, reason=child.reason,
                       uptime=time.time() - child.started,
                       **({"error": error} if error else {}))
            if self.rt.stopping or (child.extra and code == 0):
                continue  # an extra worker retiring when idle is scaling down
            # Clean exits (recycling) restart at once; crashes back off, capped.
            self.failures[key] = fails
            if fails:
                self.last_error[child.group] = {
                    "worker": child.name, "code": code, "at": time.time(),
                    "uptime": round(time.time() - child.started, 3),
                    "error": error or f"exited with {code} (nothing on stderr)"}
            delay = 0.0 if fails == 0 else backoff.delay(fails, RESTART_BACKOFF_BASE,
                                                         RESTART_BACKOFF_CAP)
            self.restart_due.append((time.monotonic() + delay, child.group, child.slot))
        if reaped:
            self.record_pids()

    def kill(self, child: Child, reason: str, grace: float, emit: Emit) -> None:
        """TERM the worker's whole process group; KILL it after `grace` seconds."""
        deadline = time.monotonic() + grace
        if child.state is ChildState.STOPPING:  # asked again: the sooner deadline holds
            child.kill_at = min(child.kill_at, deadline)
            return
        if child.state is not ChildState.RUNNING:
            return
        child.reason = reason  # set even if it is gone already: its exit was asked for
        try:
            os.killpg(child.pid, signal.SIGTERM)
            os.killpg(child.pid, signal.SIGCONT)  # a stopped worker must run to see the TERM
        except (ProcessLookupError, PermissionError):
            return  # already gone: the reap reports it
        child.kill_at = deadline
        transition(child, ChildState.STOPPING, emit, reason=reason, grace=grace)

    def kill_overdue(self, emit: Emit) -> float:
        """SIGKILL the stopping children whose grace is up; seconds until the next one."""
        mono = time.monotonic()
        timeout = 1.0
        for child in self.children.values():
            if child.state is not ChildState.STOPPING:
                continue
            if mono < child.kill_at:
                timeout = min(timeout, child.kill_at - mono)
                continue
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue  # gone already: the reap reports it
            transition(child, ChildState.KILLED, emit, reason=child.reason)
        return timeout

    # -- service hooks ----------------------------------------------------------------------
    @serves("pool.kill", wire.NOTIFY)
    def kill_order(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        for child in self.children.values():
            if child.name == body["worker"]:
                self.log.warning("killing %s (pid %d): %s", child.name, child.pid,
                                 body["reason"])
                self.kill(child, body["reason"], min(body["grace"], KILL_GRACE), fx.emit)

    @serves("pool.scale", wire.NOTIFY)
    def scale_order(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        reason = body["reason"] if isinstance(body["reason"], dict) else {}
        self.scale(fx, body["type"], body["add"], reason)

    @serves("pool.status")
    def status(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        fx.reply(msg.peer, msg.corr, self.describe() | {
            "pid": os.getpid(), "started": self.rt.started, "bad_messages": self.bad_messages,
            "internal_errors": self.internal_errors})

    @serves("peer.lost", wire.NOTIFY)
    def peer_lost(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        """The broker's notice: only the reap says one of our workers exited."""

    def describe(self) -> dict:
        workers = []
        for child in sorted(self.children.values(), key=lambda c: (c.group, c.slot)):
            row = child.row()
            try:
                with child.proc.oneshot():
                    row["rss_mb"] = round(child.proc.memory_info().rss / 2**20, 1)
                    row["cpu_s"] = round(sum(child.proc.cpu_times()[:2]), 2)
            except (psutil.Error, AttributeError):
                pass
            workers.append(row)
        crashing = {}
        for group, last in self.last_error.items():
            fails = max((n for (g, _), n in self.failures.items() if g == group), default=0)
            if fails >= CRASHING_AFTER:
                crashing[group] = {**last, "failed_starts": fails}
        return {"workers": workers, "spawned": self.spawned, "subreaper": self.subreaper,
                "groups": {g.name: g.count for g in self.settings.groups},
                "crashing": crashing}

    def on_tick(self, fx: Effects, now: float) -> float:
        mono = time.monotonic()
        self.reap(fx, now)
        timeout = self.kill_overdue(fx.emit)
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
        fx = Effects()
        for child in list(self.children.values()):
            self.kill(child, "shutdown", STOP_GRACE, fx.emit)
        while self.children:
            self.reap(fx, time.time())
            self.kill_overdue(fx.emit)
            if self.children:
                ready = dict(self.poller.poll(100))  # SIGCHLD cuts this short
                self.rt.drain_wakeups()
                self.on_sockets(ready, fx)
        self.flush(fx)
        self.record_pids()
        super().shutdown()


def main(argv=None) -> None:
    serve("cortex-pool", __doc__, Pool, argv)
