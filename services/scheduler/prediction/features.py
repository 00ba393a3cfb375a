"""What a prediction is made from: one-hot task type, priority ordinal, description
length (log chars, words), hashed description words (`N_HASH` columns), and the log
payload size in ~19% buckets (so a cached answer is exactly what the model would say).
The targets are in history.py.

Plain Python on purpose: the scheduler predicts without scikit-learn. The word hashing is
scikit-learn's `HashingVectorizer` rule (lowercase, words of two or more word characters,
signed 32-bit MurmurHash3 with seed 0, |h| mod N_HASH), which the training child checks
against the vectorizer it trains with before it saves a model (models.py).
"""

from __future__ import annotations

import math
import re
from typing import Any

from cortex.protocol.vocabulary import PRIORITY_RANK
from cortex.services.scheduler.prediction.history import TARGETS  # noqa: F401 - re-exported

N_HASH = 256  # hashed description-word columns: enough for keywords, small enough to fit fast
N_DENSE = 4  # priority, log chars, words, log payload
PAYLOAD_STEP = 4  # payload feature = round(4 * log2(1 + bytes)) / 4: ~19% buckets

_WORD = re.compile(r"(?u)\b\w\w+\b")  # HashingVectorizer's default token pattern
_MASK = 0xFFFFFFFF


def payload_feature(payload_size: Any) -> float:
    try:
        size = max(0, int(payload_size))
    except (TypeError, ValueError):
        size = 0
    return round(PAYLOAD_STEP * math.log2(1 + size)) / PAYLOAD_STEP


def _mix(k: int) -> int:
    k = (k * 0xCC9E2D51) & _MASK
    k = ((k << 15) | (k >> 17)) & _MASK
    return (k * 0x1B873593) & _MASK


def murmurhash3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 (x86, 32 bits) of `data`, signed, as sklearn.utils.murmurhash3_32."""
    h = seed & _MASK
    end = len(data) - len(data) % 4
    for i in range(0, end, 4):
        h ^= _mix(int.from_bytes(data[i:i + 4], "little"))
        h = ((h << 13) | (h >> 19)) & _MASK
        h = (h * 5 + 0xE6546B64) & _MASK
    tail = data[end:]
    if tail:
        h ^= _mix(int.from_bytes(tail, "little"))
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    h ^= h >> 16
    return h - (1 << 32) if h & 0x80000000 else h


def token_column(token: str) -> int:
    """The hashed column of one word (HashingVectorizer's index rule)."""
    h = murmurhash3_32(token.encode("utf-8"))
    # abs(-2**31) is special-cased in sklearn's _hashing_fast: the same here.
    return (2147483647 - (N_HASH - 1)) % N_HASH if h == -2147483648 else abs(h) % N_HASH


# Words recur across descriptions: their columns are remembered (hashing in Python costs
# ~4 us a word, a look-up well under one).
_COLUMNS: dict[str, int] = {}
COLUMNS_KEPT = 65536


def hash_columns(description: str) -> set[int]:
    """Columns HashingVectorizer(n_features=N_HASH) would set for one text."""
    cols = set()
    for token in _WORD.findall(description.lower()):
        col = _COLUMNS.get(token)
        if col is None:
            if len(_COLUMNS) >= COLUMNS_KEPT:
                _COLUMNS.clear()  # crude but O(1), as the answer cache
            col = _COLUMNS[token] = token_column(token)
        cols.add(col)
    return cols


def dense(priority: Any, description: str, payload_size: Any) -> list[float]:
    return [float(PRIORITY_RANK.get(priority, PRIORITY_RANK["medium"])),
            math.log1p(len(description)), float(len(description.split())),
            payload_feature(payload_size)]
