"""Settings that fail in one line: every malformed cortex.toml gives one clear line and
exit 8, from the CLI and from every service; `cortex up` refuses a handler it cannot
import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.services.cli.app import main as cortex
from cortex.services.control import Suite
from cortex.services.runtime.settings import ConfigError, load

from .conftest import short_home

# (label, the file's bytes, a word the line must hold)
MALFORMED = [
    ("not UTF-8", b'[suite]\nfsync = "\xff\xfe"\n', "UTF-8"),
    ("syntax", b"[suite\nfsync = 1\n", "cortex.toml"),
    ("top-level bus = 5", b"bus = 5\n", "[bus]"),
    ("top-level types = 5", b"types = 5\n", "types"),
    ("section as a list", b"scheduler = [1]\n", "[scheduler]"),
    ("metrics port 70000", b"[events]\nmetrics_port = 70000\n", "metrics_port"),
    ("dashboard port -2", b"[dashboard]\nport = -2\n", "port"),
    ("unknown key in [bus]", b'[bus]\nendpoint = "ipc:///x"\n', "endpoint"),
    ("unknown key in [suite]", b"[suite]\nfsnyc = 1\n", "fsnyc"),
    ("unknown key in [events]", b"[events]\nport = 1\n", "port"),
    ("unknown key in [dashboard]", b"[dashboard]\ncolour = 1\n", "colour"),
    ("unknown key in [routing]", b"[routing]\nfoo = 1\n", "foo"),
    ("unknown key in a group", b"[pool.groups.g]\nsize = 1\n", "pool.groups.g"),
    ("unknown key in a budget", b'[ledger.budgets."type:x"]\ncap = 1\n', "type:x"),
    ("wrong type in [bus]", b'[bus]\nmax_connections = "many"\n', "max_connections"),
    ("wrong type in a group", b"[pool.groups.g]\ntypes = 5\n", "types"),
    ("a string of types", b'[pool.groups.g]\ntypes = "echo"\n', "types"),
    ("wrong type of handler", b"[handlers]\necho = 5\n", "echo"),
    ("huge int", b"[scheduler]\nretention = 9223372036854775807\n", "retention"),
    ("nan", b"[scheduler]\naging = nan\n", "aging"),
    ("infinite", b"[suite]\nsnapshot_interval = inf\n", "snapshot_interval"),
    ("percent above 100", b"[scheduler]\nmemory_threshold = 200\n", "memory_threshold"),
    ("zero heartbeat", b"[suite]\nheartbeat_interval = 0\n", "heartbeat_interval"),
    ("tiny rotation", b"[events]\nmax_file_bytes = 1\n", "max_file_bytes"),
    ("negative kept results", b"[scheduler]\nkeep_results = -1\n", "keep_results"),
    ("group ceiling", b"[pool.groups.g]\ncount = 1\nmax = 99999999\n", "max"),
]


_HOMES: list[Path] = []


@pytest.fixture(autouse=True)
def remove_homes():
    """Each test's homes go with it (nothing in them runs: every start is refused)."""
    yield
    while _HOMES:
        shutil.rmtree(_HOMES.pop(), ignore_errors=True)


def new_home() -> Path:
    home = short_home("cxs")
    _HOMES.append(home)
    return home


def home_with(config: bytes) -> Path:
    home = new_home()
    (home / "cortex.toml").write_bytes(config)
    return home


@pytest.mark.parametrize("label, config, word", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_every_malformed_setting_is_one_line_and_exit_8_from_the_cli(label, config, word,
                                                                     capsys):
    home = home_with(config)
    with pytest.raises(ConfigError) as info:
        load(home)
    assert word in str(info.value) and "\n" not in str(info.value)
    for argv in (["up", "--timeout", "5"], ["up", "--foreground", "--timeout", "5"]):
        capsys.readouterr()
        code = cortex(["--home", str(home), *argv])
        err = capsys.readouterr().err
        assert code == 8, (label, argv, err)
        assert err.count("\n") == 1 and word in err and "Traceback" not in err, err
    assert not (home / "run" / "supervisord.pid").exists()  # `up` started nothing


SERVICES = ["broker", "events", "ledger", "scheduler", "pool", "listener", "dashboard"]


@pytest.mark.processes
@pytest.mark.parametrize("service", SERVICES)
def test_every_service_refuses_a_malformed_setting_with_one_line_and_exit_8(service):
    for config, word in ((b'[suite]\nfsync = "\xff"\n', "UTF-8"),
                         (b"[events]\nmetrics_port = 70000\n", "metrics_port"),
                         (b'[bus]\nsocket = "ipc:///tmp/x"\n', "socket")):
        home = home_with(config)
        done = subprocess.run([sys.executable, "-m", f"cortex.services.{service}", "--home",
                               str(home)], capture_output=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        err = done.stderr.decode(errors="replace")
        assert done.returncode == 8, (service, config, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and word in lines[0] and "Traceback" not in err, err


@pytest.mark.processes
def test_up_refuses_a_handler_it_cannot_import(capsys):
    home = home_with(b'[handlers]\nbroken = "no_such_module_h8:run"\n'
                     b'[pool.groups.default]\ncount = 1\ntypes = ["echo", "broken"]\n')
    code = cortex(["--home", str(home), "up", "--timeout", "30"])
    err = capsys.readouterr().err
    assert code == 8, err
    assert "broken" in err and "No module named 'no_such_module_h8'" in err, err
    assert err.count("\n") == 1
    assert Suite(home).supervisord_pid() is None and not list((home / "run").glob("*.sock"))


@pytest.mark.processes
def test_up_refuses_a_handler_whose_module_fails_or_lacks_the_function(capsys):
    home = new_home()
    (home / "h8_failing.py").write_text("raise RuntimeError('import-time failure')\n")
    (home / "h8_empty.py").write_text("x = 1\n")
    for spec, words in (("h8_failing:run", "import-time failure"),
                        ("h8_empty:run", "has no attribute 'run'"),
                        ("h8_empty:x", "not callable")):
        (home / "cortex.toml").write_text(f'[handlers]\nodd = "{spec}"\n')
        code = cortex(["--home", str(home), "up", "--timeout", "30"])
        err = capsys.readouterr().err
        assert code == 8 and words in err, (spec, err)
    (home / "cortex.toml").write_text('[handlers]\nodd = { command = ["no-such-prog-h8"] }\n')
    assert cortex(["--home", str(home), "up", "--timeout", "30"]) == 8
    assert "no-such-prog-h8" in capsys.readouterr().err
    assert Suite(home).supervisord_pid() is None


def test_shipped_handlers_for_this_interpreter_are_checked_without_a_child(monkeypatch,
                                                                              tmp_path):
    from cortex.services.control import suite as control
    from cortex.services.runtime.settings import DEFAULT_HANDLERS

    children, run = [], subprocess.run
    monkeypatch.setattr(control.subprocess, "run",
                        lambda argv, **kw: children.append(argv) or run(argv, **kw))
    control.check_handlers(dict(DEFAULT_HANDLERS), sys.executable, tmp_path)
    assert children == []
    # Another interpreter, or one handler of the user's: the child imports them all.
    with pytest.raises(ConfigError, match="could not check the handlers"):
        control.check_handlers(dict(DEFAULT_HANDLERS), str(tmp_path / "no-python"), tmp_path)
    mine = {**DEFAULT_HANDLERS, "broken": "no_such_module_h19:run"}
    with pytest.raises(ConfigError, match="No module named 'no_such_module_h19'"):
        control.check_handlers(mine, sys.executable, tmp_path)
    assert len(children) == 2
