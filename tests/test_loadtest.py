"""The load-test harness end to end on a small scenario: the report's fields and its
internal consistency. No timing thresholds: speed is what the harness measures, not what
a unit test asserts."""

from __future__ import annotations

import json
import sys

import psutil
import pytest

from cortex.loadtest import __main__ as cli
from cortex.loadtest.harness import percentile, summarize
from cortex.loadtest.report import median_tree

PCTS = ("p50", "p95", "p99", "max")


def test_percentiles_and_medians():
    xs = sorted(range(1, 101))
    assert [percentile(xs, q) for q in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert summarize([]) == {"count": 0, "mean": None, "p50": None, "p95": None,
                             "p99": None, "max": None}
    assert median_tree([{"a": 1, "b": {"c": 5}}, {"a": 3, "b": {"c": 1}},
                        {"a": 2, "b": {"c": 3}}]) == {"a": 2, "b": {"c": 3}}


def _check_latencies(lat: dict) -> None:
    for name, s in lat.items():
        if s["count"] == 0:
            continue
        values = [s[p] for p in PCTS]
        assert all(v is not None and v >= 0 for v in values), (name, s)
        assert values == sorted(values), f"{name}: percentiles out of order: {s}"


def _check_scenario(name: str, s: dict, planned: int) -> None:
    t = s["tasks"]
    assert t["planned"] == planned, name
    assert t["submitted"] == t["planned"]
    assert t["accepted"] + t["rejected"] == t["submitted"]
    finals = t["completed"] + t["failed"] + t["dead"] + t["cancelled"]
    assert finals + t["lost"] == t["accepted"]
    assert t["lost"] == 0 and s["lost_ids"] == []
    assert t["duplicated"] == 0 and s["duplicated_ids"] == []
    assert t["completed"] == planned  # echo tasks: all complete
    assert s["completion_rate"] == 1.0
    assert s["zombies"] == 0
    assert s["throughput"] > 0 and s["wall_s"] > 0
    _check_latencies(s["latency_ms"])
    assert s["latency_ms"]["coordination"]["count"] == planned
    assert s["latency_ms"]["end_to_end"]["count"] == planned
    # End to end contains coordination: at every percentile it cannot be smaller.
    for p in PCTS:
        assert s["latency_ms"]["end_to_end"][p] >= s["latency_ms"]["coordination"][p] - 1e-6
    ev = s["events"]
    assert ev["settled"] and ev["missing"] == 0 and ev["received"] == ev["jsonl_lines"]
    # At least created, dispatched, started and completed for every task.
    assert ev["jsonl_lines"] >= 4 * planned
    assert s["tokens"]["reported"] == s["tokens"]["ledger_committed"] == 0
    assert s["tokens"]["over_allocated_samples"] == 0
    res = s["resources"]
    assert {"broker", "scheduler", "ledger", "events", "pool", "workers"} <= set(res["cpu_s"])
    assert all(v >= 0 for v in res["cpu_s"].values())
    assert res["suite_peak_rss_mb"] >= res["workers_peak_rss_mb"] > 0
    assert 0 <= s["utilization"]["overall"] <= 1.0 + 1e-6


@pytest.mark.heavy  # a load test: three suites, 600 tasks, idle-CPU sampling, charts
@pytest.mark.processes
def test_smoke_noop_and_latency(tmp_path, capsys):
    out = tmp_path / "report"
    suites_before = supervisords_among_our_children()  # a shared suite may be running
    code = cli.main(["--agents", "10", "--tasks", "200", "--workers", "4",
                     "--scenario", "latency,noop,events", "--out", str(out),
                     "--idle-seconds", "0.5",
                     "--fsync", "off"])
    assert code == 0
    assert "[noop] 200/200 done" in capsys.readouterr().err  # the live line's last word
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "cortex.loadtest/1"
    assert report["runs"] == 1
    assert list(report["scenarios"]) == ["latency", "noop", "events"]
    ev = report["scenarios"]["events"]["events"]
    assert ev["emitted"] == 200 * 20 == ev["written"] == ev["jsonl_lines"]
    assert ev["missing"] == ev["duplicates"] == 0 and ev["per_s"] > 0
    assert report["leftovers"] == [[]]
    _check_scenario("latency", report["scenarios"]["latency"], 200)
    _check_scenario("noop", report["scenarios"]["noop"], 200)
    assert report["scenarios"]["latency"]["agents"] == 1
    assert report["scenarios"]["noop"]["agents"] == 10
    idle = report["idle_cpu"]["after"]
    assert idle["fraction_of_core"] >= 0 and set(idle["by_role"]) >= {"scheduler", "workers"}
    # 600 tasks make a model training due: the probe after the load waited for its end.
    assert idle["models_busy"] is False and idle["models_s"] >= 0
    names = {(t["scenario"], t["metric"]) for t in report["targets"]}
    assert ("latency", "latency_ms.coordination.p50") in names
    assert ("noop", "throughput") in names
    assert all(t["met"] in (True, False) for t in report["targets"])
    md = (out / "report.md").read_text()
    assert "## latency" in md and "## noop" in md and "met" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    if pngs:
        assert "noop-latency.png" in pngs and "noop-timeline.png" in pngs
    else:
        assert "charts skipped" in md
    # Nothing of the suite is left: no cxlt supervisord among our children.
    assert supervisords_among_our_children() - suites_before == set()


def test_the_idle_line_says_what_the_probe_waited_for():
    from cortex.loadtest.report import _models_waited

    assert _models_waited({"models_s": 0.2, "models_busy": False}) == ""
    assert "had ended (6.2 s after" in _models_waited({"models_s": 6.2,
                                                        "models_busy": False})
    assert "still running after 60.0 s" in _models_waited({"models_s": 60.0,
                                                             "models_busy": True})


def supervisords_among_our_children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)
            if "supervisord" in " ".join(c.cmdline())}


def test_unknown_scenario_is_refused():
    with pytest.raises(SystemExit):
        cli.parse(["--scenario", "nope"])


@pytest.mark.parametrize("args", [
    ["--idle-seconds", "0"], ["--idle-seconds", "nan"], ["--tasks", "0"], ["--agents", "-3"],
    ["--workers", "two"], ["--rate", "0"], ["--runs", "0"], ["--sample-interval", "0"],
    ["--call-timeout", "-1"], ["--grace", "-1"], ["--procs", "-2"], ["--mixed-scale", "0"],
    ["--sweep-agents", "10,x"], ["--sweep-agents", "10,0"]])
def test_a_count_or_a_wait_out_of_range_is_refused_with_the_rule(args, capsys):
    with pytest.raises(SystemExit) as ended:
        cli.parse(args)
    assert ended.value.code == 2  # argparse's usage error, before any suite starts
    said = capsys.readouterr().err
    assert args[0] in said and ("must be" in said or "not a number" in said), said


def test_counts_and_waits_in_range_are_taken():
    args = cli.parse(["--idle-seconds", "0.5", "--tasks", "1", "--procs", "-1",
                      "--grace", "0", "--sweep-agents", "1, 2"])
    assert (args.idle_seconds, args.tasks, args.procs, args.grace) == (0.5, 1, -1, 0.0)
    assert args.sweep_agents == [1, 2]


def test_mixed_phases_and_scaled_jobs():
    import random

    from cortex.loadtest.learning import mixed_job, mixed_phases

    assert mixed_phases(1400) == (1000, 400)
    assert mixed_phases(1200) == (1000, 200)
    assert mixed_phases(600) == (500, 100)  # below 1,200: 5/6 to train on
    row = {"type": "chat", "description": "list the logs", "priority": "low",
           "duration": 3.0, "tokens": 800.0}
    jobs = [mixed_job(row, random.Random(seed), {"chat"}, 10.0) for seed in range(50)]
    work = [j for j in jobs if j.type == "chat"]
    assert work and all(j.type in ("chat", "fail") for j in jobs)
    assert all(abs(j.payload["seconds"] - 0.030) < 1e-12 for j in work)  # 3 ms x 10
    assert all(j.payload["tokens"] == 800 and j.tokens == 1001 for j in work)


class _FakeScheduler:
    """Like the scheduler: model.train is refused while another training runs; a finished
    training is loaded before the next one starts. Here an automatic training (on older
    history) finishes by the second request; ours then loads on the third status poll."""

    def __init__(self, running="auto"):
        self.trained_at, self.running, self.calls, self.polls = 1.0, running, 0, 0

    def call(self, service, op, timeout=None):
        assert service == "scheduler"
        if op == "model.train":
            self.calls += 1
            if self.running == "auto" and self.calls >= 2:
                self.running, self.trained_at = None, 2.0
        else:
            assert op == "model.status"
            self.polls += 1
            if self.running == "ours" and self.polls >= 3:
                self.running, self.trained_at = None, 3.0
        model = {"model": {"trained_at": self.trained_at, "samples": 10,
                           "per_target": {"duration": {"within_25pct": 0.9}}}}
        if op == "model.train":
            if self.running:
                return {"started": False, **model}
            self.running = "ours"
            return {"started": True, **model}
        return model


def test_retrain_waits_for_its_own_training(tmp_path):
    from cortex.loadtest.learning import retrain_model

    fake = _FakeScheduler()
    out = retrain_model(fake, tmp_path, timeout=10)
    # The automatic training's model (2.0) is not taken for ours (3.0).
    assert out["loaded"] and out["trained_at"] == 3.0, out
    assert out["previous_trained_at"] == 2.0 and out["train_calls"] == 2
    out = retrain_model(_FakeScheduler(running="forever"), tmp_path, timeout=0.6)
    assert not out["loaded"] and "no new model" in out["reason"]


@pytest.mark.processes  # a server process per transport
def test_the_transport_instrument_measures_both_hops(capsys):
    from cortex.loadtest import transport

    before = {p.pid for p in psutil.Process().children()}  # others' (a shared suite)
    assert transport.main(["--count", "30", "--runs", "1", "--size", "10"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    measured = rows[2:]  # after the header and its rule
    expected = ["zmq", "unix"] if sys.platform.startswith("linux") else ["zmq"]
    assert [row.split("|")[1].strip() for row in measured] == expected
    assert all(row.count(" us ") == 3 for row in measured)  # three figures per transport
    # Each server process was waited for.
    assert {p.pid for p in psutil.Process().children()} <= before


def test_the_transport_frames_survive_a_datagram():
    from cortex.loadtest.transport import envelope, pack, unpack

    frames = envelope(300)
    assert unpack(pack(frames)) == frames
    assert unpack(pack([b"", b"x"])) == [b"", b"x"]


@pytest.mark.processes  # a suite of its own
def test_the_idle_instrument_reads_each_role_by_window(capsys):
    from cortex.loadtest import idle

    assert idle.main(["--workers", "2", "--tasks", "4", "--clients", "2",
                      "--task-seconds", "0", "--after", "0", "--windows", "2",
                      "--window", "0.5"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header[:2] == ["after the work", "suite"]
    assert {"broker", "scheduler", "events", "ledger", "pool", "workers"} <= set(header)
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["0.0-0.5 s", "0.5-1.0 s"]
    for row in rows[2:]:  # every cell a share of a core, the suite's the sum of the rest
        cells = [float(c.strip().strip("*")) for c in row.strip("|").split("|")[1:]]
        assert all(c >= 0 for c in cells) and abs(cells[0] - sum(cells[1:])) < 0.05


@pytest.mark.parametrize("args", [["--windows", "0"], ["--window", "0.01"],
                                  ["--task-seconds", "-1"], ["--workers", "0"]])
def test_the_idle_instrument_refuses_what_it_cannot_measure(args, capsys):
    from cortex.loadtest import idle

    with pytest.raises(SystemExit) as ended:
        idle.main(args)
    assert ended.value.code == 2 and "must be" in capsys.readouterr().err
