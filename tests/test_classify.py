"""The router (cortex.services.scheduler.classify): accuracy on the generator's held-out
descriptions against the keyword baseline, routes and explanations, the low-confidence
rule, the report's confusion matrix, and saving and loading."""

from __future__ import annotations

import joblib
import numpy as np
import orjson
import pytest

from cortex.loadtest.routing_data import TYPES, KeywordBaseline, labelled_descriptions, split
from cortex.services.scheduler import classify
from cortex.services.scheduler.classify import Route, decide
from cortex.services.scheduler.classify_rows import RoutingError

SEED = 0


@pytest.fixture(scope="module")
def data():
    return split(labelled_descriptions(600, SEED), 500)


@pytest.fixture(scope="module")
def router(data):
    return classify.train(data[0])


def test_routes_the_held_out_100_better_than_the_keyword_baseline(data, router):
    train, held_out = data
    assert len(train) == 500 and len(held_out) == 100
    routed = sum(router.route(r["description"]).type == r["type"] for r in held_out) / 100
    baseline = KeywordBaseline(train).accuracy(held_out)
    print(f"router {routed:.0%} vs keyword baseline {baseline:.0%} on the held-out 100")
    assert routed >= 0.945
    assert baseline <= 0.80


def test_report_holds_accuracy_and_confusion_matrix(router):
    report = router.report
    held = report["held_out"]
    labels, matrix = held["confusion"]["labels"], np.array(held["confusion"]["matrix"])
    assert labels == sorted(TYPES) == router.labels
    assert matrix.shape == (len(labels), len(labels))
    assert matrix.sum() == held["rows"] == report["rows"] - report["fit_rows"]
    assert held["accuracy"] == round(np.trace(matrix) / matrix.sum(), 4)
    assert held["accuracy"] >= 0.9
    for i, task_type in enumerate(labels):
        stats = held["per_type"][task_type]
        assert stats["support"] == matrix[i].sum() > 0
        assert stats["recall"] == round(matrix[i, i] / matrix[i].sum(), 4)
    routed = [step["routed"] for step in held["by_confidence"]]
    assert routed == sorted(routed, reverse=True)  # a higher bar routes fewer
    assert sum(report["types"].values()) == report["rows"] == 500
    assert report["fast_path"] is True and report["route_ms"] > 0


def test_route_gives_type_confidence_runner_up_and_top_3(router):
    route = router.route("Please translate the release notes into German")
    assert route.type == "translate"
    assert len(route.top) == 3
    assert route.top[0] == (route.type, route.confidence)
    assert route.top[1] == (route.runner_up, route.runner_up_confidence)
    probabilities = [p for _, p in route.top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert route.confidence > 0.5 and sum(probabilities) <= 1 + 1e-9
    as_dict = route.as_dict()
    assert as_dict["top"][0] == {"type": "translate", "probability": round(route.confidence, 4)}
    orjson.dumps(as_dict)  # fit for an event


@pytest.mark.parametrize("description, expected", [
    ("pleese trnaslate the relase notes inot Germna", "translate"),
    ("DEBUG THE CRAHS IN BILLING!!", "bug_fix"),
    ("summarise teh meeting transcirpt in five bullet points", "summarize"),
])
def test_typos_still_route(router, description, expected):
    assert router.route(description).type == expected


def test_one_row_path_agrees_with_predict_proba(data, router):
    texts = [r["description"] for r in data[1]] + ["", "!!!", "zzz qqq", "x" * 500]
    fast = np.array([router.probabilities(t) for t in texts])
    slow = router.pipeline.predict_proba([t[:200] for t in texts])
    np.testing.assert_allclose(fast, slow, rtol=1e-7, atol=1e-9)


def test_non_string_description_is_refused(router):
    with pytest.raises(TypeError):
        router.route(None)


def test_explain_gives_the_top_3_and_the_words_that_weighed_most(router):
    description = "Please translate the release notes into German"
    explained = router.explain(description)
    route = router.route(description)
    assert [t["type"] for t in explained["types"]] == [t for t, _ in route.top]
    assert explained["type"] == route.type and explained["top"] == route.as_dict()["top"]
    translate = explained["types"][0]
    words = [w["word"] for w in translate["words"]]
    assert {"translate", "german", "into"} & set(words[:3])
    assert set(words) <= set(description.lower().split())
    weights = [w["weight"] for w in translate["words"]]
    assert weights == sorted(weights, reverse=True) and all(w > 0 for w in weights)
    assert len(words) <= 5


def test_explain_weights_are_the_fall_when_a_word_is_taken_out(router):
    description = "debug the crash in billing"
    explained = router.explain(description, words=10)
    weight = {w["word"]: w["weight"] for w in explained["types"][0]["words"]}
    full = router.pipeline.predict_proba([description])[0]
    without = router.pipeline.predict_proba(["debug the   in billing"])[0]
    i = router.labels.index(explained["type"])
    expected = (np.log(full[i] / (1 - full[i])) - np.log(without[i] / (1 - without[i])))
    assert weight["crash"] == round(float(expected), 3)


def test_explain_an_empty_description(router):
    explained = router.explain("")
    assert len(explained["types"]) == 3 and all(t["words"] == [] for t in explained["types"])


# ---------------------------------------------------------------- the low-confidence rule

ROUTE = Route("summarize", 0.45, "translate", 0.30,
              (("summarize", 0.45), ("translate", 0.30), ("write_docs", 0.10)))


def test_confident_route_is_taken():
    decision = decide(ROUTE, min_confidence=0.45)  # at the bar counts as sure
    assert (decision.outcome, decision.type) == ("routed", "summarize")


def test_unsure_route_goes_to_the_fallback():
    decision = decide(ROUTE, min_confidence=0.5, fallback="triage")
    assert (decision.outcome, decision.type) == ("fallback", "triage")
    assert decision.as_dict()["chosen"] == "summarize"  # what the router thought, kept


def test_unsure_route_without_fallback_is_refused_with_the_candidates():
    decision = decide(ROUTE, min_confidence=0.5, fallback="")
    assert (decision.outcome, decision.type) == ("refused", None)
    assert "summarize 0.45, translate 0.30, write_docs 0.10" in decision.reason
    recorded = decision.as_dict()
    assert recorded["runner_up"] == "translate" and len(recorded["top"]) == 3


def test_a_description_with_nothing_to_go_on_is_unsure(router):
    route = router.route("")
    assert route.confidence < 0.5
    assert decide(route, 0.5).outcome == "refused"
    assert decide(route, 0.5, "triage").type == "triage"


# ---------------------------------------------------------------- training edge cases


def test_rare_types_are_left_out_and_named():
    rows = labelled_descriptions(120, SEED) + [{"type": "rare", "description": "odd one"}] * 3
    router = classify.train(rows)
    assert "rare" not in router.labels
    assert router.report["types_too_rare"] == {"rare": 3}


def test_too_little_data_is_refused():
    with pytest.raises(RoutingError) as info:
        classify.train([{"type": "a", "description": f"alpha {i}"} for i in range(10)])
    assert info.value.code == "too_little_data"


def test_two_types_route_too():
    rows = [{"type": "a", "description": f"alpha thing {i}"} for i in range(10)] + \
           [{"type": "b", "description": f"beta stuff {i}"} for i in range(10)]
    router = classify.train(rows)
    assert router.report["fast_path"] is True
    assert router.route("alpha").type == "a" and router.route("beta stuff").type == "b"
    assert router.route("alpha").runner_up == "b" and len(router.route("alpha").top) == 2


# ---------------------------------------------------------------- files


def test_save_and_load_round_trip(tmp_path, data, router):
    classify.save(router, tmp_path / "models")
    loaded = classify.load(tmp_path / "models")
    assert loaded.labels == router.labels
    assert loaded.report == router.report
    texts = [r["description"] for r in data[1][:20]]
    np.testing.assert_array_equal([loaded.probabilities(t) for t in texts],
                                  [router.probabilities(t) for t in texts])
    on_disk = orjson.loads((tmp_path / "models" / classify.REPORT_FILE).read_bytes())
    assert on_disk["held_out"] == router.report["held_out"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(
        [classify.MODEL_FILE, classify.REPORT_FILE])  # no temp files left


def test_load_says_why_there_is_no_model(tmp_path, router):
    with pytest.raises(RoutingError, match="no routing model") as info:
        classify.load(tmp_path)
    assert info.value.code == "no_model"
    (tmp_path / classify.MODEL_FILE).write_bytes(b"not a pickle")
    with pytest.raises(RoutingError, match="could not load"):
        classify.load(tmp_path)
    classify.save(router, tmp_path)
    blob = joblib.load(tmp_path / classify.MODEL_FILE)
    joblib.dump({**blob, "sklearn": "0.0"}, tmp_path / classify.MODEL_FILE)
    with pytest.raises(RoutingError, match="scikit-learn 0.0"):
        classify.load(tmp_path)
