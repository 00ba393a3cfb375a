"""What workers and the ledger report to the scheduler, and what it does about it: the
handlers of SchedulerState (state.py) for the workers' messages (listed in
protocol/worker.py) and the ledger's replies.

    worker.ready      idle (again): registered, or its task is over or was never there
    task.started      the attempt runs            task.heartbeat  it still runs
    task.progress     how far it is               task.finished   its result (REQUEST)
    task.rejected     it could not take the task (stopping, or busy)
    task.recalled     a prefetched task given back, or not (it had started)
    worker.leaving    it stops or recycles: no task for it ever again
    worker gone       exited (the pool says), lost (the broker says), unreachable

    ledger reply      a reservation granted or refused, a settle order confirmed

A report about an attempt counts only from the worker that runs it and for that attempt
(`_current`); anything else is a late or stray report and changes nothing.
"""

from __future__ import annotations

import math

from cortex.protocol import wire
from cortex.protocol.wire import ProtocolError
from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.admission import MAX_PAYLOAD_BYTES
from cortex.services.scheduler.clock import Now
from cortex.services.scheduler.settlement import refusal_detail
from cortex.services.scheduler.tasks import State, Task
from cortex.services.scheduler.waiting import Reason
from cortex.services.scheduler.workers import WorkerState

# A worker's idle "ready" this soon after a dispatch may have crossed the task.run.
DISPATCH_GRACE = 2.0
W = WorkerState


def _finite(value, lo: float, hi: float) -> float:
    """A reported figure if it is a finite float in [lo, hi], else lo."""
    if isinstance(value, float) and math.isfinite(value) and lo <= value <= hi:
        return value
    return lo


def _amount(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _types(body: dict) -> tuple[str, ...]:
    types = body.get("types") or [body.get("type")]
    if not isinstance(types, list | tuple) or not all(isinstance(t, str) and t for t in types):
        raise ProtocolError("bad_request", "a worker must name its task types")
    return tuple(types)


class Reports:
    """Mixed into SchedulerState; uses its parts (registry, table, marks, queue, waiting,
    progress, estimates, scaler, waiters, ledger, limits) and its moves (_move, _end, _retry,
    _settle, _kill, _enqueue, _dispatch)."""

    def _current(self, name: str, body: dict) -> Task | None:
        """The live task a worker's report is about, if that worker runs that attempt."""
        task_id = body.get("id")
        task = self.tasks.get(task_id) if isinstance(task_id, str) else None
        if task is None or task.final or task.worker != name or \
                task.attempt != body.get("attempt"):
            return None
        return task

    def worker_ready(self, fx: Effects, name: str, body: dict, now: Now) -> None:
        types = _types(body)
        pid = wire.field_int(body, "pid", required=False, default=0)
        worker = self.registry.get(name)
        if worker is None:
            self.registry.register(fx, name, types, pid, now)
            self.scaler.registered(types, now.mono)
            self._sync_if_recovered(fx, name)
            return
        worker.last_seen = now.mono
        if worker.state in (W.CLAIMED, W.LEAVING):
            return  # waiting while we reserve its next task / finishing, then gone
        if worker.state is W.BUSY:
            task = self.tasks.get(worker.task or "")
            if task is not None and not task.final and task.worker == name:
                dispatched = self.marks[task.id].dispatched
                # Counted from when our order could leave: a stalled journal sync holds
                # the reply that carries it (loop.py, `orders_left`).
                if dispatched is not None and now.mono - max(
                        dispatched, self.orders_left_at) < DISPATCH_GRACE:
                    return  # its ready crossed our task.run on the way
                # Idle long after we gave it a task: the task (or its run order) was lost.
                self._retry(fx, task, "worker_lost", "worker does not have its task", now)
            self._unprefetch(fx, worker, now)  # idle: it holds nothing either
            self.registry.move(fx, worker, W.IDLE, now)
        worker.types, worker.pid = types, pid

    def _sync_if_recovered(self, fx: Effects, name: str) -> None:
        """A worker heard from for the first time since our restart, with tasks recovered
        as its own: it is asked to sync (as every worker the broker knew at our start
        was), so a prefetched task it holds comes back before it could start it, rather
        than after the watch gave up on it and sent it elsewhere."""
        marks = self.marks
        if any(task.worker == name and (m := marks.get(task.id)) is not None and m.recovered
               for task in self.watch.active.values()):
            fx.notify(name, {"op": "worker.sync"})

    def worker_leaving(self, fx: Effects, name: str, body: dict, now: Now) -> None:
        """It stops (or recycles): it finishes the task in hand and gets no other."""
        worker = self.registry.get(name)
        if worker is None or worker.state is W.LEAVING:
            return
        reason = body.get("reason") if isinstance(body.get("reason"), str) else "stopping"
        self.registry.move(fx, worker, W.LEAVING, now, reason=reason[:64])
        self._unprefetch(fx, worker, now)  # it will not start it

    def worker_gone(self, fx: Effects, name: str, reason: str, now: Now,
                    kill: bool = False) -> None:
        """Exited, lost or unreachable; `kill`: it may be alive but hung, so end it."""
        worker = self.registry.get(name)
        if worker is None:
            return
        self._unprefetch(fx, worker, now)
        if kill:
            self._kill(fx, worker, reason, now)
        else:
            self.registry.move(fx, worker, W.GONE, now, reason=reason, pid=worker.pid)
        task = self.tasks.get(worker.task or "")
        if task is not None and not task.final and task.worker == name:
            self._retry(fx, task, "worker_lost", f"worker {name} {reason}", now)

    def task_started(self, fx: Effects, name: str, body: dict, now: Now) -> None:
        task = self._current(name, body)
        if task is not None and task.prefetched:
            self._adopt(fx, name, task, now)
        if task is not None and task.state is State.DISPATCHED:
            at = wire.field_number(body, "at", lo=0, hi=1e11, required=False, default=now.wall)
            self._move(fx, task, State.RUNNING, now)
            task.times["started"] = at
            self.marks[task.id].heard = now.mono
            fx.emit("task.started", {"attempt": task.attempt, "at": at}, task.id, name)

    def task_heartbeat(self, fx: Effects, name: str, body: dict, now: Now) -> None:
        worker = self.registry.get(name)
        task = self._current(name, body)
        if worker is None:
            # We restarted: a busy worker re-introduces itself through its heartbeat.
            worker = self.registry.register(
                fx, name, _types(body), wire.field_int(body, "pid", required=False,
                                                       default=0),
                now, busy=True, task=task.id if task is not None else None)
            self._sync_if_recovered(fx, name)
        worker.last_seen = now.mono
        if task is None:
            return
        if task.prefetched:
            self._adopt(fx, name, task, now)
        if worker.state in (W.IDLE, W.CLAIMED):
            self.registry.move(fx, worker, W.BUSY, now, task=task.id)
        else:
            worker.task = task.id
        task.times["heartbeat"] = now.wall
        self.marks[task.id].heard = now.mono
        used = body.get("tokens_used")
        if isinstance(used, int) and not isinstance(used, bool) and used >= 0:
            task.tokens_used = used

    def task_progress(self, fx: Effects, name: str, body: dict, now: Now) -> None:
        task = self._current(name, body)
        if task is not None:
            self.progress.report(fx, task, body, now.mono)

    def progress_request(self, fx: Effects, body: dict, now: Now) -> Task:
        """`task.progress` as a REQUEST (an external worker through the client library)."""
        task = self.get(body)
        if task.state in (State.DISPATCHED, State.RUNNING):
            self.progress.report(fx, task, body, now.mono)
        return task

    def task_rejected(self, fx: Effects, name: str, body: dict, now: Now) -> None:
        """It never ran the task: back to the front of the queue, same attempt."""
        task = self._current(name, body)
        worker = self.registry.get(name)
        if worker is not None:
            if task is not None and worker.task == task.id:
                worker.task = None  # not running it (busy: with something we did not give)
            if task is not None and worker.prefetched == task.id:
                self.slots.empty(worker)
            if body.get("reason") == "stopping" and worker.state is not W.LEAVING:
                self.registry.move(fx, worker, W.LEAVING, now, reason="stopping")
        if task is not None:
            self._requeue_unstarted(fx, task, now)

    def task_recalled(self, fx: Effects, name: str, body: dict, now: Now) -> None:
        """The answer to a task.recall: given back (it goes back to its place in the
        queue, same attempt), or it had started (its worker's finish made it the task the
        worker runs)."""
        worker = self.registry.get(name)
        task = self._current(name, body)
        if worker is None or task is None or worker.prefetched != task.id:
            return  # started and promoted already, or the worker left meanwhile
        if body.get("recalled") is True:
            self.slots.empty(worker)
            self._requeue_unstarted(fx, task, now)
            fx.emit("task.recalled", {"attempt": task.attempt, "worker": name}, task.id, name)
        else:
            worker.recalling = False

    def _adopt(self, fx: Effects, name: str, task: Task, now: Now, runs: bool = True) -> None:
        """A worker says it runs (`runs`) or ran a task we had as prefetched there (after
        our restart, its start or its end is our first news of it)."""
        worker = self.registry.get(name)
        if worker is not None and worker.prefetched == task.id:
            self.slots.empty(worker)
        if worker is not None and runs:
            worker.task = task.id
        self._started_here(fx, task, now)

    def task_finished(self, fx: Effects, name: str, peer: bytes, corr: bytes, body: dict,
                      now: Now) -> None:
        fx.reply(peer, corr, {"ok": True})
        task = self._current(name, body)
        worker = self.registry.get(name)
        if worker is not None:
            worker.last_seen = now.mono
            # Only the finish of the attempt it runs frees it (not a superseded one's).
            if task is not None and worker.task == task.id:
                worker.done += 1
                if worker.state is not W.BUSY:
                    worker.task = None  # leaving: it goes now
                elif not self._promote(fx, worker, now):  # it starts its prefetched task
                    self.registry.move(fx, worker, W.IDLE, now, done=worker.done)
        if task is None:
            self.counters["late_results"] += 1
            fx.emit("task.late_result", {"attempt": body.get("attempt"), "worker": name},
                    body.get("id") if isinstance(body.get("id"), str) else None, name)
            return
        if task.prefetched:  # finished before we heard of its start (our restart)
            self._adopt(fx, name, task, now, runs=False)
        used = body.get("tokens_used", 0)
        task.tokens_used = used if isinstance(used, int) and not isinstance(used, bool) \
            and 0 <= used <= wire.MAX_INT else 0
        started = body.get("started_at")
        if isinstance(started, float):
            task.times["started"] = started
            if task.state is State.DISPATCHED:  # a short task: its start came with its end
                fx.emit("task.started", {"attempt": task.attempt, "at": started}, task.id, name)
        timings = self._timings(task, body, now)
        actual = {"duration": timings["duration"], "tokens": float(task.tokens_used),
                  "memory_mb": _finite(body.get("mem_mb"), 0.0, 1e6),
                  "cpu_s": timings["cpu_s"]}
        self.scaler.learn_rss(_finite(body.get("rss_mb"), 0.0, 1e6))
        result = body.get("result")
        try:
            wire.json_safe(result, "result", MAX_PAYLOAD_BYTES)
        except ProtocolError as e:  # the journal must hold it: keep the task, not the result
            result = {"unstorable_result": e.message}
        if body.get("ok") is True:
            self._end(fx, task, State.COMPLETED, now, result=result,
                      tokens_used=task.tokens_used, actual=actual)
            # The learning features ride along, so the event log alone can train a model.
            fx.emit("task.completed", {
                "attempt": task.attempt, "tokens_used": task.tokens_used, "type": task.type,
                "priority": task.priority, "description": task.description[:1000],
                "payload_size": task.size, "actual": actual, "predicted": task.predicted,
                "result": result, **timings}, task.id, name)  # the result outlives the task
            if self.predictor is not None:
                self.predictor.observe(task.type, task.priority, task.description, task.size,
                                       actual)
        else:
            error = body.get("error") if isinstance(body.get("error"), dict) else {}
            category = error.get("category", "handler_error")
            message = str(error.get("message", ""))
            failure = {"category": category, "message": message[:2000]}
            # The traceback, and what a provider said (its retry_after), stay with the task:
            # `cortex task show` and the dashboard's task page show them.
            for key, value in list(error.items())[:24]:
                if key not in failure and len(key) <= 64 and isinstance(
                        value, str | int | float | bool):
                    failure[key] = value[-16384:] if isinstance(value, str) else value
            self._end(fx, task, State.FAILED, now, tokens_used=task.tokens_used,
                      error=failure)
            fx.emit("task.failed", {"attempt": task.attempt, "category": category,
                                    "message": message[:500],
                                    "tokens_used": task.tokens_used, **timings}, task.id, name)
        self.limits.observe(fx, task, now.wall)  # a 429 on the way shrinks its provider
        self._settle(fx, task, now)
        self.waiters.wake(fx, task)

    def _settled(self, fx: Effects, order: dict, reply: dict) -> None:
        """A settle order answered: no longer re-sent after a restart."""
        self.waiting.tokens_returned(_amount(reply.get("released")))
        task = self.tasks.get(order["task"])
        if task is not None and str(order["attempt"]) in task.settle:
            settle = {k: v for k, v in task.settle.items() if k != str(order["attempt"])}
            self.table.set(fx, task, settle=settle)

    def _timings(self, task: Task, body: dict, now: Now) -> dict:
        """How long it queued and ran, and its CPU. The run is the worker's own measure,
        never longer than the monotonic time since its dispatch (a wall clock that jumped
        during the run would say otherwise)."""
        marks = self.marks[task.id]
        finished = body.get("finished_at")
        finished = finished if isinstance(finished, float) else now.wall
        duration = max(0.0, finished - task.times.get("started", finished))
        if marks.dispatched is not None and not marks.recovered:
            duration = min(duration, max(0.0, now.mono - marks.dispatched))
        self.estimates.learn(task.type, duration)
        queued = marks.queued_for()
        if queued is None:
            queued = max(0.0, task.times.get("dispatched", now.wall) - task.times["created"])
        return {"queued": queued, "duration": duration,
                "cpu_s": _finite(body.get("cpu_s"), 0.0, 1e7)}

    def ledger_reply(self, fx: Effects, corr: bytes, ok: bool, body: dict, now: Now) -> None:
        request = self.ledger.answered(corr)
        if request is None:
            return
        batch = request["op"] in ("ledger.settle", "ledger.assign")
        if not ok and (body.get("code") == "unavailable" or (
                batch and body.get("code") == "internal")):
            # The ledger is restarting (or failed on a batch): send it again later.
            self.ledger.again_later(corr, request, now.mono)
            return
        if request["op"] in ("ledger.settle", "ledger.assign"):
            self.leases.closed(body.get("closed"), now.mono)  # reclaimed: carve no more
        if request["op"] in ("ledger.lease", "ledger.assign", "ledger.return"):
            self.leases.answered(fx, request, ok, body, now.mono)
            self.waiting.tokens_returned(_amount(body.get("returned")))
            return
        if request["op"] == "ledger.settle":
            if request.get("items"):
                self.leases.answered(fx, {"op": "ledger.assign", "items": request["items"]},
                                     ok, {"results": body.get("assigned")}, now.mono)
            results = body.get("results") if ok else None
            for index, order in enumerate(request["orders"]):
                self.leases.confirmed(order)
                result = results[index] if isinstance(results, list) and \
                    index < len(results) and isinstance(results[index], dict) else {}
                self._settled(fx, order, result)
            return
        task = self.tasks.get(request["task"])
        if request["op"] != "ledger.reserve":
            self._settled(fx, request, body)
            return
        worker = self.registry.get(request.get("worker") or "")
        if worker is not None and not (worker.state is WorkerState.CLAIMED
                                       and worker.task == request["task"]):
            worker = None  # no longer held for this task (left, or took another)
        granted = ok and bool(body.get("granted"))
        if task is None or task.state is not State.QUEUED or task.attempt != request["attempt"]:
            if worker is not None:
                self.registry.move(fx, worker, WorkerState.IDLE, now)
            if granted:  # the task moved on meanwhile: give them back
                self.ledger.send(fx, {"op": "ledger.release", "task": request["task"],
                                      "attempt": request["attempt"]}, now.mono)
            return
        if granted:
            self.table.set(fx, task, reserved=request["amount"])
            fx.emit("task.reserved", {"attempt": task.attempt, "tokens": request["amount"]},
                    task.id)
            if worker is not None:
                self._dispatch(fx, task, worker, now)
            else:
                self.waiting.set(fx, task, Reason.WORKER)
                self._enqueue(task, front=True)
            return
        if worker is not None:
            self.registry.move(fx, worker, WorkerState.IDLE, now)
        self.limits.release(fx, task, now, sent=False)  # no call made: its slot is free
        detail = refusal_detail(body, now.wall)
        if detail.get("requested", 0) > detail.get("limit", math.inf) \
                and "resets_at" not in detail:
            # A limit lowered since the submit below the ask, and no window to reset it.
            self.queue.discard(task)
            self.waiting.release(task)
            self._end(fx, task, State.FAILED, now, error={
                "category": "budget_exceeded", "message": detail["message"]})
            return
        self.waiting.hold(fx, task, Reason.TOKENS, now.mono, detail)
