"""The mixed scenario's learning: its jobs (the synthetic workload, scaled to run), its
two phases, retraining the scheduler's model between them, and how the model's
predictions held up on the tasks it never saw."""

from __future__ import annotations

import random
import time

from cortex.protocol import errors

from . import harness
from .agents import Job

MIXED_TRAIN = 1000  # mixed: tasks of the training phase (with at least MIXED_HELD_OUT more)
MIXED_HELD_OUT = 200


def mixed_phases(tasks: int) -> tuple[int, int]:
    """(training, measurement) task counts of the mixed scenario: 1,000 to train on when
    there are at least 1,200 tasks (so at least 200 are measured), else 5/6 of them."""
    if tasks >= MIXED_TRAIN + MIXED_HELD_OUT:
        return MIXED_TRAIN, tasks - MIXED_TRAIN
    train = round(tasks * 5 / 6)
    return train, tasks - train


def mixed_job(row: dict, rng: random.Random, kinds: set[str], scale: float) -> Job:
    """One synthetic workload row as a task: its duration (read as milliseconds, times
    `scale`) and tokens become the simulated agent's work; 2 % are of the failing type,
    5 % fail at the end of their work and 2 % overrun their reservation."""
    task_type = row["type"] if row["type"] in kinds else "simulated_agent"
    tokens = int(row["tokens"])
    roll = rng.random()
    if roll < 0.02:
        return Job("fail", row["description"], priority=row["priority"], retries=0,
                   tag="fail")
    payload = {"seconds": row["duration"] * scale / 1000.0, "tokens": tokens, "steps": 3,
               "fail": roll < 0.07, "overrun": 0.07 <= roll < 0.09}
    return Job(task_type, row["description"], priority=row["priority"],
               tokens=int(tokens * 1.25) + 1, payload=payload, retries=0, tag=row["type"])


def retrain_model(client, home, timeout: float) -> dict:
    """Ask the scheduler to retrain (`cortex model train`) and wait, at most `timeout`
    seconds, until it has loaded the new model (``trained_at`` differs from the one its
    reply to our request reported). While another training runs (an automatic one, on
    older history) the request is refused: ask again until ours starts. Never raises:
    what happened is in the returned dict."""

    asked = time.monotonic()
    deadline = asked + timeout
    offsets = harness.event_offsets(home)
    out: dict = {"train_calls": 0, "loaded": False}
    ours = None  # time.time() when our training started
    base = None  # trained_at of the model loaded when it started

    try:
        while time.monotonic() < deadline:
            if ours is None:
                at = time.time()  # a training_failed event stamped later is about ours
                reply = client.call("scheduler", "model.train", timeout=10) or {}
                out["train_calls"] += 1
                if reply.get("started"):
                    # The scheduler swaps a finished training in before it starts the
                    # next, so this reply already shows any model loaded before ours.
                    ours, base = at, (reply.get("model") or {}).get("trained_at")
                    out["previous_trained_at"] = base
            else:
                model = (client.call("scheduler", "model.status", timeout=5) or {}
                         ).get("model") or {}
                if model.get("trained_at") not in (None, base):
                    out.update(loaded=True, trained_at=model["trained_at"],
                               samples=model.get("samples"),
                               held_out_within_25pct={
                                   t: (a or {}).get("within_25pct")
                                   for t, a in (model.get("per_target") or {}).items()})
                    break
                if _training_failed(home, offsets, ours):
                    out["reason"] = "the training child failed (model.training_failed)"
                    break
            time.sleep(0.25)  # polling the scheduler for the swap, with a deadline
        else:
            out["reason"] = f"no new model loaded within {timeout:.0f} s"
    except errors.CortexError as exc:
        out["reason"] = f"{type(exc).__name__}: {exc}"
    out["wait_s"] = round(time.monotonic() - asked, 3)
    return out


def _training_failed(home, offsets: dict, since: float) -> bool:
    """Whether a model.training_failed event stamped after `since` reached the JSONL."""
    for line in harness.new_event_lines(home, offsets):
        if b'"model.training_failed"' in line:
            event = harness.parse_event(line)
            if event is not None and event.get("type") == "model.training_failed" \
                    and (event.get("ts") or 0) >= since - 0.5:
                return True
    return False


def _training_line(t: dict) -> str:
    if t.get("loaded"):
        acc = ", ".join(f"{k} {v:.0%}" for k, v in (t.get("held_out_within_25pct") or {}).items()
                        if k in ("duration", "tokens") and v is not None)
        return (f"retrained on {t.get('samples')} rows in {t['wait_s']:.1f} s"
                f" (its held-out share within 25 %: {acc or '-'})")
    return f"not retrained: {t.get('reason')}"


def prediction_accuracy(records: list[dict]) -> dict:
    """How the scheduler's predictions held up: for completed tasks predicted by the
    learned model, the share within ±25 % of the measured duration and tokens (and how
    many tasks each source predicted)."""
    sources: dict[str, int] = {}
    within = {"duration": [], "tokens": []}
    for r in records:
        pred, actual = r.get("predicted") or {}, r.get("actual") or {}
        if r.get("state") != "completed" or not pred or not actual:
            continue
        sources[pred.get("source", "?")] = sources.get(pred.get("source", "?"), 0) + 1
        if pred.get("source") != "model":
            continue
        for target in within:
            truth = actual.get(target)
            if truth:
                within[target].append(abs(pred[target] - truth) <= 0.25 * abs(truth))
    return {"sources": sources,
            **{f"{t}_within_25pct": (sum(v) / len(v) if v else None) for t, v in within.items()},
            "model_predicted": len(within["duration"])}
