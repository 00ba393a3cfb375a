"""Routing one description fast: the router pipeline's probabilities without sklearn.

``Pipeline.predict_proba`` validates its input on every call, which costs far more than
the arithmetic for one short text. :class:`OneRow` does the same arithmetic with dicts
and a few numpy steps. It relies on each TfidfVectorizer using sublinear tf and the l2
norm, and on the model's probabilities being the softmax of its scores, so
:func:`checked_fast_path` compares it with ``predict_proba`` on held-out rows before it is
used.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from sklearn.pipeline import Pipeline


class OneRow:
    """The pipeline's probabilities for one text, without sklearn's per-call checks.

    Relies on each TfidfVectorizer using sublinear tf and l2 norm, and on the model's
    probabilities being the softmax of its scores; :func:`checked_fast_path` verifies.
    """

    def __init__(self, pipeline: Pipeline):
        self.parts = []
        offset = 0
        for _, vectorizer in pipeline.named_steps["features"].transformer_list:
            vocabulary = vectorizer.vocabulary_
            self.parts.append((vectorizer.build_analyzer(), vocabulary, vectorizer.idf_,
                               offset))
            offset += len(vocabulary)
        model = pipeline.named_steps["model"]
        self.coef = np.ascontiguousarray(model.coef_)
        self.intercept = model.intercept_.astype(np.float64)
        self.binary = self.coef.shape[0] == 1  # two types: one score for the second

    def probabilities(self, text: str) -> np.ndarray:
        columns: list[int] = []
        values: list[np.ndarray] = []
        for analyze, vocabulary, idf, offset in self.parts:
            found = {}
            for token, count in Counter(analyze(text)).items():
                j = vocabulary.get(token)
                if j is not None:
                    found[j] = (1.0 + math.log(count)) * idf[j]
            if found:
                v = np.fromiter(found.values(), dtype=np.float64, count=len(found))
                values.append(v / math.sqrt(float(v @ v)))
                columns.extend(offset + j for j in found)
        scores = self.intercept.copy()
        if columns:
            scores += self.coef[:, columns] @ np.concatenate(values)
        if self.binary:
            scores = np.array([0.0, scores[0]])
        scores -= scores.max()
        e = np.exp(scores)
        return e / e.sum()


def checked_fast_path(pipeline: Pipeline, probe: list[str]) -> tuple[OneRow | None, str]:
    try:
        fast = OneRow(pipeline)
        if probe:
            got = np.array([fast.probabilities(t) for t in probe])
            if not np.allclose(got, pipeline.predict_proba(probe), rtol=1e-7, atol=1e-9):
                raise ValueError("one-row probabilities disagree with predict_proba")
        return fast, ""
    except Exception as exc:  # sklearn internals moved: stay correct, just slower
        return None, f"{type(exc).__name__}: {exc}"
