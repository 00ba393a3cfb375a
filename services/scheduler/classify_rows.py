"""What the router learns from: labelled examples and the history of typed tasks.

Two sources of rows ``{"type", "description"}``:

- the examples file (``[routing] examples``): JSONL, one ``{"type", "description"}`` object
  a line. The user wrote it, so a bad line is an error naming the line, never skipped.
- the event log: each ``task.created`` event of a task submitted with an explicit type.
  Events of routed tasks (their data carries ``"routing"``) are left out: the router would
  otherwise learn from its own guesses, mistakes included.

:func:`training_rows` joins them: every description cut to ``ROUTE_CHARS`` (the event log
keeps only that much, so training and routing see the same text), duplicates dropped, and
at most ``PER_TYPE_LIMIT`` rows per type (the examples first, then the newest history), so
one flood of a type neither drowns the others nor makes training slow.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

# The saved router (classify.py writes it): named here so that the scheduler can tell
# whether there is one without loading scikit-learn.
MODEL_FILE = "router.joblib"

ROUTE_CHARS = 200  # task.created events keep the first 200 characters of a description
MAX_TYPE_CHARS = 64  # as the scheduler accepts on submit
PER_TYPE_LIMIT = 2000
MIN_ROWS_PER_TYPE = 5  # a type with fewer rows is left out of training (named in the report)
AUTO = "auto"  # the type that asks for routing: never a label


class RoutingError(Exception):
    """Routing cannot go on; ``code`` is stable: ``bad_examples``, ``too_little_data``,
    ``no_model``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _valid_type(value) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= MAX_TYPE_CHARS and value != AUTO
            and "\x00" not in value)


def read_examples(path: str | os.PathLike) -> list[dict]:
    """The rows of an examples file; RoutingError ``bad_examples`` names the bad line."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise RoutingError("bad_examples", f"cannot read examples {path}: "
                                           f"{exc.strerror or exc}") from exc
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise RoutingError("bad_examples", f"{where}: not JSON ({exc})") from exc
        if not isinstance(item, dict):
            raise RoutingError("bad_examples", f"{where}: expected an object "
                                               '{"type": ..., "description": ...}')
        if not _valid_type(item.get("type")):
            raise RoutingError("bad_examples", f"{where}: type must be a task type (1 to "
                                               f"{MAX_TYPE_CHARS} characters, not 'auto')")
        description = item.get("description")
        if not isinstance(description, str) or not description.strip():
            raise RoutingError("bad_examples", f"{where}: description must be a non-empty "
                                               "string")
        rows.append({"type": item["type"], "description": description})
    return rows


def history_rows(events: Iterable[dict]) -> Iterator[dict]:
    """Rows from ``task.created`` events of tasks typed by their submitter, in event order.

    The event's data holds ``type`` and ``description`` (cut at 200 characters); events
    without a usable type or with an empty description are skipped, and so are routed
    tasks (data with ``"routing"``).
    """
    for event in events:
        if not isinstance(event, dict) or event.get("type") != "task.created":
            continue
        data = event.get("data")
        if not isinstance(data, dict) or "routing" in data:
            continue
        description = data.get("description")
        if _valid_type(data.get("type")) and isinstance(description, str) \
                and description.strip():
            yield {"type": data["type"], "description": description}


def too_little_data(rows: list[dict]) -> str | None:
    """Why `rows` cannot teach a router (fewer than two types with MIN_ROWS_PER_TYPE
    descriptions each), or None when they can."""
    sizes: dict[str, int] = {}
    for row in rows:
        sizes[row["type"]] = sizes.get(row["type"], 0) + 1
    usable = sum(n >= MIN_ROWS_PER_TYPE for n in sizes.values())
    if usable >= 2:
        return None
    return (f"need two types with {MIN_ROWS_PER_TYPE} descriptions each; have "
            f"{len(rows)} descriptions, {usable} such types")


def training_rows(examples: Iterable[dict], history: Iterable[dict],
                  per_type_limit: int = PER_TYPE_LIMIT) -> tuple[list[dict], dict]:
    """Rows to train on, and how many came from where (for the report)."""
    kept: dict[str, list[dict]] = {}  # per type, examples first
    seen: set[tuple[str, str]] = set()
    counts = {"examples": 0, "history": 0, "duplicates": 0}
    for source, rows in (("examples", examples), ("history", list(history)[::-1])):
        for row in rows:  # history newest first, so the cap keeps the newest
            description = row["description"][:ROUTE_CHARS]
            key = (row["type"], " ".join(description.lower().split()))
            if key in seen:
                counts["duplicates"] += 1
                continue
            per_type = kept.setdefault(row["type"], [])
            if len(per_type) >= per_type_limit:
                continue
            seen.add(key)
            per_type.append({"type": row["type"], "description": description})
            counts[source] += 1
    return [row for task_type in sorted(kept) for row in kept[task_type]], counts
