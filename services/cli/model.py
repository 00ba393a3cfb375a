"""The prediction models: `cortex model status` and `cortex model train`."""

from __future__ import annotations

from .reach import connect
from .registry import JSON, Exit, command
from .render import emit, emit_json, escape, human_duration, number, percent, short, stamp, table
from .route import render_routing


@command("model status", JSON)
def cmd_model_status(args):
    """Show the prediction models (trained on what and when, held-out accuracy, fallbacks)
    and the router of `--type auto` (held-out accuracy, confusion matrix)."""
    with connect(args) as client:
        status = client.call("scheduler", "model.status")
    if args.json:
        emit_json(status)
    else:
        emit(render_model(status))
    return Exit.OK


def render_model(status: dict) -> str:
    out = []
    model = status.get("model")
    if model:
        types = ", ".join(escape(t) for t in model.get("types", [])) or "-"
        out.append(f"model trained {stamp(model.get('trained_at'))} on "
                   f"{number(model.get('samples'))} completed tasks (types: {types})")
        out.append(table(["TARGET", "WITHIN_25%", "MAE", "R2"], [
            [target, percent(acc.get("within_25pct", 0)), number(acc.get("mae")),
             number(acc.get("r2"))] for target, acc in model.get("per_target", {}).items()]))
    else:
        out.append(f"no model: {short(status.get('reason'), 200)}")
    averages = status.get("averages", {})
    if averages:
        out.append(table(["TYPE", "COMPLETIONS", "MEAN_DURATION", "MEAN_TOKENS"], [
            [t, a.get("duration", {}).get("count"),
             human_duration(a.get("duration", {}).get("mean")),
             number(a.get("tokens", {}).get("mean"))] for t, a in sorted(averages.items())]))
    line = (f"completions since training: {number(status.get('completions_since_training'))}"
            f", training now: {'yes' if status.get('training') else 'no'}")
    if status.get("last_error"):
        line += f", last error: {short(status['last_error'], 300)}"
    out.append(line)
    out.append(render_routing(status.get("routing")))
    return "\n".join(out)


@command("model train", JSON)
def cmd_model_train(args):
    """Retrain the prediction models now, in the background, from the event log's history.

    Exit 0 when a training started (see `cortex model status` for its outcome); 6, with
    the scheduler's reason, when it did not (one is already running, too few completed
    tasks to learn from, ...).
    """
    with connect(args) as client:
        reply = client.call("scheduler", "model.train")
    if args.json:
        emit_json(reply)
    else:
        emit(train_text(reply))
    return Exit.OK if reply.get("started") else Exit.REFUSED


def train_text(reply: dict) -> str:
    if reply.get("started"):
        return "training started in the background; see `cortex model status`"
    reason = reply.get("reason") or "a training is already running"
    return f"training did not start: {short(reason, 300)}"
