"""The scheduler's state: task table, queues, workers, and every decision about them.

Pure logic: each handler takes a decoded request and `now`, changes state only through
`_move()` / `_set()` (which also write the journal record), and leaves what must be
sent in an `Effects`. The process (scheduler.py) journals the records, commits, and only
then sends the replies: journal first, then acknowledge.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from cortex.protocol import wire
from cortex.protocol.wire import ProtocolError
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.settings import SchedulerSettings
from cortex.services.scheduler.feasibility import ResourceMonitor, check, task_share
from cortex.services.scheduler.feasibility import estimate_start as simulate_start
from cortex.services.scheduler.queue import TaskQueue
from cortex.services.scheduler.tasks import (
    FINAL,
    PRIORITIES,
    PRIORITY_RANK,
    State,
    Task,
    new_task_id,
    transition,
)

log = logging.getLogger(__name__)

MAX_DESCRIPTION = 8192
MAX_PAYLOAD_BYTES = 512 * 1024
LEDGER_RESEND = 1.0  # seconds before an unanswered ledger request is sent again
BLOCKED_RETRY = 0.5  # seconds between re-tries of tasks waiting for tokens
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0
TIMEOUT_GRACE = 5.0  # seconds between TERM and KILL of a timed-out task's process group
# A worker's idle "ready" this soon after a dispatch may have crossed the task.run.
DISPATCH_GRACE = 2.0
REJECTED_MEMORY = 100_000  # refused idempotency keys remembered (oldest forgotten first)
SCALE_COOLDOWN = 2.0  # seconds between scale requests for one type (hysteresis)
WATCH_INTERVAL = 0.1  # seconds between scans of running tasks for timeouts and silence
WORKER_RSS_MB = 50.0  # a worker's memory before any has reported its own


@dataclass
class WorkerInfo:
    name: str
    types: tuple[str, ...]
    pid: int
    state: str = "idle"  # idle | claimed (reserving tokens for a task) | busy | leaving
    task: str | None = None
    last_seen: float = 0.0
    done: int = 0


def _finite(value, lo: float, hi: float) -> float:
    """A reported figure if it is a finite float in [lo, hi], else lo."""
    if isinstance(value, float) and math.isfinite(value) and lo <= value <= hi:
        return value
    return lo


@dataclass(slots=True)
class Hold:
    """What a dispatched task holds of the machine until it ends (feasibility)."""

    cpu: float  # cores
    memory_mb: float  # growth of its worker's RSS
    pid: int  # its worker's pid (0: unknown)
    sample: int  # the monitor's sample count when it was dispatched
    rss_base: float | None  # its worker's RSS in that sample, when the sample had it


class SchedulerState:
    def __init__(self, settings: SchedulerSettings, predictor=None,
                 monitor: ResourceMonitor | None = None):
        self.settings = settings
        self.predictor = predictor  # prediction.Predictor, or None (then per-type averages)
        self.tasks: dict[str, Task] = {}
        self.keys: dict[str, str] = {}  # idempotency key -> task id
        self.rejected: OrderedDict[str, tuple[str, str]] = OrderedDict()  # key -> refusal
        self.finished: OrderedDict[str, None] = OrderedDict()  # retention order
        self.queue = TaskQueue(aging=settings.aging or None)
        # Machine readings, sampled at most once a second (the process passes one that
        # knows the suite's own pids).
        self.monitor = monitor or ResourceMonitor()
        self.holds: dict[str, Hold] = {}  # task id -> its share, from dispatch to end
        self.memory_pressure = False
        self.blocked: dict[str, Task] = {}  # queued but waiting for tokens
        self.backoff: list[tuple[float, str]] = []  # (not before, task id) heap
        self.workers: dict[str, WorkerInfo] = {}
        self.waiters: dict[str, list[tuple[bytes, bytes, float]]] = {}  # id -> (peer, corr, until)
        self.ledger_pending: dict[bytes, tuple[float, dict]] = {}  # corr -> (resend at, body)
        self.ledger_seq = 0
        self.avg_duration: dict[str, float] = {}
        self.counters = {"submitted": 0, "completed": 0, "failed": 0, "cancelled": 0,
                         "dead": 0, "retried": 0, "rejected": 0, "late_results": 0,
                         "duplicates": 0, "surges": 0, "scale_ups": 0, "scale_blocked": 0}
        self.next_blocked_retry = 0.0
        self.active: dict[str, Task] = {}  # dispatched or running: watched for timeouts
        self.next_watch = 0.0
        self.scale_cooldown: dict[str, float] = {}  # type -> no new scale request before
        self.surged: dict[str, int] = {}  # type -> critical tasks queued at the last request
        self.declined: dict[str, int] = {}  # type -> critical queued when surge last declined
        self.scale_requested: dict[str, float] = {}  # type -> oldest unanswered scale request
        self.worker_start_s = settings.worker_start  # learned: scale request -> registration
        self.worker_rss_mb = WORKER_RSS_MB  # learned from the workers' reports

    # -- the only two ways state changes -------------------------------------------------
    def _set(self, fx: Effects, task: Task, **changes) -> None:
        for key, value in changes.items():
            setattr(task, key, value)
        fx.records.append({"k": "set", "id": task.id, **changes})

    def _move(self, fx: Effects, task: Task, new: State, now: float, **changes) -> None:
        transition(task, new, now)
        if new in (State.DISPATCHED, State.RUNNING):
            self.active[task.id] = task
        else:
            self.active.pop(task.id, None)
            self.holds.pop(task.id, None)  # its share of the machine is free at once
        for key, value in changes.items():
            setattr(task, key, value)
        fx.records.append({"k": "set", "id": task.id, "state": str(new), "at": now, **changes})
        if new in FINAL:
            self.counters[str(new)] = self.counters.get(str(new), 0) + 1
            self.finished[task.id] = None
            self._retain()

    def apply(self, record: dict) -> None:
        """Replay one journal record (recovery)."""
        if record["k"] == "rejected":
            self.rejected[record["key"]] = (record["code"], record["reason"])
            return
        if record["k"] == "new":
            row = {k: v for k, v in record["task"].items() if k in Task.__dataclass_fields__}
            task = Task(**row)
            task.state = State(task.state)
            self.tasks[task.id] = task
            self.keys[task.key] = task.id
            return
        task = self.tasks.get(record["id"])
        if task is None:
            return  # dropped by retention before the snapshot
        for key, value in record.items():
            if key not in Task.__dataclass_fields__ or key == "id":
                continue  # "k", "at", the journal's "lsn"
            if key == "state":
                task.state = State(value)
                task.times[value] = record["at"]
            else:
                setattr(task, key, value)

    def restore(self, now: float) -> None:
        """After snapshot + replay: rebuild queues; in-flight attempts go back to the queue
        (their workers will tell us if they still run them)."""
        for task in sorted(self.tasks.values(), key=lambda t: t.times.get("created", 0)):
            if task.state in FINAL:
                self.finished[task.id] = None
            elif task.state is State.QUEUED:
                task.waiting = "worker"
                self.queue.push(task)
            else:
                # Dispatched or running when we crashed: wait for its worker's heartbeat
                # (worker.sync), and requeue it if none comes (see tick()).
                task.waiting = None
                task.times["recovered"] = now
                self.active[task.id] = task
                share = self.needs(task)
                self.holds[task.id] = Hold(share["cpu"], share["memory_mb"], 0,
                                           self.monitor.samples, None)
            for body in task.settle.values():  # ledger orders not confirmed before the crash
                self.ledger_seq += 1
                self.ledger_pending[b"L" + self.ledger_seq.to_bytes(8, "big")] = (now, body)
        self._retain()

    def _retain(self) -> None:
        while len(self.finished) > self.settings.retention:
            old, _ = self.finished.popitem(last=False)
            task = self.tasks.pop(old, None)
            if task is not None and self.keys.get(task.key) == old:
                del self.keys[task.key]

    # -- client requests -----------------------------------------------------------------
    def submit(self, fx: Effects, peer: bytes, corr: bytes, body: dict, now: float) -> None:
        key = wire.field_str(body, "idempotency_key", max_len=128)
        existing = self.keys.get(key)
        if existing is not None and existing in self.tasks:
            self.counters["duplicates"] += 1
            fx.reply(peer, corr, self.tasks[existing].summary())
            return
        if key in self.rejected:
            # A re-sent copy of a request we refused: the same answer, never a late accept
            # (the client already took the refusal and may have submitted anew).
            fx.error(peer, corr, *self.rejected[key])
            return
        task_type = wire.field_str(body, "type", max_len=64)
        description = wire.field_str(body, "description", max_len=MAX_DESCRIPTION,
                                     required=False, default="", allow_empty=True)
        priority = wire.field_choice(body, "priority", PRIORITIES, required=False,
                                     default="medium")
        tokens = wire.field_int(body, "tokens", required=False, default=0)
        timeout = wire.field_number(body, "timeout", lo=0.001, hi=7 * 86400, required=False,
                                    default=self.settings.default_timeout)
        retries = wire.field_int(body, "retries", hi=100, required=False,
                                 default=self.settings.default_retries)
        deadline = wire.field_number(body, "deadline", lo=0, hi=1e11, required=False)
        agent = wire.field_str(body, "agent", max_len=128, required=False,
                               default=peer.decode(errors="replace"))
        payload = body.get("payload")
        if payload is not None:
            wire.json_safe(payload, "payload", MAX_PAYLOAD_BYTES)
        size = wire.field_int(body, "_size", required=False, default=0)
        predicted = None
        if self.predictor is not None:
            predicted = self.predictor.predict(task_type, priority, description, size).as_dict()
        eta = self.estimate_start(task_type, priority, now)
        if priority != "critical" and self.queue.depth(task_type) >= \
                self.settings.max_queue_per_type:
            self._reject(fx, peer, corr, key, "queue_full", task_type, priority,
                         f"queue for {task_type} is full "
                         f"({self.settings.max_queue_per_type} tasks)")
            return
        if deadline is not None and eta > deadline:
            self._reject(fx, peer, corr, key, "rejected", task_type, priority,
                         f"estimated start {eta:.3f} is past the deadline {deadline:.3f} "
                         f"(in {eta - now:.1f} s)")
            return
        if eta - now > self.settings.max_wait:
            self._reject(fx, peer, corr, key, "rejected", task_type, priority,
                         f"estimated start in {eta - now:.0f} s exceeds the maximum wait of "
                         f"{self.settings.max_wait:.0f} s")
            return
        task = Task(id=new_task_id(now), type=task_type, description=description,
                    priority=priority, tokens=tokens, timeout=timeout, retries=retries,
                    agent=agent, key=key, payload=payload, deadline=deadline,
                    times={"created": now}, waiting="worker", eta=eta, size=size,
                    predicted=predicted)
        self.tasks[task.id] = task
        self.keys[key] = task.id
        self.queue.push(task)
        self.counters["submitted"] += 1
        fx.records.append({"k": "new", "task": task.summary() | {"final": None}})
        fx.records[-1]["task"].pop("final")
        fx.emit("task.created", {"type": task_type, "priority": priority, "tokens": tokens,
                                 "agent": agent, "eta": eta,
                                 "description": description[:200]}, task.id)
        fx.reply(peer, corr, task.summary())

    def _reject(self, fx, peer, corr, key, code, task_type, priority, reason) -> None:
        if key:
            self.rejected[key] = (code, reason)
            fx.records.append({"k": "rejected", "key": key, "code": code, "reason": reason})
            while len(self.rejected) > REJECTED_MEMORY:
                self.rejected.popitem(last=False)
        self.counters["rejected"] += 1
        fx.emit("scheduler.rejected", {"type": task_type, "priority": priority, "code": code,
                                       "reason": reason})
        fx.error(peer, corr, code, reason)

    def mean_duration(self, task_type: str) -> float:
        if self.predictor is not None:
            prediction = self.predictor.predict(task_type, "medium", "", 0)
            if prediction.source != "default":
                return prediction.duration
        return self.avg_duration.get(task_type, 1.0)

    def estimate_start(self, task_type: str, priority: str, now: float,
                       ahead: int | None = None) -> float:
        """When a task of this type and priority would start: the tasks ahead of it go,
        each for its predicted duration, to the workers of its type as they free up."""
        workers = [w for w in self.workers.values() if task_type in w.types
                   and w.state != "leaving"]
        if ahead is None:
            counts = self.queue.counts.get(task_type, [0] * len(PRIORITIES))
            ahead = sum(counts[: PRIORITY_RANK[priority] + 1])
        mean = self.mean_duration(task_type)
        remaining = []
        for w in workers:
            task = self.tasks.get(w.task or "")
            if task is not None and w.state == "busy":
                remaining.append(max(0.0, self.time_left(task, now, mean)))
        return simulate_start(now, ahead, mean, len(workers), remaining)

    def time_left(self, task: Task, now: float, mean: float | None = None) -> float:
        """Predicted seconds until a dispatched task ends (negative once overdue)."""
        if mean is None:
            mean = self.mean_duration(task.type)
        expected = (task.predicted or {}).get("duration", mean)
        return task.times.get("dispatched", now) + expected - now

    def refresh_eta(self, task: Task, now: float) -> None:
        if task.state is State.QUEUED:
            task.eta = self.estimate_start(task.type, task.priority, now,
                                           ahead=self.queue.ahead_of(task))

    def get(self, body: dict) -> Task:
        task_id = wire.field_str(body, "id", max_len=64)
        task = self.tasks.get(task_id)
        if task is None:
            raise ProtocolError("not_found", f"no task {task_id}")
        return task

    def wait(self, fx: Effects, peer: bytes, corr: bytes, body: dict, now: float) -> None:
        task = self.get(body)
        hold = wire.field_number(body, "hold", lo=0, hi=60, required=False, default=0)
        if task.final or hold == 0:
            fx.reply(peer, corr, task.summary())
        else:
            self.waiters.setdefault(task.id, []).append((peer, corr, now + hold))

    def _wake(self, fx: Effects, task: Task) -> None:
        for peer, corr, _ in self.waiters.pop(task.id, ()):
            fx.reply(peer, corr, task.summary())

    def cancel(self, fx: Effects, peer: bytes, corr: bytes, body: dict, now: float) -> None:
        task = self.get(body)
        if task.final:
            fx.reply(peer, corr, task.summary())
            return
        error = {"category": "cancelled", "message": "cancelled on request"}
        if task.state is State.QUEUED:
            self._leave_queue(task)
            self._move(fx, task, State.CANCELLED, now, error=error, waiting=None)
            self._settle_tokens(fx, task, now)
        else:
            worker = self.workers.get(task.worker or "")
            fx.notify(task.worker, {"op": "task.cancel", "id": task.id, "attempt": task.attempt})
            # The handler may ignore the flag: the pool ends the worker after a grace period.
            if worker is not None:
                self._kill_worker(fx, worker, "cancel")
            self._move(fx, task, State.CANCELLED, now, error=error,
                       tokens_used=task.tokens_used)
            self._settle_tokens(fx, task, now)
        fx.emit("task.cancelled", {"attempt": task.attempt}, task.id, task.worker)
        self._wake(fx, task)
        fx.reply(peer, corr, task.summary())

    def _leave_queue(self, task: Task) -> None:
        if task.waiting == "worker":
            self.queue.discard(task)
        self.blocked.pop(task.id, None)
        task.waiting = None

    def list_tasks(self, body: dict) -> dict:
        state = wire.field_str(body, "state", max_len=16, required=False)
        limit = wire.field_int(body, "limit", lo=1, hi=10000, required=False, default=100)
        if state is not None and state not in State.__members__.values():
            raise ProtocolError("bad_request", f"unknown state {state!r}")
        chosen = [t for t in self.tasks.values() if state is None or t.state == state]
        chosen = chosen[-limit:]
        return {"tasks": [t.summary() | {"payload": None, "result": None} for t in chosen],
                "total": len(chosen)}

    def status(self, now: float) -> dict:
        states: dict[str, int] = {}
        for t in self.tasks.values():
            states[str(t.state)] = states.get(str(t.state), 0) + 1
        workers: dict[str, dict[str, int]] = {}
        for w in self.workers.values():
            for t in w.types:
                row = workers.setdefault(t, {"idle": 0, "busy": 0})
                row["idle" if w.state == "idle" else "busy"] += 1
        return {"queue": self.queue.by_priority(), "states": states, "workers": workers,
                "waiting": dict(sorted(Counter(t.waiting for t in self.blocked.values())
                                       .items())), "backoff": len(self.backoff),
                "memory_pressure": self.memory_pressure,
                "counters": dict(self.counters)}

    # -- workers -------------------------------------------------------------------------
    def worker_ready(self, fx: Effects, name: str, body: dict, now: float) -> None:
        types = body.get("types") or [body.get("type")]
        if not all(isinstance(t, str) and t for t in types):
            raise ProtocolError("bad_request", "worker.ready needs its task types")
        pid = wire.field_int(body, "pid", required=False, default=0)
        worker = self.workers.get(name)
        if worker is None:
            worker = self.workers[name] = WorkerInfo(name, tuple(types), pid, last_seen=now)
            fx.emit("worker.registered", {"types": types, "pid": pid}, worker=name)
            for t in types:  # a worker we asked for: how long starting one takes
                asked = self.scale_requested.pop(t, None)
                if asked is not None and 0 <= now - asked < 60:
                    self.worker_start_s = 0.7 * self.worker_start_s + 0.3 * (now - asked)
        elif worker.state == "claimed":
            worker.last_seen = now  # idle indeed: it waits while we reserve its next task
            return
        elif worker.task is not None:
            task = self.tasks.get(worker.task)
            if task is not None and not task.final and task.worker == name:
                if now - task.times.get("dispatched", now) < DISPATCH_GRACE:
                    worker.last_seen = now  # its ready crossed our task.run on the way
                    return
                # Idle long after we gave it a task: the task (or its run order) was lost.
                self._retry(fx, task, "worker_lost", "worker does not have its task", now)
        worker.types, worker.pid, worker.last_seen = tuple(types), pid, now
        worker.state, worker.task = "idle", None

    def worker_gone(self, fx: Effects, name: str, reason: str, now: float,
                    kill: bool = False) -> None:
        worker = self.workers.get(name)
        if worker is None:
            return
        if kill:
            self._kill_worker(fx, worker, reason)  # silent but maybe alive (hung): end it
        self.workers.pop(name, None)
        fx.emit("worker.lost", {"reason": reason, "pid": worker.pid}, worker.task, name)
        task = self.tasks.get(worker.task or "")
        if task is not None and not task.final and task.worker == name:
            self._retry(fx, task, "worker_lost", f"worker {name} {reason}", now)

    def worker_leaving(self, name: str) -> None:
        worker = self.workers.get(name)
        if worker is not None and worker.task is None:
            del self.workers[name]  # a busy one leaves after its finish (or is lost)

    def _kill_worker(self, fx: Effects, worker: WorkerInfo, reason: str) -> None:
        fx.sends.append((b"pool", wire.NOTIFY, b"", {"op": "pool.kill", "worker": worker.name,
                                                      "pid": worker.pid, "reason": reason,
                                                      "grace": TIMEOUT_GRACE}))
        self.workers.pop(worker.name, None)

    def task_started(self, fx: Effects, name: str, body: dict, now: float) -> None:
        task = self._current(name, body)
        if task is not None and task.state is State.DISPATCHED:
            at = wire.field_number(body, "at", lo=0, hi=1e11, required=False, default=now)
            self._move(fx, task, State.RUNNING, now)
            task.times["started"] = at
            fx.emit("task.started", {"attempt": task.attempt, "at": at}, task.id, name)

    def task_heartbeat(self, fx: Effects, name: str, body: dict, now: float) -> None:
        worker = self.workers.get(name)
        if worker is None:
            # We restarted: a busy worker re-introduces itself through its heartbeat.
            types = body.get("types") or [body.get("type")]
            if all(isinstance(t, str) and t for t in types):
                worker = self.workers[name] = WorkerInfo(
                    name, tuple(types), int(body.get("pid") or 0), state="busy",
                    last_seen=now)
        else:
            worker.last_seen = now
        task = self._current(name, body)
        if task is not None and worker is not None:
            worker.state, worker.task = "busy", task.id
            task.times["heartbeat"] = now
            used = body.get("tokens_used")
            if isinstance(used, int) and not isinstance(used, bool) and used >= 0:
                task.tokens_used = used

    def task_progress(self, name: str, body: dict, now: float) -> None:
        task = self._current(name, body)
        if task is not None:
            task.progress = wire.field_number(body, "fraction", lo=0, hi=1, required=False,
                                              default=task.progress)
            task.message = wire.field_str(body, "message", max_len=500, required=False,
                                          default="", allow_empty=True)

    def _current(self, name: str, body: dict) -> Task | None:
        task = self.tasks.get(body.get("id") if isinstance(body.get("id"), str) else "")
        if task is None or task.final or task.worker != name or task.attempt != body.get(
                "attempt"):
            return None
        return task

    def task_rejected(self, fx: Effects, name: str, body: dict, now: float) -> None:
        task = self._current(name, body)
        worker = self.workers.get(name)
        if body.get("reason") == "stopping":
            self.workers.pop(name, None)
        elif worker is not None and task is not None and worker.task == task.id:
            worker.task = None  # busy with something we did not give it: wait for its ready
        if task is not None:
            # The worker never ran it: back to the front of the queue, same attempt.
            self._move(fx, task, State.QUEUED, now, worker=None, waiting="worker")
            self.queue.push(task, front=True)

    def task_finished(self, fx: Effects, name: str, peer: bytes, corr: bytes, body: dict,
                      now: float) -> None:
        fx.reply(peer, corr, {"ok": True})
        task = self._current(name, body)
        worker = self.workers.get(name)
        if worker is not None:
            worker.last_seen = now
            # Only the finish of the attempt it runs frees it (not a superseded one's).
            if worker.task == body.get("id") and task is not None:
                worker.state, worker.task = "idle", None
                worker.done += 1
        if task is None:
            self.counters["late_results"] += 1
            fx.emit("task.late_result", {"attempt": body.get("attempt"), "worker": name},
                    body.get("id") if isinstance(body.get("id"), str) else None, name)
            return
        used = body.get("tokens_used", 0)
        task.tokens_used = used if isinstance(used, int) and not isinstance(used, bool) \
            and 0 <= used <= wire.MAX_INT else 0
        started = body.get("started_at")
        if isinstance(started, float):
            task.times["started"] = started
            if task.state is State.DISPATCHED:  # a short task: its start came with its end
                fx.emit("task.started", {"attempt": task.attempt, "at": started}, task.id, name)
        finished_at = body.get("finished_at") if isinstance(body.get("finished_at"), float) \
            else now
        duration = max(0.0, finished_at - task.times.get("started", finished_at))
        prev = self.avg_duration.get(task.type)
        self.avg_duration[task.type] = duration if prev is None else 0.9 * prev + 0.1 * duration
        cpu_s = _finite(body.get("cpu_s"), 0.0, 1e7)
        timings = {"queued": task.times.get("dispatched", now) - task.times["created"],
                   "duration": duration, "cpu_s": cpu_s}
        rss = _finite(body.get("rss_mb"), 0.0, 1e6)
        if rss > 0:
            self.worker_rss_mb = 0.99 * self.worker_rss_mb + 0.01 * rss
        # What the task itself used: CPU seconds, and how far it grew its worker's RSS
        # (the worker's own interpreter is there whether it runs a task or not).
        actual = {"duration": duration, "tokens": float(task.tokens_used),
                  "memory_mb": _finite(body.get("mem_mb"), 0.0, 1e6), "cpu_s": cpu_s}
        result = body.get("result")
        try:
            wire.json_safe(result, "result", MAX_PAYLOAD_BYTES)
        except ProtocolError as e:  # the journal must hold it: keep the task, not the result
            result = {"unstorable_result": e.message}
        if body.get("ok") is True:
            self._move(fx, task, State.COMPLETED, now, result=result,
                       tokens_used=task.tokens_used, actual=actual)
            # The learning features ride along, so the event log alone can train a model.
            fx.emit("task.completed", {
                "attempt": task.attempt, "tokens_used": task.tokens_used, "type": task.type,
                "priority": task.priority, "description": task.description[:1000],
                "payload_size": task.size, "actual": actual, "predicted": task.predicted,
                **timings}, task.id, name)
            if self.predictor is not None:
                self.predictor.observe(task.type, task.priority, task.description, task.size,
                                       actual)
        else:
            error = body.get("error") if isinstance(body.get("error"), dict) else {}
            category = error.get("category", "handler_error")
            failure = {"category": category, "message": str(error.get("message", ""))[:2000]}
            if isinstance(error.get("traceback"), str):  # the dashboard's task page shows it
                failure["traceback"] = error["traceback"][-4000:]
            self._move(fx, task, State.FAILED, now, tokens_used=task.tokens_used, error=failure)
            fx.emit("task.failed", {"attempt": task.attempt, "category": category,
                                    "message": str(error.get("message", ""))[:500],
                                    "tokens_used": task.tokens_used, **timings}, task.id, name)
        self._settle_tokens(fx, task, now)
        self._wake(fx, task)

    def _retry(self, fx: Effects, task: Task, category: str, message: str, now: float) -> None:
        """A lost attempt: release its tokens, then back to the queue or to the dead letters."""
        self._settle_tokens(fx, task, now)
        error = {"category": category, "message": message}
        lost = {"lost_attempt": task.attempt, "tokens_used": task.tokens_used}
        if task.attempt > task.retries:
            # No retry policy: a plain failure. Retries spent: the dead letters.
            final = State.FAILED if task.retries == 0 else State.DEAD
            self._move(fx, task, final, now, error=error, worker=None,
                       tokens_used=task.tokens_used)
            fx.emit("task.failed" if final is State.FAILED else "task.dead",
                    {"attempt": task.attempt, **lost, **error}, task.id)
            self._wake(fx, task)
            return
        self.counters["retried"] += 1
        delay = min(BACKOFF_BASE * 2 ** (task.attempt - 1), BACKOFF_CAP)
        self._move(fx, task, State.QUEUED, now, attempt=task.attempt + 1, worker=None,
                   error=error, waiting="backoff", reserved=0, tokens_used=0)
        heapq.heappush(self.backoff, (now + delay, task.id))
        fx.emit("task.retry", {"attempt": task.attempt, "after": delay, **lost, **error},
                task.id)

    # -- tokens --------------------------------------------------------------------------
    def _ledger(self, fx: Effects, body: dict, now: float) -> bytes:
        self.ledger_seq += 1
        corr = b"L" + self.ledger_seq.to_bytes(8, "big")
        self.ledger_pending[corr] = (now + LEDGER_RESEND, body)
        fx.sends.append((b"ledger", wire.REQUEST, corr, body))
        return corr

    def _settle_tokens(self, fx: Effects, task: Task, now: float) -> None:
        """Commit what the attempt used (releasing the rest) or release its reservation.

        The order is journaled with the task (`settle`) until the ledger confirms it, so a
        scheduler restart re-sends it; the ledger is idempotent by (task, attempt). A task
        with a token budget is released even when we saw no grant: the grant may have
        been made just before a crash."""
        if task.tokens_used > 0:
            body = {"op": "ledger.commit", "task": task.id, "attempt": task.attempt,
                    "used": task.tokens_used, "type": task.type, "agent": task.agent}
        elif task.reserved > 0 or task.tokens > 0:
            body = {"op": "ledger.release", "task": task.id, "attempt": task.attempt}
        else:
            return
        self._ledger(fx, body, now)
        self._set(fx, task, reserved=0, settle={**task.settle, str(task.attempt): body})

    def ledger_reply(self, fx: Effects, corr: bytes, ok: bool, body: dict, now: float) -> None:
        pending = self.ledger_pending.pop(corr, None)
        if pending is None:
            return
        request = pending[1]
        if not ok and body.get("code") == "unavailable":
            self.ledger_pending[corr] = (now + LEDGER_RESEND, request)  # ledger restarting
            return
        if request["op"] != "ledger.reserve":
            self.next_blocked_retry = now  # tokens came back: waiting tasks may fit now
            task = self.tasks.get(request["task"])
            if task is not None and str(request["attempt"]) in task.settle:
                settle = {k: v for k, v in task.settle.items() if k != str(request["attempt"])}
                self._set(fx, task, settle=settle)
            return
        task = self.tasks.get(request["task"])
        worker = self.workers.get(request["worker"])
        if worker is not None and worker.state == "claimed" and worker.task == request["task"]:
            worker.state, worker.task = "idle", None
        if task is None or task.state is not State.QUEUED or task.attempt != request["attempt"]:
            if ok and body.get("granted"):  # the task moved on meanwhile: give them back
                self._ledger(fx, {"op": "ledger.release", "task": request["task"],
                                  "attempt": request["attempt"]}, now)
            return
        if ok and body.get("granted"):
            self._set(fx, task, reserved=request["amount"])
            fx.emit("task.reserved", {"attempt": task.attempt, "tokens": request["amount"]},
                    task.id)
            if worker is not None and worker.state == "idle":
                self._dispatch(fx, task, worker, now)
            else:
                task.waiting = "worker"
                self.queue.push(task, front=True)
        else:
            reason = body.get("reason") or body.get("message") or "token budget"
            task.waiting = "tokens"
            self.blocked[task.id] = task
            fx.emit("task.waiting", {"reason": "tokens", "detail": str(reason)[:300]}, task.id)

    # -- dispatch ------------------------------------------------------------------------
    def needs(self, task: Task) -> dict:
        """What the task will hold of the machine while it runs (feasibility.task_share):
        its predicted CPU seconds over its predicted duration (at least a sampling
        interval, so a no-op holds next to nothing), and its predicted memory growth."""
        return task_share(task.predicted, self.monitor.interval)

    def held(self, readings) -> dict:
        """What the running tasks hold and the readings do not already show.

        A task's CPU is its predicted share, or what its worker was measured using if it
        ran through the whole last interval and used more (so an unpredicted CPU hog still
        counts). Its memory is its predicted growth less the growth its worker already
        shows (which the readings' available memory has taken off)."""
        cpu = memory = 0.0
        for hold in self.holds.values():
            usage = readings.per_pid.get(hold.pid) if hold.pid else None
            hold_cpu, hold_mem = hold.cpu, hold.memory_mb
            if usage is not None:
                if self.monitor.samples >= hold.sample + 2:
                    hold_cpu = max(hold_cpu, usage[0])
                if hold.rss_base is not None and self.monitor.samples > hold.sample:
                    hold_mem = max(0.0, hold_mem - max(0.0, usage[1] - hold.rss_base))
            cpu += hold_cpu
            memory += hold_mem
        return {"cpu": cpu, "memory_mb": memory}

    def feasible(self, fx: Effects, task: Task, readings, held: dict, now: float) -> bool:
        needs = self.needs(task)
        reason = check(needs, readings, held, task.priority, self.settings.memory_threshold)
        if reason is None:
            return True  # held once dispatched (not if refused tokens)
        if task.waiting != reason:
            fx.emit("task.waiting", {"reason": reason, "needs": needs,
                                     "readings": readings.as_dict(),
                                     "held": {k: round(v, 4) for k, v in held.items()},
                                     "running": len(self.holds)}, task.id)
        task.waiting = reason
        self.blocked[task.id] = task  # retried with the token waiters (no head-of-line)
        return False

    def dispatch(self, fx: Effects, now: float) -> None:
        """Give every idle worker the best task it can take and that fits the machine."""
        if not any(any(counts) for counts in self.queue.counts.values()):
            return  # nothing queued: the common case at light load, checked cheaply
        readings = held = None
        for worker in list(self.workers.values()):
            while worker.state == "idle":
                task = self.queue.pop_for(worker.types, now)
                if task is None:
                    break
                if readings is None:
                    readings = self.monitor.readings(time.monotonic())
                    self.memory_pressure = readings.mem_percent > self.settings.memory_threshold
                    held = self.held(readings)
                if not self.feasible(fx, task, readings, held, now):
                    continue
                if task.tokens > 0 and task.reserved == 0:
                    # Reserve first; the worker waits for this task meanwhile, while other
                    # workers keep taking other tasks (no head-of-line blocking).
                    task.waiting = "reserving"
                    worker.state, worker.task = "claimed", task.id
                    self._ledger(fx, {"op": "ledger.reserve", "task": task.id,
                                      "attempt": task.attempt, "amount": task.tokens,
                                      "type": task.type, "agent": task.agent,
                                      "worker": worker.name}, now)
                    break
                self._dispatch(fx, task, worker, now)
                for key, value in self.needs(task).items():
                    held[key] += value

    def next_free(self, workers: list[WorkerInfo], now: float) -> float:
        """Seconds until the first of these busy workers is expected to free up. A task
        past its predicted duration is assumed to need as long again as it is overdue,
        so a stuck task soon stops looking like it will free its worker."""
        means: dict[str, float] = {}  # one prediction per type, not per worker
        best = float("inf")
        for w in workers:
            task = self.tasks.get(w.task or "")
            if task is None or w.state != "busy":
                return 0.0  # claimed or between tasks: about to take work
            if task.type not in means:
                means[task.type] = self.mean_duration(task.type)
            best = min(best, abs(self.time_left(task, now, means[task.type])))
        return best

    def type_needs(self, task_type: str) -> dict:
        """What one more worker of a type would take from the machine: its interpreter
        (the workers' measured RSS) plus what one of its tasks holds (as in needs())."""
        needs = {"cpu": 0.0, "memory_mb": self.worker_rss_mb}
        if self.predictor is not None:
            share = task_share(self.predictor.predict(task_type, "medium", "", 0).as_dict(),
                               self.monitor.interval)
            needs = {"cpu": share["cpu"], "memory_mb": needs["memory_mb"] + share["memory_mb"]}
        return needs

    def scale(self, fx: Effects, now: float) -> None:
        """Ask the pool for extra workers of a type that has none idle: for a waiting
        critical task (surge), unless a busy worker frees sooner than a new one starts;
        and when the predicted backlog per worker passes scale_backlog. Never past the
        machine's headroom (feasibility.check on one more worker's needs). Each decision
        is an event with the numbers behind it; extra workers retire when idle."""
        for task_type, counts in self.queue.counts.items():
            depth = sum(counts)
            critical = counts[0] > 0
            if not critical:
                self.surged[task_type] = 0
                self.declined.pop(task_type, None)
            # Critical work skips the cooldown once per new critical task (never waits).
            fresh = critical and counts[0] > self.surged.get(task_type, 0)
            if depth <= 0 or (now < self.scale_cooldown.get(task_type, 0.0) and not fresh):
                continue
            workers = [w for w in self.workers.values() if task_type in w.types
                       and w.state != "leaving"]
            if any(w.state == "idle" for w in workers):
                continue
            mean = self.mean_duration(task_type)
            backlog = depth * mean / max(len(workers), 1)
            reason = {"queued": depth, "critical_queued": counts[0], "workers": len(workers),
                      "predicted_task_s": round(mean, 4), "backlog_s": round(backlog, 3),
                      "threshold_s": self.settings.scale_backlog}
            surge = False
            if fresh:
                free_in = self.next_free(workers, now)
                reason |= {"worker_free_in_s": round(free_in, 4),
                           "worker_start_s": round(self.worker_start_s, 4)}
                surge = free_in >= self.worker_start_s
                if not surge and self.declined.get(task_type) != counts[0]:
                    self.declined[task_type] = counts[0]
                    fx.emit("scheduler.surge_declined", {
                        "type": task_type, "why": "a busy worker frees sooner than a new "
                        "one starts", **reason})
            if not surge and backlog <= self.settings.scale_backlog:
                continue
            needs = self.type_needs(task_type)
            readings = self.monitor.readings(time.monotonic())
            blocked = check(needs, readings, self.held(readings),
                            "critical" if surge else "medium", self.settings.memory_threshold)
            self.scale_cooldown[task_type] = now + SCALE_COOLDOWN
            self.surged[task_type] = counts[0]
            if blocked is not None:
                self.counters["scale_blocked"] += 1
                fx.emit("scheduler.scale_blocked", {
                    "type": task_type, "why": f"no {blocked} headroom for another worker",
                    "needs": needs, "readings": readings.as_dict(), **reason})
                continue
            add = min(max(1, counts[0]) if surge else 1, 8)
            self.counters["surges" if surge else "scale_ups"] += 1
            reason = {"why": "critical task waiting" if surge else "backlog", **reason,
                      "needs": needs}
            fx.sends.append((b"pool", wire.NOTIFY, b"", {"op": "pool.scale", "type": task_type,
                                                          "add": add, "reason": reason}))
            fx.emit("scheduler.scale", {"type": task_type, "add": add, **reason})
            self.scale_requested.setdefault(task_type, now)

    def _dispatch(self, fx: Effects, task: Task, worker: WorkerInfo, now: float) -> None:
        self._move(fx, task, State.DISPATCHED, now, worker=worker.name, waiting=None)
        share = self.needs(task)
        latest = self.monitor.latest
        usage = latest.per_pid.get(worker.pid) if latest is not None and worker.pid else None
        self.holds[task.id] = Hold(share["cpu"], share["memory_mb"], worker.pid,
                                   self.monitor.samples, usage[1] if usage else None)
        worker.state, worker.task = "busy", task.id
        worker.last_seen = now
        fx.notify(worker.name, {"op": "task.run", "task": {
            "id": task.id, "attempt": task.attempt, "type": task.type,
            "description": task.description, "priority": task.priority,
            "payload": task.payload, "tokens": task.reserved, "timeout": task.timeout}})
        # Why this task, now, here: its rank against what else was queued for the worker.
        fx.emit("task.dispatched", {
            "attempt": task.attempt, "worker": worker.name, "priority": task.priority,
            "agent": task.agent, "deadline": task.deadline,
            "waited": now - task.times["created"], "reserved": task.reserved,
            "still_queued": {t: self.queue.counts.get(t, [0] * len(PRIORITIES))
                             for t in worker.types if any(self.queue.counts.get(t, ()))},
            "predicted": task.predicted}, task.id, worker.name)

    # -- time ----------------------------------------------------------------------------
    def tick(self, fx: Effects, now: float, task_heartbeat: float) -> float:
        """Handle everything due by `now`; returns seconds until the next deadline."""
        next_due = now + 1.0
        while self.backoff and self.backoff[0][0] <= now:
            _, task_id = heapq.heappop(self.backoff)
            task = self.tasks.get(task_id)
            if task is not None and task.state is State.QUEUED and task.waiting == "backoff":
                task.waiting = "worker"
                self.queue.push(task, front=True)
        if self.backoff:
            next_due = min(next_due, self.backoff[0][0])
        if self.blocked and now >= self.next_blocked_retry:
            for task in list(self.blocked.values()):
                del self.blocked[task.id]
                task.waiting = "worker"
                self.queue.push(task, front=True)
            self.next_blocked_retry = now + BLOCKED_RETRY
        # The scans below are O(pending work): at most every WATCH_INTERVAL, not every turn.
        if now < self.next_watch:
            return max(0.0, min(next_due, self.next_watch) - now)
        self.next_watch = now + WATCH_INTERVAL
        for corr, (due, body) in list(self.ledger_pending.items()):
            if now >= due:
                self.ledger_pending[corr] = (now + LEDGER_RESEND, body)
                fx.sends.append((b"ledger", wire.REQUEST, corr, body))
        for task_id, waits in list(self.waiters.items()):
            keep = [w for w in waits if w[2] > now]
            for peer, corr, _ in (w for w in waits if w[2] <= now):
                task = self.tasks.get(task_id)
                if task is not None:
                    fx.reply(peer, corr, task.summary())
            if keep:
                self.waiters[task_id] = keep
                next_due = min(next_due, min(w[2] for w in keep))
            else:
                del self.waiters[task_id]
        lost_after = task_heartbeat * wire.HEARTBEAT_LIVENESS
        for task in list(self.active.values()):
            since = task.times.get("dispatched", now)
            if now - since > task.timeout:
                worker = self.workers.get(task.worker or "")
                if worker is not None:
                    self._kill_worker(fx, worker, "timeout")
                fx.emit("task.timeout", {"attempt": task.attempt, "timeout": task.timeout},
                        task.id, task.worker)
                self._retry(fx, task, "timeout", f"ran past its timeout of {task.timeout} s",
                            now)
                continue
            seen = max(task.times.get("heartbeat", 0), since, task.times.get("recovered", 0))
            worker = self.workers.get(task.worker or "")
            if worker is not None:
                seen = max(seen, worker.last_seen)
            if now - seen > lost_after:
                if worker is not None:
                    self._kill_worker(fx, worker, "silent")  # hung (e.g. SIGSTOP): end it
                fx.emit("worker.lost", {"reason": "no heartbeat", "silent_for": now - seen},
                        task.id, task.worker)
                self._retry(fx, task, "worker_lost",
                            f"no heartbeat from {task.worker} for {now - seen:.1f} s", now)
        return max(0.0, next_due - now)

    # -- snapshots -----------------------------------------------------------------------
    def snapshot(self) -> dict:
        # The Task dataclasses themselves: orjson writes them in C as the journal does it
        # (building a summary dict per task took ~40 ms of the loop per 5,000 tasks).
        # Serialized at once by the caller, so the live objects are safe to hand over.
        return {"tasks": list(self.tasks.values()),
                "counters": self.counters, "avg_duration": self.avg_duration,
                "rejected": [[k, *v] for k, v in self.rejected.items()]}

    def load_snapshot(self, data: dict) -> None:
        for row in data.get("tasks", []):
            row = dict(row)
            row.pop("final", None)
            self.apply({"k": "new", "task": row})
        self.counters.update(data.get("counters", {}))
        for row in data.get("rejected", []):
            if isinstance(row, list) and len(row) == 3:
                self.rejected[row[0]] = (row[1], row[2])
        self.avg_duration.update(data.get("avg_duration", {}))
