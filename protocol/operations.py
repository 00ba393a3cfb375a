"""Every operation of the client library, written once, for both faces.

An operation is a plan: a generator that yields the `Request`s it needs, receives each
answer (or has the typed error thrown in), and returns the result. It decides what to
ask and what the answers mean; it never touches a socket or sleeps. The sync `Client`
runs a plan with blocking calls, the `AsyncClient` with awaited ones (`client.py`), so
the two cannot drift apart.
"""

from __future__ import annotations

from . import errors, wire
from .calls import RESEND_AFTER, Request, Session, within
from .catalogue import MAX_SUBMIT_BATCH, SUBMIT_FIELDS

WAIT_HOLD = 5.0  # the scheduler holds a wait at most this long; then we ask again, so a
#                  scheduler restart (which forgets held waits) costs at most a few seconds
REPLY_MARGIN = 5.0  # how long past its hold a held answer may take to come back
BATCH_FIELDS = tuple(f.name for f in SUBMIT_FIELDS)
BATCH_BYTES = wire.MAX_MESSAGE_BYTES - 64 * 1024  # a batch's tasks, leaving room for the rest
REFUSED_WHOLE = ("too_large", "bad_request")  # a batch's message itself: the next may pass
QUERY_PAGE = 5000  # events.query's most events a page (each page also fits one message)


class Plans:
    """The operations, as plans over one session (see the module docstring)."""

    def __init__(self, session: Session, agent: str):
        self.session = session
        self.agent = agent

    def call(self, service: str, op: str, body: dict | None = None,
             timeout: float | None = None, resend_after: float = RESEND_AFTER):
        """Ask `service` for `op` with `body`; the REPLY body, or raises a CortexError
        (Timeout after `timeout` seconds, default the client's)."""
        return (yield Request(service, op, body, within(timeout), resend_after))

    def submit(self, task_type: str, description: str = "", *, priority: str = "medium",
               tokens: int = 0, timeout: float | None = None, retries: int | None = None,
               deadline: float | None = None, payload=None, idempotency_key: str | None = None,
               agent: str | None = None, follow: bool = True) -> dict:
        """Queue a task; returns its summary (id, state, eta). The same idempotency key
        twice gives the same task. `timeout`: how long the task may run; `deadline`: the
        unix time by which it must start. `follow` (the default): the scheduler also
        sends the task's end (or its state after WAIT_HOLD seconds) unasked, so a `wait`
        for it soon after costs no request; False for a task nobody here will wait for,
        or one polled with `task.wait` calls of its own (its end would come twice)."""
        body = self._submit_body(task_type, description, priority, tokens, timeout, retries,
                                 deadline, payload, idempotency_key, agent)
        if follow:
            body["follow"] = WAIT_HOLD
        return (yield Request("scheduler", "task.submit", body))

    def submit_many(self, tasks: list[dict]) -> list[dict | errors.CortexError]:
        """Queue many tasks with few messages (`task.submit_many`, up to
        MAX_SUBMIT_BATCH tasks and under the message size limit each). Each task is a
        dict of `submit`'s fields: `type` (required), `description`, `priority`, `tokens`,
        `timeout`, `retries`, `deadline`, `payload`, `idempotency_key`, `agent`. Returns,
        in order, per task its summary (`id`, `state`) or its error (a CortexError,
        returned, not raised: one bad task refuses only itself). Keys are given to the
        tasks that have none before the first send, so a re-sent batch is the same
        tasks; give your own to submit again what ended in Timeout or Unavailable. A
        message refused whole (`too_large`) is its tasks' error and the rest go on; a
        scheduler that cannot be reached is the error of every task not yet answered."""
        bodies = [self._batch_body(i, task) for i, task in enumerate(tasks)]
        results: list[dict | errors.CortexError] = []
        unreachable = None
        for batch in _batches(bodies):
            if unreachable is not None:
                results += [unreachable] * len(batch)
                continue
            try:
                reply = yield Request("scheduler", "task.submit_many", {"tasks": batch})
            except errors.CortexError as e:
                results += [e] * len(batch)
                if e.code not in REFUSED_WHOLE:
                    unreachable = e
                continue
            answers = reply.get("results")
            if not isinstance(answers, list) or len(answers) != len(batch):
                raise errors.CortexError("task.submit_many: the reply does not hold one "
                                         "result per task", details=reply)
            results += [errors.from_reply(a) if isinstance(a, dict) and "code" in a else a
                        for a in answers]
        return results

    def submit_and_wait(self, task_type: str, description: str = "", *,
                        priority: str = "medium", tokens: int = 0,
                        task_timeout: float | None = None, retries: int | None = None,
                        deadline: float | None = None, payload=None,
                        idempotency_key: str | None = None, agent: str | None = None,
                        timeout: float | None = None, raise_on_failure: bool = False) -> dict:
        """Submit a task and wait for its end in one call: one round trip when it ends
        within a few seconds (the scheduler holds the submit's answer until then), then
        held waits. `timeout`: how long to wait (default the client's), Timeout with the
        task in `.details` if it has not ended by then; `task_timeout`: how long the task
        may run. Returns the ended task (TaskFailed if it did not complete and
        `raise_on_failure`)."""
        clock = self.session.clock
        end = clock() + self._span(timeout)
        hold = min(WAIT_HOLD, max(0.0, end - clock()))
        body = self._submit_body(task_type, description, priority, tokens, task_timeout,
                                 retries, deadline, payload, idempotency_key, agent)
        body["wait"] = hold
        # Re-sent until the wait is over: the key makes every copy the same task.
        task = yield Request("scheduler", "task.submit", body,
                             timeout=max(end - clock(), hold) + REPLY_MARGIN,
                             resend_after=hold + RESEND_AFTER)
        if not task.get("final"):
            task = yield from self._held_waits(task["id"], end, task)
        return _ended((yield from self._result_from_log(task)), raise_on_failure)

    def status(self, task_id: str) -> dict:
        """The task as the scheduler sees it now (state, waiting reason, eta, ...)."""
        task = yield Request("scheduler", "task.status", {"id": task_id})
        return (yield from self._result_from_log(task))

    def wait(self, task_id: str, timeout: float | None = None, *,
             raise_on_failure: bool = False) -> dict:
        """Until the task ends; returns it. Timeout (the task as last seen in `.details`)
        if it does not end within `timeout` seconds (default the client's); TaskFailed
        for a task that did not complete when `raise_on_failure`."""
        end = self.session.clock() + self._span(timeout)
        task = yield from self._held_waits(task_id, end, None)
        return _ended((yield from self._result_from_log(task)), raise_on_failure)

    def cancel(self, task_id: str) -> dict:
        """Cancel a queued or running task; returns it (an ended task is left as it is)."""
        return (yield Request("scheduler", "task.cancel", {"id": task_id}))

    def list_tasks(self, state: str | None = None, limit: int = 100) -> list[dict]:
        """Tasks, newest first, optionally only those in `state`."""
        body = {"limit": limit}
        if state:
            body["state"] = state
        return (yield Request("scheduler", "task.list", body))["tasks"]

    def workers(self) -> list[dict]:
        """The workers the scheduler knows: name, types, state, task."""
        return (yield Request("scheduler", "worker.list"))["workers"]

    def progress(self, task_id: str, attempt: int, fraction: float, message: str = "") -> dict:
        """Report progress of a task run outside the pool (0 <= fraction <= 1)."""
        return (yield Request("scheduler", "task.progress", {
            "id": task_id, "attempt": attempt, "fraction": fraction, "message": message}))

    def reserve(self, task_id: str, amount: int, attempt: int = 1,
                task_type: str | None = None) -> dict:
        """Reserve tokens for work done outside the pool; BudgetExceeded if refused."""
        body = {"task": task_id, "attempt": attempt, "amount": amount, "agent": self.agent}
        if task_type:
            body["type"] = task_type
        reply = yield Request("ledger", "ledger.reserve", body)
        if not reply.get("granted"):
            raise errors.BudgetExceeded(reply.get("reason", "token budget exceeded"),
                                        details=reply)
        return reply

    def commit(self, task_id: str, used: int, attempt: int = 1) -> dict:
        """Settle a reservation: `used` tokens are spent, the rest is released."""
        return (yield Request("ledger", "ledger.commit",
                              {"task": task_id, "attempt": attempt, "used": used}))

    def release(self, task_id: str, attempt: int = 1) -> dict:
        """Give a reservation back unspent."""
        return (yield Request("ledger", "ledger.release", {"task": task_id, "attempt": attempt}))

    def budget(self) -> dict:
        """Every budget: limit, window, committed, reserved."""
        return (yield Request("ledger", "ledger.status"))

    def query_events(self, *, task: str | None = None, type: str | None = None,
                     worker: str | None = None, text: str | None = None,
                     since: float | None = None, until: float | None = None,
                     limit: int = 1000, newest: bool = False) -> dict:
        """Events from the log matching every filter given (`type`: a glob), the oldest
        first (`newest`: the newest first), at most `limit`: `{events, more}`, following
        `events.query`'s pages; `more`: more match than `limit`; `partial`: a page's read
        hit its time bound, so some may be missing (narrow the filters)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise errors.BadRequest("limit must be a positive integer")
        body = {key: value for key, value in (
            ("task", task), ("type", type), ("worker", worker), ("text", text),
            ("since", since), ("until", until)) if value is not None}
        body["newest"] = newest
        events: list[dict] = []
        page: dict = {"more": True, "cursor": None}
        partial = False
        while page.get("more") and len(events) < limit:
            ask = body | {"limit": min(QUERY_PAGE, limit - len(events))}
            if page.get("cursor") is not None:
                ask["after"] = page["cursor"]
            page = yield Request("events", "events.query", ask)
            events += page.get("events") or []
            partial = partial or bool(page.get("partial"))
            if not page.get("events"):
                break
        reply = {"events": events[:limit], "more": bool(page.get("more"))}
        return reply | {"partial": True} if partial else reply

    # -- shared by the plans ---------------------------------------------------------------
    def _span(self, timeout: float | None) -> float:
        return self.session.timeout if timeout is None else within(timeout)

    def _submit_body(self, task_type, description, priority, tokens, timeout, retries,
                     deadline, payload, idempotency_key, agent) -> dict:
        body = {"type": task_type, "description": description, "priority": priority,
                "tokens": tokens, "agent": agent or self.agent,
                "idempotency_key": idempotency_key or self.session.new_key()}
        if timeout is not None:
            body["timeout"] = timeout
        if retries is not None:
            body["retries"] = retries
        if deadline is not None:
            body["deadline"] = deadline
        if payload is not None:
            body["payload"] = payload
        return body

    def _batch_body(self, index: int, task: dict) -> dict:
        if not isinstance(task, dict) or not isinstance(task.get("type"), str):
            raise errors.BadRequest(f"submit_many: task {index} must be a dict with a "
                                    "'type'")
        unknown = set(task) - set(BATCH_FIELDS)
        if unknown:
            raise errors.BadRequest(f"submit_many: task {index} has unknown fields "
                                    f"{sorted(unknown)}")
        body = {k: v for k, v in task.items() if v is not None}
        body.setdefault("agent", self.agent)
        body.setdefault("idempotency_key", self.session.new_key())
        return body

    def _result_from_log(self, task: dict):
        """A finished task the scheduler has trimmed (payload and result dropped after a
        while) gets its result back from its `task.completed` event in the log."""
        if not (task.get("trimmed") and task.get("state") == "completed"):
            return task
        try:
            found = yield Request("events", "events.query", {
                "task": task["id"], "type": "task.completed", "limit": 1, "newest": True})
        except errors.CortexError:
            return task  # the router is away: the task without its result, still trimmed
        for event in found.get("events") or []:
            return task | {"result": (event.get("data") or {}).get("result")}
        return task

    def _held_waits(self, task_id: str, end: float, task: dict | None):
        """task.wait, each held up to WAIT_HOLD seconds, until the task ends or `end`."""
        clock = self.session.clock
        while True:
            left = end - clock()
            if task is not None and left <= 0:
                raise errors.Timeout(f"task {task_id} still {task.get('state')}",
                                     details=task)
            hold = min(WAIT_HOLD, max(0.0, left))
            try:
                task = yield Request("scheduler", "task.wait", {"id": task_id, "hold": hold},
                                     timeout=hold + REPLY_MARGIN,
                                     resend_after=hold + RESEND_AFTER)
            except (errors.Timeout, errors.Unavailable):
                if clock() >= end:
                    raise
                continue  # the scheduler is restarting: ask again until our deadline
            if task.get("final"):
                return task


def _batches(bodies: list[dict]):
    """Consecutive runs of at most MAX_SUBMIT_BATCH bodies whose encoding fits a
    message (a body too large alone goes alone: the scheduler answers it `too_large`)."""
    batch, size = [], 0
    for body in bodies:
        body_size = len(wire.encode_body(body))
        if batch and (len(batch) == MAX_SUBMIT_BATCH or size + body_size > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(body)
        size += body_size
    if batch:
        yield batch


def _ended(task: dict, raise_on_failure: bool) -> dict:
    if raise_on_failure and task.get("state") != "completed":
        error = task.get("error") or {}
        raise errors.TaskFailed(
            f"task {task.get('id')} {task.get('state')}: "
            f"{error.get('category', '?')}: {error.get('message', '')}".rstrip(": "),
            details=task)
    return task


# The operations both faces expose, each run by `calls.drive` (sync) or its async twin.
OPERATIONS = ("call", "submit", "submit_many", "submit_and_wait", "status", "wait", "cancel",
              "list_tasks", "workers", "progress", "reserve", "commit", "release", "budget",
              "query_events")
