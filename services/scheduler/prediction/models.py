"""Fitting the models, in the training child (the one module here that loads scikit-learn).

One scikit-learn `HistGradientBoostingRegressor` per target, each learnt as `log1p` (the
targets are skewed), 20% of the rows held out to measure them. Predicting one row must be
cheap (it sits on the dispatch path) and must not load scikit-learn into the scheduler:
so the fitted trees of all four models are flattened into a few numpy arrays
(flat.FlatForest), checked here against scikit-learn's `predict` on held-out rows built
the scheduler's way (features.py: its word hashing included), and saved by flat.save. If
they disagree nothing is saved and the training fails with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import sklearn
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.feature_extraction.text import HashingVectorizer
from threadpoolctl import threadpool_limits

from cortex.services.scheduler.prediction.features import N_DENSE, N_HASH, TARGETS, dense
from cortex.services.scheduler.prediction.flat import FlatForest, FlatModels, from_model_space

MAX_TYPES = 200  # one-hot columns; rarer types fall back to averages
TYPE_MIN_ROWS = 5  # a type seen fewer times in training is not trusted to the model
PROBE_ROWS = 50  # held-out rows that check the flat arrays (saved with them)

_HGB_PARAMS = dict(max_iter=60, learning_rate=0.2, max_depth=6, max_leaf_nodes=31, max_bins=64,
                   min_samples_leaf=10, l2_regularization=1e-3, random_state=0)

VECTORIZER = HashingVectorizer(n_features=N_HASH, alternate_sign=False, norm=None,
                               binary=True, dtype=np.float64)


class FastPathError(ValueError):
    """The flattened trees do not give scikit-learn's answers: nothing is saved."""


@dataclass(frozen=True)
class Fitted:
    models: FlatModels  # what the scheduler predicts with
    estimators: list[HistGradientBoostingRegressor]  # one per target, in TARGETS order
    probe_x: np.ndarray  # held-out feature rows the arrays were checked on
    probe_y: np.ndarray  # scikit-learn's raw answers for them (saved with the arrays)


def to_model_space(y: np.ndarray) -> np.ndarray:
    return np.log1p(y)


def flatten(models: list[HistGradientBoostingRegressor]) -> FlatForest:
    """The trees of `models` (one per target, in order) as one FlatForest."""
    feat, thr, left, right, value, roots, owner = [], [], [], [], [], [], []
    offset, depth = 0, 0
    for m_idx, model in enumerate(models):
        for per_iteration in model._predictors:
            for tree in per_iteration:
                nodes = tree.nodes
                if nodes["is_categorical"].any():
                    raise FastPathError("categorical splits are not flattened")
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
    return FlatForest({
        "feat": np.concatenate(feat), "thr": np.concatenate(thr),
        "left": np.concatenate(left), "right": np.concatenate(right),
        "value": np.concatenate(value), "roots": np.asarray(roots),
        "starts": np.searchsorted(np.asarray(owner), np.arange(len(models))),
        "baseline": np.array([float(np.ravel(m._baseline_prediction)[0]) for m in models]),
    }, depth)


def matrix(types: list[str], rows: list[dict]) -> np.ndarray:
    """Training-time matrix: the columns FlatModels.row builds one at a time."""
    index = {t: i for i, t in enumerate(types)}
    k = len(types)
    X = np.zeros((len(rows), k + N_DENSE + N_HASH))
    for i, r in enumerate(rows):
        j = index.get(r["type"])
        if j is not None:
            X[i, j] = 1.0
        X[i, k:k + N_DENSE] = dense(r["priority"], r["description"], r["payload_size"])
    X[:, k + N_DENSE:] = VECTORIZER.transform([r["description"] for r in rows]).toarray()
    return X


def check_fast_path(models: FlatModels, estimators: list[HistGradientBoostingRegressor],
                    rows: list[dict], X: np.ndarray) -> np.ndarray:
    """scikit-learn's raw answers for `X` (the matrix of `rows`), once the scheduler's
    path (its own feature rows, the flat arrays) gives the same; FastPathError if not."""
    slow = np.column_stack([m.predict(X) for m in estimators])
    for r, x, expected in zip(rows, X, slow, strict=True):
        row = models.row(r["type"], r["priority"], r["description"], r["payload_size"])
        if not np.array_equal(row, x):
            raise FastPathError("the scheduler's feature row differs from the training "
                                f"matrix for {r['description'][:80]!r}")
        if not np.allclose(models.forest.predict_one(row), expected, rtol=1e-9, atol=1e-9):
            raise FastPathError("the flattened trees disagree with predict()")
    return slow


def fit(rows: list[dict]) -> Fitted:
    """The models fitted on clean rows (history.clean_row), measured on 20% held out, and
    flattened once checked on the held-out rows."""
    started = time.perf_counter()
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["type"]] = counts.get(r["type"], 0) + 1
    types = sorted(sorted((t for t, c in counts.items() if c >= TYPE_MIN_ROWS),
                          key=lambda t: (-counts[t], t))[:MAX_TYPES])
    X = matrix(types, rows)
    Y = {t: np.array([r[t] for r in rows]) for t in TARGETS}

    order = np.random.default_rng(0).permutation(len(rows))
    n_test = max(1, len(rows) // 5)
    test, fit_idx = order[:n_test], order[n_test:]
    estimators, per_target = [], {}
    # One OpenMP thread: the training child runs beside the services on a shared machine.
    with threadpool_limits(limits=1, user_api="openmp"):
        for t in TARGETS:
            model = HistGradientBoostingRegressor(**_HGB_PARAMS)
            model.fit(X[fit_idx], to_model_space(Y[t][fit_idx]))
            estimators.append(model)
            pred = np.array([from_model_space(v) for v in model.predict(X[test])])
            per_target[t] = _accuracy(Y[t][test], pred)

    report = {
        "trained": True,
        "trained_at": time.time(),
        "samples": len(rows),
        "fit_rows": len(fit_idx),
        "held_out_rows": n_test,
        "types": {t: counts[t] for t in types},
        "types_not_modelled": sorted(set(counts) - set(types)),
        "per_target": per_target,
        "model": f"HistGradientBoostingRegressor({_HGB_PARAMS})",
        "sklearn": sklearn.__version__,
        "train_seconds": round(time.perf_counter() - started, 3),
    }
    models = FlatModels(flatten(estimators), types, report)
    probe = test[:PROBE_ROWS]
    probe_y = check_fast_path(models, estimators, [rows[i] for i in probe], X[probe])
    return Fitted(models, estimators, X[probe], probe_y)


def _accuracy(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    err = np.abs(pred - truth)
    within = err <= 0.25 * np.abs(truth)
    var = float(np.var(truth))
    r2 = 1.0 - float(np.mean((pred - truth) ** 2)) / var if var > 0 else 0.0
    return {"within_25pct": float(within.mean()), "mae": float(err.mean()), "r2": r2}
