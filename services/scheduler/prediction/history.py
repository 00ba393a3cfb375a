"""The rows a model learns from: completed tasks, from the event log or as observed.

A row is `{type, priority, description, payload_size}` and the four targets: duration
(s), tokens, memory growth (MB), CPU (s). Light on purpose (no numpy, no scikit-learn):
the training child counts its rows with it before it loads those.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import orjson

# The saved models (flat.py writes them): named here so that the predictor can tell
# whether there are any without loading numpy.
MODEL_FILE = "predictor.npz"
LEGACY_MODEL_FILE = "predictor.joblib"  # scikit-learn models pickled: read no more

TARGETS = ("duration", "tokens", "memory_mb", "cpu_s")


def too_few(rows: int, min_samples: int) -> dict | None:
    """The report of a training that did not happen for want of rows, or None."""
    if rows >= min_samples:
        return None
    return {"trained": False, "samples": rows,
            "reason": f"{rows} valid rows < min_samples {min_samples}"}


def clean_row(row: dict) -> dict | None:
    """A training row with every field usable, or None."""
    if row.get("type") in (None, ""):
        return None
    try:
        out = {"type": str(row["type"]), "priority": str(row.get("priority") or "medium"),
               "description": str(row.get("description") or ""),
               "payload_size": int(row.get("payload_size") or 0)}
        for t in TARGETS:
            v = float(row[t])
            if not math.isfinite(v) or v < 0:
                return None
            out[t] = v
    except (KeyError, TypeError, ValueError):
        return None
    return out


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
