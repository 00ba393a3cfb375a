"""Routing by description: which task type a piece of work is, from its words.

A :class:`Router` is a scikit-learn text classifier: TF-IDF of words and word pairs plus
TF-IDF of character n-grams within words (they survive typos: "trnaslate" still shares
" tr", "slate", "ate " with "translate"), feeding a multinomial logistic regression, whose
class probabilities are the confidence. It is trained on rows ``{"type", "description"}``
(see :mod:`classify_rows` for where they come from) and is immutable once built, so the
scheduler swaps a retrained one in by assigning one reference.

- :func:`train` fits one, after measuring it: a model fitted on 80 % of the rows (per type)
  routes the other 20 %; accuracy, the confusion matrix and per-type precision and recall
  go in its ``report``. The router returned is then fitted on all the rows.
- :meth:`Router.route` answers one description; :meth:`Router.explain` says which words
  weighed most for each of the top types.
- :func:`decide` applies ``[routing] min_confidence`` and ``fallback``.
- :func:`save` and :func:`load`: ``<home>/models/router.joblib`` (what :func:`load` reads)
  and ``router-report.json`` (the same report, for ``jq``), both written atomically.
- ``python -m cortex.services.scheduler.classify_child train --home DIR`` trains from the
  examples file and the event log in a process of its own, so the scheduler never waits
  (and refuses before it loads scikit-learn when the rows cannot teach a router).

Routing sits on the submit path, so one description is routed by :mod:`classify_fast`
(the same numbers as ``predict_proba``, checked on held-out rows, without its per-call
overhead).
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import orjson
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_union
from threadpoolctl import threadpool_limits

from cortex.services.runtime.durable import write_atomic
from cortex.services.scheduler import classify_child
from cortex.services.scheduler.classify_fast import checked_fast_path
from cortex.services.scheduler.classify_rows import (
    MIN_ROWS_PER_TYPE,
    MODEL_FILE,
    ROUTE_CHARS,
    RoutingError,
    too_little_data,
)

REPORT_FILE = "router-report.json"
FORMAT_VERSION = 1
HELD_OUT_SHARE = 0.2
TOP = 3
PROBE_ROWS = 50  # held-out descriptions that check the one-row path
CONFIDENCE_STEPS = (0.3, 0.5, 0.7, 0.9)
_C = 10.0  # inverse regularisation: clear cases land near 0.9, unclear ones well below
_WORD = re.compile(r"\w+")


def _pipeline() -> Pipeline:
    words = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), max_features=20_000)
    chars = TfidfVectorizer(sublinear_tf=True, analyzer="char_wb", ngram_range=(2, 5),
                            max_features=50_000)
    return Pipeline([("features", make_union(words, chars)),
                     ("model", LogisticRegression(C=_C, max_iter=1000))])


@dataclass(frozen=True, slots=True)
class Route:
    type: str
    confidence: float
    runner_up: str | None
    runner_up_confidence: float | None
    top: tuple[tuple[str, float], ...]  # the TOP likeliest types, likeliest first

    def as_dict(self) -> dict:
        return {"type": self.type, "confidence": round(self.confidence, 4),
                "runner_up": self.runner_up,
                "runner_up_confidence": None if self.runner_up_confidence is None
                else round(self.runner_up_confidence, 4),
                "top": [{"type": t, "probability": round(p, 4)} for t, p in self.top]}


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: str  # "routed" | "fallback" | "refused"
    type: str | None  # what the task runs as; None when refused
    route: Route
    reason: str

    def as_dict(self) -> dict:
        """What a routed task's events record."""
        return {"outcome": self.outcome, "type": self.type, "reason": self.reason,
                **{k: v for k, v in self.route.as_dict().items() if k != "type"},
                "chosen": self.route.type}


def decide(route: Route, min_confidence: float, fallback: str = "") -> Decision:
    """The low-confidence rule: a route below ``min_confidence`` goes to ``fallback``, or is
    refused (with the candidates in the reason) when there is no fallback."""
    if route.confidence >= min_confidence:
        return Decision("routed", route.type, route,
                        f"{route.type} at {route.confidence:.2f} >= {min_confidence:.2f}")
    candidates = ", ".join(f"{t} {p:.2f}" for t, p in route.top)
    if fallback:
        return Decision("fallback", fallback, route,
                        f"unsure ({candidates}; below {min_confidence:.2f}): "
                        f"fallback {fallback}")
    return Decision("refused", None, route,
                    f"cannot tell the type: {candidates} (below {min_confidence:.2f}); "
                    "give the type")


# ---------------------------------------------------------------- the router


class Router:
    """A trained classifier and its report; safe to share between threads."""

    def __init__(self, pipeline: Pipeline, report: dict, probe: list[str]):
        self.pipeline = pipeline
        self.labels: list[str] = [str(c) for c in pipeline.classes_]
        self.report = report
        self.probe = probe
        self._fast, error = checked_fast_path(pipeline, probe)
        self.report["fast_path"] = self._fast is not None
        self.report["fast_path_error"] = error or None

    def probabilities(self, description: str) -> np.ndarray:
        if not isinstance(description, str):
            raise TypeError(f"description must be a string, not {type(description).__name__}")
        text = description[:ROUTE_CHARS]
        if self._fast is not None:
            return self._fast.probabilities(text)
        return self.pipeline.predict_proba([text])[0]

    def _route(self, p: np.ndarray) -> Route:
        order = np.argsort(-p, kind="stable")[:TOP]
        top = tuple((self.labels[i], float(p[i])) for i in order)
        second = top[1] if len(top) > 1 else (None, None)
        return Route(top[0][0], top[0][1], second[0], second[1], top)

    def route(self, description: str) -> Route:
        """The likeliest type, its probability, the runner-up and the top 3."""
        return self._route(self.probabilities(description))

    def explain(self, description: str, words: int = 5) -> dict:
        """The route and, for each of the top types, the words that weighed most for it.

        A word's weight for a type is how far the log-odds of the type's probability fall
        when every occurrence of the word is taken out. Log-odds, because a sure route's
        probability barely moves when one of several cues goes, while its odds do.
        """
        route = self.route(description)
        text = description[:ROUTE_CHARS]
        vocabulary = sorted({w.lower() for w in _WORD.findall(text)})
        without = [re.sub(rf"\b{re.escape(w)}\b", " ", text, flags=re.IGNORECASE)
                   for w in vocabulary]
        full = _log_odds(self.pipeline.predict_proba([text])[0])
        fewer = _log_odds(self.pipeline.predict_proba(without)) if without \
            else np.empty((0, len(full)))
        column = {t: i for i, t in enumerate(self.labels)}
        types = []
        for task_type, probability in route.top:
            i = column[task_type]
            weights = sorted(((float(full[i] - fewer[k, i]), w)
                              for k, w in enumerate(vocabulary)), reverse=True)
            types.append({"type": task_type, "probability": round(probability, 4),
                          "words": [{"word": w, "weight": round(d, 3)}
                                    for d, w in weights[:words] if d > 0]})
        return {**route.as_dict(), "types": types}


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


# ---------------------------------------------------------------- training


def _split(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Per type, HELD_OUT_SHARE of the rows (at least one) held out."""
    rng = random.Random(seed)
    by_type: dict[str, list[dict]] = {}
    for row in rows:
        by_type.setdefault(row["type"], []).append(row)
    fit, held_out = [], []
    for task_type in sorted(by_type):
        group = by_type[task_type][:]
        rng.shuffle(group)
        n = max(1, round(HELD_OUT_SHARE * len(group)))
        held_out += group[:n]
        fit += group[n:]
    return fit, held_out


def _fit(rows: list[dict]) -> Pipeline:
    pipeline = _pipeline()
    # One BLAS/OpenMP thread: leave the other core to the services.
    with threadpool_limits(limits=1):
        pipeline.fit([r["description"] for r in rows], [r["type"] for r in rows])
    return pipeline


def _measure(pipeline: Pipeline, held_out: list[dict]) -> dict:
    labels = [str(c) for c in pipeline.classes_]
    truth = [r["type"] for r in held_out]
    p = pipeline.predict_proba([r["description"] for r in held_out])
    chosen = [labels[i] for i in p.argmax(axis=1)]
    confidence = p.max(axis=1)
    index = {t: i for i, t in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for t, c in zip(truth, chosen, strict=True):
        matrix[index[t], index[c]] += 1
    per_type = {}
    for t, i in index.items():
        support, predicted = int(matrix[i].sum()), int(matrix[:, i].sum())
        hits = int(matrix[i, i])
        per_type[t] = {"support": support,
                       "recall": round(hits / support, 4) if support else None,
                       "precision": round(hits / predicted, 4) if predicted else None}
    right = np.array([t == c for t, c in zip(truth, chosen, strict=True)])
    by_confidence = []
    for step in CONFIDENCE_STEPS:
        sure = confidence >= step
        by_confidence.append({"min_confidence": step, "routed": round(float(sure.mean()), 4),
                              "accuracy": round(float(right[sure].mean()), 4)
                              if sure.any() else None})
    return {"rows": len(held_out), "accuracy": round(float(right.mean()), 4),
            "confusion": {"labels": labels, "matrix": matrix.tolist()},
            "per_type": per_type, "by_confidence": by_confidence}


def train(rows: list[dict], counts: dict | None = None, seed: int = 0) -> Router:
    """A router for ``rows`` (``{"type", "description"}``), measured on a held-out share.

    Types with fewer than MIN_ROWS_PER_TYPE rows are left out (named in the report);
    RoutingError ``too_little_data`` when fewer than two types remain.
    """
    started = time.perf_counter()
    reason = too_little_data(rows)
    if reason is not None:
        raise RoutingError("too_little_data", reason)
    sizes = Counter(r["type"] for r in rows)
    usable = {t for t, n in sizes.items() if n >= MIN_ROWS_PER_TYPE}
    rows = [r for r in rows if r["type"] in usable]
    fit_rows, held_out = _split(rows, seed)
    measured = _measure(_fit(fit_rows), held_out)
    pipeline = _fit(rows)
    report = {
        "trained": True, "trained_at": time.time(), "rows": len(rows),
        "sources": counts or {}, "types": {t: sizes[t] for t in sorted(usable)},
        "types_too_rare": {t: n for t, n in sorted(sizes.items()) if t not in usable},
        "held_out": measured, "fit_rows": len(fit_rows),
        "model": f"TF-IDF words 1-2 + chars 2-5 -> LogisticRegression(C={_C})",
        "sklearn": sklearn.__version__,
        "train_seconds": round(time.perf_counter() - started, 3),
    }
    router = Router(pipeline, report, [r["description"] for r in held_out[:PROBE_ROWS]])
    report["route_ms"] = _route_ms(router)
    return router


def _route_ms(router: Router) -> float | None:
    """Median milliseconds to route one probe description (what a submit pays)."""
    times = []
    for text in router.probe:
        started = time.perf_counter()
        router.route(text)
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1000, 4) if times else None


# ---------------------------------------------------------------- files


def save(router: Router, model_dir: str | os.PathLike) -> None:
    model_dir = Path(model_dir)
    blob = {"format": FORMAT_VERSION, "sklearn": sklearn.__version__,
            "pipeline": router.pipeline, "report": router.report, "probe": router.probe}
    write_atomic(model_dir / MODEL_FILE, lambda f: joblib.dump(blob, f))
    write_atomic(model_dir / REPORT_FILE,
                 orjson.dumps(router.report, option=orjson.OPT_INDENT_2))


def load(model_dir: str | os.PathLike) -> Router:
    """The router saved in ``model_dir``; RoutingError ``no_model`` says why not."""
    path = Path(model_dir) / MODEL_FILE
    if not path.exists():
        raise RoutingError("no_model", f"no routing model at {path}")
    try:
        blob = joblib.load(path)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
            raise ValueError("unknown file format")
        if blob.get("sklearn") != sklearn.__version__:
            # Pickled estimators are only promised to work on the version that wrote them.
            raise ValueError(f"saved by scikit-learn {blob.get('sklearn')}, "
                             f"running {sklearn.__version__}")
        pipeline = blob["pipeline"]
        if not isinstance(pipeline, Pipeline) or not hasattr(pipeline, "classes_"):
            raise ValueError("not a trained pipeline")
        return Router(pipeline, dict(blob["report"]), [str(t) for t in blob["probe"]])
    except Exception as exc:
        raise RoutingError("no_model", f"could not load {path}: "
                                       f"{type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------- the training child

# Kept here too: `python -m cortex.services.scheduler.classify train|explain` still works.
train_from_home = classify_child.train_from_home
main = classify_child.main


if __name__ == "__main__":
    raise SystemExit(main())
