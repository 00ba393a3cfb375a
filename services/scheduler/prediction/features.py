"""What a prediction is made from, and the rows a model learns from.

Features: one-hot task type, priority ordinal, description length (log chars, words),
hashed description words (sklearn's HashingVectorizer rule, `N_HASH` columns), and the
log payload size in ~19% buckets (so a cached answer is exactly what the model would
say). Targets: duration (s), tokens, memory growth (MB), CPU (s).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.utils import murmurhash3_32

from cortex.protocol.vocabulary import PRIORITY_RANK

TARGETS = ("duration", "tokens", "memory_mb", "cpu_s")
N_HASH = 256  # hashed description-word columns: enough for keywords, small enough to fit fast
N_DENSE = 4  # priority, log chars, words, log payload
PAYLOAD_STEP = 4  # payload feature = round(4 * log2(1 + bytes)) / 4: ~19% buckets

VECTORIZER = HashingVectorizer(n_features=N_HASH, alternate_sign=False, norm=None,
                               binary=True, dtype=np.float64)
_ANALYZE = VECTORIZER.build_analyzer()


def payload_feature(payload_size: Any) -> float:
    try:
        size = max(0, int(payload_size))
    except (TypeError, ValueError):
        size = 0
    return round(PAYLOAD_STEP * math.log2(1 + size)) / PAYLOAD_STEP


def hash_columns(description: str) -> set[int]:
    """Columns HashingVectorizer would set for one text, without its per-call overhead."""
    cols = set()
    for token in _ANALYZE(description):
        h = murmurhash3_32(token, seed=0, positive=False)
        # Same index rule as sklearn's _hashing_fast (abs(-2**31) is special-cased there).
        cols.add((2147483647 - (N_HASH - 1)) % N_HASH if h == -2147483648 else abs(h) % N_HASH)
    return cols


def dense(priority: Any, description: str, payload_size: Any) -> list[float]:
    return [float(PRIORITY_RANK.get(priority, PRIORITY_RANK["medium"])),
            math.log1p(len(description)), float(len(description.split())),
            payload_feature(payload_size)]


def clean_row(row: dict) -> dict | None:
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
