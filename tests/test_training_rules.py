"""When automatic trainings start (pure): they wait for a lull (no task queued for
workers for LULL_SECONDS) or at most MAX_LULL_WAIT; MIN_TRAINING_GAP still holds; a
request starts at once; and the router is trained only when the typed history shows two
types with descriptions."""

from __future__ import annotations

import sys

import pytest

from cortex.services.scheduler.routing import can_teach
from cortex.services.scheduler.trainer import (
    LULL_SECONDS,
    MAX_LULL_WAIT,
    MIN_TRAINING_GAP,
    Trainer,
    lull_allows,
)


@pytest.mark.parametrize(("waited", "quiet_for", "allowed"), [
    (0.0, LULL_SECONDS, True),  # nothing queued for long enough: at once
    (0.0, LULL_SECONDS - 0.001, False),  # a moment's empty queue is no lull
    (0.0, None, False),  # tasks queued: wait
    (MAX_LULL_WAIT - 0.001, None, False),
    (MAX_LULL_WAIT, None, True),  # never idle: it still runs after the longest wait
    (MAX_LULL_WAIT * 3, None, True),
])
def test_the_lull_rule(waited, quiet_for, allowed):
    now = 1000.0 + waited
    quiet_since = None if quiet_for is None else now - quiet_for
    assert lull_allows(1000.0, quiet_since, now) is allowed


def test_the_lull_rule_takes_its_limits():
    assert lull_allows(0.0, None, 5.0, max_wait=5.0)
    assert not lull_allows(0.0, None, 4.9, max_wait=5.0)
    assert lull_allows(0.0, 3.0, 4.0, lull=1.0) and not lull_allows(0.0, 3.5, 4.0, lull=1.0)


@pytest.mark.parametrize(("types", "teaches"), [(0, False), (1, False), (2, True), (7, True)])
def test_the_router_needs_two_described_types(types, teaches):
    assert can_teach(types) is teaches


class Completions:
    """What Trainer asks of a model: completions since its last training."""

    def __init__(self, count: int = 0):
        self.count = count

    def completions_since_training(self) -> int:
        return self.count

    def status(self) -> dict:
        return {}


@pytest.fixture
def quiet_trainer(tmp_path, monkeypatch):
    """A Trainer whose start() records the time instead of running a child."""
    trainer = Trainer(tmp_path, Completions(10), command=[sys.executable, "-c", "pass"])
    started: list[float] = []

    def start(now: float) -> None:
        started.append(now)
        trainer.due_since = None
        trainer.next_auto = now + MIN_TRAINING_GAP

    monkeypatch.setattr(trainer, "start", start)
    return trainer, started


def test_an_automatic_training_waits_for_no_task_queued(quiet_trainer):
    trainer, started = quiet_trainer
    trainer.maybe_auto(5, 10.0, queued=True)
    assert started == [] and trainer.status()["waiting_for_lull"]
    trainer.maybe_auto(5, 20.0, queued=True)
    assert started == []
    trainer.maybe_auto(5, 21.0, queued=False)  # the first look with nothing queued
    trainer.maybe_auto(5, 21.0 + LULL_SECONDS - 1, queued=False)
    assert started == []
    trainer.maybe_auto(5, 21.0 + LULL_SECONDS - 0.5, queued=True)  # a burst: not yet
    trainer.maybe_auto(5, 21.0 + LULL_SECONDS, queued=False)
    assert started == []
    trainer.maybe_auto(5, 21.0 + 2 * LULL_SECONDS, queued=False)
    assert started == [21.0 + 2 * LULL_SECONDS] and not trainer.status()["waiting_for_lull"]


def test_a_suite_never_idle_still_retrains_after_the_longest_wait(quiet_trainer):
    trainer, started = quiet_trainer
    trainer.maybe_auto(5, 10.0, queued=True)  # due from here
    trainer.maybe_auto(5, 10.0 + MAX_LULL_WAIT - 1, queued=True)
    assert started == []
    trainer.maybe_auto(5, 10.0 + MAX_LULL_WAIT, queued=True)
    assert started == [10.0 + MAX_LULL_WAIT]


def test_the_gap_between_automatic_trainings_still_holds(quiet_trainer):
    trainer, started = quiet_trainer
    trainer.maybe_auto(5, 10.0 - LULL_SECONDS, queued=False)  # quiet before it was due
    trainer.maybe_auto(5, 10.0, queued=False)
    trainer.maybe_auto(5, 10.0 + MIN_TRAINING_GAP - 1, queued=False)
    assert started == [10.0]
    assert not trainer.status()["waiting_for_lull"]  # not due before the gap is over
    trainer.maybe_auto(5, 10.0 + MIN_TRAINING_GAP, queued=False)
    assert started == [10.0, 10.0 + MIN_TRAINING_GAP]


def test_too_few_completions_are_not_due(quiet_trainer):
    trainer, started = quiet_trainer
    trainer.maybe_auto(50, 10.0, queued=False)
    trainer.maybe_auto(0, 10.0, queued=False)  # 0: never
    assert started == [] and not trainer.status()["waiting_for_lull"]


def test_a_training_asked_for_starts_at_once_and_clears_the_wait(tmp_path):
    """What model.train does: no lull needed."""
    trainer = Trainer(tmp_path, Completions(10), command=[sys.executable, "-c", "pass"])
    trainer.maybe_auto(5, 10.0, queued=True)
    assert trainer.due_since == 10.0
    try:
        trainer.start(11.0)
        assert trainer.busy and trainer.due_since is None
    finally:
        trainer.stop()
