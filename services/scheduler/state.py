"""The scheduler's state: one facade over the modules that each own a part of it.

Each handler takes the turn's Effects, the decoded request and `now` (clock.Now: the wall
and the monotonic clock, both read by the process), changes state, and leaves in the
Effects what must be sent and the journal records of what changed. The process writes
the records before it sends any reply: journal first, then acknowledge.

    table.py       the task table and its journal records (replay, retention)
    admission.py   what a submit must hold, refusals remembered by key
    eta.py         mean durations, a running task's time left, a queued one's wait
    queue.py       the dispatch order
    waiting.py     why a queued task waits; the tasks held out of the queue
    workers.py     the worker registry and its state table
    holds.py       what dispatched tasks hold of the machine (feasibility.py judges)
    limits.py      what model providers allow (ratelimit.py's windows), a feasibility dimension
    settlement.py  ledger requests: reservations and settle orders, re-sent
    scaling.py     surge and autoscaling requests to the pool
    waiters.py     long polls (task.wait, task.submit with wait)
    watch.py       timeouts and silence of the tasks in flight
    progress.py    task.progress events, rate-limited
    clients.py     what clients ask: submit, wait, cancel, list, status
    reports.py     what workers and the ledger report: ready, started, finished, ...
"""

from __future__ import annotations

import random

from cortex.protocol import wire
from cortex.protocol.backoff import delay as backoff_delay
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.settings import SchedulerSettings
from cortex.services.scheduler.admission import Admission
from cortex.services.scheduler.clients import ClientRequests
from cortex.services.scheduler.clock import Marks, Now
from cortex.services.scheduler.eta import Estimates
from cortex.services.scheduler.feasibility import ResourceMonitor
from cortex.services.scheduler.holds import MachineHolds
from cortex.services.scheduler.leases import Leases
from cortex.services.scheduler.limits import ProviderLimits
from cortex.services.scheduler.prefetch import Slots
from cortex.services.scheduler.progress import ProgressEvents
from cortex.services.scheduler.queue import TaskQueue
from cortex.services.scheduler.reports import Reports
from cortex.services.scheduler.scaling import Scaler
from cortex.services.scheduler.settlement import LedgerOrders, settle_order
from cortex.services.scheduler.table import TaskTable
from cortex.services.scheduler.tasks import FINAL, State, Task
from cortex.services.scheduler.waiters import Waiters
from cortex.services.scheduler.waiting import BLOCKED_RETRY, Reason, WaitingRoom
from cortex.services.scheduler.watch import Watch
from cortex.services.scheduler.workers import Worker, WorkerRegistry, WorkerState

BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0  # a lost attempt's retry delay (with jitter)
TIMEOUT_GRACE = 5.0  # seconds between TERM and KILL of a timed-out task's process group
ACTIVE = (State.DISPATCHED, State.RUNNING)
COUNTERS = ("submitted", "completed", "failed", "cancelled", "dead", "retried", "rejected",
            "late_results", "duplicates", "surges", "scale_ups", "scale_blocked")


class SchedulerState(ClientRequests, Reports):
    def __init__(self, settings: SchedulerSettings, *, monitor: ResourceMonitor,
                 predictor=None, rng: random.Random | None = None,
                 providers: dict | None = None, routing=None):
        self.settings = settings
        self.rng = rng or random.Random()
        self.counters = dict.fromkeys(COUNTERS, 0)
        # Since when our orders have been leaving (monotonic; the loop's `orders_left`):
        # no worker is judged silent, or lost its task, for what a stall held back.
        self.orders_left_at = 0.0
        self.table = TaskTable(settings.retention, self.counters, settings.keep_results,
                               settings.keep_results_mb)
        self.tasks, self.marks = self.table.tasks, self.table.marks
        self.queue = TaskQueue(aging=settings.aging or None)
        self.registry = WorkerRegistry()
        self.workers = self.registry.workers
        self.waiting = WaitingRoom(self.rng)
        self.holds = MachineHolds(monitor, settings.memory_threshold)
        self.limits = ProviderLimits(providers, self.waiting)
        self.routing = routing  # routing.Routing: type "auto" (None: refused as any type)
        self.estimates = Estimates(predictor, self.queue, self.registry, self.tasks,
                                   self.marks)
        self.admission = Admission(settings, self.counters)
        self.ledger = LedgerOrders()
        self.leases = Leases(settings.lease)
        self.scaler = Scaler(settings, self.queue, self.registry, self.estimates, self.holds,
                             self.counters)
        self.waiters = Waiters()
        self.watch = Watch(self.marks)
        self.progress = ProgressEvents()
        self.slots = Slots(settings.prefetch, settings.prefetch_pause,
                           settings.critical_reserve)
        self.reserve_closes: float | None = None  # when an idle worker kept free may work
        self.scaler.prefetched = self.slots.by_type

    @property
    def predictor(self):
        return self.estimates.predictor

    @predictor.setter
    def predictor(self, predictor) -> None:
        self.estimates.predictor = predictor

    @property
    def monitor(self) -> ResourceMonitor:
        return self.holds.monitor

    @monitor.setter
    def monitor(self, monitor: ResourceMonitor) -> None:
        self.holds.monitor = monitor

    # -- moves that touch several parts -------------------------------------------------
    def _move(self, fx: Effects, task: Task, new: State, now: Now, **changes) -> None:
        was = task.state
        self.table.move(fx, task, new, now, **changes)
        if new in ACTIVE:
            self.watch.add(task)
        else:
            self.watch.discard(task.id)
            self.holds.release(task.id)  # its share of the machine is free at once
            # Its provider's slot too; a retry keeps the whole reservation counted.
            self.limits.release(fx, task, now, sent=was in ACTIVE,
                                used=task.tokens_used if new in FINAL else None)
            if new in FINAL:
                self.limits.forget(task)

    def _end(self, fx: Effects, task: Task, final: State, now: Now, **changes) -> None:
        """The task ends: its last progress is written first, it waits no more."""
        self.progress.end(fx, task)
        self.waiting.set(fx, task, None)
        self._move(fx, task, final, now, **changes)

    def _enqueue(self, task: Task, front: bool = False) -> None:
        self.queue.push(task, front=front, since=self.marks[task.id].created)
        if self.slots.held:
            self.slots.queued(task)  # it may outrank a prefetched task: recall it

    def _settle(self, fx: Effects, task: Task, now: Now) -> None:
        """Order the ledger to settle the attempt's tokens (settlement.py); the order is
        journaled with the task until the ledger confirms it."""
        body = settle_order(task)
        if body is None:
            return
        if self.leases.enabled:
            self.leases.settle(body, now.mono)  # sent with others (flush_ledger)
        else:
            self.ledger.send(fx, body, now.mono)
        lease = {"lease": None} if task.lease else {}
        self.table.set(fx, task, reserved=0, settle={**task.settle, str(task.attempt): body},
                       **lease)

    def ledger_orders(self) -> int:
        """Requests to the ledger not yet answered, sent or gathered for the next batch: at
        0, after the tasks have ended, the ledger has heard every settle order and its
        totals are final (a client hears its task's end before the ledger does)."""
        return len(self.ledger.pending) + len(self.leases.assigns) + len(self.leases.settles)

    def flush_ledger(self, fx: Effects, now_mono: float, force: bool = False) -> None:
        """At the end of a turn: the carves and settle orders gathered, once they are due
        (leases.py), ahead of the turn's task.run orders."""
        if self.leases.due(now_mono) or (force and (self.leases.assigns or
                                                    self.leases.settles)):
            mark = len(fx.sends)
            self.leases.flush(fx, self.ledger, now_mono)
            fx.sends[:] = fx.sends[mark:] + fx.sends[:mark]

    def _kill(self, fx: Effects, worker: Worker, reason: str, now: Now, **data) -> None:
        """Ask the pool to end a worker (hung, timed out, cancelled); it is gone for us."""
        fx.sends.append((b"pool", wire.NOTIFY, b"", {"op": "pool.kill", "worker": worker.name,
                                                      "pid": worker.pid, "reason": reason,
                                                      "grace": TIMEOUT_GRACE}))
        self._unprefetch(fx, worker, now)
        self.registry.move(fx, worker, WorkerState.GONE, now, reason=reason, pid=worker.pid,
                           killed=True, **data)

    def _retry(self, fx: Effects, task: Task, category: str, message: str, now: Now) -> None:
        """A lost attempt: settle its tokens, then back to the queue after a backoff, or
        to the dead letters when its retries are spent."""
        self._settle(fx, task, now)
        error = {"category": category, "message": message}
        lost = {"lost_attempt": task.attempt, "tokens_used": task.tokens_used}
        if task.attempt > task.retries:
            # No retry policy: a plain failure. Retries spent: the dead letters.
            final = State.FAILED if task.retries == 0 else State.DEAD
            self._end(fx, task, final, now, error=error, worker=None,
                      tokens_used=task.tokens_used)
            fx.emit("task.failed" if final is State.FAILED else "task.dead",
                    {"attempt": task.attempt, **lost, **error}, task.id)
            self.waiters.wake(fx, task)
            return
        self.counters["retried"] += 1
        delay = round(backoff_delay(task.attempt, BACKOFF_BASE, BACKOFF_CAP, rng=self.rng), 3)
        self.progress.end(fx, task)
        task.progress, task.message = 0.0, ""  # the next attempt reports its own
        self.marks[task.id] = Marks(created=self.marks[task.id].created)
        self._move(fx, task, State.QUEUED, now, attempt=task.attempt + 1, worker=None,
                   error=error, reserved=0, tokens_used=0)
        self.waiting.hold(fx, task, Reason.BACKOFF, now.mono, delay=delay)
        fx.emit("task.retry", {"attempt": task.attempt, "after": delay, **lost, **error},
                task.id)

    # -- dispatch ------------------------------------------------------------------------
    def dispatch(self, fx: Effects, now: Now) -> None:
        """Give every idle worker the best task it can take and that fits the machine;
        then, while tasks are left, fill the busy workers' prefetch slots the same way,
        and recall the prefetched tasks a queued one outranks (prefetch.py)."""
        self.reserve_closes = None
        if self.queue.empty():
            if self.slots.held:  # an idle worker may start a prefetched task sooner
                self._recall(fx, self.slots.to_steal(self._idle_for_any(now), self.workers))
            return  # nothing queued: the common case at light load, checked cheaply
        if (self.slots.size or self.slots.reserve) and self.queue.critical_waiting():
            self.slots.pause_for_critical(self.queue.counts, now.mono)
        machine: list = []  # [readings, held], read once a turn when first needed
        idle = self.registry.idle()
        kept, self.reserve_closes = self.slots.kept_free(idle, self._serving, now.mono)
        for worker in idle:
            if kept and worker.name in kept and not self._critical_queued(worker):
                continue  # kept for the next critical task of its types (prefetch.py)
            while worker.state is WorkerState.IDLE:
                task = self._next_for(fx, worker, now, machine)
                if task is None:
                    break
                if task.tokens > 0 and task.reserved == 0 and not self._carve(fx, task, now):
                    # Reserve first; the worker waits for this task meanwhile, while other
                    # workers keep taking other tasks (no head-of-line blocking).
                    self._reserve(fx, task, worker, now)
                    break
                self._hold(machine, self._dispatch(fx, task, worker, now))
            if self.queue.empty():
                # Nothing left for anyone: no need to ask the others.
                if self.slots.held:
                    self._recall(fx, self.slots.to_steal(self._idle_for_any(now),
                                                         self.workers))
                return
        if self.slots.size:
            self._prefetch(fx, now, machine)
        if self.slots.recall_due:
            self._recall(fx, self.slots.to_recall(self.workers, self.queue.counts))

    def _idle_for_any(self, now: Now) -> list[Worker]:
        """The idle workers that may take a lower task (not kept for critical ones)."""
        idle = self.registry.idle()
        kept, closes = self.slots.kept_free(idle, self._serving, now.mono)
        if not kept:
            return idle
        self.reserve_closes = closes
        return [w for w in idle if w.name not in kept]

    def _serving(self, task_type: str) -> int:
        return len(self.registry.serving(task_type))

    def _critical_queued(self, worker: Worker) -> bool:
        counts = self.queue.counts
        return any(counts[t][0] for t in worker.types if t in counts)

    def _recall(self, fx: Effects, found: list[tuple[Worker, str]]) -> None:
        for worker, task_id in found:
            task = self.tasks[task_id]
            fx.notify(worker.name, {"op": "task.recall", "id": task_id,
                                    "attempt": task.attempt})
            fx.emit("task.recall", {"attempt": task.attempt, "worker": worker.name,
                                    "priority": task.priority}, task_id, worker.name)

    def _prefetch(self, fx: Effects, now: Now, machine: list) -> None:
        """The tasks the idle workers could not take go to free slots of busy ones. One
        whose tokens are not reserved yet is reserved first, holding no worker."""
        for worker in list(self.workers.values()):
            if not (self.slots.free(worker) and self.slots.may_fill(worker,
                                                                    self.queue.counts,
                                                                    now.mono)):
                continue
            task = self._next_for(fx, worker, now, machine)
            if task is None:
                if self.queue.empty():
                    return
                continue
            if task.tokens > 0 and task.reserved == 0 and not self._carve(fx, task, now):
                self._reserve(fx, task, None, now)
                continue
            self._hold(machine, self._dispatch(fx, task, worker, now, prefetch=True))

    def _next_for(self, fx: Effects, worker: Worker, now: Now, machine: list) -> Task | None:
        """The best queued task `worker` can take that fits the machine and its provider's
        limits (taken); the ones that do not fit wait, held out of the queue."""
        while True:
            task = self.queue.pop_for(worker.types, now.mono)
            if task is None:
                return None
            if not machine:
                machine.extend(self.holds.readings(now.mono))
            blocked = self.holds.blocker(task, machine[0], machine[1]) or \
                self.limits.blocker(task, now.wall)
            if blocked is None:
                self.limits.take(fx, task, now.wall)
                return task
            reason = Reason(blocked[0])  # it waits; others go ahead
            self.waiting.hold(fx, task, reason, now.mono, blocked[1],
                              delay=self.limits.retry_in(blocked[1])
                              if reason is Reason.RATE_LIMIT else BLOCKED_RETRY)

    @staticmethod
    def _hold(machine: list, share: dict) -> None:
        for key, value in share.items():
            machine[1][key] += value

    def _carve(self, fx: Effects, task: Task, now: Now) -> bool:
        """Reserve the task's tokens from a lease we hold, with no round trip (leases.py);
        False: none fits, reserve from the ledger."""
        if not self.leases.enabled:
            return False
        lease = self.leases.carve(fx, self.ledger, task, now.mono)
        if lease is None:
            return False
        self.table.set(fx, task, reserved=task.tokens, lease=lease)
        fx.emit("task.reserved", {"attempt": task.attempt, "tokens": task.tokens,
                                  "lease": lease}, task.id)
        return True

    def _reserve(self, fx: Effects, task: Task, worker: Worker | None, now: Now) -> None:
        """Ask the ledger for the task's tokens, holding `worker` for it (None: a retry
        of a refused reservation, sent while a worker of its type is idle but holding
        none, so a refusal again changes no worker)."""
        if task.waiting != Reason.TOKENS:  # a retry keeps saying why it waits
            self.waiting.set(fx, task, Reason.RESERVING)
        if worker is not None:
            self.registry.move(fx, worker, WorkerState.CLAIMED, now, task=task.id)
        self.ledger.send(fx, {"op": "ledger.reserve", "task": task.id,
                              "attempt": task.attempt, "amount": task.tokens,
                              "type": task.type, "agent": task.agent,
                              "worker": worker.name if worker is not None else None},
                         now.mono)

    def _dispatch(self, fx: Effects, task: Task, worker: Worker, now: Now,
                  prefetch: bool = False) -> dict:
        """Send the task to the worker (`prefetch`: to its slot, to start when its current
        task ends; its clocks start then); returns the share of the machine it now holds."""
        marks = self.marks[task.id]
        marks.dispatched = None if prefetch else now.mono
        marks.heard, marks.recovered = None, False
        self.waiting.set(fx, task, None)
        if prefetch:
            self._move(fx, task, State.DISPATCHED, now, worker=worker.name, prefetched=True)
            self.slots.fill(worker, task)
        else:
            self._move(fx, task, State.DISPATCHED, now, worker=worker.name)
        share = self.holds.hold(task, worker.pid)
        if not prefetch:
            self.registry.move(fx, worker, WorkerState.BUSY, now, task=task.id)
        worker.last_seen = now.mono
        run = {"op": "task.run", "task": {
            "id": task.id, "attempt": task.attempt, "type": task.type,
            "description": task.description, "priority": task.priority,
            "payload": task.payload, "tokens": task.reserved, "timeout": task.timeout}}
        if task.lease:
            run["task"]["lease"] = task.lease
        if prefetch:
            run["prefetch"] = True
        fx.notify(worker.name, run)
        # Why this task, now, here: its rank against what else was queued for the worker.
        counts = self.queue.counts
        fx.emit("task.dispatched", {
            "attempt": task.attempt, "worker": worker.name, "priority": task.priority,
            "agent": task.agent, "deadline": task.deadline,
            "waited": now.mono - marks.created, "reserved": task.reserved,
            "still_queued": {t: counts[t] for t in worker.types if any(counts.get(t, ()))},
            "predicted": task.predicted, **self.limits.counted(task),
            **({"prefetched": True} if prefetch else {})}, task.id, worker.name)
        return share

    # -- prefetched tasks: started, or back to the queue -----------------------------------
    def _promote(self, fx: Effects, worker: Worker, now: Now) -> bool:
        """The worker's task ended and it starts its prefetched one at once: that one is
        its task now, and its clocks (timeout, silence) start. False: it held none."""
        task_id = self.slots.empty(worker)
        task = self.tasks.get(task_id or "")
        if task is None or not task.prefetched or task.worker != worker.name:
            return False
        self._started_here(fx, task, now)
        worker.task = task.id
        return True

    def _started_here(self, fx: Effects, task: Task, now: Now) -> None:
        """A prefetched task began on its worker."""
        self.table.set(fx, task, prefetched=False)
        marks = self.marks[task.id]
        marks.dispatched, marks.recovered = now.mono, False

    def _unprefetch(self, fx: Effects, worker: Worker, now: Now) -> None:
        """The worker will not start its prefetched task (it leaves, is gone or lost its
        task): the task goes back to its place in the queue, its attempt unchanged."""
        task = self.tasks.get(self.slots.empty(worker) or "")
        if task is not None and task.prefetched and task.worker == worker.name:
            self._requeue_unstarted(fx, task, now)

    def _requeue_unstarted(self, fx: Effects, task: Task, now: Now) -> None:
        """A dispatched task that never started: to the front of its level, same attempt."""
        self.marks[task.id].dispatched = None
        changes = {"prefetched": False} if task.prefetched else {}
        self._move(fx, task, State.QUEUED, now, worker=None, **changes)
        self.waiting.set(fx, task, Reason.WORKER)
        self._enqueue(task, front=True)

    def scale(self, fx: Effects, now: Now) -> None:
        self.scaler.scale(fx, now)

    # -- time ----------------------------------------------------------------------------
    def tick(self, fx: Effects, now: Now, task_heartbeat: float) -> float:
        """Handle everything due by `now`; returns seconds until the next deadline."""
        for task in self.waiting.due(fx, now.mono):
            if task.state is not State.QUEUED:
                continue
            if task.waiting == Reason.TOKENS and task.reserved == 0 and any(
                    w.state is WorkerState.IDLE for w in self.registry.serving(task.type)):
                self._reserve(fx, task, None, now)
            else:
                self._enqueue(task, front=True)
        next_due = now.mono + 1.0
        for due in (self.waiting.next_due(), self.progress.due(fx, now.mono),
                    self.reserve_closes):
            if due is not None:
                next_due = min(next_due, due)
        # The scans below are O(pending work): at most every WATCH_INTERVAL, not every turn.
        if not self.watch.scan_due(now.mono):
            return max(0.0, min(next_due, self.watch.next_scan) - now.mono)
        self.flush_ledger(fx, now.mono, force=True)  # gathered ones wait one scan at most
        self.ledger.resend_due(fx, now.mono)
        if self.leases.held:
            self.leases.give_back(fx, self.ledger, now.mono)
        self.table.trim(now.wall)  # an idle suite lets go of old results too
        soonest = self.waiters.expire(fx, self.tasks, now.mono)
        if soonest is not None:
            next_due = min(next_due, soonest)
        lost_after = task_heartbeat * wire.HEARTBEAT_LIVENESS
        for task, kind, seconds in self.watch.overdue(self.registry, now.mono, lost_after,
                                                      self.orders_left_at):
            if task.state not in ACTIVE:
                continue  # given back by a kill earlier in this scan (it was prefetched)
            if task.prefetched:  # recovered, and no worker said it runs it: never started
                self._requeue_unstarted(fx, task, now)
                continue
            worker = self.registry.get(task.worker or "")
            if kind == "timeout":
                if worker is not None:
                    self._kill(fx, worker, "timeout", now)
                fx.emit("task.timeout", {"attempt": task.attempt, "timeout": task.timeout},
                        task.id, task.worker)
                self._retry(fx, task, "timeout", f"ran past its timeout of {task.timeout} s",
                            now)
            else:
                if worker is not None:  # hung (e.g. SIGSTOP): end it
                    self._kill(fx, worker, "silent", now, silent_for=round(seconds, 3))
                self._retry(fx, task, "worker_lost",
                            f"no heartbeat from {task.worker} for {seconds:.1f} s", now)
        for worker in self.registry.departed(now.mono, lost_after):
            self.registry.move(fx, worker, WorkerState.GONE, now, reason="left")
        return max(0.0, next_due - now.mono)

    # -- recovery and snapshots ----------------------------------------------------------
    def apply(self, record: dict) -> None:
        """Replay one journal record (recovery)."""
        if record["k"] == "rejected":
            self.admission.remember(record["key"], record["code"], record["reason"],
                                    record.get("digest", ""))
        elif record["k"] == "rate":
            self.limits.apply(record)
        elif record["k"] == "lease":
            self.leases.apply(record)
        else:
            self.table.apply(record)

    def restore(self, now: Now) -> None:
        """After snapshot + replay: rebuild the queue; tasks in flight wait for their
        worker's heartbeat (worker.sync) and are retried if none comes (tick()). Their
        monotonic clocks start now."""
        quiet = Effects()  # worker and None are quiet reasons: no event to send
        for task in sorted(self.tasks.values(), key=lambda t: t.times.get("created", 0)):
            self.waiting.set(quiet, task, None)
            if task.state in FINAL:
                self.table.finished[task.id] = None
            elif task.state is State.QUEUED:
                self.marks[task.id] = Marks(created=now.mono)
                self.waiting.set(quiet, task, Reason.WORKER)
                self._enqueue(task)
            else:
                self.marks[task.id] = Marks(created=now.mono, dispatched=now.mono,
                                            recovered=True)
                task.times["recovered"] = now.wall
                self.watch.add(task)
                self.holds.hold(task, 0)
            for body in task.settle.values():  # ledger orders not confirmed before the crash
                if self.leases.enabled or body.get("lease"):
                    self.leases.settle(body, 0.0)
                else:
                    self.ledger.resend_soon(body, now.mono)
        self.leases.restored(self.tasks.values())
        self.limits.restored(quiet, self.tasks, now)
        self.table.retain()
        self.table.recovered(now.wall)

    def snapshot(self) -> dict:
        # The Task dataclasses themselves: orjson writes them in C as the journal does
        # (a summary dict per task cost ~40 ms of the loop per 5,000 tasks). Serialized at
        # once by the caller, so the live objects are safe to hand over.
        return {"tasks": list(self.tasks.values()), "counters": self.counters,
                "avg_duration": self.estimates.avg_duration,
                "rejected": [[k, *v] for k, v in self.admission.refusals.items()],
                "rate_limits": self.limits.snapshot(), "leases": self.leases.snapshot()}

    def load_snapshot(self, data: dict) -> None:
        for row in data.get("tasks", []):
            row = dict(row)
            row.pop("final", None)
            self.apply({"k": "new", "task": row})
        self.counters.update(data.get("counters", {}))
        for row in data.get("rejected", []):
            if isinstance(row, list) and len(row) in (3, 4):
                self.admission.remember(*row)
        self.estimates.avg_duration.update(data.get("avg_duration", {}))
        self.limits.load_snapshot(data.get("rate_limits"))
        for row in data.get("leases", []):
            self.leases.apply(row)
