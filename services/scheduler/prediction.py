"""Resource predictions for queued tasks: duration (s), tokens, memory growth (MB), CPU (s).

Memory is how far the task grows its worker's RSS (the worker's interpreter is there
anyway), CPU the seconds of CPU it uses: both are learnt per task, from its own features,
so a type that mixes sleeps and no-ops is not given the product of two averages.

The scheduler asks :class:`Predictor` before admission and dispatch. Three sources, in order:

1. ``"model"``: one scikit-learn ``HistGradientBoostingRegressor`` per target, trained on the
   suite's completed-task history. Used only for task types the model saw at least
   ``TYPE_MIN_ROWS`` times in training; an unseen type has nothing to go on but its name.
2. ``"average"``: a per-type running average of every completion observed by this process
   (plain mean for the first ``AVERAGE_WINDOW`` completions, then an exponential average so
   it follows drift).
3. ``"default"``: the configured defaults (``DEFAULTS`` overridden by the ``defaults`` dict).

Features: one-hot task type, priority ordinal, description length (log chars, words), hashed
description words (``HashingVectorizer``, ``N_HASH`` columns), log payload size.
Every target is learnt as ``log1p`` (they are skewed).

Predicting one row must be cheap (it sits on the dispatch path), and sklearn's own
``predict`` walks trees one Python call at a time (~15 ms for one row here). So at training
time the fitted trees of all four models are flattened into a few numpy arrays and walked
together, one level per numpy step (checked against ``model.predict`` before it is trusted;
if the check fails the slow path is used and ``status()`` says so). Results are also cached per
(type, priority, description hash, payload bucket), the payload feature being bucketed so a
cached answer is exactly what the model would say.

Training runs in a background thread; it builds a whole new :class:`_ModelSet` and swaps
one reference, so ``predict`` never waits for it. Files under ``model_dir``:
``predictor.joblib`` (models + report, what :meth:`Predictor.load` reads) and
``predictor-report.json`` (the same report, for ``cat``/``jq``), both written atomically.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import orjson
import sklearn
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.utils import murmurhash3_32
from threadpoolctl import threadpool_limits

from cortex.protocol.vocabulary import PRIORITY_RANK

TARGETS = ("duration", "tokens", "memory_mb", "cpu_s")
LOG_TARGETS = frozenset(TARGETS)
DEFAULTS = {"duration": 60.0, "tokens": 2000.0, "memory_mb": 64.0, "cpu_s": 1.0}

N_HASH = 256  # hashed description-word columns: enough for keywords, small enough to fit fast
MAX_TYPES = 200  # one-hot columns; rarer types fall back to averages
TYPE_MIN_ROWS = 5  # a type seen fewer times in training is not trusted to the model
AVERAGE_WINDOW = 100  # plain mean up to this many completions, then EWMA with alpha 1/window
HISTORY_LIMIT = 50_000
CACHE_LIMIT = 8192
PAYLOAD_STEP = 4  # payload feature = round(4 * log2(1 + bytes)) / 4: ~19% buckets
MODEL_FILE = "predictor.joblib"
REPORT_FILE = "predictor-report.json"
FORMAT_VERSION = 2  # 2: memory is growth and CPU is seconds (1 had peak RSS and cores)

_HGB_PARAMS = dict(max_iter=60, learning_rate=0.2, max_depth=6, max_leaf_nodes=31, max_bins=64,
                   min_samples_leaf=10, l2_regularization=1e-3, random_state=0)
_N_DENSE = 4  # priority, log chars, words, log payload
_VECTORIZER = HashingVectorizer(n_features=N_HASH, alternate_sign=False, norm=None,
                                binary=True, dtype=np.float64)
_ANALYZE = _VECTORIZER.build_analyzer()


@dataclass(slots=True)
class Prediction:
    duration: float
    tokens: float
    memory_mb: float
    cpu_s: float
    source: str  # "model" | "average" | "default"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- features


def _payload_feature(payload_size: Any) -> float:
    try:
        size = max(0, int(payload_size))
    except (TypeError, ValueError):
        size = 0
    return round(PAYLOAD_STEP * math.log2(1 + size)) / PAYLOAD_STEP


def _hash_columns(description: str) -> set[int]:
    """Columns HashingVectorizer would set for one text, without its per-call overhead."""
    cols = set()
    for token in _ANALYZE(description):
        h = murmurhash3_32(token, seed=0, positive=False)
        # Same index rule as sklearn's _hashing_fast (abs(-2**31) is special-cased there).
        cols.add((2147483647 - (N_HASH - 1)) % N_HASH if h == -2147483648 else abs(h) % N_HASH)
    return cols


def _dense(priority: Any, description: str, payload_size: Any) -> list[float]:
    return [float(PRIORITY_RANK.get(priority, PRIORITY_RANK["medium"])),
            math.log1p(len(description)), float(len(description.split())),
            _payload_feature(payload_size)]


def _clean_row(row: dict) -> dict | None:
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


# ---------------------------------------------------------------- flattened trees


class _FlatForest:
    """All trees of several HGB regressors as flat arrays, walked together for one row.

    Leaves point to themselves with an infinite threshold, so every tree can take exactly
    ``depth`` steps and no per-tree branching is needed.
    """

    def __init__(self, models: list[HistGradientBoostingRegressor]):
        feat, thr, left, right, value, roots, owner = [], [], [], [], [], [], []
        offset, depth = 0, 0
        for m_idx, model in enumerate(models):
            for per_iteration in model._predictors:
                for tree in per_iteration:
                    nodes = tree.nodes
                    if nodes["is_categorical"].any():
                        raise ValueError("categorical splits are not flattened")
                    n = len(nodes)
                    leaf = nodes["is_leaf"].astype(bool)
                    own = np.arange(offset, offset + n)
                    feat.append(np.where(leaf, 0, nodes["feature_idx"]))
                    thr.append(np.where(leaf, np.inf, nodes["num_threshold"]))
                    left.append(np.where(leaf, own, nodes["left"].astype(np.int64) + offset))
                    right.append(np.where(leaf, own, nodes["right"].astype(np.int64) + offset))
                    value.append(np.where(leaf, nodes["value"], 0.0))
                    roots.append(offset)
                    owner.append(m_idx)
                    depth = max(depth, int(nodes["depth"].max()))
                    offset += n
        self.feat = np.concatenate(feat).astype(np.intp)
        self.thr = np.concatenate(thr)
        self.left = np.concatenate(left).astype(np.intp)
        self.right = np.concatenate(right).astype(np.intp)
        self.value = np.concatenate(value)
        self.roots = np.asarray(roots, dtype=np.intp)
        self.depth = depth
        self.baseline = np.array([float(np.ravel(m._baseline_prediction)[0]) for m in models])
        # Trees are grouped by model, so each model's sum is one reduceat segment.
        owner_arr = np.asarray(owner)
        self.starts = np.searchsorted(owner_arr, np.arange(len(models)))

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        idx = self.roots
        for _ in range(self.depth):
            idx = np.where(x[self.feat[idx]] <= self.thr[idx], self.left[idx], self.right[idx])
        return self.baseline + np.add.reduceat(self.value[idx], self.starts)


# ---------------------------------------------------------------- a trained model set


class _ModelSet:
    """Immutable once built: models, their feature layout, report, and a prediction cache."""

    def __init__(self, models: dict[str, HistGradientBoostingRegressor], types: list[str],
                 report: dict):
        self.models = models
        self.types = types
        self.type_index = {t: i for i, t in enumerate(types)}
        self.report = report
        self.n_features = len(types) + _N_DENSE + N_HASH
        self.cache: dict[tuple, tuple[float, ...]] = {}
        self.probe: np.ndarray | None = None  # held-out rows that check the fast path
        self.flat: _FlatForest | None = None
        self.fast_path_error: str | None = None

    # Training-time matrix: the same columns _row() builds one at a time.
    def matrix(self, rows: list[dict]) -> np.ndarray:
        k = len(self.types)
        X = np.zeros((len(rows), self.n_features))
        for i, r in enumerate(rows):
            j = self.type_index.get(r["type"])
            if j is not None:
                X[i, j] = 1.0
            X[i, k:k + _N_DENSE] = _dense(r["priority"], r["description"], r["payload_size"])
        X[:, k + _N_DENSE:] = _VECTORIZER.transform([r["description"] for r in rows]).toarray()
        return X

    def _row(self, task_type: str, priority: str, description: str, payload: Any) -> np.ndarray:
        k = len(self.types)
        x = np.zeros(self.n_features)
        x[self.type_index[task_type]] = 1.0
        x[k:k + _N_DENSE] = _dense(priority, description, payload)
        cols = _hash_columns(description)
        if cols:
            x[[k + _N_DENSE + c for c in cols]] = 1.0
        return x

    def enable_fast_path(self, probe: np.ndarray) -> None:
        try:
            flat = _FlatForest([self.models[t] for t in TARGETS])
            fast = np.array([flat.predict_one(x) for x in probe])
            slow = np.column_stack([self.models[t].predict(probe) for t in TARGETS])
            if not np.allclose(fast, slow, rtol=1e-9, atol=1e-9):
                raise ValueError("flattened trees disagree with predict()")
            self.flat = flat
        except Exception as exc:  # sklearn internals moved: stay correct, just slower
            self.fast_path_error = f"{type(exc).__name__}: {exc}"

    def predict(self, task_type: str, priority: str, description: str,
                payload_size: Any) -> tuple[float, ...]:
        key = (task_type, priority, hash(description), len(description),
               _payload_feature(payload_size))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        x = self._row(task_type, priority, description, payload_size)
        if self.flat is not None:
            raw = self.flat.predict_one(x)
        else:
            raw = [float(self.models[t].predict(x[None, :])[0]) for t in TARGETS]
        out = tuple(_from_model_space(t, float(v)) for t, v in zip(TARGETS, raw, strict=True))
        if len(self.cache) >= CACHE_LIMIT:
            self.cache.clear()  # crude but O(1) and thread-safe under the GIL
        self.cache[key] = out
        return out


def _to_model_space(target: str, y: np.ndarray) -> np.ndarray:
    return np.log1p(y) if target in LOG_TARGETS else y


def _from_model_space(target: str, v: float) -> float:
    v = math.expm1(min(v, 700.0)) if target in LOG_TARGETS else v
    return max(0.0, v)


# ---------------------------------------------------------------- running averages


class _RunningAverage:
    __slots__ = ("count", "mean")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.mean += (value - self.mean) * max(1.0 / self.count, 1.0 / AVERAGE_WINDOW)


# ---------------------------------------------------------------- the predictor


class Predictor:
    """Predicts a task's resource needs; see the module docstring for sources and files.

    ``min_samples``: fewest valid history rows :meth:`train` will fit a model on.
    Thread-safety: ``predict``/``observe``/``status`` may be called from any thread while
    a training thread runs.
    """

    def __init__(self, model_dir: str | os.PathLike | None, defaults: dict[str, float] | None
                 = None, min_samples: int = 50):
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.defaults = {**DEFAULTS, **{k: float(v) for k, v in (defaults or {}).items()
                                        if k in DEFAULTS}}
        self.min_samples = max(int(min_samples), 10)
        self._models: _ModelSet | None = None  # swapped whole, never mutated in place
        self._averages: dict[str, dict[str, _RunningAverage]] = {}
        self._history: deque[dict] = deque(maxlen=HISTORY_LIMIT)
        self._lock = threading.Lock()  # guards averages, history and the counters
        self._since_training = 0
        self._train_lock = threading.Lock()  # one training at a time
        self._thread: threading.Thread | None = None
        self._reason: str | None = "no model trained yet"
        self._last_error: str | None = None

    # ------------------------------------------------------------ prediction

    def predict(self, task_type: str, priority: str, description: str,
                payload_size: int) -> Prediction:
        description = description if isinstance(description, str) else str(description or "")
        models = self._models  # one read: a concurrent swap cannot mix two model sets
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

    # ------------------------------------------------------------ learning online

    def observe(self, task_type: str, priority: str, description: str, payload_size: int,
                actual: dict[str, float]) -> None:
        """Record a completion: update the type's averages and append to the history.

        Targets missing or not finite/non-negative in ``actual`` are skipped; the row joins
        the training history only when all four are usable.
        """
        row = {"type": task_type, "priority": priority, "description": description,
               "payload_size": payload_size, **(actual or {})}
        clean = _clean_row(row)
        with self._lock:
            per_type = self._averages.setdefault(str(task_type), {})
            for t in TARGETS:
                try:
                    v = float(actual[t])
                except (KeyError, TypeError, ValueError):
                    continue
                if math.isfinite(v) and v >= 0:
                    per_type.setdefault(t, _RunningAverage()).add(v)
            if clean is not None:
                self._history.append(clean)
                self._since_training += 1

    def replay(self, rows: Iterable[dict]) -> int:
        """Observe many training rows (e.g. :func:`history_from_events` after a restart)."""
        n = 0
        for r in rows:
            actual = {t: r[t] for t in TARGETS if t in r}
            self.observe(r.get("type"), r.get("priority"), r.get("description") or "",
                         r.get("payload_size") or 0, actual)
            n += 1
        return n

    def completions_since_training(self) -> int:
        return self._since_training

    # ------------------------------------------------------------ training

    def train(self, history: list[dict] | None = None) -> dict:
        """Fit new models, hold out 20% to measure them, save, then swap them in.

        Returns the report; ``report["trained"]`` is False (and nothing changes) when there
        are fewer than ``min_samples`` valid rows.
        """
        with self._train_lock:
            with self._lock:
                source = list(self._history) if history is None else history
                seen = self._since_training
            rows = [c for c in map(_clean_row, source) if c is not None]
            if len(rows) < self.min_samples:
                return {"trained": False, "samples": len(rows),
                        "reason": f"{len(rows)} valid rows < min_samples {self.min_samples}"}
            started = time.perf_counter()
            model_set = _fit(rows)
            model_set.report["train_seconds"] = round(time.perf_counter() - started, 3)
            if self.model_dir is not None:
                _save(self.model_dir, model_set)
            self._models = model_set  # the atomic swap
            self._reason = None
            with self._lock:
                if history is None:
                    self._since_training -= seen  # keep completions that raced the fit
                else:
                    self._since_training = 0
            return model_set.report

    def read_saved(self) -> Predictor:
        """The models saved under ``model_dir``, read into a new predictor (slow: safe to
        call from another thread, changes nothing here)."""
        return Predictor.load(self.model_dir, self.defaults, self.min_samples)

    def adopt(self, fresh: Predictor) -> bool:
        """Swap in the models of ``fresh`` (from :meth:`read_saved`); keeps the running
        averages. False, with the reason kept for status, if it has none."""
        if fresh._models is None:
            self._last_error = fresh._reason
            return False
        self._models = fresh._models
        self._reason = None
        with self._lock:
            self._since_training = 0
        return True

    def train_in_background(self) -> threading.Thread | None:
        """Start :meth:`train` in a daemon thread unless one is running (then None)."""
        with self._lock:  # check-and-start as one step, so two callers start one thread
            if self._thread is not None and self._thread.is_alive():
                return None
            thread = threading.Thread(target=self._train_quietly, name="predictor-train",
                                      daemon=True)
            self._thread = thread
            thread.start()
        return thread

    def _train_quietly(self) -> None:
        try:
            report = self.train()
            if not report.get("trained", True):
                self._last_error = report["reason"]
        except Exception as exc:
            self._last_error = f"train: {type(exc).__name__}: {exc}"

    # ------------------------------------------------------------ inspection

    def status(self) -> dict:
        models = self._models
        with self._lock:
            averages = {t: {k: {"count": a.count, "mean": a.mean} for k, a in v.items()}
                        for t, v in self._averages.items()}
            history = len(self._history)
        out = {
            "loaded": models is not None,
            "reason": self._reason,  # why there is no model, when there is none
            "training": self._thread is not None and self._thread.is_alive(),
            "last_error": self._last_error,
            "completions_since_training": self._since_training,
            "history_rows": history,
            "min_samples": self.min_samples,
            "model_dir": str(self.model_dir) if self.model_dir is not None else None,
            "defaults": dict(self.defaults),
            "averages": averages,
        }
        if models is not None:
            out["model"] = {**models.report, "fast_path": models.flat is not None,
                            "fast_path_error": models.fast_path_error,
                            "cached_predictions": len(models.cache)}
        return out

    @classmethod
    def load(cls, model_dir: str | os.PathLike, defaults: dict[str, float] | None = None,
             min_samples: int = 50) -> Predictor:
        """A predictor with the models saved in ``model_dir``, or without (reason in status)."""
        self = cls(model_dir, defaults, min_samples)
        path = Path(model_dir) / MODEL_FILE
        if not path.exists():
            self._reason = f"no saved model at {path}"
            return self
        try:
            blob = joblib.load(path)
            if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
                raise ValueError("unknown file format")
            if blob.get("sklearn") != sklearn.__version__:
                # Pickled estimators are only promised to work on the version that wrote them.
                raise ValueError(f"saved by scikit-learn {blob.get('sklearn')}, "
                                 f"running {sklearn.__version__}")
            models = blob["models"]
            if set(models) != set(TARGETS) or not all(
                    isinstance(m, HistGradientBoostingRegressor) for m in models.values()):
                raise ValueError("models missing or of the wrong kind")
            model_set = _ModelSet(models, list(blob["types"]), dict(blob["report"]))
            model_set.probe = np.asarray(blob["probe"], dtype=np.float64)
            model_set.enable_fast_path(model_set.probe)
        except Exception as exc:
            self._reason = f"could not load {path}: {type(exc).__name__}: {exc}"
            return self
        self._models = model_set
        self._reason = None
        return self


# ---------------------------------------------------------------- fitting and saving


def _fit(rows: list[dict]) -> _ModelSet:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["type"]] = counts.get(r["type"], 0) + 1
    types = sorted((t for t, c in counts.items() if c >= TYPE_MIN_ROWS),
                   key=lambda t: (-counts[t], t))[:MAX_TYPES]
    model_set = _ModelSet({}, sorted(types), {})
    X = model_set.matrix(rows)
    Y = {t: np.array([r[t] for r in rows]) for t in TARGETS}

    order = np.random.default_rng(0).permutation(len(rows))
    n_test = max(1, len(rows) // 5)
    test, fit_idx = order[:n_test], order[n_test:]
    per_target = {}
    # One OpenMP thread: leave the other core to the scheduler that owns this thread.
    with threadpool_limits(limits=1, user_api="openmp"):
        for t in TARGETS:
            model = HistGradientBoostingRegressor(**_HGB_PARAMS)
            model.fit(X[fit_idx], _to_model_space(t, Y[t][fit_idx]))
            model_set.models[t] = model
            pred = np.array([_from_model_space(t, v) for v in model.predict(X[test])])
            per_target[t] = _accuracy(Y[t][test], pred)

    model_set.report.update({
        "trained": True,
        "trained_at": time.time(),
        "samples": len(rows),
        "fit_rows": len(fit_idx),
        "held_out_rows": n_test,
        "types": {t: counts[t] for t in model_set.types},
        "types_not_modelled": sorted(set(counts) - set(model_set.types)),
        "per_target": per_target,
        "model": f"HistGradientBoostingRegressor({_HGB_PARAMS})",
        "sklearn": sklearn.__version__,
    })
    model_set.probe = X[test[:50]]
    model_set.enable_fast_path(model_set.probe)
    return model_set


def _accuracy(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    err = np.abs(pred - truth)
    within = err <= 0.25 * np.abs(truth)
    var = float(np.var(truth))
    r2 = 1.0 - float(np.mean((pred - truth) ** 2)) / var if var > 0 else 0.0
    return {"within_25pct": float(within.mean()), "mae": float(err.mean()), "r2": r2}


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _save(model_dir: Path, model_set: _ModelSet) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT_VERSION, "sklearn": sklearn.__version__,
            "models": model_set.models, "types": model_set.types,
            "report": model_set.report, "probe": model_set.probe}
    _atomic_write(model_dir / MODEL_FILE, lambda f: joblib.dump(blob, f))
    _atomic_write(model_dir / REPORT_FILE,
                  lambda f: f.write(orjson.dumps(model_set.report, option=orjson.OPT_INDENT_2)))
    try:  # make the renames durable too
        dir_fd = os.open(model_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# ---------------------------------------------------------------- event log


def history_from_events(events: Iterable[dict | str | bytes]) -> list[dict]:
    """Training rows from the suite's event log (dicts, or raw JSONL lines).

    An event is used when its ``"type"`` (or ``"event"``) is ``"task.completed"`` and its
    ``"data"`` holds::

        {"type": str,            # task type (``"task_type"`` also accepted)
         "priority": str,        # "critical" | "high" | "medium" | "low"
         "description": str,
         "payload_size": int,    # bytes of the JSON-encoded payload
         "actual": {"duration": s, "tokens": n, "memory_mb": growth MB, "cpu_s": s}}

    All four ``actual`` values are required (finite, >= 0); an older event's ``cpu``
    (cores) is read as ``cpu`` x ``duration`` seconds. Anything else is skipped.
    Rows are ``{type, priority, description, payload_size, duration, tokens, memory_mb,
    cpu_s}`` in event order.
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
        row = _clean_row({**actual, "type": task_type,
                          "priority": data.get("priority"),
                          "description": data.get("description"),
                          "payload_size": data.get("payload_size")})
        if row is not None:
            rows.append(row)
    return rows


def main(argv=None) -> int:
    """`python -m cortex.services.scheduler.prediction train --home DIR`: fit the models on the
    completed-task history in the event log and save them under <home>/models/."""
    import argparse
    import json

    from cortex.protocol import locate
    from cortex.services.runtime.eventlog import read_events

    parser = argparse.ArgumentParser(prog="cortex-train", description=main.__doc__)
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--home")
    parser.add_argument("--limit", type=int, default=50_000, help="most recent rows to use")
    args = parser.parse_args(argv)
    home = locate.find_home(args.home)
    history = history_from_events(read_events(home / "events", type_pattern="task.completed"))
    report = Predictor(home / "models").train(history[-args.limit:])
    print(json.dumps(report, default=str))
    return 0 if report.get("trained", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
