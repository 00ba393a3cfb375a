"""Trained models: fitting, the fast one-row path, saving and loading.

One scikit-learn `HistGradientBoostingRegressor` per target, each learnt as `log1p` (the
targets are skewed), 20% of the rows held out to measure them. Predicting one row must be
cheap (it sits on the dispatch path), and sklearn's own `predict` walks trees one Python
call at a time (~15 ms for one row here): so the fitted trees of all four models are
flattened into a few numpy arrays and walked together, one level per numpy step, once
checked against `predict` (if the check fails the slow path is used and the status says
so). Answers are cached per (type, priority, description, payload bucket).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import orjson
import sklearn
from sklearn.ensemble import HistGradientBoostingRegressor
from threadpoolctl import threadpool_limits

from cortex.services.runtime.durable import fsync_dir, write_atomic
from cortex.services.scheduler.prediction.features import (
    N_DENSE,
    N_HASH,
    TARGETS,
    VECTORIZER,
    dense,
    hash_columns,
    payload_feature,
)
from cortex.services.scheduler.prediction.history import MODEL_FILE

MAX_TYPES = 200  # one-hot columns; rarer types fall back to averages
TYPE_MIN_ROWS = 5  # a type seen fewer times in training is not trusted to the model
CACHE_LIMIT = 8192
REPORT_FILE = "predictor-report.json"
FORMAT_VERSION = 2  # 2: memory is growth and CPU is seconds (1 had peak RSS and cores)

_HGB_PARAMS = dict(max_iter=60, learning_rate=0.2, max_depth=6, max_leaf_nodes=31, max_bins=64,
                   min_samples_leaf=10, l2_regularization=1e-3, random_state=0)


def to_model_space(y: np.ndarray) -> np.ndarray:
    return np.log1p(y)


def from_model_space(v: float) -> float:
    return max(0.0, math.expm1(min(v, 700.0)))


class FlatForest:
    """All trees of several HGB regressors as flat arrays, walked together for one row.

    Leaves point to themselves with an infinite threshold, so every tree can take exactly
    `depth` steps and no per-tree branching is needed.
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


class ModelSet:
    """Immutable once built: models, their feature layout, report, and a prediction cache."""

    def __init__(self, models: dict[str, HistGradientBoostingRegressor], types: list[str],
                 report: dict):
        self.models = models
        self.types = types
        self.type_index = {t: i for i, t in enumerate(types)}
        self.report = report
        self.n_features = len(types) + N_DENSE + N_HASH
        self.cache: dict[tuple, tuple[float, ...]] = {}
        self.probe: np.ndarray | None = None  # held-out rows that check the fast path
        self.flat: FlatForest | None = None
        self.fast_path_error: str | None = None

    def matrix(self, rows: list[dict]) -> np.ndarray:
        """Training-time matrix: the same columns row() builds one at a time."""
        k = len(self.types)
        X = np.zeros((len(rows), self.n_features))
        for i, r in enumerate(rows):
            j = self.type_index.get(r["type"])
            if j is not None:
                X[i, j] = 1.0
            X[i, k:k + N_DENSE] = dense(r["priority"], r["description"], r["payload_size"])
        X[:, k + N_DENSE:] = VECTORIZER.transform([r["description"] for r in rows]).toarray()
        return X

    def row(self, task_type: str, priority: str, description: str, payload: Any) -> np.ndarray:
        k = len(self.types)
        x = np.zeros(self.n_features)
        x[self.type_index[task_type]] = 1.0
        x[k:k + N_DENSE] = dense(priority, description, payload)
        cols = hash_columns(description)
        if cols:
            x[[k + N_DENSE + c for c in cols]] = 1.0
        return x

    def enable_fast_path(self, probe: np.ndarray) -> None:
        try:
            flat = FlatForest([self.models[t] for t in TARGETS])
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
               payload_feature(payload_size))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        x = self.row(task_type, priority, description, payload_size)
        if self.flat is not None:
            raw = self.flat.predict_one(x)
        else:
            raw = [float(self.models[t].predict(x[None, :])[0]) for t in TARGETS]
        out = tuple(from_model_space(float(v)) for v in raw)
        if len(self.cache) >= CACHE_LIMIT:
            self.cache.clear()  # crude but O(1)
        self.cache[key] = out
        return out


def fit(rows: list[dict]) -> ModelSet:
    """Fit the four models on clean rows (features.clean_row), measured on 20% held out."""
    started = time.perf_counter()
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["type"]] = counts.get(r["type"], 0) + 1
    types = sorted((t for t, c in counts.items() if c >= TYPE_MIN_ROWS),
                   key=lambda t: (-counts[t], t))[:MAX_TYPES]
    model_set = ModelSet({}, sorted(types), {})
    X = model_set.matrix(rows)
    Y = {t: np.array([r[t] for r in rows]) for t in TARGETS}

    order = np.random.default_rng(0).permutation(len(rows))
    n_test = max(1, len(rows) // 5)
    test, fit_idx = order[:n_test], order[n_test:]
    per_target = {}
    # One OpenMP thread: the training child runs beside the services on a shared machine.
    with threadpool_limits(limits=1, user_api="openmp"):
        for t in TARGETS:
            model = HistGradientBoostingRegressor(**_HGB_PARAMS)
            model.fit(X[fit_idx], to_model_space(Y[t][fit_idx]))
            model_set.models[t] = model
            pred = np.array([from_model_space(v) for v in model.predict(X[test])])
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
        "train_seconds": round(time.perf_counter() - started, 3),
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


def save(model_dir: Path, model_set: ModelSet) -> None:
    """The models (what load() reads) and the report (for `cat`/`jq`), both atomically."""
    blob = {"format": FORMAT_VERSION, "sklearn": sklearn.__version__,
            "models": model_set.models, "types": model_set.types,
            "report": model_set.report, "probe": model_set.probe}
    write_atomic(model_dir / MODEL_FILE, lambda f: joblib.dump(blob, f))
    write_atomic(model_dir / REPORT_FILE,
                 orjson.dumps(model_set.report, option=orjson.OPT_INDENT_2))
    fsync_dir(model_dir)


def load(model_dir: Path) -> ModelSet:
    """The saved models; FileNotFoundError or ValueError (with the reason) otherwise."""
    path = Path(model_dir) / MODEL_FILE
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
    model_set = ModelSet(models, list(blob["types"]), dict(blob["report"]))
    model_set.probe = np.asarray(blob["probe"], dtype=np.float64)
    model_set.enable_fast_path(model_set.probe)
    return model_set
