"""Pure unit tests of the `[providers.NAME]` settings: values read, defaults, every bad
value refused with a ConfigError naming the key, key files others can read refused,
and the provider a payload names (or the only one)."""

from __future__ import annotations

import pytest

from cortex.services.runtime import settings as config
from cortex.services.runtime.settings import ConfigError, ProviderSettings, load


def write(home, text: str):
    (home / "cortex.toml").write_text(text)
    return home


def test_a_provider_is_read_with_its_defaults(tmp_path):
    settings = load(write(tmp_path, '[providers.local]\nbase_url = "http://127.0.0.1:8/v1/"\n'
                                    'model = "m"\napi_key_env = "LOCAL_KEY"\n'
                                    'requests_per_window = 5\nwindow = 2\n'))
    assert settings.providers == {"local": ProviderSettings(
        "local", "http://127.0.0.1:8/v1", "m", "LOCAL_KEY", "", 5, 0, 0, 2.0, 120.0)}
    assert load(tmp_path / "none").providers == {}
    assert config.DEFAULT_HANDLERS["llm"] == "cortex.services.pool.llm:llm"


def test_a_relative_key_file_is_under_the_home_and_must_be_private(tmp_path):
    key = tmp_path / "keys" / "k"
    key.parent.mkdir()
    key.write_text("sk-x")
    key.chmod(0o600)
    settings = load(write(tmp_path, '[providers.a]\nbase_url = "https://x"\n'
                                    'api_key_file = "keys/k"\n'))
    assert settings.providers["a"].api_key_file == str(key)
    for mode in (0o640, 0o604, 0o660):
        key.chmod(mode)
        with pytest.raises(ConfigError, match="chmod 600"):
            load(tmp_path)


@pytest.mark.parametrize("text, words", [
    ('[providers.a]\nbase_url = "ftp://x"\n', "base_url"),
    ('[providers.a]\nmodel = "m"\n', "base_url"),
    ('[providers.a]\nbase_url = "http://x"\nconcurrent = 1.5\n', "concurrent"),
    ('[providers.a]\nbase_url = "http://x"\nrequests_per_window = -1\n', "requests_per_window"),
    ('[providers.a]\nbase_url = "http://x"\ntokens_per_window = true\n', "tokens_per_window"),
    ('[providers.a]\nbase_url = "http://x"\nwindow = 0\n', "window"),
    ('[providers.a]\nbase_url = "http://x"\ntimeout = nan\n', "timeout"),
    ('[providers.a]\nbase_url = "http://x"\ncolour = 1\n', "unknown key"),
    ('[providers.a]\nbase_url = "http://x"\nname = "b"\n', "name"),
    ('[providers."a b"]\nbase_url = "http://x"\n', "provider name"),
    ('[providers.a]\nbase_url = "http://x"\napi_key_env = "1X"\n', "api_key_env"),
    ('[providers.a]\nbase_url = "http://x"\napi_key_env = "K"\napi_key_file = "f"\n', "not both"),
    ('providers = 3\n', "providers"),
    ('[providers]\na = 3\n', "providers.a"),
])
def test_bad_provider_settings_are_refused_naming_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    assert words in str(info.value) and info.value.code == "bad_config"


def test_the_provider_of_a_payload(tmp_path):
    one = load(write(tmp_path, '[providers.a]\nbase_url = "http://x"\n'))
    assert one.provider_for(None).name == "a" and one.provider_for({"provider": "a"}).name == "a"
    two = load(write(tmp_path, '[providers.a]\nbase_url = "http://x"\n'
                               '[providers.b]\nbase_url = "http://y"\n'))
    assert two.provider_for({"provider": "b"}).base_url == "http://y"
    with pytest.raises(ConfigError, match="name one of"):
        two.provider_for({})
    with pytest.raises(ConfigError, match="unknown provider"):
        two.provider_for({"provider": 3})
    with pytest.raises(ConfigError, match=r"\[providers.NAME\]"):
        load(tmp_path / "none").provider_for({})
