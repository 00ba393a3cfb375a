"""Pure unit tests of the settings loader: defaults, the commented default file, and every
way a bad file is refused (ConfigError naming the key, never another exception)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cortex.services.runtime import settings as config
from cortex.services.runtime.settings import BusSettings, ConfigError, load


def write(home: Path, text: str) -> Path:
    (home / "cortex.toml").write_text(text)
    return home


def refused(home: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(write(home, text))
    assert info.value.code == "bad_config"
    return str(info.value)


# --- defaults -----------------------------------------------------------------------------

def test_missing_file_gives_the_defaults(tmp_path):
    settings = load(tmp_path)
    assert settings.home == tmp_path
    assert settings.suite == config.SuiteSettings()
    assert settings.scheduler == config.SchedulerSettings()
    assert settings.events == config.EventSettings()
    assert settings.bus == BusSettings()
    assert settings.handlers == config.DEFAULT_HANDLERS
    assert settings.ledger.budget == config.LedgerSettings().budget
    assert settings.ledger.budgets == {"global": {"limit": 100_000_000, "window": None}}
    (group,) = settings.groups
    assert (group.name, group.count, group.types) == (
        "default", 20, ("echo", "sleep", "simulated_agent", "fail"))
    assert group.max == 24 and group.max_tasks == 0


def test_default_config_file_parses_to_the_defaults(tmp_path):
    written = load(write(tmp_path, config.DEFAULT_CONFIG))
    defaults = load(tmp_path / "no-such-home")
    assert written == dataclasses.replace(defaults, home=tmp_path)


def test_default_config_documents_every_setting():
    text = config.DEFAULT_CONFIG
    for cls in (config.SuiteSettings, config.SchedulerSettings, config.EventSettings):
        for name in cls.__dataclass_fields__:
            assert f"\n{name} = " in text, name


def test_empty_file_gives_the_defaults(tmp_path):
    settings = load(write(tmp_path, ""))
    assert settings.scheduler == config.SchedulerSettings() and len(settings.groups) == 1


def test_values_are_read(tmp_path):
    settings = load(write(tmp_path, """
[suite]
fsync = "always"
heartbeat_interval = 2
[scheduler]
max_queue_per_type = 7
max_wait = 60
[events]
postgres_url = "postgresql://x@y/z"
[bus]
bus = "tcp://127.0.0.1:5555"
insecure_tcp = true
"""))
    assert settings.suite.fsync == "always"
    assert settings.suite.heartbeat_interval == 2.0
    assert isinstance(settings.suite.heartbeat_interval, float)  # int accepted for a float
    assert settings.scheduler.max_queue_per_type == 7 and settings.scheduler.max_wait == 60.0
    assert settings.events.postgres_url == "postgresql://x@y/z"
    assert settings.bus == BusSettings(bus="tcp://127.0.0.1:5555", insecure_tcp=True)


# --- unknown names are fatal --------------------------------------------------------------

def test_unknown_section_is_fatal(tmp_path):
    assert "unknown section(s) schedular" in refused(tmp_path, "[schedular]\nx = 1\n")


@pytest.mark.parametrize("section", ["suite", "scheduler", "ledger", "events"])
def test_unknown_key_is_fatal_and_named(tmp_path, section):
    message = refused(tmp_path, f"[{section}]\nmax_queue_per_typo = 1\n")
    assert f"[{section}]" in message and "max_queue_per_typo" in message


def test_syntax_error_is_a_config_error(tmp_path):
    assert "cortex.toml" in refused(tmp_path, "[suite\nfsync = \n")


# --- wrong types and values ---------------------------------------------------------------

@pytest.mark.parametrize("line", [
    'max_queue_per_type = "5"', "max_queue_per_type = 1.5", "max_queue_per_type = true",
    'max_wait = "long"', "max_wait = false", "default_retries = 2.0", "retention = []",
    "aging = {}",
], ids=["int_as_str", "int_as_float", "int_as_bool", "float_as_str", "float_as_bool",
        "int_as_whole_float", "int_as_list", "float_as_table"])
def test_wrong_type_is_fatal(tmp_path, line):
    message = refused(tmp_path, f"[scheduler]\n{line}\n")
    assert line.split(" =")[0] in message and "expected" in message


@pytest.mark.parametrize("line", ["max_wait = -1", "max_queue_per_type = -1",
                                  "memory_threshold = -0.5"])
def test_negative_number_is_fatal(tmp_path, line):
    assert ">= 0" in refused(tmp_path, f"[scheduler]\n{line}\n")


@pytest.mark.parametrize("value", ['"sometimes"', '"ALWAYS"', '""', "1"])
def test_bad_fsync_is_fatal(tmp_path, value):
    assert "fsync" in refused(tmp_path, f"[suite]\nfsync = {value}\n")


@pytest.mark.parametrize("policy", config.FSYNC_POLICIES)
def test_every_fsync_policy_is_accepted(tmp_path, policy):
    assert load(write(tmp_path, f'[suite]\nfsync = "{policy}"\n')).suite.fsync == policy


def test_zero_heartbeat_interval_is_fatal(tmp_path):
    assert "heartbeat_interval" in refused(tmp_path, "[suite]\nheartbeat_interval = 0\n")


@pytest.mark.parametrize("section,key", [("suite", "heartbeat_interval"),
                                         ("scheduler", "task_heartbeat"),
                                         ("scheduler", "max_wait")])
def test_nan_is_fatal(tmp_path, section, key):
    assert key in refused(tmp_path, f"[{section}]\n{key} = nan\n")


@pytest.mark.parametrize("text", [
    "suite = 5\n", "scheduler = [1]\n", "handlers = 1\n", "pool = 3\n",
    "[ledger]\nbudgets = 5\n", "[pool.groups]\ndefault = 5\n", "[pool]\ngroups = 1\n",
], ids=["suite", "scheduler", "handlers", "pool", "ledger_budgets", "pool_group",
        "pool_groups"])
def test_a_section_that_is_not_a_table_is_a_config_error(tmp_path, text):
    refused(tmp_path, text)


# --- ledger budgets -----------------------------------------------------------------------

def test_sub_budgets_are_read(tmp_path):
    settings = load(write(tmp_path, """
[ledger]
budget = 1000
window = "daily"
[ledger.budgets."type:llm"]
limit = 500
window = "rolling:3600"
[ledger.budgets."agent:planner"]
limit = 0
"""))
    assert settings.ledger.budgets == {
        "global": {"limit": 1000, "window": "daily"},
        "type:llm": {"limit": 500, "window": "rolling:3600"},
        "agent:planner": {"limit": 0, "window": None},
    }


@pytest.mark.parametrize("table,body", [
    ('"llm"', "limit = 5"),
    ('"global"', "limit = 5"),
    ('"type:llm"', "limit = 5\nperiod = 1"),
    ('"type:llm"', "limit = -1"),
    ('"type:llm"', "limit = true"),
    ('"type:llm"', 'limit = "5"'),
    ('"type:llm"', "limit = 5.0"),
    ('"type:llm"', "window = \"daily\""),
    ('"type:llm"', 'limit = 5\nwindow = "weekly"'),
    ('"type:llm"', 'limit = 5\nwindow = "rolling:0"'),
    ('"type:llm"', 'limit = 5\nwindow = "rolling:x"'),
    ('"type:llm"', 'limit = 5\nwindow = "rolling:"'),
    ('"type:llm"', "limit = 5\nwindow = 3"),
    ('"type:llm"', "limit = 5\nwindow = 0"),
    ('"type:llm"', 'limit = 5\nwindow = "rolling:1.5"'),
    ('"type:llm"', 'limit = 5\nwindow = "rolling:060"'),
], ids=["no_scope_kind", "global", "unknown_key", "negative", "bool", "str", "float",
        "no_limit", "weekly", "rolling_zero", "rolling_text", "rolling_empty", "window_int",
        "window_zero_int", "rolling_fraction", "rolling_leading_zero"])
def test_bad_sub_budget_is_fatal(tmp_path, table, body):
    assert "llm" in refused(tmp_path, f"[ledger.budgets.{table}]\n{body}\n") or \
        table == '"global"'


@pytest.mark.parametrize("line", ['window = "hourly"', "budget = -1", "budget = 1.5",
                                  'window = "rolling:-5"', 'window = "rolling:1.5"'])
def test_bad_global_budget_is_fatal(tmp_path, line):
    refused(tmp_path, f"[ledger]\n{line}\n")


def test_a_window_the_config_takes_is_one_the_ledger_takes(tmp_path):
    from cortex.services.ledger.budgets import LedgerState

    settings = load(write(tmp_path, '[ledger]\nwindow = "rolling:90"\n'
                          '[ledger.budgets."type:llm"]\nlimit = 5\nwindow = "daily"\n'))
    LedgerState(settings.ledger.budgets, now=0.0)  # raises on a window it would refuse


@pytest.mark.processes
def test_a_service_refuses_a_bad_config_with_exit_8(tmp_path):
    """`rolling:1.5` once passed the config check and crash-looped the ledger; now the
    ledger's start refuses it as a bad configuration (exit 8) naming the key."""
    import subprocess
    import sys

    write(tmp_path, '[ledger]\nwindow = "rolling:1.5"\n')
    done = subprocess.run([sys.executable, "-m", "cortex.services.ledger", "--home",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == ConfigError.exit_code == 8
    assert "[ledger] window" in done.stderr and "rolling:1.5" in done.stderr
    assert "Traceback" not in done.stderr


# --- handlers -----------------------------------------------------------------------------

def test_handler_specs(tmp_path):
    settings = load(write(tmp_path, """
[handlers]
echo = "my.module:echo"
llm = { command = ["python3", "-m", "agent"] }
"""))
    assert settings.handlers["echo"] == "my.module:echo"
    assert settings.handlers["llm"] == {"command": ["python3", "-m", "agent"]}
    assert settings.handlers["sleep"] == config.DEFAULT_HANDLERS["sleep"]


@pytest.mark.parametrize("spec", [
    '"no_colon"', "5", "{ command = [] }", '{ command = "prog" }', "{ command = [1] }",
    '{ command = ["p"], env = {} }', '{ cmd = ["p"] }', '["a:b"]',
], ids=["no_colon", "number", "empty_command", "command_str", "command_int", "extra_key",
        "wrong_key", "list"])
def test_bad_handler_spec_is_fatal(tmp_path, spec):
    assert "[handlers] llm" in refused(tmp_path, f"[handlers]\nllm = {spec}\n")


# --- pool groups --------------------------------------------------------------------------

def test_pool_groups(tmp_path):
    settings = load(write(tmp_path, """
[handlers]
llm = "agents:llm"
[pool.groups.fast]
count = 2
types = ["echo"]
[pool.groups.llm]
count = 0
types = ["llm"]
max = 5
max_tasks = 100
max_rss_mb = 512
idle_exit = 30
"""))
    fast, llm = settings.groups
    assert (fast.name, fast.count, fast.types, fast.max) == ("fast", 2, ("echo",), 6)
    assert (llm.count, llm.max, llm.max_tasks, llm.max_rss_mb, llm.idle_exit) == (
        0, 5, 100, 512.0, 30.0)


def test_pool_group_with_an_unknown_type_is_fatal(tmp_path):
    message = refused(tmp_path, '[pool.groups.g]\ntypes = ["echo", "translate"]\n')
    assert "pool.groups.g" in message and "translate" in message


def test_pool_group_type_known_through_handlers_is_fine(tmp_path):
    text = '[handlers]\nllm = "a:b"\n[pool.groups.g]\ntypes = ["llm"]\n'
    assert load(write(tmp_path, text)).groups[0].types == ("llm",)


@pytest.mark.parametrize("body,word", [
    ("count = 1001", "count"), ("count = -1", "count"), ("count = true", "count"),
    ('count = "2"', "count"), ("count = 2.0", "count"), ("colour = 1", "unknown"),
    ("count = 5\nmax = 4", "max"), ("max = true", "max"), ("max = 30.0", "max"),
], ids=["count_high", "count_negative", "count_bool", "count_str", "count_float",
        "unknown_key", "max_below_count", "max_bool", "max_float"])
def test_bad_pool_group_is_fatal(tmp_path, body, word):
    assert word in refused(tmp_path, f"[pool.groups.g]\n{body}\n")


def test_pool_with_other_tables_is_fatal(tmp_path):
    assert "[pool]" in refused(tmp_path, "[pool]\ncount = 3\n")


def test_pool_without_groups_has_none(tmp_path):
    assert load(write(tmp_path, "[pool]\n")).groups == ()


@pytest.mark.parametrize("body", ['max_tasks = "many"', 'idle_exit = "soon"',
                                  "max_tasks = -1", "max_rss_mb = -5", "idle_exit = -1"])
def test_bad_pool_group_limits_are_config_errors(tmp_path, body):
    refused(tmp_path, f"[pool.groups.g]\n{body}\n")


def test_bus_section_is_typed_and_refuses_unknown_keys(tmp_path):
    for text, what in (('[bus]\nbsu = "tcp://x:1"\n', "unknown key"),
                       ('[bus]\nbus = "http://x"\n', "ipc:// or tcp://"),
                       ('[bus]\nmax_connections = "many"\n', "expected int"),
                       ('[bus]\nmax_connections = -5\n', "number >= ")):
        (tmp_path / "cortex.toml").write_text(text)
        with pytest.raises(ConfigError) as e:
            load(tmp_path)
        assert what in str(e.value), (text, str(e.value))
    (tmp_path / "cortex.toml").write_text("[bus]\nmax_connections = 40\n")
    assert load(tmp_path).bus.max_connections == 40
