"""Streaming metrics of the event stream: latency histograms, counters, gauges.

The event router feeds every event it accepts to `Metrics.observe`; nothing here does
I/O or keeps per-event state beyond a bounded table of tasks in flight, so memory stays
bounded however long the suite runs:

* latency histograms per task type and priority, for three stages:
  ``queue`` (submit -> handler start), ``run`` (handler start -> end) and ``total``
  (submit -> end). Buckets are fixed and log-spaced, 12 per decade from 10 us to
  10,000 s (one bucket spans a factor of 10^(1/12) ~ 1.21), so a percentile estimated
  from the buckets is within that factor of the exact one (and clamped to the observed
  min/max);
* counters: tasks by state (created, completed, failed, dead, cancelled, retried,
  rejected at admission) per type and priority, events by type, rejections by code,
  supervisord process restarts, crashes and FATALs per process, worker exits and losses;
* gauges set from outside (`set_gauge`), e.g. the PostgreSQL lag; a gauge may be a
  callable, evaluated when read.

`summary()` is what `cortex status` shows; `render_prometheus()` is the Prometheus
text exposition format, made by prometheus-client from these figures and the suite's
gauges the router polls (queue depth, workers by state, budgets: `set_suite`);
`serve(port, token)` exposes it at ``http://127.0.0.1:PORT/metrics`` from a daemon
thread.

Threads: `observe` and `set_gauge` run on the router's loop; `render_prometheus` and
`summary` may run on the HTTP thread. They read through C-level copies (``dict.copy``,
``list(...)``), which the GIL makes atomic, so no lock is taken on the hot path; a
scrape may see a histogram a few events apart from its neighbour, never a torn one.
"""

from __future__ import annotations

import hmac
import math
import threading
from bisect import bisect_left
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from cortex.protocol.vocabulary import PRIORITIES

__all__ = ["BOUNDS", "Histogram", "Metrics", "MetricsServer", "STAGES"]

PER_DECADE = 12
LOW_EXP, HIGH_EXP = -5, 4  # bucket bounds from 1e-5 s to 1e4 s
BOUNDS: tuple[float, ...] = tuple(
    float(f"{10 ** (LOW_EXP + i / PER_DECADE):.6g}")
    for i in range((HIGH_EXP - LOW_EXP) * PER_DECADE + 1))
# Prometheus gets every 4th bound (10^(1/3) apart): exact cumulative counts, fewer lines.
EXPORT_EVERY = 4
STAGES = ("queue", "run", "total")
STAGE_HELP = {
    "queue": "Task submit to handler start (first attempt), seconds",
    "run": "Task handler start to end (final attempt), seconds",
    "total": "Task submit to final end, seconds",
}
FINAL = {"task.completed": "completed", "task.failed": "failed", "task.dead": "dead",
         "task.cancelled": "cancelled"}
TASK_STATES = ("created", "completed", "failed", "dead", "cancelled", "retried", "rejected")

MAX_TRACKED_TASKS = 200_000  # tasks in flight remembered; the oldest tenth goes past it
MAX_SERIES = 256  # (type, priority) pairs; more are counted under type "other"
MAX_LABELS = 512  # distinct event types, rejection codes, process names
OTHER = "other"
READ_TIMEOUT = 5.0  # seconds a /metrics connection may take to send its request
MAX_CONNECTIONS = 16  # /metrics connections served at once; more are closed at once
BUDGET_AMOUNTS = ("limit", "reserved", "leased", "committed", "available")


def _number(v) -> bool:
    """A finite, non-negative int or float (not bool, not NaN)."""
    return (type(v) is float or type(v) is int) and 0 <= v < math.inf


class Histogram:
    """Counts per fixed log-spaced bucket; bucket i holds BOUNDS[i-1] < v <= BOUNDS[i]
    (bucket 0 everything <= BOUNDS[0], the last one everything above BOUNDS[-1])."""

    __slots__ = ("counts", "sum", "min", "max")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0

    def add(self, v: float) -> None:
        self.counts[bisect_left(BOUNDS, v)] += 1
        self.sum += v
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merge(self, other: Histogram) -> None:
        counts = list(other.counts)
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float | None:
        """Estimate of the nearest-rank q-quantile (0 < q <= 1); None when empty."""
        counts = list(self.counts)
        total = sum(counts)
        if not total:
            return None
        rank = max(1, math.ceil(q * total))
        seen = i = 0
        while seen + counts[i] < rank:
            seen += counts[i]
            i += 1
        n = counts[i]
        frac = (rank - seen) / n  # position inside bucket i, in (0, 1]
        if i == 0:
            est = BOUNDS[0] * frac
        elif i == len(BOUNDS):
            est = self.max
        else:
            lo, hi = BOUNDS[i - 1], BOUNDS[i]
            est = lo * (hi / lo) ** frac
        return min(max(est, self.min), self.max)

    def stats(self) -> dict:
        n = self.count
        out = {"count": n}
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            out[name] = self.percentile(q)
        out["mean"] = self.sum / n if n else None
        out["max"] = self.max if n else None
        return out


class _Series:
    """Everything kept per (task type, priority)."""

    __slots__ = ("hists", "states")

    def __init__(self) -> None:
        self.hists = {stage: Histogram() for stage in STAGES}
        self.states = dict.fromkeys(TASK_STATES, 0)


class Metrics:
    def __init__(self, max_tracked: int = MAX_TRACKED_TASKS) -> None:
        self.max_tracked = max_tracked
        self.series: dict[tuple[str, str], _Series] = {}
        # task id -> [created ts, type, priority, first start or None]
        self.tasks: dict[str, list] = {}
        self.events: dict[str, int] = {}
        self.rejections: dict[str, int] = {}
        self.restarts: dict[str, int] = {}  # supervisord restarted it after an exit
        self.crashes: dict[str, int] = {}  # exited when supervisord did not expect it
        self.fatal: dict[str, int] = {}
        self.worker_exits: dict[str, int] = {"exited": 0, "lost": 0}
        self.gauges: dict[str, float | Callable[[], float]] = {}
        self.suite: dict = {}  # queue, workers, budgets: see set_suite
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self.observed = 0
        self.malformed = 0
        self.untracked = 0  # tasks ending with no task.created seen (e.g. router restarted)
        self._handlers: dict[str, Callable[[dict, dict], None]] = {
            "task.created": self._created,
            "task.started": self._started,
            "task.retry": self._retry,
            "scheduler.rejected": self._rejected,
            "worker.exited": self._worker_exited,
            "worker.lost": self._worker_lost,
            "supervisor.process_starting": self._proc_starting,
            "supervisor.process_exited": self._proc_exited,
            "supervisor.process_fatal": self._proc_fatal,
        }
        for type_ in FINAL:
            self._handlers[type_] = self._finished

    # -- the hot path ---------------------------------------------------------------------
    def observe(self, event: dict) -> None:
        """Account for one event. Never raises on a malformed one (counts it)."""
        try:
            type_ = event["type"]
            if type(type_) is not str:
                raise TypeError
            self.observed += 1
            events = self.events
            n = events.get(type_)
            if n is not None:
                events[type_] = n + 1
            else:
                self._bump(events, type_)
            handler = self._handlers.get(type_)
            if handler is not None:
                data = event.get("data")
                handler(event, data if type(data) is dict else {})
        except (KeyError, TypeError, AttributeError, ValueError):
            self.malformed += 1

    def observe_many(self, events) -> None:
        observe = self.observe
        for event in events:
            observe(event)

    def set_gauge(self, name: str, value: float | Callable[[], float]) -> None:
        """Set gauge `name` (a number, or a callable read when the gauge is read)."""
        self.gauges[name] = value

    # -- handlers -------------------------------------------------------------------------
    @staticmethod
    def _bump(counter: dict[str, int], key, n: int = 1) -> None:
        key = key if type(key) is str else str(key)
        if key not in counter and len(counter) >= MAX_LABELS:
            key = OTHER
        counter[key] = counter.get(key, 0) + n

    def _series(self, type_, priority) -> _Series:
        key = (type_, priority)
        s = self.series.get(key)
        if s is None:
            if type(type_) is not str:
                type_ = "unknown" if type_ is None else OTHER
            if priority not in PRIORITIES:
                priority = "unknown" if priority is None else OTHER
            key = (type_, priority)
            s = self.series.get(key)
            if s is None:
                if len(self.series) >= MAX_SERIES:
                    key = (OTHER, priority)
                    s = self.series.get(key)
                if s is None:
                    s = self.series[key] = _Series()
        return s

    def _created(self, event: dict, data: dict) -> None:
        task, ts = event.get("task"), event.get("ts")
        if type(task) is not str or not _number(ts):
            return
        type_, priority = data.get("type"), data.get("priority")
        tasks = self.tasks
        if task not in tasks and len(tasks) >= self.max_tracked:
            # Forget the oldest tenth in one pass (a dict is in insertion order).
            self.tasks = tasks = dict(islice(tasks.items(), len(tasks) // 10, None))
        tasks[task] = [ts, type_, priority, None]
        self._series(type_, priority).states["created"] += 1

    def _started(self, event: dict, data: dict) -> None:
        rec = self.tasks.get(event.get("task"))
        if rec is None or rec[3] is not None:
            return  # unknown task, or a retry's start: the queue stage counts the first
        at = data.get("at")
        if not _number(at):
            at = event.get("ts")
            if not _number(at):
                return
        rec[3] = at
        wait = at - rec[0]
        self._series(rec[1], rec[2]).hists["queue"].add(wait if wait > 0 else 0.0)

    def _finished(self, event: dict, data: dict) -> None:
        rec = self.tasks.pop(event.get("task"), None)
        if rec is not None:
            series = self._series(rec[1], rec[2])
        else:
            self.untracked += 1
            series = self._series(data.get("type"), data.get("priority"))
        series.states[FINAL[event["type"]]] += 1
        if event["type"] == "task.cancelled":
            return  # no handler end to measure
        duration = data.get("duration")
        if _number(duration):
            series.hists["run"].add(duration)
        ts = event.get("ts")
        if rec is not None and _number(ts):
            total = ts - rec[0]
            series.hists["total"].add(total if total > 0 else 0.0)
        elif _number(duration) and _number(data.get("queued")):
            series.hists["total"].add(data["queued"] + duration)  # created before we ran

    def _retry(self, event: dict, data: dict) -> None:
        rec = self.tasks.get(event.get("task"))
        series = self._series(rec[1], rec[2]) if rec is not None else self._series(None, None)
        series.states["retried"] += 1

    def _rejected(self, event: dict, data: dict) -> None:
        self._bump(self.rejections, data.get("code") or "unknown")
        self._series(data.get("type"), data.get("priority")).states["rejected"] += 1

    def _worker_exited(self, event: dict, data: dict) -> None:
        self.worker_exits["exited"] += 1

    def _worker_lost(self, event: dict, data: dict) -> None:
        self.worker_exits["lost"] += 1

    def _proc_starting(self, event: dict, data: dict) -> None:
        if data.get("from_state") in ("EXITED", "BACKOFF"):
            self._bump(self.restarts, data.get("name") or "unknown")

    def _proc_exited(self, event: dict, data: dict) -> None:
        if data.get("expected") is False:
            self._bump(self.crashes, data.get("name") or "unknown")

    def _proc_fatal(self, event: dict, data: dict) -> None:
        self._bump(self.fatal, data.get("name") or "unknown")

    # -- reading --------------------------------------------------------------------------
    def gauge_values(self) -> dict[str, float]:
        out = {}
        for name, value in self.gauges.copy().items():
            if callable(value):
                try:
                    value = value()
                except Exception:  # noqa: BLE001 - a failing probe is an absent gauge
                    continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[name] = value
        return out

    def latency(self, type_: str | None = None, priority: str | None = None) -> dict:
        """Stage -> stats, merged over the series matching the filters (None: any)."""
        merged = {stage: Histogram() for stage in STAGES}
        for (t, p), s in self.series.copy().items():
            if (type_ is None or t == type_) and (priority is None or p == priority):
                for stage in STAGES:
                    merged[stage].merge(s.hists[stage])
        return {stage: h.stats() for stage, h in merged.items()}

    def summary(self) -> dict:
        """JSON-able digest: per type/priority counts and p50/p95/p99 of each stage."""
        rows = []
        totals = dict.fromkeys(TASK_STATES, 0)
        for (t, p), s in sorted(self.series.copy().items()):
            states = s.states.copy()
            for k, v in states.items():
                totals[k] += v
            rows.append({"type": t, "priority": p, "tasks": states,
                         **{stage: s.hists[stage].stats() for stage in STAGES}})
        return {
            "latency": rows,
            "overall": self.latency(),
            "tasks": totals,
            "in_flight": len(self.tasks),
            "events": {"observed": self.observed, "malformed": self.malformed,
                       "by_type": dict(sorted(self.events.copy().items()))},
            "rejections": self.rejections.copy(),
            "restarts": self.restarts.copy(),
            "crashes": self.crashes.copy(),
            "fatal": self.fatal.copy(),
            "worker_exits": self.worker_exits.copy(),
            "gauges": self.gauge_values(),
        }

    def set_suite(self, queue: dict | None = None, workers: dict | None = None,
                  budgets: list | None = None) -> None:
        """What the router last heard from the scheduler (queue depth per priority,
        workers per type and state) and the ledger (budgets): gauges for Prometheus."""
        if queue is not None:
            self.suite["queue"] = queue
        if workers is not None:
            self.suite["workers"] = workers
        if budgets is not None:
            self.suite["budgets"] = budgets

    def render_prometheus(self) -> bytes:
        """The Prometheus text exposition format, written by prometheus-client."""
        return generate_latest(self.registry)

    def serve(self, port: int, token: str, host: str = "127.0.0.1") -> MetricsServer:
        """Serve /metrics on host:port (0: any free port) to requests that carry
        `Authorization: Bearer <token>`, from a daemon thread; returns a callable that
        stops it (with `.port` and `.url`)."""
        return MetricsServer(self, port, token, host)


class _Collector:
    """Metrics as prometheus-client metric families, made at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self):
        m = self.m
        series = sorted(m.series.copy().items())
        for stage in STAGES:
            family = HistogramMetricFamily(f"cortex_task_{stage}_seconds", STAGE_HELP[stage],
                                           labels=("type", "priority"))
            for (t, p), s in series:
                h = s.hists[stage]
                counts, cumulative, buckets = list(h.counts), 0, []
                for i, n in enumerate(counts[:-1]):
                    cumulative += n
                    if i % EXPORT_EVERY == 0:
                        buckets.append((repr(BOUNDS[i]), cumulative))
                buckets.append(("+Inf", cumulative + counts[-1]))
                family.add_metric((t, p), buckets, h.sum)
            yield family
        tasks = CounterMetricFamily("cortex_tasks", "Tasks by state reached, type and priority",
                                    labels=("type", "priority", "state"))
        for (t, p), s in series:
            for state, n in s.states.copy().items():
                tasks.add_metric((t, p, state), n)
        yield tasks
        yield GaugeMetricFamily("cortex_tasks_in_flight", "Tasks created and not yet ended",
                                value=len(m.tasks))
        yield _labelled(CounterMetricFamily, "cortex_events", "Events through the router, "
                        "by type", "type", m.events)
        yield CounterMetricFamily("cortex_events_malformed", "Events metrics could not read",
                                  value=m.malformed)
        for name, help_, counter, label in (
                ("cortex_rejections", "Tasks refused at admission, by code", m.rejections,
                 "code"),
                ("cortex_process_restarts", "Restarts by supervisord after an exit",
                 m.restarts, "process"),
                ("cortex_process_crashes", "Unexpected exits seen by supervisord", m.crashes,
                 "process"),
                ("cortex_process_fatal", "Processes supervisord gave up on (FATAL)", m.fatal,
                 "process"),
                ("cortex_worker_exits", "Worker processes that exited or were lost",
                 m.worker_exits, "kind")):
            yield _labelled(CounterMetricFamily, name, help_, label, counter)
        yield from self._suite()
        for gname, value in sorted(m.gauge_values().items()):
            yield GaugeMetricFamily("cortex_" + _metric_name(gname),
                                    f"Gauge {gname} set by the event router", value=value)

    def _suite(self):
        suite = self.m.suite
        yield _labelled(GaugeMetricFamily, "cortex_queue_depth",
                        "Tasks queued, by priority (from the scheduler)", "priority",
                        suite.get("queue") or {})
        workers = GaugeMetricFamily("cortex_workers", "Workers by task type and state "
                                    "(idle, busy, leaving; from the scheduler)",
                                    labels=("type", "state"))
        for task_type, states in sorted((suite.get("workers") or {}).items())[:MAX_LABELS]:
            for state, n in sorted(states.items()):
                workers.add_metric((task_type, state), n)
        yield workers
        budgets = GaugeMetricFamily("cortex_budget_tokens", "Token budgets by scope: limit, "
                                    "reserved, leased, committed, available (from the ledger)",
                                    labels=("scope", "amount"))
        for row in (suite.get("budgets") or [])[:MAX_LABELS]:
            for amount in BUDGET_AMOUNTS:
                if row.get(amount) is not None:
                    budgets.add_metric((row["scope"], amount), row[amount])
        yield budgets


def _labelled(kind, name: str, help_: str, label: str, counts: dict):
    family = kind(name, help_, labels=(label,))
    for key, n in sorted(counts.copy().items()):
        family.add_metric((str(key),), n)
    return family


def _metric_name(name: str) -> str:
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else "_" + cleaned


class MetricsServer:
    """The /metrics endpoint: the owner's alone (a bearer token from run/metrics.token),
    each connection given READ_TIMEOUT seconds, at most MAX_CONNECTIONS at once (more
    are closed at once); calling it stops it."""

    def __init__(self, metrics: Metrics, port: int, token: str,
                 host: str = "127.0.0.1") -> None:
        expected = f"Bearer {token}".encode()

        class Handler(BaseHTTPRequestHandler):
            timeout = READ_TIMEOUT  # a slow or idle client cannot hold its thread

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                given = (self.headers.get("Authorization") or "").encode(errors="replace")
                if not hmac.compare_digest(given, expected):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Bearer realm="cortex"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics here")
                    return
                try:
                    body = metrics.render_prometheus()
                except Exception as e:  # noqa: BLE001 - a scrape error must not kill us
                    self.send_error(500, f"rendering failed: {type(e).__name__}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass  # scrapes are not news

        self._server = _CappedServer((host, port), Handler)
        self.host = host
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}/metrics"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        self._stopped = False

    @property
    def refused(self) -> int:
        return self._server.refused

    def __call__(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2.0)


class _CappedServer(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them."""

    daemon_threads = True

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()
