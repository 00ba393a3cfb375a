"""Training from the event log, in the training child:

    python -m cortex.services.scheduler.prediction train --home DIR

reads the completed-task history from the event log, prints one line before it fits
(`{"rows": N, "min_samples": M}`: the scheduler answers `model.train` with it), fits the
models, saves them under <home>/models/, prints the report and exits 0 (1: not trained).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable

import orjson

from cortex.protocol import locate
from cortex.services.runtime.eventlog import read_events
from cortex.services.scheduler.prediction.features import clean_row
from cortex.services.scheduler.prediction.predictor import Predictor


def history_from_events(events: Iterable[dict | str | bytes]) -> list[dict]:
    """Training rows from the suite's event log (dicts, or raw JSONL lines).

    An event is used when its `"type"` (or `"event"`) is `"task.completed"` and its
    `"data"` holds::

        {"type": str,            # task type (`"task_type"` also accepted)
         "priority": str,        # "critical" | "high" | "medium" | "low"
         "description": str,
         "payload_size": int,    # bytes of the JSON-encoded payload
         "actual": {"duration": s, "tokens": n, "memory_mb": growth MB, "cpu_s": s}}

    All four `actual` values are required (finite, >= 0); an older event's `cpu` (cores)
    is read as `cpu` x `duration` seconds. Anything else is skipped. Rows are `{type,
    priority, description, payload_size, duration, tokens, memory_mb, cpu_s}` in event
    order.
    """
    rows = []
    for event in events:
        if isinstance(event, str | bytes):
            try:
                event = orjson.loads(event)
            except orjson.JSONDecodeError:
                continue
        if not isinstance(event, dict):
            continue
        if event.get("type", event.get("event")) != "task.completed":
            continue
        data = event.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("actual"), dict):
            continue
        task_type = data.get("type") or data.get("task_type")
        actual = data["actual"]
        if "cpu_s" not in actual and "cpu" in actual:
            try:
                actual = {**actual, "cpu_s": float(actual["cpu"]) * float(actual["duration"])}
            except (KeyError, TypeError, ValueError):
                continue
        row = clean_row({**actual, "type": task_type, "priority": data.get("priority"),
                         "description": data.get("description"),
                         "payload_size": data.get("payload_size")})
        if row is not None:
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cortex-train", description=__doc__)
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--home")
    parser.add_argument("--limit", type=int, default=50_000, help="most recent rows to use")
    args = parser.parse_args(argv)
    home = locate.find_home(args.home)
    history = history_from_events(read_events(home / "events", type_pattern="task.completed"))
    history = history[-args.limit:]
    predictor = Predictor(home / "models")
    print(json.dumps({"rows": len(history), "min_samples": predictor.min_samples}), flush=True)
    report = predictor.train(history)
    print(json.dumps(report, default=str), flush=True)
    return 0 if report.get("trained", True) else 1
