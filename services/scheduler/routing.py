"""Routing on submit: a task submitted with `type: "auto"` gets its type from its
description (classify.py's router), and the router is retrained in the background.

- `decide(description)` at submit: the router's Decision under `[routing]
  min_confidence` and `fallback`: routed, to the fallback, or refused (the candidates in
  the reason). With no router yet (none trained, or its file unreadable) an auto task is
  refused with the reason.
- The decision is kept with the task (`task.routing`, shown by `task.status` and
  `cortex task show`) and written under `data["routing"]` of its `task.created` event:
  the chosen type, its confidence, the runner-up and the top 3. History reading skips
  such events, so the router never learns from its own guesses.
- `RouterModel` is what trainer.Trainer drives for the router as it does for the
  predictor: the child (`python -m cortex.services.scheduler.classify_child train`) fits and
  saves, a thread reads the file, `adopt` swaps the new router in with one assignment,
  so dispatch never waits for it. A retrain is due every `retrain_every` tasks submitted
  with an explicit type and a description (at most one a minute), but only once those
  tasks show two types (`can_teach`: a router of one type could only ever answer it), and
  at start when there is no router but an examples file. Like the predictor's, it waits
  for a lull (trainer.lull_allows).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cortex.services.runtime.settings import RoutingSettings
from cortex.services.scheduler.classify_rows import AUTO, RoutingError
from cortex.services.scheduler.trainer import Trainer

UNROUTABLE = "rejected"  # a refused auto task's error code; its message has the candidates
TYPES_TO_TEACH = 2  # a router needs two types to tell apart


def can_teach(described_types: int) -> bool:
    """Can the typed history teach a router? Only with TYPES_TO_TEACH distinct types among
    the tasks submitted with a description (none: nothing to learn from; one: a router
    that can only ever answer that type)."""
    return described_types >= TYPES_TO_TEACH


class RouterModel:
    """The current router (None until one is trained) as trainer.Trainer sees a model."""

    def __init__(self, models_dir: Path, loader):
        self.models_dir = models_dir
        self.loader = loader  # classify.load: imported by the caller (scikit-learn)
        self.router = None
        self.last_error: str | None = None
        self.typed_since = 0  # typed tasks with a description since the last training
        # Distinct types of those (a few are enough to tell): a router trained before
        # learnt two or more from the history it read, which is still there.
        self.described_types: set[str] = set()
        self.adopt(self.read_saved())

    def completions_since_training(self) -> int:
        return self.typed_since

    def read_saved(self):
        """The saved router, or None (the reason kept in `last_error`)."""
        try:
            return self.loader(self.models_dir)
        except RoutingError as e:
            self.last_error = str(e)
            return None

    def adopt(self, router) -> bool:
        if router is None:
            return False
        self.router, self.last_error, self.typed_since = router, None, 0
        self.described_types.update(router.labels[:TYPES_TO_TEACH])
        return True

    def status(self) -> dict:
        return {"last_error": self.last_error}


class Routing:
    def __init__(self, home: Path, settings: RoutingSettings, loader,
                 command: list[str] | None = None):
        self.settings = settings
        self.model = RouterModel(home / "models", loader)
        self.trainer = Trainer(home, self.model, command=command or [
            sys.executable, "-m", "cortex.services.scheduler.classify_child", "train",
            "--home", str(home)], events="router")
        self.counts = {"routed": 0, "fallback": 0, "refused": 0}

    # -- submit -----------------------------------------------------------------------------
    def decide(self, description: str):
        """(Decision, None), or (None, (code, reason)) when the task cannot be routed."""
        router = self.model.router
        if router is None:
            self.counts["refused"] += 1
            return None, (UNROUTABLE, "no routing model yet (" + (
                self.model.last_error or "none trained") + "); give the type, or add "
                "[routing] examples and wait for a training")
        from cortex.services.scheduler.classify import decide  # scikit-learn, as the router

        decision = decide(router.route(description), self.settings.min_confidence,
                          self.settings.fallback)
        self.counts[decision.outcome] += 1
        if decision.type is None:
            return None, (UNROUTABLE, decision.reason)
        return decision, None

    def typed(self, task_type: str, description: str) -> None:
        """A task was submitted with an explicit type: one more row of history, if it has
        a description to learn from."""
        if task_type != AUTO and description and not description.isspace():
            self.model.typed_since += 1
            if len(self.model.described_types) < TYPES_TO_TEACH:
                self.model.described_types.add(task_type)

    def explain(self, description: str, words: int) -> dict:
        router = self.model.router
        if router is None:
            raise RoutingError("no_model", self.model.last_error or "no routing model yet")
        return router.explain(description, words) | {
            "min_confidence": self.settings.min_confidence, "fallback": self.settings.fallback}

    # -- background training ----------------------------------------------------------------
    def maybe_train(self, now: float, queued: bool = False) -> None:
        """At start (no router, but examples to learn from) and every `retrain_every`
        typed submits with a description once they show two types; in a lull."""
        if self.model.router is None and self.settings.examples:
            self.trainer.start_in_lull(now, queued)
        elif can_teach(len(self.model.described_types)):
            self.trainer.maybe_auto(self.settings.retrain_every, now, queued)

    def status(self) -> dict:
        """For `model.status`: the held-out report (accuracy, confusion matrix) and more."""
        router = self.model.router
        report = dict(router.report) if router is not None else {"trained": False}
        return {**report, "min_confidence": self.settings.min_confidence,
                "fallback": self.settings.fallback, "decisions": dict(self.counts),
                "typed_since_training": self.model.typed_since,
                "history_can_teach": can_teach(len(self.model.described_types)),
                "retrain_every": self.settings.retrain_every,
                **self.trainer.status(), "last_error": self.model.last_error,
                "age_s": None if router is None else round(
                    time.time() - report.get("trained_at", time.time()), 1)}
