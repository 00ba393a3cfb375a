"""What the dashboard knows of the suite, built from the live events and status polls.

Pure: no sockets, no clock of its own (every time is passed in), so each piece is tested
alone. The process feeds it events as they arrive and status replies once a second;
`Board.take_changes()` says, once per flush, what changed since the previous one, so
the page receives only that.

Everything kept is bounded: workers by what the pool and the scheduler report, the
queue by `MAX_QUEUE_ROWS`, events by `RECENT_EVENTS`, series by their time window.

While no one watches, the process stops following the live events and marks the board
stale (`go_dormant`); `rebuild` then catches it up from a status poll and the router's
recent events, as if it had followed them all along.
"""

from __future__ import annotations

import fnmatch
import hmac
import math
from collections import deque

from cortex.protocol.vocabulary import PRIORITIES
from cortex.services.dashboard.series import Latency, Resources

RECENT_EVENTS = 5000  # kept here for a page that changes its filter
PAGE_EVENTS = 1000  # what a page keeps, and the most it is sent at once
MAX_QUEUE_ROWS = 500
QUEUE_EVERY = 0.5  # seconds between two sendings of the queue table
RECENT_NOTES = 30  # rejections and overruns listed with their reasons
GONE_AFTER = 30.0  # seconds a lost or exited worker stays on screen
FILTER_FIELDS = ("type", "task", "worker", "text")


class BadInput(Exception):
    """Input from a page that cannot be used; `code` is the stable error code."""

    code = "bad_request"


def token_ok(expected: str, given) -> bool:
    """Constant-time comparison, so the token cannot be guessed byte by byte."""
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())


def _text(value, name: str, limit: int = 200) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise BadInput(f"{name} must be a string of at most {limit} characters")
    return value


class EventFilter:
    """The events page's filter: a type glob, a task, a worker, a text (all must match)."""

    def __init__(self, type: str | None = None, task: str | None = None,  # noqa: A002
                 worker: str | None = None, text: str | None = None):
        self.type = _text(type, "type")
        self.task = _text(task, "task")
        self.worker = _text(worker, "worker")
        self.text = _text(text, "text")
        self._needle = self.text.lower() if self.text else None

    @classmethod
    def from_dict(cls, raw) -> EventFilter:
        if not isinstance(raw, dict):
            raise BadInput("a filter is an object")
        unknown = set(raw) - set(FILTER_FIELDS)
        if unknown:
            raise BadInput(f"unknown filter field(s): {', '.join(sorted(map(str, unknown)))}")
        return cls(**{k: raw.get(k) for k in FILTER_FIELDS})

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in FILTER_FIELDS if getattr(self, k) is not None}

    @property
    def empty(self) -> bool:
        return not self.as_dict()

    def matches(self, event: dict) -> bool:
        if self.task is not None and event.get("task") != self.task:
            return False
        if self.worker is not None and event.get("worker") != self.worker:
            return False
        if self.type is not None:
            kind = event.get("type")
            if not isinstance(kind, str) or not fnmatch.fnmatchcase(kind, self.type):
                return False
        if self._needle is not None:
            blob = f"{event.get('type')} {event.get('task')} {event.get('worker')} " \
                   f"{event.get('data')}".lower()
            if self._needle not in blob:
                return False
        return True


# -- the fleet ---------------------------------------------------------------------------

class Fleet:
    """One row per worker: its state, its task and since when, the task it holds to start
    next (`next`, prefetched), its process figures.

    Events move a worker at once (dispatched: busy, finished: idle, lost, exited); the
    polls of the scheduler's worker list and the pool's children correct what an event
    missed (the dashboard may drop events under load) and add pid, memory and CPU."""

    def __init__(self):
        self.workers: dict[str, dict] = {}
        self.changed: set[str] = set()

    def _row(self, name: str, now: float | None = None) -> dict:
        """The worker's row (made if new); `now` is given when an event touches it."""
        row = self.workers.get(name)
        if row is None:
            row = self.workers[name] = {
                "name": name, "group": None, "types": [], "state": "starting", "task": None,
                "next": None, "since": None, "pid": None, "extra": False, "rss_mb": None,
                "cpu_s": None, "done": 0, "gone_at": None, "touched": -math.inf}
        if now is not None:
            row["touched"] = now
        self.changed.add(name)
        return row

    def on_event(self, event: dict, now: float) -> None:
        name = event.get("worker")
        kind = event.get("type")
        if not isinstance(name, str) or not isinstance(kind, str):
            return
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        ts = event.get("ts") if isinstance(event.get("ts"), int | float) else None
        task = event.get("task")
        if kind == "worker.spawned":
            row = self._row(name, now)
            row.update(state="starting", pid=data.get("pid"), group=data.get("group"),
                       extra=bool(data.get("extra")), gone_at=None)
        elif kind == "worker.registered":
            row = self._row(name, now)
            row.update(state="idle", types=list(data.get("types") or []), gone_at=None)
            row["pid"] = data.get("pid") or row["pid"]
        elif kind == "task.dispatched" and data.get("prefetched"):
            self._row(name, now)["next"] = task  # it waits for the task its worker runs
        elif kind in ("task.dispatched", "task.started"):
            row = self._row(name, now)
            if row["task"] != task or row["state"] != "busy":
                row.update(state="busy", task=task, since=data.get("at") or ts)
            if row["next"] == task:
                row["next"] = None
        elif kind in ("task.completed", "task.failed", "task.cancelled", "task.dead"):
            row = self.workers.get(name)
            if row is not None and row["task"] == task and row["state"] == "busy":
                row = self._row(name, now)
                row.update(state="idle", task=None, since=ts, done=row["done"] + 1)
            elif row is not None and row["next"] == task:
                self._row(name, now)["next"] = None
        elif kind == "task.recalled" and self.workers.get(name, {}).get("next") == task:
            self._row(name, now)["next"] = None  # given back to the queue
        elif kind == "worker.lost":
            row = self._row(name, now)
            row.update(state="lost", next=None, gone_at=now)
        elif kind == "worker.exited":
            row = self._row(name, now)
            row.update(state="exited", task=None, next=None, gone_at=now)
        elif kind.startswith("worker."):
            # A worker's own state change (leaving, stopping, ...), however it is named.
            state = data.get("to") or data.get("state")
            if isinstance(state, str):
                row = self._row(name, now)
                row["state"] = "stopping" if state in ("leaving", "stopping") else state

    def merge_poll(self, scheduler_rows: list | None, pool_rows: list | None,
                   asked_at: float, now: float, wall: float | None = None) -> None:
        """Correct the rows from the scheduler's and the pool's lists (None: that service
        did not answer), asked for at `asked_at`: an event since then wins over them."""
        pool = {w["name"]: w for w in pool_rows or [] if isinstance(w.get("name"), str)}
        sched = {w["name"]: w for w in scheduler_rows or [] if isinstance(w.get("name"), str)}
        for name in pool.keys() | sched.keys():
            row = self.workers.get(name)
            newer = row is not None and row["touched"] >= asked_at
            row = row if row is not None else self._row(name)
            before = dict(row)
            proc, known = pool.get(name), sched.get(name)
            if proc is not None:  # process figures: the pool's word is the latest
                row.update({k: proc[k] for k in ("group", "pid", "rss_mb", "cpu_s")
                            if proc.get(k) is not None})
                row["extra"] = bool(proc.get("extra"))
            elif pool_rows is not None:
                row["group"] = row["group"] or "external"  # not one of the pool's
            if known is not None:
                row["types"] = list(known.get("types") or row["types"])
                row["pid"] = row["pid"] or known.get("pid")
                row["done"] = max(row["done"], known.get("done") or 0)
            if not newer:
                if known is not None:
                    state = {"leaving": "stopping", "claimed": "idle"}.get(
                        known.get("state"), known.get("state"))
                    task = known.get("task") if state == "busy" else None
                    if state == "busy" and task != row["task"]:
                        row["since"] = wall  # busy before we looked: known from now on
                    row.update(state=state, task=task, gone_at=None,
                               next=known.get("prefetched") if state == "busy" else None)
                elif scheduler_rows is not None and row["state"] not in ("lost", "exited"):
                    row["state"] = "starting"  # a process the scheduler does not know yet
            if row != before:
                self.changed.add(name)
        if scheduler_rows is None or pool_rows is None:
            return  # a service did not answer: absence proves nothing
        for name, row in list(self.workers.items()):
            if name in pool or name in sched or row["touched"] >= asked_at:
                continue
            if row["gone_at"] is None:
                row.update(state="exited", task=None, next=None, gone_at=now)
                self.changed.add(name)
            elif now - row["gone_at"] >= GONE_AFTER:
                del self.workers[name]
                self.changed.add(name)

    def take_changes(self) -> dict[str, dict | None]:
        out = {name: self.public(self.workers[name]) if name in self.workers else None
               for name in self.changed}
        self.changed = set()
        return out

    def snapshot(self) -> dict[str, dict]:
        return {name: self.public(row) for name, row in self.workers.items()}

    @staticmethod
    def public(row: dict) -> dict:
        return {k: v for k, v in row.items() if k not in ("touched", "gone_at")}


# -- the queue ---------------------------------------------------------------------------

def queue_row(task: dict) -> dict:
    """What the queue page shows of a queued task (from `task.list`)."""
    times = task.get("times") if isinstance(task.get("times"), dict) else {}
    return {"id": task.get("id"), "type": task.get("type"), "priority": task.get("priority"),
            "agent": task.get("agent"), "waiting": task.get("waiting"),
            "detail": task.get("waiting_detail"), "eta": task.get("eta"),
            "created": times.get("created"), "attempt": task.get("attempt"),
            "description": str(task.get("description") or "")[:120]}


class Queue:
    """Queued tasks (the newest `MAX_QUEUE_ROWS`), their waiting reasons and ETAs, and the
    admission counts; events move rows between the polls."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        # Prefetched tasks not started yet (bounded as the rows): a recall gives one back.
        self.held: dict[str, dict] = {}
        self.totals: dict = {"by_priority": dict.fromkeys(PRIORITIES, 0), "total": 0}
        self.admission: dict = {"admitted": 0, "refused": 0, "rejected": 0, "codes": {}}
        self.refusals: deque[dict] = deque(maxlen=RECENT_NOTES)
        self.dirty = True

    def on_event(self, event: dict) -> None:
        kind, task = event.get("type"), event.get("task")
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        if kind == "task.created" and isinstance(task, str):
            if len(self.rows) < MAX_QUEUE_ROWS:
                self.rows[task] = {
                    "id": task, "type": data.get("type"), "priority": data.get("priority"),
                    "agent": data.get("agent"), "waiting": "worker", "detail": None,
                    "eta": data.get("eta"), "created": event.get("ts"), "attempt": 1,
                    "description": str(data.get("description") or "")[:120]}
            self.admission["admitted"] += 1
        elif kind == "task.waiting" and task in self.rows:
            detail = {k: v for k, v in data.items() if k != "reason"} or None
            self.rows[task].update(waiting=data.get("reason"), detail=detail)
        elif kind == "task.dispatched" and isinstance(task, str):
            shown = self.rows.pop(task, None)
            row = shown or self.held.pop(task, None)
            if data.get("prefetched"):
                self._hold(task, row, data)
            if shown is None:
                return  # the view is unchanged
        elif kind == "task.recalled" and task in self.held:
            row = self.held.pop(task)  # given back: queued again, waiting for a worker
            if len(self.rows) < MAX_QUEUE_ROWS:
                self.rows[task] = {**row, "waiting": "worker", "detail": None}
        elif kind in ("task.started", "task.cancelled", "task.failed", "task.dead",
                      "task.completed") and (task in self.rows or task in self.held):
            self.held.pop(task, None)
            if self.rows.pop(task, None) is None:
                return  # the view is unchanged
        elif kind == "scheduler.rejected":
            code = data.get("code") or "unknown"
            self.admission["refused" if code == "queue_full" else "rejected"] += 1
            self.admission["codes"][code] = self.admission["codes"].get(code, 0) + 1
            self.refusals.appendleft({"ts": event.get("ts"), "code": code,
                                      "type": data.get("type"),
                                      "priority": data.get("priority"),
                                      "reason": str(data.get("reason") or "")[:300]})
        else:
            return
        self.dirty = True

    def _hold(self, task: str, row: dict | None, data: dict) -> None:
        """Keep a prefetched task's row (made from its dispatch if it had none here)."""
        if row is None:
            row = {"id": task, "type": None, "priority": data.get("priority"),
                   "agent": data.get("agent"), "eta": None, "created": None,
                   "description": ""}
        row["attempt"] = data.get("attempt") or row.get("attempt")
        self.held[task] = row
        while len(self.held) > MAX_QUEUE_ROWS:
            del self.held[next(iter(self.held))]  # the oldest: its recall is the least likely

    def merge_poll(self, tasks: list | None, status: dict | None,
                   metrics: dict | None) -> None:
        if tasks is not None:
            self.rows = {t["id"]: queue_row(t) for t in tasks[-MAX_QUEUE_ROWS:]
                         if isinstance(t, dict) and isinstance(t.get("id"), str)}
        if status is not None:
            by_priority = status.get("queue") if isinstance(status.get("queue"), dict) else {}
            self.totals = {"by_priority": by_priority, "total": sum(
                v for v in by_priority.values() if isinstance(v, int)),
                "waiting": status.get("waiting"), "backoff": status.get("backoff"),
                "memory_pressure": status.get("memory_pressure")}
        if metrics is not None:
            codes = metrics.get("rejections") if isinstance(metrics.get("rejections"),
                                                             dict) else {}
            tasks_ = metrics.get("tasks") if isinstance(metrics.get("tasks"), dict) else {}
            self.admission = {
                "admitted": tasks_.get("created", 0), "codes": dict(codes),
                "refused": codes.get("queue_full", 0),
                "rejected": sum(n for c, n in codes.items() if c != "queue_full")}
        self.dirty = True

    def view(self) -> dict:
        return {"rows": list(self.rows.values()), "totals": self.totals,
                "admission": self.admission, "refusals": list(self.refusals)}


# -- budgets -----------------------------------------------------------------------------

class Budgets:
    """Every budget scope as the ledger reports it, and the recent overruns."""

    def __init__(self):
        self.rows: list[dict] = []
        self.overruns: deque[dict] = deque(maxlen=RECENT_NOTES)
        self.dirty = True
        self.stale = True  # a ledger event came: ask the ledger again soon

    def on_event(self, event: dict) -> None:
        kind = event.get("type")
        if not isinstance(kind, str) or not kind.startswith("ledger."):
            return
        self.stale = True
        if kind == "ledger.overrun":
            data = event.get("data") if isinstance(event.get("data"), dict) else {}
            self.overruns.appendleft({"ts": event.get("ts"), "task": event.get("task"),
                                      "data": data})
            self.dirty = True

    def merge_poll(self, budgets: list | None) -> None:
        self.stale = False
        if budgets is not None and budgets != self.rows:
            self.rows = [b for b in budgets if isinstance(b, dict)]
            self.dirty = True

    def view(self) -> dict:
        return {"rows": self.rows, "overruns": list(self.overruns)}


# -- services ----------------------------------------------------------------------------

class Services:
    """Each service: does it answer on the bus, its pid and start time, and the last
    state supervisord reported for it (from the `supervisor.process_*` events)."""

    def __init__(self, names):
        self.rows = {name: {"name": name, "answering": None, "pid": None, "started": None,
                            "supervisor": None} for name in names}
        self.dirty = True

    def on_event(self, event: dict) -> None:
        kind = event.get("type")
        if not isinstance(kind, str) or not kind.startswith("supervisor.process_"):
            return
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        row = self.rows.get(data.get("name"))
        if row is not None:
            row["supervisor"] = kind[len("supervisor.process_"):].upper()
            if data.get("pid"):
                row["pid"] = data["pid"]
            self.dirty = True

    def merge_poll(self, name: str, reply: dict | None, now: float) -> None:
        row = self.rows[name]
        before = dict(row)
        row["answering"] = reply is not None
        if reply is not None:
            row["pid"] = reply.get("pid") or row["pid"]
            uptime = reply.get("uptime")
            if isinstance(uptime, int | float):
                row["started"] = now - uptime
            elif isinstance(reply.get("started"), int | float):
                row["started"] = reply["started"]
            if row["supervisor"] in (None, "STARTING", "BACKOFF", "EXITED"):
                row["supervisor"] = "RUNNING"  # it answers: it runs
        if row != before:
            self.dirty = True

    def view(self) -> list[dict]:
        return list(self.rows.values())


class Board:
    """Everything the pages show; the process feeds it and sends what changed."""

    def __init__(self, services):
        self.fleet = Fleet()
        self.queue = Queue()
        self.budgets = Budgets()
        self.services = Services(services)
        self.resources = Resources()
        self.latency = Latency()
        self.recent: deque[dict] = deque(maxlen=RECENT_EVENTS)
        self.counts = {"events": 0}
        self.pending: dict = {}  # parts of the next update not in the components
        self.next_queue = -math.inf
        # Not following the live events: what only they keep (worker moves, notes, the
        # recent events) is as old as `dormant_since`; polls still refresh the rest.
        self.dormant_since: float | None = None
        self.rebuilt_at: float | None = None  # wall time of the last catch-up

    def on_event(self, event: dict, now: float) -> None:
        self.counts["events"] += 1
        self.recent.append(event)
        self._apply(event, now)

    def _apply(self, event: dict, now: float) -> None:
        """The event's effect on every component but the recent list and the count."""
        self.fleet.on_event(event, now)
        self.queue.on_event(event)
        self.budgets.on_event(event)
        self.services.on_event(event)

    def merge_poll(self, poll: dict, asked: float, now: float, wall: float) -> None:
        """A status poll, asked at monotonic `asked` (wall time `wall`), answered by `now`:
        `poll` holds `status` (service -> its status reply), `workers` (worker.list),
        `queued` (task.list) and `metrics` (events.metrics), each None when unanswered."""
        status = poll.get("status") or {}
        workers, queued, metrics = poll.get("workers"), poll.get("queued"), poll.get("metrics")
        for name in self.services.rows:
            self.services.merge_poll(name, status.get(name), wall)
        pool = status.get("pool")
        self.fleet.merge_poll(workers.get("workers") if workers else None,
                              pool.get("workers") if pool else None, asked, now, wall)
        self.queue.merge_poll(queued.get("tasks") if queued else None, status.get("scheduler"),
                              metrics)
        ledger = status.get("ledger")
        self.budgets.merge_poll(ledger.get("budgets") if ledger else None)
        if metrics:
            point = self.latency.add(wall, metrics)
            if point is not None:
                self.pending["latency_point"] = point
            self.pending["latency_summary"] = self.latency.summary

    def go_dormant(self, wall: float) -> None:
        """No longer fed the live events (until `rebuild`)."""
        if self.dormant_since is None:
            self.dormant_since = wall

    def rebuild(self, poll: dict, recent: list[dict] | None, live: list[dict],
                asked: float, wall: float, now: float) -> None:
        """Catch up after a dormant spell, as if the live events had come all along.

        `poll` (see `merge_poll`) was asked at monotonic `asked`, wall time `wall`;
        `recent` are the router's newest events (oldest first, None: it did not answer),
        asked after the live feed was on again; `live` the live events received since it
        was. What only events keep (worker moves, prefetched tasks, rejections, overruns,
        supervisord states) is rebuilt from `recent`: those older than the poll before
        it (the poll wins over them, as it does over any event it follows), the newer
        ones after it. Then the live events the recent ones do not hold (by id), in the
        order they came: an event is applied once, and none is missed."""
        if recent is None:  # no word from the router: the events-only parts stay as kept
            self.merge_poll(poll, asked, now, wall)
            fresh = live
        else:
            known = {e.get("id") for e in self.recent}
            admission = self.queue.admission  # the router's counts, if its metrics are late
            self.fleet, self.queue, self.budgets = Fleet(), Queue(), Budgets()
            self.queue.admission = admission
            self.recent = deque(recent, maxlen=RECENT_EVENTS)
            self.counts["events"] += sum(1 for e in recent if e.get("id") not in known)
            later = []
            for event in recent:
                ts = event.get("ts")
                if isinstance(ts, int | float) and ts < wall:
                    self._apply(event, asked - (wall - ts))  # when it happened, roughly
                else:
                    later.append(event)
            self.merge_poll(poll, asked, now, wall)
            for event in later:
                self._apply(event, now)
            ids = {e.get("id") for e in recent}
            fresh = [e for e in live if e.get("id") is None or e.get("id") not in ids]
        for event in fresh:
            self.on_event(event, now)
        self.dormant_since = None
        self.rebuilt_at = wall

    def matching(self, flt: EventFilter, limit: int = PAGE_EVENTS) -> list[dict]:
        """The newest `limit` recent events the filter lets through, oldest first."""
        out = []
        for event in reversed(self.recent):
            if flt.matches(event):
                out.append(event)
                if len(out) >= limit:
                    break
        out.reverse()
        return out

    def snapshot(self) -> dict:
        return {"fleet": self.fleet.snapshot(), "queue": self.queue.view(),
                "budgets": self.budgets.view(), "services": self.services.view(),
                "resources": self.resources.view(), "latency": self.latency.view(),
                "counts": dict(self.counts), "feed": self.feed()}

    def feed(self) -> dict:
        """Whether the board follows the live events, or since when it has not."""
        return {"dormant": self.dormant_since is not None,
                "dormant_since": self.dormant_since, "rebuilt_at": self.rebuilt_at}

    def take_changes(self, now: float) -> dict:
        """What changed since the last call (empty when nothing did). The queue, a
        table of up to `MAX_QUEUE_ROWS`, goes at most every `QUEUE_EVERY` seconds."""
        out = dict(self.pending)
        self.pending = {}
        fleet = self.fleet.take_changes()
        if fleet:
            out["fleet"] = fleet
        for name in ("queue", "budgets", "services"):
            part = getattr(self, name)
            if name == "queue" and part.dirty:
                if now < self.next_queue:
                    continue
                self.next_queue = now + QUEUE_EVERY
            if part.dirty:
                part.dirty = False
                out[name] = part.view()
        if out:
            out["counts"] = dict(self.counts)
        return out
