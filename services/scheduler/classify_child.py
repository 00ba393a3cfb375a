"""The router's training child, light until it has something to learn:

    python -m cortex.services.scheduler.classify_child train --home DIR
    python -m cortex.services.scheduler.classify_child explain --home DIR "a description"

`train` reads the examples file and the typed-task history (classify_rows.py), and when
they cannot teach a router (fewer than two types with enough descriptions) prints the
reason and exits 1 before it loads scikit-learn: a suite of one type, or of tasks without
descriptions, pays for no import and no fit. Otherwise it trains (classify.py), saves
under <home>/models/ and prints the report (exit 0). `explain` asks the saved router.
"""

from __future__ import annotations

import argparse
import os
from collections import deque
from pathlib import Path

import orjson

from cortex.protocol import locate
from cortex.services.runtime.eventlog import read_events
from cortex.services.runtime.settings import ConfigError
from cortex.services.runtime.settings import load as load_settings
from cortex.services.scheduler.classify_rows import (
    RoutingError,
    history_rows,
    read_examples,
    too_little_data,
    training_rows,
)

HISTORY_LIMIT = 200_000  # newest typed tasks read from the event log


def rows_from_home(home: str | os.PathLike, limit: int = HISTORY_LIMIT
                   ) -> tuple[list[dict], dict]:
    """The home's examples and typed-task history as training rows, and their sources."""
    home = Path(home)
    examples_path = load_settings(home).routing.examples
    examples = read_examples(examples_path) if examples_path else []
    # The text filter skips decoding every other event's line.
    events = read_events(home / "events", type_pattern="task.created", text="task.created")
    return training_rows(examples, deque(history_rows(events), maxlen=limit))


def train_from_home(home: str | os.PathLike, limit: int = HISTORY_LIMIT):
    """Train on the home's rows and save under models/ (classify.Router); RoutingError
    `too_little_data` before scikit-learn is loaded when the rows cannot teach one."""
    rows, counts = rows_from_home(home, limit)
    reason = too_little_data(rows)
    if reason is not None:
        raise RoutingError("too_little_data", reason)
    from cortex.services.scheduler import classify  # scikit-learn

    router = classify.train(rows, counts)
    classify.save(router, Path(home) / "models")
    return router


def main(argv=None) -> int:
    """Train the router (printing its report as JSON; exit 1 with the reason when it
    cannot), or explain a description with the saved one."""
    parser = argparse.ArgumentParser(prog="cortex-route", description=main.__doc__)
    parser.add_argument("command", choices=["train", "explain"])
    parser.add_argument("description", nargs="?", default="")
    parser.add_argument("--home")
    parser.add_argument("--limit", type=int, default=HISTORY_LIMIT,
                        help="newest typed tasks to learn from")
    args = parser.parse_args(argv)
    home = locate.find_home(args.home)
    try:
        if args.command == "train":
            out = train_from_home(home, args.limit).report
        else:
            from cortex.services.scheduler import classify  # scikit-learn

            out = classify.load(home / "models").explain(args.description)
    except (RoutingError, ConfigError) as exc:
        print(orjson.dumps({"trained": False, "code": exc.code, "reason": str(exc)}).decode())
        return 1
    print(orjson.dumps(out).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
