"""The soak scenario, short (CI's heavy tier): a warm-up that fills the suite's bounded
tables, then a minute of a trickle of tasks, every process of the suite watched for
descriptor, memory and zombie leaks (loadtest/soak.py; operators run it for hours:
`python -m cortex.loadtest --scenario soak --duration 4h`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cortex.loadtest import soak


@pytest.mark.heavy
@pytest.mark.timeout(900)  # the warm-up (2,000 tasks, the models settling), then a minute
def test_a_short_soak_finds_no_leak(tmp_path):
    out = tmp_path / "soak"
    done = subprocess.run([sys.executable, "-m", "cortex.loadtest", "--scenario", "soak",
                           "--duration", "60s", "--tasks", "120", "--workers", "4",
                           "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = json.loads((out / "soak.json").read_text())
    assert done.returncode == 0, report["leaks"] or done.stderr[-2000:]
    assert report["tasks"] == {"completed": 120}, report["tasks"]
    warm = report["warm_up"]
    assert warm["full"] and list(warm["tasks"]) == ["completed"], warm
    assert warm["events"] >= soak.RING_EVENTS
    assert sum(warm["tasks"].values()) >= soak.SOAK_RETENTION
    names = {row["name"] for row in report["processes"]}
    assert {"supervisord", "broker", "events", "ledger", "scheduler", "pool"} <= names, names
    assert any(name.startswith("worker ") for name in names), names
    assert (out / "soak.md").read_text().count("|") > 20
