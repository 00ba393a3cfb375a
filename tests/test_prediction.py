"""Tests for the cortex.services.scheduler.prediction package: fallbacks, persistence, the
fast path, swapping in models read elsewhere, the training child's entry point, event-log
history and the accuracy required of the model on a synthetic workload."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.loadtest import workloads
from cortex.loadtest.workloads import synthetic_truth, synthetic_workload
from cortex.services.scheduler.prediction import features, flat, models
from cortex.services.scheduler.prediction.flat import MODEL_FILE, REPORT_FILE
from cortex.services.scheduler.prediction.history import TARGETS, history_from_events
from cortex.services.scheduler.prediction.predictor import DEFAULTS, Predictor


def _args(row):
    return row["type"], row["priority"], row["description"], row["payload_size"]


def _actual(row):
    return {t: row[t] for t in TARGETS}


@pytest.fixture(scope="module")
def trained():
    """One small trained predictor shared by the read-only tests (training is the slow bit)."""
    p = Predictor(None)
    report = p.train(synthetic_workload(300, seed=11))
    assert report["trained"]
    return p


# ---------------------------------------------------------------- fallbacks


def test_fallback_order_default_then_average_then_model():
    p = Predictor(None, defaults={"duration": 7.0}, min_samples=50)
    first = p.predict("chat", "high", "say hello", 10)
    assert first.source == "default"
    assert first.duration == 7.0 and first.tokens == DEFAULTS["tokens"]

    p.observe("chat", "high", "say hello", 10,
              {"duration": 2.0, "tokens": 100.0, "memory_mb": 50.0, "cpu_s": 0.2})
    p.observe("chat", "low", "say bye", 10,
              {"duration": 4.0, "tokens": 300.0, "memory_mb": 70.0, "cpu_s": 0.4})
    avg = p.predict("chat", "high", "anything", 99)
    assert avg.source == "average"
    assert (avg.duration, avg.tokens, avg.memory_mb, avg.cpu_s) == pytest.approx((3, 200, 60, 0.3))
    assert p.predict("never-seen", "high", "x", 1).source == "default"

    for row in synthetic_workload(200, seed=3):
        p.observe(*_args(row), _actual(row))
    assert p.completions_since_training() == 202
    report = p.train()
    assert report["trained"] and report["samples"] == 202
    assert p.completions_since_training() == 0
    assert p.predict("chat", "high", "summarize the logs", 100).source == "model"
    assert p.predict("never-seen", "high", "x", 1).source == "default"


def test_type_too_rare_for_model_uses_its_average():
    p = Predictor(None)
    rows = synthetic_workload(120, seed=4)
    rows.append({**rows[0], "type": "rare"})
    p.train(rows)
    assert "rare" in p.status()["model"]["types_not_modelled"]
    assert p.predict("rare", "low", "x", 1).source == "default"
    p.observe("rare", "low", "x", 1, _actual(rows[0]))
    assert p.predict("rare", "low", "x", 1).source == "average"


def test_running_average_is_a_mean_then_exponential():
    p = Predictor(None)
    for v in range(1, 11):
        p.observe("t", "low", "", 0, {"duration": float(v)})  # partial actual: averages only
    assert p.predict("t", "low", "", 0).duration == pytest.approx(5.5)
    assert p.predict("t", "low", "", 0).tokens == DEFAULTS["tokens"]
    assert p.status()["history_rows"] == 0  # incomplete rows never reach training
    for _ in range(2000):
        p.observe("t", "low", "", 0, {"duration": 100.0})
    assert p.predict("t", "low", "", 0).duration == pytest.approx(100.0, rel=1e-3)


def test_observe_ignores_bad_values():
    p = Predictor(None)
    p.observe("t", "low", "", 0, {"duration": float("nan"), "tokens": -5, "cpu": "x",
                                  "memory_mb": 10.0})
    pred = p.predict("t", "low", "", 0)
    assert pred.source == "average"
    assert pred.duration == DEFAULTS["duration"] and pred.memory_mb == 10.0


def test_too_little_history_trains_nothing():
    p = Predictor(None, min_samples=50)
    report = p.train(synthetic_workload(20, seed=5))
    assert report["trained"] is False and "min_samples" in report["reason"]
    assert p.status()["loaded"] is False


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task_type=st.sampled_from(sorted(workloads.SYNTHETIC_TYPES)),
       priority=st.one_of(st.sampled_from(["critical", "high", "medium", "low"]), st.text()),
       description=st.text(max_size=300),
       payload=st.one_of(st.integers(min_value=-10, max_value=2**40), st.none()))
def test_model_predictions_are_always_finite_and_non_negative(trained, task_type, priority,
                                                              description, payload):
    pred = trained.predict(task_type, priority, description, payload)
    assert pred.source == "model"
    for t in TARGETS:
        value = getattr(pred, t)
        assert math.isfinite(value) and value >= 0


# ---------------------------------------------------------------- the fast path


def test_hashed_columns_match_hashing_vectorizer():
    texts = ["Summarize the Quarterly report!", "", "a b c", "naïve café — 日本語 テキスト",
             *(r["description"] for r in synthetic_workload(50, seed=6))]
    expected = models.VECTORIZER.transform(texts).toarray()
    for text, row in zip(texts, expected, strict=True):
        assert features.hash_columns(text) == set(np.flatnonzero(row))


def test_murmurhash_matches_sklearn():
    from sklearn.utils import murmurhash3_32

    for text in ["", "a", "ab", "abc", "abcd", "abcde", "naïve", "日本語テキスト", "x" * 37]:
        assert features.murmurhash3_32(text.encode()) == murmurhash3_32(text, seed=0,
                                                                         positive=False)


def test_saved_flat_arrays_predict_what_the_sklearn_models_predict(tmp_path):
    """Saved and loaded with numpy alone, the arrays give scikit-learn's answers."""
    fitted = models.fit(synthetic_workload(300, seed=11))
    flat.save(tmp_path, fitted.models, fitted.probe_x, fitted.probe_y)
    loaded = flat.load(tmp_path)
    assert loaded.types == fitted.models.types and loaded.report == fitted.models.report
    for row in synthetic_workload(40, seed=7):
        if row["type"] not in loaded.type_index:
            continue
        x = models.matrix(loaded.types, [row])
        slow = [m.predict(x)[0] for m in fitted.estimators]
        expected = [flat.from_model_space(v) for v in slow]
        assert loaded.predict(*_args(row)) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    with np.load(tmp_path / MODEL_FILE, allow_pickle=False) as blob:  # no pickle inside
        assert all(blob[k].dtype != object for k in blob.files)


def test_arrays_that_disagree_with_sklearn_are_never_saved(tmp_path, monkeypatch):
    def skewed(estimators):
        forest = real(estimators)
        forest.baseline = forest.baseline + 1.0
        return forest

    real = models.flatten
    monkeypatch.setattr(models, "flatten", skewed)
    p = Predictor(tmp_path)
    with pytest.raises(models.FastPathError):
        p.train(synthetic_workload(100, seed=3))
    assert not (tmp_path / MODEL_FILE).exists() and not p.status()["loaded"]


# ---------------------------------------------------------------- persistence


def test_save_and_load_round_trip(tmp_path):
    p = Predictor(tmp_path / "models")
    report = p.train(synthetic_workload(200, seed=8))
    assert (tmp_path / "models" / MODEL_FILE).exists()
    on_disk = json.loads((tmp_path / "models" / REPORT_FILE).read_text())
    assert on_disk["samples"] == report["samples"] == 200
    assert set(on_disk["per_target"]) == set(TARGETS)
    assert not list((tmp_path / "models").glob("*.tmp"))

    loaded = Predictor.load(tmp_path / "models")
    status = loaded.status()
    assert status["loaded"] and status["reason"] is None
    assert status["model"]["trained_at"] == report["trained_at"]
    for row in synthetic_workload(20, seed=9):
        assert loaded.predict(*_args(row)) == p.predict(*_args(row))


def test_load_missing_or_corrupt_falls_back_with_reason(tmp_path):
    missing = Predictor.load(tmp_path / "nothing-here")
    assert not missing.status()["loaded"] and "no saved model" in missing.status()["reason"]

    p = Predictor(tmp_path)
    p.train(synthetic_workload(100, seed=10))
    p.observe("chat", "low", "hi", 1, {t: 1.0 for t in TARGETS})
    (tmp_path / MODEL_FILE).write_bytes(b"\x80\x04 this is not a pickle")
    broken = Predictor.load(tmp_path, defaults={"tokens": 5.0})
    status = broken.status()
    assert status["loaded"] is False and "could not load" in status["reason"]
    pred = broken.predict("chat", "low", "hi", 1)
    assert pred.source == "default" and pred.tokens == 5.0


def test_load_refuses_a_tampered_file_or_another_layout(tmp_path):
    Predictor(tmp_path).train(synthetic_workload(100, seed=12))
    with np.load(tmp_path / MODEL_FILE, allow_pickle=False) as saved:
        blob = {k: saved[k] for k in saved.files}
    tampered = {**blob, "value": blob["value"] * 2}
    np.savez(tmp_path / MODEL_FILE, **tampered)
    status = Predictor.load(tmp_path).status()
    assert not status["loaded"] and "disagree" in status["reason"]
    out_of_range = {**blob, "left": blob["left"] + len(blob["left"])}
    np.savez(tmp_path / MODEL_FILE, **out_of_range)
    assert "left out of range" in Predictor.load(tmp_path).status()["reason"]
    meta = json.loads(blob["meta"].tobytes())
    other = {**blob, "meta": np.frombuffer(json.dumps({**meta, "n_hash": 512}).encode(),
                                           dtype=np.uint8)}
    np.savez(tmp_path / MODEL_FILE, **other)
    assert "another feature layout" in Predictor.load(tmp_path).status()["reason"]


def test_an_older_pickled_model_is_retrained_in_the_first_lull(tmp_path):
    """An upgrade does not wait for `retrain_every` new completions to predict again."""
    import sys

    from cortex.services.scheduler.trainer import LULL_SECONDS, Trainer

    (tmp_path / "predictor.joblib").write_bytes(b"\x80\x04 an older version's models")
    predictor = Predictor.load(tmp_path)
    status = predictor.status()
    assert not status["loaded"] and "retrain" in status["reason"] and predictor.outdated
    trainer = Trainer(tmp_path, predictor, command=[sys.executable, "-c", "pass"])
    started: list[float] = []
    trainer.start = started.append
    trainer.maybe_auto(500, 10.0, queued=False)
    trainer.maybe_auto(500, 10.0 + LULL_SECONDS, queued=False)
    assert started == [10.0 + LULL_SECONDS]
    assert not Predictor.load(tmp_path / "elsewhere").outdated  # nothing saved: not due


# ---------------------------------------------------------------- models read elsewhere


def test_models_saved_by_one_predictor_are_adopted_by_another_keeping_its_averages(tmp_path):
    trainer = Predictor(tmp_path)  # as the training child does
    trainer.train(synthetic_workload(150, seed=13))
    live = Predictor(tmp_path)  # as the scheduler holds it
    live.observe("rare", "low", "x", 1, {t: 1.0 for t in TARGETS})
    assert live.predict("chat", "low", "list the tickets", 10).source == "default"
    assert live.adopt(live.read_saved())
    assert live.predict("chat", "low", "list the tickets", 10).source == "model"
    assert live.predict("rare", "low", "x", 1).source == "average"
    assert live.completions_since_training() == 0


def test_adopting_nothing_keeps_the_reason():
    live = Predictor(None)
    empty = Predictor.load("/nonexistent/models")
    assert live.adopt(empty) is False
    assert "no saved model" in live.status()["last_error"]


def test_the_training_child_says_how_many_rows_it_has_before_it_fits(tmp_path):
    """Too few rows: it says so and exits before it even loads scikit-learn. (A full
    training from the event log is in test_prediction_suite.py.)"""
    home = tmp_path / "home"
    (home / "events").mkdir(parents=True)
    rows = synthetic_workload(12, seed=18)
    with open(home / "events" / "events-20240101-001.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": f"e{i}", "type": "task.completed", "ts": 1.0 + i,
                                "data": {"type": r["type"], "priority": r["priority"],
                                         "description": r["description"],
                                         "payload_size": r["payload_size"],
                                         "actual": {t: r[t] for t in TARGETS}}}) + "\n")
    run = subprocess.run([sys.executable, "-X", "importtime", "-m",
                          "cortex.services.scheduler.prediction", "train", "--home", str(home)],
                         capture_output=True, text=True, timeout=300)
    first, last = run.stdout.splitlines()
    assert json.loads(first) == {"rows": 12, "min_samples": 50}
    assert run.returncode == 1
    assert json.loads(last)["reason"] == "12 valid rows < min_samples 50"
    assert "sklearn" not in run.stderr  # the import log: it never loaded scikit-learn
    assert not (home / "models").exists()


# ---------------------------------------------------------------- event log


def test_history_from_events():
    good = {"type": "codegen", "priority": "high", "description": "refactor the api",
            "payload_size": 512,
            "actual": {"duration": 3.5, "tokens": 900, "memory_mb": 120.0, "cpu": 0.4}}
    events = [
        {"type": "task.created", "data": {**good}},
        {"type": "task.completed", "data": good},
        json.dumps({"event": "task.completed", "data": {**good, "type": None,
                                                        "task_type": "chat"}}),
        b"{not json",
        {"type": "task.completed", "data": {**good, "actual": {"duration": 1.0}}},
        {"type": "task.completed", "data": {**good, "actual": {**good["actual"], "cpu": -1}}},
        {"type": "task.completed", "data": "nope"},
        {"type": "task.failed", "data": good},
        "[1, 2]",
    ]
    rows = history_from_events(events)
    assert rows == [
        {"type": "codegen", "priority": "high", "description": "refactor the api",
         "payload_size": 512, "duration": 3.5, "tokens": 900.0, "memory_mb": 120.0,
         "cpu_s": pytest.approx(1.4)},
        {"type": "chat", "priority": "high", "description": "refactor the api",
         "payload_size": 512, "duration": 3.5, "tokens": 900.0, "memory_mb": 120.0,
         "cpu_s": pytest.approx(1.4)},
    ]
    p = Predictor(None)
    for r in rows:
        p.observe(*_args(r), _actual(r))
    assert p.predict("chat", "low", "", 0).source == "average"


# ---------------------------------------------------------------- accuracy (the bar)


def test_synthetic_workload_is_deterministic_and_noisy_around_truth():
    rows = synthetic_workload(300, seed=1)
    assert rows == synthetic_workload(300, seed=1)
    assert rows != synthetic_workload(300, seed=2)
    for row in rows:
        truth = synthetic_truth(row["type"], row["description"])
        for t in TARGETS:
            assert 0.9 * truth[t] - 1e-9 <= row[t] <= 1.1 * truth[t] + 1e-9
    words = {w for r in rows for w in r["description"].split()}
    assert set(workloads.SYNTHETIC_KEYWORDS) <= words


def test_accuracy_on_synthetic_workload():
    p = Predictor(None)
    report = p.train(synthetic_workload(1000, seed=1))
    held_out = synthetic_workload(200, seed=2)
    for target in ("duration", "tokens"):
        within = [abs(getattr(p.predict(*_args(r)), target) - r[target]) <= 0.25 * r[target]
                  for r in held_out]
        assert sum(within) / len(within) >= 0.80, target
        assert report["per_target"][target]["within_25pct"] >= 0.80
    assert all(p.predict(*_args(r)).source == "model" for r in held_out)
