"""The [routing] section of cortex.toml: defaults, paths relative to the home, refusals."""

from __future__ import annotations

import pytest

from cortex.services.runtime.settings import ConfigError, RoutingSettings, load


def settings_of(home, text: str):
    (home / "cortex.toml").write_text(text)
    return load(home).routing


def test_defaults(tmp_path):
    assert load(tmp_path).routing == RoutingSettings() == RoutingSettings(
        examples="", min_confidence=0.5, fallback="", retrain_every=500)


def test_values_are_read_and_the_examples_path_is_relative_to_the_home(tmp_path):
    routing = settings_of(tmp_path, '[routing]\nexamples = "data/ex.jsonl"\nmin_confidence = 1'
                                    '\nfallback = "triage"\nretrain_every = 0\n')
    assert routing == RoutingSettings(str(tmp_path / "data" / "ex.jsonl"), 1.0, "triage", 0)
    assert settings_of(tmp_path, '[routing]\nexamples = "/srv/ex.jsonl"\n').examples == \
        "/srv/ex.jsonl"


@pytest.mark.parametrize("text, key", [
    ("min_confidence = 1.5", "min_confidence"),
    ("min_confidence = -0.1", "min_confidence"),
    ('min_confidence = "high"', "min_confidence"),
    ("min_confidence = nan", "min_confidence"),
    ('fallback = "auto"', "fallback"),
    (f'fallback = "{"t" * 65}"', "fallback"),
    ("fallback = 3", "fallback"),
    ("examples = true", "examples"),
    ("retrain_every = -1", "retrain_every"),
    ("retrain_every = 2.5", "retrain_every"),
    ("threshold = 0.5", "unknown key"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key) as info:
        settings_of(tmp_path, f"[routing]\n{text}\n")
    assert info.value.code == "bad_config" and "[routing]" in str(info.value)
