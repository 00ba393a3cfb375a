"""Predicting with numpy alone: the trained models as flat arrays, and their file.

The training child (models.py, scikit-learn) fits the gradient-boosted trees, flattens
them into a few arrays and checks the arrays' answers against scikit-learn's `predict`
before it saves them here; the scheduler reads the file with numpy and never loads
scikit-learn and SciPy (~100 MB of the scheduler's PSS, measured).

`predictor.npz` (np.savez, read with allow_pickle=False) holds the arrays below, the
probe (held-out feature rows and scikit-learn's answers for them: loading checks the
arrays still give those), and `meta`: JSON bytes with the format, the feature layout,
the modelled types and the training report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cortex.services.runtime.durable import fsync_dir, write_atomic
from cortex.services.scheduler.prediction.features import (
    N_DENSE,
    N_HASH,
    PAYLOAD_STEP,
    TARGETS,
    dense,
    hash_columns,
    payload_feature,
)
from cortex.services.scheduler.prediction.history import MODEL_FILE

REPORT_FILE = "predictor-report.json"
FORMAT_VERSION = 3  # 3: flat numpy arrays (2 was a joblib pickle of scikit-learn models)
CACHE_LIMIT = 8192
INDEX_ARRAYS = ("feat", "left", "right", "roots", "starts")
VALUE_ARRAYS = ("thr", "value", "baseline")
LAYOUT = {"n_hash": N_HASH, "n_dense": N_DENSE, "payload_step": PAYLOAD_STEP,
          "targets": list(TARGETS)}


def from_model_space(v: float) -> float:
    """Models learn log1p of each target (the targets are skewed)."""
    return max(0.0, math.expm1(min(v, 700.0)))


class FlatForest:
    """All trees of the per-target models as flat arrays, walked together for one row.

    Leaves point to themselves with an infinite threshold, so every tree can take exactly
    `depth` steps and no per-tree branching is needed; trees are grouped by target, so a
    target's sum is one reduceat segment (from `starts`).
    """

    def __init__(self, arrays: dict[str, np.ndarray], depth: int):
        self.feat, self.left, self.right, self.roots, self.starts = (
            np.asarray(arrays[k], dtype=np.intp) for k in INDEX_ARRAYS)
        self.thr, self.value, self.baseline = (
            np.asarray(arrays[k], dtype=np.float64) for k in VALUE_ARRAYS)
        self.depth = int(depth)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in (*INDEX_ARRAYS, *VALUE_ARRAYS)}

    def check(self, n_features: int) -> None:
        """ValueError unless every index stays inside the arrays (a bad file must not
        make a prediction read out of bounds or loop)."""
        nodes = len(self.feat)
        if not nodes or any(len(a) != nodes for a in (self.thr, self.left, self.right,
                                                      self.value)):
            raise ValueError("node arrays of different lengths")
        if len(self.baseline) != len(TARGETS) or len(self.starts) != len(TARGETS):
            raise ValueError("not one model per target")
        for name, values, limit in (("feat", self.feat, n_features), ("left", self.left, nodes),
                                    ("right", self.right, nodes), ("roots", self.roots, nodes),
                                    ("starts", self.starts, len(self.roots))):
            if len(values) and (values.min() < 0 or values.max() >= limit):
                raise ValueError(f"{name} out of range")
        if not 0 <= self.depth <= 64:
            raise ValueError(f"depth {self.depth}")

    def predict_one(self, x: np.ndarray) -> np.ndarray:
        idx = self.roots
        for _ in range(self.depth):
            idx = np.where(x[self.feat[idx]] <= self.thr[idx], self.left[idx], self.right[idx])
        return self.baseline + np.add.reduceat(self.value[idx], self.starts)


class FlatModels:
    """Immutable once built: the forest, its feature layout, report, and an answer cache."""

    def __init__(self, forest: FlatForest, types: list[str], report: dict):
        self.forest = forest
        self.types = types
        self.type_index = {t: i for i, t in enumerate(types)}
        self.report = report
        self.n_features = len(types) + N_DENSE + N_HASH
        self.cache: dict[tuple, tuple[float, ...]] = {}

    def row(self, task_type: str, priority: str, description: str, payload: Any) -> np.ndarray:
        k = len(self.types)
        x = np.zeros(self.n_features)
        j = self.type_index.get(task_type)
        if j is not None:
            x[j] = 1.0
        x[k:k + N_DENSE] = dense(priority, description, payload)
        cols = hash_columns(description)
        if cols:
            x[[k + N_DENSE + c for c in cols]] = 1.0
        return x

    def predict(self, task_type: str, priority: str, description: str,
                payload_size: Any) -> tuple[float, ...]:
        key = (task_type, priority, hash(description), len(description),
               payload_feature(payload_size))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        raw = self.forest.predict_one(self.row(task_type, priority, description, payload_size))
        out = tuple(from_model_space(float(v)) for v in raw)
        if len(self.cache) >= CACHE_LIMIT:
            self.cache.clear()  # crude but O(1)
        self.cache[key] = out
        return out


def save(model_dir: Path, models: FlatModels, probe_x: np.ndarray, probe_y: np.ndarray
         ) -> None:
    """The models (what load() reads) and the report (for `cat`/`jq`), both atomically.
    `probe_y`: scikit-learn's raw answers for the rows `probe_x`, one column per target."""
    model_dir = Path(model_dir)
    meta = {"format": FORMAT_VERSION, **LAYOUT, "depth": models.forest.depth,
            "types": models.types, "report": models.report}
    blob = {**models.forest.arrays(), "probe_x": np.asarray(probe_x, dtype=np.float64),
            "probe_y": np.asarray(probe_y, dtype=np.float64),
            "meta": np.frombuffer(orjson.dumps(meta), dtype=np.uint8)}
    write_atomic(model_dir / MODEL_FILE, lambda f: np.savez(f, **blob))
    write_atomic(model_dir / REPORT_FILE, orjson.dumps(models.report, option=orjson.OPT_INDENT_2))
    fsync_dir(model_dir)


def load(model_dir: Path) -> FlatModels:
    """The saved models; FileNotFoundError or ValueError (with the reason) otherwise."""
    with np.load(Path(model_dir) / MODEL_FILE, allow_pickle=False) as blob:
        arrays = {k: blob[k] for k in blob.files}
    try:
        meta = orjson.loads(arrays.pop("meta").tobytes())
    except (KeyError, orjson.JSONDecodeError) as exc:
        raise ValueError("no readable meta") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ValueError("unknown file format")
    layout = {k: meta.get(k) for k in LAYOUT}
    if layout != LAYOUT:
        raise ValueError(f"saved for another feature layout ({layout})")
    types, report = meta.get("types"), meta.get("report")
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types) \
            or not isinstance(report, dict):
        raise ValueError("types or report missing")
    try:
        forest = FlatForest(arrays, meta.get("depth"))
        probe_x, probe_y = arrays["probe_x"], arrays["probe_y"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"arrays missing: {exc}") from exc
    models = FlatModels(forest, types, report)
    forest.check(models.n_features)
    if probe_x.ndim != 2 or probe_x.shape[1] != models.n_features \
            or probe_y.shape != (len(probe_x), len(TARGETS)):
        raise ValueError("probe of the wrong shape")
    got = np.array([forest.predict_one(x) for x in probe_x]).reshape(probe_y.shape)
    if not np.allclose(got, probe_y, rtol=1e-9, atol=1e-9):
        raise ValueError("the arrays disagree with the answers saved with them")
    return models
