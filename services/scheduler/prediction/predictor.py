"""The `Predictor`: a task's resource needs from the best source it has.

1. "model": the trained models (models.py), for the task types they saw at least
   `TYPE_MIN_ROWS` times in training; an unseen type has nothing to go on but its name.
2. "average": a per-type running average of every completion this process observed
   (plain mean for the first `AVERAGE_WINDOW`, then exponential, so it follows drift).
3. "default": the configured defaults (`DEFAULTS`, overridden by `defaults`).

Used from the scheduler's loop only; training runs in a child process (trainer.py), and
its models are read by `read_saved()` in a thread and swapped in by `adopt()`. Predicting
and loading need numpy alone (flat.py); only `train()` loads scikit-learn (models.py).
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortex.services.scheduler.prediction.history import (
    LEGACY_MODEL_FILE,
    MODEL_FILE,
    TARGETS,
    clean_row,
    too_few,
)

if TYPE_CHECKING:  # flat.py loads numpy: only once there is a model
    from cortex.services.scheduler.prediction.flat import FlatModels

DEFAULTS = {"duration": 60.0, "tokens": 2000.0, "memory_mb": 64.0, "cpu_s": 1.0}
AVERAGE_WINDOW = 100  # plain mean up to this many completions, then EWMA with alpha 1/window
HISTORY_LIMIT = 50_000  # completions a predictor keeps for train() with no rows given


@dataclass(slots=True)
class Prediction:
    duration: float
    tokens: float
    memory_mb: float
    cpu_s: float
    source: str  # "model" | "average" | "default"

    def as_dict(self) -> dict[str, Any]:
        # Field by field: asdict deep-copies through every value, at every submit.
        return {"duration": self.duration, "tokens": self.tokens,
                "memory_mb": self.memory_mb, "cpu_s": self.cpu_s, "source": self.source}


class _RunningAverage:
    __slots__ = ("count", "mean")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.mean += (value - self.mean) * max(1.0 / self.count, 1.0 / AVERAGE_WINDOW)


class Predictor:
    """`min_samples`: fewest valid history rows `train()` fits a model on; `history_limit`:
    completions kept for it (0 where training reads its rows elsewhere)."""

    def __init__(self, model_dir: str | os.PathLike | None, defaults: dict[str, float] | None
                 = None, min_samples: int = 50, history_limit: int = HISTORY_LIMIT):
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.defaults = {**DEFAULTS, **{k: float(v) for k, v in (defaults or {}).items()
                                        if k in DEFAULTS}}
        self.min_samples = max(int(min_samples), 10)
        self._models: FlatModels | None = None  # swapped whole, never changed in place
        self.outdated = False  # only models of an older format saved: retrain at once
        self._averages: dict[str, dict[str, _RunningAverage]] = {}
        self._history: deque[dict] = deque(maxlen=max(0, int(history_limit)))
        self._since_training = 0
        self._reason: str | None = "no model trained yet"  # why there is no model
        self._last_error: str | None = None

    def predict(self, task_type: str, priority: str, description: str,
                payload_size: int) -> Prediction:
        description = description if isinstance(description, str) else str(description or "")
        models = self._models
        if models is not None and task_type in models.type_index:
            try:
                return Prediction(*models.predict(task_type, priority, description,
                                                  payload_size), source="model")
            except Exception as exc:  # never let a bad model break dispatch
                self._last_error = f"predict: {type(exc).__name__}: {exc}"
        per_type = self._averages.get(task_type)
        if per_type:
            values = {t: (per_type[t].mean if t in per_type else self.defaults[t])
                      for t in TARGETS}
            return Prediction(**values, source="average")
        return Prediction(**self.defaults, source="default")

    def observe(self, task_type: str, priority: str, description: str, payload_size: int,
                actual: dict[str, float]) -> None:
        """Record a completion: update the type's averages and append to the history.

        Targets missing or not finite/non-negative in `actual` are skipped; the row joins
        the training history only when all four are usable.
        """
        per_type = self._averages.setdefault(str(task_type), {})
        usable = 0
        for t in TARGETS:
            try:
                v = float(actual[t])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(v) and v >= 0:
                per_type.setdefault(t, _RunningAverage()).add(v)
                usable += 1
        if usable < len(TARGETS) or task_type in (None, ""):
            return
        if self._history.maxlen != 0:  # the scheduler keeps none: its child reads the log
            row = clean_row({"type": task_type, "priority": priority,
                             "description": description, "payload_size": payload_size,
                             **actual})
            if row is None:
                return
            self._history.append(row)
        self._since_training += 1

    def completions_since_training(self) -> int:
        return self._since_training

    def train(self, history: list[dict] | None = None) -> dict:
        """Fit new models (on `history`, else the completions observed), save them, swap
        them in; returns the report. `report["trained"]` is False (and nothing changes)
        with fewer than `min_samples` valid rows."""
        rows = [c for c in map(clean_row, self._history if history is None else history)
                if c is not None]
        refused = too_few(len(rows), self.min_samples)
        if refused is not None:
            return refused
        from cortex.services.scheduler.prediction import flat
        from cortex.services.scheduler.prediction.models import fit  # scikit-learn

        fitted = fit(rows)
        if self.model_dir is not None:
            flat.save(self.model_dir, fitted.models, fitted.probe_x, fitted.probe_y)
        self._models = fitted.models
        self._reason = None
        self._since_training = 0
        return fitted.models.report

    def read_saved(self) -> Predictor:
        """The models saved under `model_dir`, read into a new predictor (slow: safe to
        call from another thread, changes nothing here)."""
        return Predictor.load(self.model_dir, self.defaults, self.min_samples,
                              self._history.maxlen or 0)

    def adopt(self, fresh: Predictor) -> bool:
        """Swap in the models of `fresh` (from read_saved()); keeps the running averages.
        False, with the reason kept for status, if it has none."""
        if fresh._models is None:
            self._last_error = fresh._reason
            return False
        self._models = fresh._models
        self._reason = None
        self._since_training = 0
        self.outdated = False
        return True

    def status(self) -> dict:
        models = self._models
        out = {
            "loaded": models is not None,
            "reason": self._reason,
            "last_error": self._last_error,
            "completions_since_training": self._since_training,
            "history_rows": len(self._history),
            "min_samples": self.min_samples,
            "model_dir": str(self.model_dir) if self.model_dir is not None else None,
            "defaults": dict(self.defaults),
            "averages": {t: {k: {"count": a.count, "mean": a.mean} for k, a in v.items()}
                         for t, v in self._averages.items()},
        }
        if models is not None:
            out["model"] = {**models.report, "cached_predictions": len(models.cache)}
        return out

    @classmethod
    def load(cls, model_dir: str | os.PathLike, defaults: dict[str, float] | None = None,
             min_samples: int = 50, history_limit: int = HISTORY_LIMIT) -> Predictor:
        """A predictor with the models saved in `model_dir`, or without (reason in status)."""
        self = cls(model_dir, defaults, min_samples, history_limit)
        path = Path(model_dir) / MODEL_FILE
        if not path.exists():
            legacy = Path(model_dir) / LEGACY_MODEL_FILE
            self.outdated = legacy.exists()  # the next lull retrains them (trainer.py)
            self._reason = (f"models saved in an older format ({legacy}): retrained in "
                            "the next lull, or now with cortex model train") if \
                self.outdated else f"no saved model at {path}"
            return self
        try:
            from cortex.services.scheduler.prediction import flat

            self._models = flat.load(Path(model_dir))
        except Exception as exc:
            self._reason = f"could not load {path}: {type(exc).__name__}: {exc}"
            return self
        self._reason = None
        return self
