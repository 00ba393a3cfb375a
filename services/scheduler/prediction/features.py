"""What a prediction is made from: one-hot task type, priority ordinal, description
length (log chars, words), hashed description words (sklearn's HashingVectorizer rule,
`N_HASH` columns), and the log payload size in ~19% buckets (so a cached answer is
exactly what the model would say). The targets are in history.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.utils import murmurhash3_32

from cortex.protocol.vocabulary import PRIORITY_RANK
from cortex.services.scheduler.prediction.history import TARGETS  # noqa: F401 - re-exported

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
