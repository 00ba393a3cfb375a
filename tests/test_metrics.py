"""Streaming metrics from the event stream (services/metrics.py), without sockets."""

from __future__ import annotations

import math
import random
import urllib.error
import urllib.request

import pytest

from cortex.services.events.metrics import BOUNDS, PER_DECADE, Histogram, Metrics

RATIO = 10 ** (1 / PER_DECADE)  # one bucket's width: the estimate's worst error factor
T0 = 1_700_000_000.0


def exact(values: list[float], q: float) -> float:
    """Nearest-rank percentile, the definition the estimate approximates."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def event(type_: str, task: str | None = None, ts: float = T0, **data) -> dict:
    return {"id": f"x:{random.random()}", "source": "scheduler", "epoch": 1, "seq": 1,
            "ts": ts, "type": type_, "trace": task, "task": task, "worker": None, "data": data}


def lifecycle(m: Metrics, task: str, type_: str, priority: str, created: float, wait: float,
              run: float, outcome: str = "task.completed") -> None:
    m.observe(event("task.created", task, created, type=type_, priority=priority, tokens=0,
                    agent="a", eta=0.0))
    m.observe(event("task.dispatched", task, created + wait, attempt=1, worker="w",
                    waited=wait))
    m.observe(event("task.started", task, created + wait, attempt=1, at=created + wait))
    m.observe(event(outcome, task, created + wait + run, attempt=1, tokens_used=1,
                    type=type_, priority=priority, queued=wait, duration=run))


# -- histograms ------------------------------------------------------------------------


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "bimodal", "exponential"])
def test_percentiles_within_one_bucket_of_exact(dist):
    rng = random.Random(dist)
    draw = {
        "lognormal": lambda: rng.lognormvariate(-6, 1.5),
        "uniform": lambda: rng.uniform(0.001, 0.5),
        "bimodal": lambda: rng.choice([rng.gauss(0.002, 0.0002), rng.gauss(1.5, 0.1)]),
        "exponential": lambda: rng.expovariate(20),
    }[dist]
    values = [abs(draw()) + 1e-6 for _ in range(20_000)]
    h = Histogram()
    for v in values:
        h.add(v)
    assert h.count == len(values)
    assert h.sum == pytest.approx(sum(values))
    for q in (0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        want, got = exact(values, q), h.percentile(q)
        assert want / RATIO <= got <= want * RATIO, (q, want, got)


def test_histogram_edges():
    h = Histogram()
    assert h.percentile(0.5) is None
    assert h.stats() == {"count": 0, "p50": None, "p95": None, "p99": None, "mean": None,
                         "max": None}
    h.add(0.0)
    assert h.percentile(0.99) == 0.0
    big = Histogram()
    for v in (1e6, 2e6, 3e6):  # beyond the last bound: clamped to what was seen
        big.add(v)
    assert big.percentile(1.0) == 3e6
    assert 1e6 <= big.percentile(0.5) <= 3e6
    one = Histogram()
    one.add(0.0123)
    assert one.percentile(0.5) == pytest.approx(0.0123)  # min == max: exact
    # Buckets are fixed and log-spaced: memory never grows with observations.
    assert len(h.counts) == len(BOUNDS) + 1
    steps = [b / a for a, b in zip(BOUNDS, BOUNDS[1:], strict=False)]
    assert all(step == pytest.approx(RATIO, rel=1e-3) for step in steps)


# -- the event stream ------------------------------------------------------------------


def test_latency_per_type_and_priority_from_the_lifecycle():
    m = Metrics()
    rng = random.Random(7)
    waits: dict[tuple, list] = {}
    runs: dict[tuple, list] = {}
    for i in range(3000):
        key = (rng.choice(["echo", "sleep"]), rng.choice(["critical", "low"]))
        wait, run = rng.lognormvariate(-7, 1), rng.lognormvariate(-3, 1)
        lifecycle(m, f"t{i}", *key, created=T0 + i, wait=wait, run=run)
        waits.setdefault(key, []).append(wait)
        runs.setdefault(key, []).append(run)
    summary = m.summary()
    assert summary["tasks"]["created"] == summary["tasks"]["completed"] == 3000
    assert summary["in_flight"] == 0
    rows = {(r["type"], r["priority"]): r for r in summary["latency"]}
    assert set(rows) == set(waits)
    for key, row in rows.items():
        assert row["tasks"]["completed"] == len(waits[key])
        totals = [w + r for w, r in zip(waits[key], runs[key], strict=True)]
        for stage, values in (("queue", waits[key]), ("run", runs[key]), ("total", totals)):
            assert row[stage]["count"] == len(values)
            for p, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                want = exact(values, q)
                # timestamps near 1.7e9 carry ~1e-7 s of float error on top of the bucket
                assert want / RATIO - 1e-6 <= row[stage][p] <= want * RATIO + 1e-6, (
                    key, stage, p, want, row[stage][p])
    everything = [w for ws in waits.values() for w in ws]
    overall = summary["overall"]["queue"]
    assert overall["count"] == 3000
    assert exact(everything, 0.99) / RATIO - 1e-6 <= overall["p99"]
    assert overall["p99"] <= exact(everything, 0.99) * RATIO + 1e-6
    assert m.latency(type_="echo", priority="low")["run"]["count"] == len(runs[("echo", "low")])


def test_counters_states_rejections_restarts_exits():
    m = Metrics()
    lifecycle(m, "a", "echo", "high", T0, 0.01, 0.02)
    lifecycle(m, "b", "echo", "high", T0, 0.01, 0.02, outcome="task.failed")
    m.observe(event("task.created", "c", T0, type="echo", priority="high"))
    m.observe(event("task.retry", "c", T0 + 1, attempt=1, after=0.1))
    m.observe(event("task.dead", "c", T0 + 2, attempt=2))
    m.observe(event("task.created", "d", T0, type="sleep", priority="low"))
    m.observe(event("task.cancelled", "d", T0 + 1, attempt=0))
    m.observe(event("scheduler.rejected", None, T0, type="echo", priority="low",
                    code="queue_full", reason="full"))
    m.observe(event("scheduler.rejected", None, T0, code="queue_full", reason="full"))
    m.observe(event("worker.exited", None, T0, pid=1, code=0, reason="recycled"))
    m.observe(event("worker.lost", None, T0, reason="no heartbeat"))
    m.observe(event("supervisor.process_exited", None, T0, name="ledger", group="ledger",
                    from_state="RUNNING", pid=5, expected=False))
    m.observe(event("supervisor.process_starting", None, T0, name="ledger", group="ledger",
                    from_state="EXITED", pid=None, expected=None))
    m.observe(event("supervisor.process_starting", None, T0, name="pool", group="pool",
                    from_state="STOPPED", pid=None, expected=None))  # a start, not a restart
    m.observe(event("supervisor.process_exited", None, T0, name="pool", group="pool",
                    from_state="STOPPING", pid=6, expected=True))
    m.observe(event("supervisor.process_fatal", None, T0, name="pool", group="pool",
                    from_state="BACKOFF", pid=None, expected=None))
    # Ends of tasks created before the router started: counted, timed from their data.
    m.observe(event("task.completed", "zz", T0, type="echo", priority="high", queued=0.5,
                    duration=1.0))
    s = m.summary()
    assert s["tasks"] == {"created": 4, "completed": 2, "failed": 1, "dead": 1,
                          "cancelled": 1, "retried": 1, "rejected": 2}
    rows = {(r["type"], r["priority"]): r for r in s["latency"]}
    assert rows[("echo", "high")]["tasks"]["dead"] == 1
    assert rows[("sleep", "low")]["tasks"]["cancelled"] == 1
    # a, b, c (dead after 2 s) and zz (queued 0.5 + ran 1.0, from its own data)
    assert rows[("echo", "high")]["total"]["count"] == 4
    assert rows[("echo", "high")]["total"]["max"] == pytest.approx(2.0)
    assert rows[("echo", "high")]["run"]["count"] == 3  # the dead one has no handler end
    assert rows[("echo", "low")]["tasks"]["rejected"] == 1
    assert rows[("unknown", "unknown")]["tasks"]["rejected"] == 1
    assert s["rejections"] == {"queue_full": 2}
    assert s["restarts"] == {"ledger": 1}
    assert s["crashes"] == {"ledger": 1}
    assert s["fatal"] == {"pool": 1}
    assert s["worker_exits"] == {"exited": 1, "lost": 1}
    assert s["events"]["by_type"]["task.created"] == 4
    assert s["events"]["by_type"]["supervisor.process_starting"] == 2
    assert s["events"]["observed"] == sum(s["events"]["by_type"].values())
    assert s["in_flight"] == 0 and m.untracked == 1


def test_malformed_events_are_counted_not_raised():
    m = Metrics()
    for bad in ({}, {"type": 5}, {"type": None}, "text", None, {"type": "task.created"},
                {"type": "task.started", "task": "nope", "data": "x"},
                {"type": "task.created", "task": "t", "ts": float("nan"), "data": {}},
                {"type": "task.completed", "task": "t", "data": {"duration": float("inf"),
                                                                 "queued": -1}},
                {"type": "task.completed", "task": "t", "data": {"duration": True}}):
        m.observe(bad)
    assert m.malformed == 5
    assert m.summary()["overall"]["run"]["count"] == 0


def test_memory_is_bounded():
    m = Metrics(max_tracked=1000)
    for i in range(5000):  # tasks created, never ending
        m.observe(event("task.created", f"t{i}", T0, type=f"type{i}", priority="weird"))
    assert len(m.tasks) <= 1000
    assert len(m.series) <= 257  # MAX_SERIES, then "other"
    rows = {(r["type"], r["priority"]) for r in m.summary()["latency"]}
    assert ("other", "other") in rows
    for i in range(2000):
        m.observe(event(f"custom.{i}", None, T0))
    assert len(m.events) <= 513


def test_gauges_values_and_callables():
    m = Metrics()
    m.set_gauge("postgres_lag", 12)
    m.set_gauge("events_buffered", lambda: 3.5)
    m.set_gauge("broken", lambda: 1 / 0)
    assert m.summary()["gauges"] == {"postgres_lag": 12, "events_buffered": 3.5}
    m.set_gauge("postgres_lag", 0)
    assert m.gauge_values()["postgres_lag"] == 0


# -- Prometheus ------------------------------------------------------------------------


def busy_metrics() -> Metrics:
    m = Metrics()
    rng = random.Random(3)
    for i in range(500):
        lifecycle(m, f"t{i}", rng.choice(["echo", 'we"ird\\type\n']),
                  rng.choice(["high", "low"]), T0 + i, rng.random() / 100, rng.random())
    m.observe(event("scheduler.rejected", None, T0, code="queue_full"))
    m.observe(event("supervisor.process_exited", None, T0, name="ledger", expected=False))
    m.set_gauge("postgres_lag", 42)
    return m


def test_prometheus_text_parses():
    parser = pytest.importorskip("prometheus_client.parser")
    m = busy_metrics()
    families = {f.name: f for f in parser.text_string_to_metric_families(
        m.render_prometheus().decode())}
    queue = families["cortex_task_queue_seconds"]
    assert queue.type == "histogram"
    counts = [s for s in queue.samples if s.name == "cortex_task_queue_seconds_count"]
    assert sum(s.value for s in counts) == 500
    assert {s.labels["type"] for s in counts if s.value} == {"echo", 'we"ird\\type\n'}
    for labels in ({"type": "echo", "priority": "high"}, {"type": "echo", "priority": "low"}):
        buckets = [s for s in queue.samples if s.name.endswith("_bucket")
                   and all(s.labels[k] == v for k, v in labels.items())]
        les = [float(s.labels["le"]) for s in buckets]
        assert les == sorted(les) and les[-1] == math.inf
        values = [s.value for s in buckets]
        assert values == sorted(values)  # cumulative
        count = next(s.value for s in counts if s.labels == labels)
        assert values[-1] == count
    tasks = families["cortex_tasks"]  # the parser drops the _total suffix of a counter
    assert tasks.type == "counter"
    completed = sum(s.value for s in tasks.samples if s.labels.get("state") == "completed")
    assert completed == 500
    assert families["cortex_rejections"].samples[0].labels == {"code": "queue_full"}
    assert families["cortex_process_crashes"].samples[0].labels == {"process": "ledger"}
    assert families["cortex_postgres_lag"].samples[0].value == 42
    events = {s.labels["type"]: s.value for s in families["cortex_events"].samples}
    assert events["task.created"] == 500


def test_prometheus_text_of_empty_metrics_parses():
    parser = pytest.importorskip("prometheus_client.parser")
    text = Metrics().render_prometheus().decode()
    names = {f.name for f in parser.text_string_to_metric_families(text)}
    assert "cortex_task_total_seconds" in names and "cortex_events" in names


def test_http_endpoint_serves_metrics():
    m = busy_metrics()
    stop = m.serve(0, "tok")

    def get(url):
        return urllib.request.urlopen(urllib.request.Request(
            url, headers={"Authorization": "Bearer tok"}), timeout=5)
    try:
        assert stop.port > 0 and stop.url == f"http://127.0.0.1:{stop.port}/metrics"
        with get(stop.url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            body = resp.read()
        assert b"cortex_task_queue_seconds_bucket" in body
        m.set_gauge("postgres_lag", 7)  # every scrape renders anew
        with get(stop.url) as resp:
            assert b"cortex_postgres_lag 7.0" in resp.read()
        with pytest.raises(urllib.error.HTTPError) as err:
            get(f"http://127.0.0.1:{stop.port}/other")
        assert err.value.code == 404
    finally:
        stop()
    stop()  # twice is harmless
    with pytest.raises(OSError):
        urllib.request.urlopen(stop.url, timeout=2)


def test_observe_throughput_is_far_above_the_event_rate():
    """Not a timing assertion: a figure printed for the report (pytest -s shows it)."""
    import time

    m = Metrics()
    events = []
    for i in range(20_000):
        task = f"t{i}"
        events += [event("task.created", task, T0 + i, type="echo", priority="low"),
                   event("task.dispatched", task, T0 + i, attempt=1, worker="w", waited=0.0),
                   event("ledger.reserved", task, T0 + i),
                   event("task.started", task, T0 + i, attempt=1, at=T0 + i + 0.001),
                   event("task.completed", task, T0 + i + 0.01, duration=0.009, queued=0.001)]
    start = time.perf_counter()
    m.observe_many(events)
    elapsed = time.perf_counter() - start
    print(f"\nMetrics.observe: {len(events) / elapsed:,.0f} events/s")
    assert m.summary()["tasks"]["completed"] == 20_000
