"""The soak's verdict (loadtest/soak.py), the memory the services keep, and the opt-in
memory trace that finds what grows (services/runtime/memtrace.py).

The soak itself, on a real suite, is tests/test_lifecycle_soak.py (heavy tier)."""

from __future__ import annotations

import logging
import os
import random
import signal
import tracemalloc

import pytest

from cortex.loadtest import soak
from cortex.protocol.client import Client
from cortex.services.dashboard.series import SERIES_SECONDS, Latency, Resources
from cortex.services.runtime import memtrace
from cortex.services.scheduler.prediction.history import TARGETS
from cortex.services.scheduler.prediction.predictor import Predictor

from .conftest import wait_for


def _samples(rss_of_t, duration: float = 3600.0, every: float = 60.0, fds=(20, 20)) -> list:
    """Samples of one process whose RSS at time t is rss_of_t(t)."""
    out = []
    steps = int(duration / every)
    for i in range(steps + 1):
        t = i * every
        out.append({"t": t, "zombies": [], "procs": {"7": {
            "name": "events", "rss_mb": rss_of_t(t), "cpu_s": 0.0, "created": 1.0,
            "fds": fds[0] if i < steps else fds[1]}}})
    return out


def test_growth_over_the_second_half_above_the_rule_is_a_leak():
    rows, leaks = soak.analyse(_samples(lambda t: 50 + 3.0 * t / 3600), 3600.0)
    assert rows[0]["rss_slope_2nd_half_mb_h"] > soak.RSS_SLOPE_MB_H
    assert leaks and "RSS grew" in leaks[0], leaks


def test_a_table_filling_in_the_first_half_then_flat_is_no_leak():
    rows, leaks = soak.analyse(_samples(lambda t: 50 + min(t, 1500) / 100), 3600.0)
    assert rows[0]["rss_slope_2nd_half_mb_h"] == 0
    assert leaks == []


def test_one_allocator_step_in_the_second_half_is_not_evidence():
    # One arena (1 MiB, less a page) taken at 45 min: a steep slope over a 30-minute half,
    # but no more than one step grown.
    def rss(t):
        return 50 + (soak.ALLOCATOR_STEP_MB - 0.004 if t >= 2700 else 0)

    rows, leaks = soak.analyse(_samples(rss), 3600.0)
    assert rows[0]["rss_slope_2nd_half_mb_h"] > soak.RSS_SLOPE_MB_H
    assert leaks == []


def test_a_short_run_applies_the_same_rule():
    # Five minutes: a 2 MB rise over the second half is 48 MB/h and more than one step.
    rows, leaks = soak.analyse(_samples(lambda t: 50 + 4.0 * t / 300, 300.0, 5.0), 300.0)
    assert leaks, rows


def test_descriptors_not_back_to_their_baseline_are_a_leak():
    _, leaks = soak.analyse(_samples(lambda t: 50, fds=(20, 20 + soak.FD_TOLERANCE + 1)),
                            3600.0)
    assert leaks and "descriptors" in leaks[0]


def test_the_soak_suite_keeps_small_tables_and_the_warm_up_reads_them(tmp_path):
    (tmp_path / "cortex.toml").write_text(soak.config(4, "group"))
    assert soak.retention_of(tmp_path) == soak.SOAK_RETENTION
    (tmp_path / "cortex.toml").write_text("[suite]\n")
    assert soak.retention_of(tmp_path) == soak.DEFAULT_RETENTION
    (tmp_path / "cortex.toml").write_text("not toml [")
    assert soak.retention_of(tmp_path) == soak.DEFAULT_RETENTION


def test_line_counter_counts_events_appended_after_it_starts(tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    (events / "a.jsonl").write_bytes(b'{"n": 1}\n' * 5)
    counter = soak.LineCounter(tmp_path)
    with open(events / "a.jsonl", "ab") as f:
        f.write(b'{"n": 2}\n' * 3)
    (events / "b.jsonl").write_bytes(b'{"n": 3}\n' * 4)  # a rotation: a new file
    assert counter.count() == 7
    assert counter.count() == 7  # counted once


def test_a_predictor_without_history_still_learns_its_averages(tmp_path):
    kept, lean = Predictor(tmp_path), Predictor(tmp_path, history_limit=0)
    rng = random.Random(1)
    for _ in range(500):
        actual = {t: rng.uniform(0.1, 10.0) for t in TARGETS}
        for p in (kept, lean):
            p.observe("echo", "medium", "x" * 200, 40, actual)
    assert kept.status()["history_rows"] == 500
    assert lean.status()["history_rows"] == 0
    assert lean.completions_since_training() == 500  # what the trainer's schedule counts
    assert lean.predict("echo", "medium", "", 40) == kept.predict("echo", "medium", "", 40)
    assert lean.read_saved().status()["history_rows"] == 0


def test_a_memory_trace_names_the_line_that_grew(caplog):
    was_tracing = tracemalloc.is_tracing()
    trace = memtrace.MemoryTrace(logging.getLogger("test.memtrace"))
    try:
        with caplog.at_level(logging.WARNING, logger="test.memtrace"):
            assert "baseline taken" in trace.mark()[0]
            kept = [bytearray(1000) for _ in range(2000)]  # about 2 MB, from this line
            report = trace.mark()
        assert len(kept) == 2000
        assert "top growth" in report[0]
        assert __file__ in report[1], report[:3]  # the largest growth is ours
        assert caplog.messages[-len(report):] == report
    finally:
        if not was_tracing:
            tracemalloc.stop()


def test_memory_tracing_is_off_unless_asked_for():
    log = logging.getLogger("test.memtrace")
    assert memtrace.from_environment(log, {}) is None
    assert memtrace.from_environment(log, {memtrace.ENV: "0"}) is None


@pytest.mark.heavy  # a real suite whose scheduler traces every allocation: slow to start
def test_a_service_logs_its_memory_growth_on_sigusr2(suites, monkeypatch):
    monkeypatch.setenv(memtrace.ENV, "1")
    suite = suites.start()
    pid = next(row["pid"] for row in suite.processes() if row["name"] == "scheduler")
    with Client(suite.home, timeout=60) as client:  # it answers: its handler is set
        client.call("scheduler", "scheduler.status", {})
    log = suite.home / "logs" / "scheduler.log"
    os.kill(pid, signal.SIGUSR2)
    wait_for(lambda: "baseline taken" in log.read_text(), 120, "the baseline in its log")
    os.kill(pid, signal.SIGUSR2)
    wait_for(lambda: "top growth by source" in log.read_text(), 120, "a report in its log")
    assert next(row["pid"] for row in suite.processes() if row["name"] == "scheduler") == pid


def test_dashboard_series_keep_their_last_ten_minutes_at_any_poll_rate():
    # Idle, the dashboard polls every 10 s: 600 points would be 100 minutes of history.
    resources, latency = Resources(), Latency(window=1)
    reply = {"bounds": [0.1, 1.0], "latency": [], "buckets": [
        {"type": "echo", "priority": "low", "queue": [], "run": [], "total": []}]}
    for i in range(1000):
        resources.add(i * 10.0, 0.1, 50.0, None)
        latency.add(i * 10.0, reply)
    kept = resources.view()
    assert kept[-1]["ts"] - kept[0]["ts"] <= SERIES_SECONDS
    assert len(kept) == SERIES_SECONDS / 10 + 1
    for series in latency.view()["series"].values():
        assert series[-1]["ts"] - series[0]["ts"] <= SERIES_SECONDS


def test_the_warm_up_waits_while_a_model_is_trained_or_owed():
    idle = {"training": False, "completions_since_training": 10,
            "routing": {"training": False, "typed_since_training": 10, "retrain_every": 500}}
    assert not soak.training_due(idle, 500)
    assert soak.training_due(idle | {"training": True}, 500)
    assert soak.training_due(idle | {"completions_since_training": 500}, 500)
    assert not soak.training_due(idle | {"completions_since_training": 500}, 0)  # never
    assert soak.training_due(idle | {"routing": {"training": True}}, 500)
    failing = idle | {"completions_since_training": 900, "last_failure": {"exit_code": 1}}
    assert not soak.training_due(failing, 500)  # retried, never owed
