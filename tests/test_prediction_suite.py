"""Predictions on the real suite: recorded per task, learned from the event log, made by
a scheduler that never loads scikit-learn (the training child does)."""

from __future__ import annotations

from pathlib import Path

from cortex.protocol import Client
from cortex.services.cli import main as cli

from .conftest import wait_for


def test_tasks_record_predicted_and_actual_and_model_trains_from_log(suites, capsys):
    suite = suites.start(workers=4)
    with Client(suite.home, timeout=60) as c:
        ids = []
        for i in range(60):
            kind = ("short", "long")[i % 2]
            seconds = 0.01 if kind == "short" else 0.05
            ids.append(c.submit("simulated_agent", f"{kind} job {i}",
                                payload={"seconds": seconds, "tokens": 10, "steps": 1},
                                tokens=20)["id"])
        done = [c.wait(t, timeout=60) for t in ids]
        assert all(t["state"] == "completed" for t in done)
        assert all(t["predicted"] and t["actual"]["tokens"] == 10.0 for t in done)
        # After some completions the per-type average replaces the defaults.
        late = c.submit("simulated_agent", "another", payload={"seconds": 0.01, "tokens": 1})
        assert late["predicted"]["source"] in ("average", "model")
        assert c.call("scheduler", "model.train")["started"] is True
        status = wait_for(lambda: (s := c.call("scheduler", "model.status"))["loaded"]
                          and not s["training"] and s, 60, "a model trained from the log")
        # The scheduler predicts with the trained arrays, and never maps scikit-learn.
        modelled = c.submit("simulated_agent", "short job again",
                            payload={"seconds": 0.01, "tokens": 1})
        assert c.status(modelled["id"])["predicted"]["source"] == "model"
        pid = c.call("scheduler", "scheduler.status")["pid"]
    assert status["model"]["samples"] >= 50
    assert (suite.home / "models" / "predictor.npz").exists()
    mapped = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
              if "/site-packages/" in line}
    packages = {path.split("/site-packages/")[1].split("/")[0] for path in mapped}
    assert "numpy" in packages  # the probe sees a package the scheduler did load
    assert {"sklearn", "scipy"} & packages == set(), packages
    assert cli(["--home", str(suite.home), "model", "status"]) == 0
    assert "within_25".upper()[:6] in capsys.readouterr().out.upper()
