"""Routing by description on a live suite: with no router an auto task is refused with
the reason; tasks submitted with their type become history, and once `retrain_every`
came the router is trained from it in the background; auto tasks then run as the chosen
type, which their events and `cortex task show` record with the confidence and the
runner-up; an unclear description is refused with the candidates; `cortex route` shows
the top 3 with probabilities and the words that weighed most; `cortex model status
--json` holds the held-out confusion matrix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cortex.loadtest.routing_data import TYPES, labelled_descriptions
from cortex.protocol import Client, errors
from tests.conftest import jsonl_events_of, suite_config, wait_for

PER_TYPE = 12
HISTORY = PER_TYPE * len(TYPES)


def config() -> str:
    handlers = "\n".join(f'{t} = "cortex.services.pool.handlers:echo"' for t in TYPES)
    return suite_config(2, ("echo", *TYPES), extra=f"""
[handlers]
{handlers}
[routing]
min_confidence = 0.5
retrain_every = {HISTORY}
""")


def cli(home, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cortex.services.cli", *args,
                           "--home", str(home)], capture_output=True, text=True, timeout=120)


def history(rows: list[dict]) -> list[dict]:
    """PER_TYPE rows of each type."""
    out: list[dict] = []
    for task_type in TYPES:
        out += [r for r in rows if r["type"] == task_type][:PER_TYPE]
    return out


def test_auto_tasks_are_routed_by_a_router_trained_from_history(suites):
    suite = suites.start(config())
    home = suite.home
    rows = labelled_descriptions(400, 11)
    typed = history(rows)
    assert len(typed) == HISTORY
    with Client(home) as client:
        with pytest.raises(errors.Rejected, match="no routing model yet"):
            client.submit("auto", "Please translate the release notes into German")

        for row in typed:
            client.submit(row["type"], row["description"])

        def trained():
            routing = client.call("scheduler", "model.status")["routing"]
            return routing.get("trained") and not routing.get("training") and routing

        routing = wait_for(trained, 240, "the router to be trained from the history")
        assert set(routing["types"]) == set(TYPES)

        task = client.submit("auto", "Please translate the release notes into German")
        done = client.wait(task["id"], timeout=60)
        assert done["state"] == "completed" and done["type"] == "translate"
        decision = done["routing"]
        assert decision["outcome"] == "routed" and decision["chosen"] == "translate"
        assert decision["runner_up"] and decision["runner_up"] != "translate"

        with pytest.raises(errors.Rejected, match="cannot tell the type") as refused:
            client.submit("auto", "???")  # no word it knows: every type about as likely
        assert refused.value.args[0].count(",") >= 2  # the candidates, with probabilities

    shown = cli(home, "task", "show", task["id"])
    assert shown.returncode == 0, shown.stderr
    line = next(s for s in shown.stdout.splitlines() if s.startswith("routing"))
    assert "routed: translate at" in line and f"runner-up {decision['runner_up']}" in line

    created = [e for e in jsonl_events_of(home) if e["type"] == "task.created"
               and e["task"] == task["id"]]
    assert created[0]["data"]["routing"]["confidence"] == decision["confidence"]

    explained = cli(home, "route", "fix the crash in the billing module", "--json")
    assert explained.returncode == 0, explained.stderr
    reply = json.loads(explained.stdout)
    assert len(reply["types"]) == 3 and reply["type"] == reply["types"][0]["type"]
    assert sum(t["probability"] for t in reply["types"]) <= 1.0001
    assert reply["types"][0]["words"], "the words that weighed most"
    text = cli(home, "route", "fix the crash in the billing module")
    assert text.returncode == 0 and "WORDS THAT WEIGHED MOST" in text.stdout
    assert text.stdout.count("%") >= 3 and "auto:" in text.stdout

    status = cli(home, "model", "status", "--json")
    assert status.returncode == 0, status.stderr
    held = json.loads(status.stdout)["routing"]["held_out"]
    labels, matrix = held["confusion"]["labels"], held["confusion"]["matrix"]
    assert sorted(labels) == sorted(TYPES) and len(matrix) == len(labels)
    assert sum(map(sum, matrix)) == held["rows"] > 0
    assert "held-out descriptions" in cli(home, "model", "status").stdout


@pytest.mark.heavy  # waits out the minute between automatic trainings
def test_the_router_is_retrained_from_history_and_learns_a_new_type(suites, tmp_path):
    rows = labelled_descriptions(480, 5)
    known = [r for r in rows if r["type"] != "write_docs"]
    new = [r for r in rows if r["type"] == "write_docs"]
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in known))
    suite = suites.start(config().replace(
        f"retrain_every = {HISTORY}", f'retrain_every = 30\nexamples = "{examples}"'))
    home = suite.home
    with Client(home) as client:
        def routing():
            return client.call("scheduler", "model.status")["routing"]

        first = wait_for(lambda: routing().get("trained") and routing(), 240,
                         "the router trained from the examples at the start")
        assert "write_docs" not in first["types"] and first["sources"]["history"] == 0
        for row in new[:40]:  # a type the examples never mentioned, submitted typed
            client.submit(row["type"], row["description"])
        learnt = wait_for(lambda: "write_docs" in (routing().get("types") or {})
                          and routing(), 300, "a retrained router that knows write_docs")
        assert set(learnt["types"]) == set(TYPES)
        assert learnt["sources"]["history"] >= 30 and learnt["sources"]["examples"] > 0
        assert learnt["trained_at"] > first["trained_at"]
        task = client.wait(client.submit("auto", new[0]["description"])["id"], timeout=60)
        assert task["type"] == "write_docs", task["routing"]
    # The retrained router answers before its event is in the log: events reach the
    # router in batches and are written a moment later.
    def trainings():
        found = [e for e in jsonl_events_of(home) if e["type"] == "router.trained"]
        return found if len(found) >= 2 else None

    trained = wait_for(trainings, 30, "both trainings' router.trained events in the log")
    assert len(trained) >= 2
