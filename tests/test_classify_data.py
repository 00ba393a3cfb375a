"""The labelled-description generator: deterministic, varied, noisy, and not separable by
one keyword per type."""

from __future__ import annotations

import re
from collections import Counter

from cortex.loadtest import routing_data
from cortex.loadtest.routing_data import KeywordBaseline, labelled_descriptions, split, words_of

SEED = 0


def test_deterministic_for_a_seed():
    assert labelled_descriptions(600, SEED) == labelled_descriptions(600, SEED)
    assert labelled_descriptions(600, SEED) != labelled_descriptions(600, SEED + 1)


def test_at_least_six_types_in_equal_shares():
    rows = labelled_descriptions(600, SEED)
    counts = Counter(r["type"] for r in rows)
    assert len(rows) == 600 and len(counts) >= 6
    assert set(counts.values()) == {600 // len(counts)}


def test_wording_varies():
    rows = labelled_descriptions(600, SEED)
    assert len({r["description"] for r in rows}) >= 590
    for task_type in routing_data.TYPES:
        first_words = Counter(r["description"].split()[0].lower() for r in rows
                              if r["type"] == task_type)
        # Templates and openers: no single way of starting a request dominates.
        assert first_words.most_common(1)[0][1] < 0.35 * sum(first_words.values()), task_type


def test_words_are_shared_between_types():
    rows = labelled_descriptions(600, SEED)
    types_of: dict[str, set[str]] = {}
    for r in rows:
        for w in words_of(r["description"]):
            types_of.setdefault(w, set()).add(r["type"])
    for word in ("check", "look", "draft", "write", "report", "customer", "compare"):
        assert len(types_of[word]) >= 2, word


def _clean_vocabulary() -> set[str]:
    """Every word the generator can write before noise."""
    texts = [*routing_data.MODULES, *routing_data.DOCS, *routing_data.LANGUAGES,
             *routing_data.VENDORS, *routing_data.FIELDS, *routing_data.CONTEXT,
             *routing_data.OPENERS, *routing_data.CLOSERS, *routing_data.STRAY,
             *(t for _, t in routing_data._TEMPLATES)]
    for words in routing_data.TYPES.values():
        texts += [*words.asks, *words.nouns, *words.short, *words.objects, *words.details]
    return {w for t in texts for w in words_of(t)}


def test_typos_casing_and_punctuation_are_there():
    rows = labelled_descriptions(600, SEED)
    vocabulary = _clean_vocabulary()
    words = [w for r in rows for w in words_of(r["description"])
             if not re.fullmatch(r"[0-9a-f]+|feature", w)]  # PR numbers, hashes, branches
    misspelt = sum(w not in vocabulary for w in words)
    assert 0.02 < misspelt / len(words) < 0.15
    assert sum(r["description"].isupper() for r in rows) >= 10
    assert sum(r["description"].endswith(("!!", "...")) for r in rows) >= 10


def test_keyword_baseline_scores_at_most_80_percent_on_the_held_out_100():
    train, held_out = split(labelled_descriptions(600, SEED), 500)
    assert len(held_out) == 100
    baseline = KeywordBaseline(train)
    assert len(baseline.keywords) == len(routing_data.TYPES)  # one keyword per type
    accuracy = baseline.accuracy(held_out)
    print(f"keyword baseline: {accuracy:.0%} on the held-out 100, keywords {baseline.keywords}")
    assert accuracy <= 0.80


def test_keyword_baseline_routes_by_its_keywords():
    rows = [{"type": "a", "description": "alpha common"}, {"type": "a", "description": "alpha"},
            {"type": "b", "description": "beta common"}, {"type": "b", "description": "beta"},
            {"type": "b", "description": "common beta"}]
    baseline = KeywordBaseline(rows)
    # "common" is in more b rows than a rows, but "beta" is in more b rows still.
    assert baseline.keywords == {"a": "alpha", "b": "beta"}
    assert baseline.precision == {"a": 1.0, "b": 1.0}
    assert baseline.route("ALPHA!") == "a"
    assert baseline.route("nothing known") == "b"  # the commonest type
