"""What clients ask of the scheduler: the handlers of SchedulerState (state.py) for
`task.submit`, `task.wait`, `task.cancel`, `task.status`, `task.list`, `worker.list` and
`scheduler.status` (their fields are in protocol/README.md).
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from collections import Counter
from operator import attrgetter

import orjson

from cortex.protocol import wire
from cortex.protocol.vocabulary import PRIORITIES
from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.admission import parse_wait
from cortex.services.scheduler.clock import Now
from cortex.services.scheduler.tasks import State, Task, new_task_id
from cortex.services.scheduler.waiting import ANNOUNCED, Reason

log = logging.getLogger("cortex.scheduler")

AUTO = "auto"  # the type that asks the scheduler to choose (routing.py)

# What a submit asks for. Not its content: `wait`, the key itself, and the agent (a
# client names itself anew at each start, and a restarted agent re-sending its submit is
# what the key is for).
CONTENT = ("type", "description", "priority", "tokens", "timeout", "retries", "deadline",
           "payload")


_STATE_OF = attrgetter("state")


def content_digest(body: dict) -> str:
    """A digest of the task a submit describes, as sent (defaults not filled in), so a
    re-send matches and a different task under the same idempotency key does not."""
    fields = {k: body.get(k) for k in CONTENT}
    try:
        content = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):  # not JSON: admission refuses it next
        content = repr(fields).encode()
    return hashlib.blake2b(content, digest_size=16).hexdigest()


class ClientRequests:
    """Mixed into SchedulerState; uses its parts (table, admission, estimates, queue,
    waiting, waiters, registry, holds, limits, routing) and its moves (_end, _enqueue,
    _kill, _settle)."""

    def submit(self, fx: Effects, peer: bytes, corr: bytes, body: dict, now: Now) -> None:
        # Checked before admitting: a bad field must refuse the submit before any change.
        follow = wire.field_number(body, "follow", lo=0, hi=60, required=False, default=0.0)
        outcome = self.admit(fx, peer, body, now)
        if not isinstance(outcome, Task):
            fx.error(peer, corr, *outcome)
            return
        wait = parse_wait(body)
        self._reply_or_hold(fx, peer, corr, outcome, wait, now)
        if follow > 0 and wait <= 0 and not outcome.final \
                and len(corr) < wire.MAX_CORR_BYTES:
            # Answered again when it ends, as a wait sent with the submit would be: the
            # submitter's next wait for it then costs no request (calls.py).
            self.waiters.hold(outcome.id, peer, corr + wire.FOLLOW_SUFFIX, now.mono + follow)

    def submit_many(self, fx: Effects, peer: bytes, corr: bytes,
                    items: list[dict | wire.ProtocolError], now: Now) -> None:
        """Each item (a checked submit body, or why it failed its check) admitted on its
        own, in order; one reply: per item the task (`id`, `state`) or its error. A task
        whose admission raises is that task's `internal` error (its effects dropped, an
        event with the traceback); the others keep theirs."""
        results = []
        for index, item in enumerate(items):
            outcome = item
            if isinstance(item, dict):
                mark = fx.mark()
                try:
                    outcome = self.admit(fx, peer, item, now)
                except wire.ProtocolError as e:
                    fx.rollback(mark)
                    outcome = e
                except Exception as e:  # a bug in one task's admission fails that task only
                    fx.rollback(mark)
                    outcome = self._admission_failed(fx, peer, index, e)
            if isinstance(outcome, Task):
                results.append({"id": outcome.id, "state": str(outcome.state)})
            elif isinstance(outcome, wire.ProtocolError):
                results.append(wire.error_body(outcome.code, outcome.message))
            else:
                results.append(wire.error_body(*outcome))
        fx.reply(peer, corr, {"results": results})

    def _admission_failed(self, fx: Effects, peer: bytes, index: int, e: Exception
                          ) -> tuple[str, str]:
        """Announce an exception in a batch task's admission as the service loop does for
        a handler's; the task's result."""
        trace = traceback.format_exc()
        self.counters["internal_errors"] = self.counters.get("internal_errors", 0) + 1
        log.error("task.submit_many task %d from %s failed: %s", index,
                  peer.decode(errors="replace"), trace)
        fx.emit("scheduler.internal_error", {
            "op": "task.submit_many", "type": wire.REQUEST.decode(), "index": index,
            "peer": peer.decode(errors="replace"), "error": f"{type(e).__name__}: {e}"[:500],
            "traceback": trace[-4000:]})
        return "internal", f"scheduler failed on task.submit_many: {type(e).__name__}"

    def admit(self, fx: Effects, peer: bytes, body: dict, now: Now) -> Task | tuple[str, str]:
        """The task a submit body asks for (the same one for a key seen before), or the
        refusal (code, reason); raises ProtocolError `bad_request` before any change."""
        key = wire.field_str(body, "idempotency_key", max_len=128)
        digest = content_digest(body)
        existing = self.table.by_key(key)
        if existing is not None and existing.digest not in ("", digest):
            self.counters["conflicts"] = self.counters.get("conflicts", 0) + 1
            return "conflict", (f"idempotency key {key[:128]!r} was used for task "
                                f"{existing.id} with different content")
        if existing is not None:  # a re-sent submit: the same task (and, with `wait`, a wait)
            self.counters["duplicates"] += 1
            return existing
        refusal = self.admission.refused(key)
        if refusal is not None:
            code, reason, refused_digest = refusal
            if refused_digest not in ("", digest):
                code, reason = "conflict", (f"idempotency key {key[:128]!r} was refused for "
                                            "a submit with different content")
            return code, reason  # the same answer, never a late accept
        req = self.admission.parse(body, peer)
        req.digest = digest
        sent_type = req.type  # before routing may choose one
        routing, refusal = self._route(req)
        refusal = refusal or self.limits.refusal(req)
        if refusal is None:
            wait_s = self.estimates.wait_before_start(req.type, req.priority, now.mono)
            # Prefetched tasks have not started either: they count as waiting.
            waiting = self.queue.depth(req.type) + self.slots.by_type.get(req.type, 0)
            refusal = self.admission.judge(req, waiting, wait_s, now)
        if refusal is not None:
            self.admission.record_refusal(fx, req, *refusal)
            self._typed(sent_type, req.description)
            return refusal
        predicted = None
        if self.predictor is not None:
            predicted = self.predictor.predict(req.type, req.priority, req.description,
                                               req.size).as_dict()
        task = Task(id=new_task_id(now.wall), type=req.type, description=req.description,
                    priority=req.priority, tokens=req.tokens, timeout=req.timeout,
                    retries=req.retries, agent=req.agent, key=key, payload=req.payload,
                    deadline=req.deadline, times={"created": now.wall},
                    eta=now.wall + wait_s, size=req.size, predicted=predicted,
                    routing=routing, digest=digest)
        self.waiting.set(fx, task, Reason.WORKER)  # the new task's own fields, no event
        self._take_in(fx, task, now)
        self._typed(sent_type, req.description)
        return task

    def _take_in(self, fx: Effects, task: Task, now: Now) -> None:
        """The admitted task into the table and the queue, all or nothing. The loop drops
        the effects of a turn that raises: a task left in memory without its record would
        be acknowledged later as a duplicate that was never journaled."""
        mark = fx.mark()
        submitted = self.counters["submitted"]
        try:
            self.table.add(fx, task, now)
            self._enqueue(task)
            fx.emit("task.created", {"type": task.type, "priority": task.priority,
                                     "tokens": task.tokens, "agent": task.agent,
                                     "eta": task.eta, "description": task.description[:200],
                                     **({"routing": task.routing} if task.routing else {})},
                    task.id)
            fx.check_encodable(mark)  # here, while this task alone can be taken back
        except BaseException:
            fx.rollback(mark)
            self.queue.discard(task)
            self.table.forget_new(task)
            self.counters["submitted"] = submitted
            raise

    def _typed(self, task_type: str, description: str) -> None:
        """One more row of routing history (a task sent with its type, taken or refused)."""
        if self.routing is not None and task_type != AUTO:
            self.routing.typed(task_type, description)

    def _route(self, req) -> tuple[dict | None, tuple[str, str] | None]:
        """A task of type "auto" takes the type its description routes to (the decision
        returned, to keep), or is refused (code, reason); a typed one is history to learn."""
        if self.routing is None:
            return None, None
        if req.type != AUTO:
            return None, None  # history to learn once it is judged (_typed)
        decision, refusal = self.routing.decide(req.description)
        if decision is None:
            return None, refusal
        req.type = decision.type
        return decision.as_dict(), None

    def _reply_or_hold(self, fx: Effects, peer: bytes, corr: bytes, task: Task,
                       seconds: float, now: Now) -> None:
        if task.final or seconds <= 0:
            fx.reply(peer, corr, task.answer())
        else:
            self.waiters.hold(task.id, peer, corr, now.mono + seconds)

    def wait(self, fx: Effects, peer: bytes, corr: bytes, body: dict, now: Now) -> None:
        task = self.get(body)
        hold = wire.field_number(body, "hold", lo=0, hi=60, required=False, default=0)
        self._reply_or_hold(fx, peer, corr, task, hold, now)

    def get(self, body: dict) -> Task:
        return self.table.get(body)

    def cancel(self, fx: Effects, peer: bytes, corr: bytes, body: dict, now: Now) -> None:
        task = self.get(body)
        if task.final:
            fx.reply(peer, corr, task.answer())
            return
        error = {"category": "cancelled", "message": "cancelled on request"}
        if task.state is State.QUEUED:
            self.queue.discard(task)
            self.waiting.release(task)
            self._end(fx, task, State.CANCELLED, now, error=error)
        elif task.prefetched:  # not started: its worker drops it, and runs on
            worker = self.registry.get(task.worker or "")
            if worker is not None and worker.prefetched == task.id:
                self.slots.empty(worker)
            fx.notify(task.worker, {"op": "task.cancel", "id": task.id, "attempt": task.attempt})
            self._end(fx, task, State.CANCELLED, now, error=error, prefetched=False)
        else:
            worker = self.registry.get(task.worker or "")
            fx.notify(task.worker, {"op": "task.cancel", "id": task.id, "attempt": task.attempt})
            # The handler may ignore the flag: the pool ends the worker after a grace period.
            if worker is not None:
                self._kill(fx, worker, "cancel", now)
            self._end(fx, task, State.CANCELLED, now, error=error,
                      tokens_used=task.tokens_used)
        self._settle(fx, task, now)
        fx.emit("task.cancelled", {"attempt": task.attempt}, task.id, task.worker)
        self.waiters.wake(fx, task)
        fx.reply(peer, corr, task.answer())

    def list_tasks(self, body: dict) -> dict:
        return self.table.listing(body)

    def refresh_eta(self, task: Task, now: Now) -> None:
        """A queued task's ETA as of now: the window reset it waits for, unknown while it
        waits for tokens that no window gives back, else the queue's estimate."""
        if task.state is not State.QUEUED:
            return
        if task.waiting == Reason.TOKENS:
            task.eta = (task.waiting_detail or {}).get("resets_at")
            return
        if task.waiting == Reason.RATE_LIMIT:  # when its provider's window lets it in
            task.eta = (task.waiting_detail or {}).get("eta")
            return
        task.eta = now.wall + self.estimates.wait_before_start(
            task.type, task.priority, now.mono, ahead=self.queue.ahead_of(task))

    def status(self, now: Now) -> dict:
        # Asked every second while a dashboard is open: the table (finished tasks up to
        # `retention`) is counted in C, and only the live tasks are looked at one by one.
        states = Counter(map(_STATE_OF, self.tasks.values()))
        waiting: Counter = Counter()
        queued = dict.fromkeys(PRIORITIES, 0)
        for task_id in self.marks:  # the live tasks (table.py)
            t = self.tasks.get(task_id)
            if t is not None and t.state is State.QUEUED:
                queued[t.priority] = queued.get(t.priority, 0) + 1
                waiting[t.waiting or Reason.WORKER.value] += 1
        # "queue" holds every queued task, as "states" counts them; the dispatch queue
        # alone leaves out those held aside (tokens, backoff, cpu, memory, reserving).
        return {"queue": queued, "states": {str(state): n for state, n in states.items()},
                "queued_by_reason": {r.value: waiting[r] for r in Reason if waiting[r]},
                "workers": self.registry.by_type(),
                "waiting": {r.value: waiting[r] for r in sorted(ANNOUNCED) if waiting[r]},
                "backoff": waiting[Reason.BACKOFF.value],
                "memory_pressure": self.holds.memory_pressure,
                "providers": self.limits.status(now.wall),
                "counters": dict(self.counters)}

    def worker_rows(self, now: Now) -> list[dict]:
        return [w.row(now) for w in self.workers.values()]
