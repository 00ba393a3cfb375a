"""Training from the event log, in the training child:

    python -m cortex.services.scheduler.prediction train --home DIR

reads the completed-task history from the event log and prints one line before it loads
scikit-learn and fits (`{"rows": N, "min_samples": M}`: the scheduler answers
`model.train` with it), fits the models, checks their flattened arrays against
scikit-learn, saves the arrays under <home>/models/ (flat.py: the scheduler reads them
with numpy alone), prints the report and exits 0 (1: not trained, with the reason).
"""

from __future__ import annotations

import argparse
import json
import os
import signal

from cortex.protocol import locate
from cortex.services.runtime.eventlog import read_events
from cortex.services.runtime.lineage import die_with_parent, linux_calls
from cortex.services.scheduler.prediction.history import history_from_events, too_few

MIN_SAMPLES = 50  # the fewest rows worth a model (Predictor's default)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cortex-train", description=__doc__)
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--home")
    parser.add_argument("--limit", type=int, default=50_000, help="most recent rows to use")
    args = parser.parse_args(argv)
    if not linux_calls():  # no parent-death signal here: watch the scheduler ourselves
        die_with_parent(os.getppid(), signal.SIGKILL)
    home = locate.find_home(args.home)
    history = history_from_events(read_events(home / "events", type_pattern="task.completed"))
    history = history[-args.limit:]
    print(json.dumps({"rows": len(history), "min_samples": MIN_SAMPLES}), flush=True)
    report = too_few(len(history), MIN_SAMPLES)  # then it never loads scikit-learn
    if report is None:
        from cortex.services.scheduler.prediction.models import FastPathError  # scikit-learn
        from cortex.services.scheduler.prediction.predictor import Predictor

        try:
            report = Predictor(home / "models", min_samples=MIN_SAMPLES).train(history)
        except FastPathError as exc:  # the scheduler could not predict with these
            report = {"trained": False, "samples": len(history), "reason": str(exc)}
    print(json.dumps(report, default=str), flush=True)
    return 0 if report.get("trained", True) else 1
