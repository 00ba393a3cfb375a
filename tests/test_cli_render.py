"""The CLI's pure parts: escaping, human units, tables, one-piece writes, the registry's
"did you mean", --version and the exit codes. No suite."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from cortex.services.cli import app, events, model, registry, render, tasks
from cortex.services.cli.registry import Exit

from .conftest import short_home

HOSTILE = ("ok\x1b[2J\x1b]0;pwned\x07 \r\x85NEL \x9b31m CSI \u202eRLO\u202c \u2066iso\u2069"
           " \x00nul \x7fdel \n second line")
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                    "\u2028\u2029]")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = app.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_escape_makes_every_control_and_bidi_character_visible():
    text = render.escape(HOSTILE)
    assert not UNSAFE.search(text) and "\n" not in text and "\t" not in text
    for visible in ("\\x1b[2J", "\\x07", "\\r", "\\x85", "\\x9b", "\\u202e", "\\u2066",
                    "\\x00", "\\x7f", "\\n second"):
        assert visible in text, visible
    assert render.escape("plain text, ünïcödé, emoji 👩‍💻") == "plain text, ünïcödé, emoji 👩‍💻"
    block = render.escape_block("line one\tcol\nline two \x1b[31m")
    assert block == "line one\tcol\nline two \\x1b[31m"


def test_every_renderer_escapes_what_it_shows():
    task = {"id": "t1\x1b[H", "type": "echo\u202e", "description": HOSTILE, "priority": "high",
            "state": "failed", "attempt": 1, "retries": 0, "agent": "a\rb", "worker": "w\x9b",
            "times": {"created": 1.7e9, "failed": 1.7e9 + 2}, "final": True,
            "result": {"x": HOSTILE}, "error": {"category": "handler_error", "message": HOSTILE},
            "payload": HOSTILE, "progress": 0.5, "message": "half\x1b[2K"}
    shown = [tasks.render_task(task, {"state": "x\x1b", "granted": 1, "used": 1}, 1.7e9 + 3),
             render.table(["A", "B"], [[HOSTILE, task["id"]]]),
             render.event_line({"ts": 1.7e9, "source": "s\x1b", "type": "task.created\r",
                                "task": task["id"], "worker": "w\x85",
                                "data": {"description": HOSTILE, "k\x1b": [HOSTILE]}}),
             render.key_data({"message": HOSTILE}),
             render.fields([("k", HOSTILE)]),
             model.train_text({"started": False, "reason": HOSTILE}),
             tasks.progress_text(task)]
    for text in shown:
        assert not UNSAFE.search(text), text
    # The renderers keep their own line structure: a hostile value adds no line.
    assert render.table(["A"], [[HOSTILE]]).count("\n") == 1


def test_emit_is_one_write_per_line_and_escapes_what_a_renderer_missed(monkeypatch):
    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.writes: list[str] = []

        def write(self, text):
            self.writes.append(text)
            return super().write(text)

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    render.emit("t-123")
    render.emit("two\nlines \x1b[31m")
    render.emit_json({"description": HOSTILE})
    assert out.writes[0] == "t-123\n" and out.writes[1] == "two\nlines \\x1b[31m\n"
    assert json.loads(out.writes[2])["description"] == HOSTILE  # --json stays exact
    assert not UNSAFE.search(out.writes[2])  # (JSON escapes control characters itself)
    assert all(w.endswith("\n") for w in out.writes)


def test_a_failure_line_is_escaped_too(capsys):
    code, _, err = run(capsys, "--home", "/tmp/x\x1b[2J", "logs", "nope")
    assert code in (Exit.NOT_FOUND, Exit.USAGE) and "\x1b" not in err and "\\x1b[2J" in err
    code, _, err = run(capsys, "task", "create", "--type", "e", "-d", "x", "-p", "\x1b[31m")
    assert code == Exit.USAGE and "\x1b" not in err and err.count("\n") == 1


def test_human_units():
    assert render.human_duration(0) == "0s" and render.human_duration(0.0123) == "12ms"
    assert render.human_duration(125) == "2m05s" and render.human_duration(4000) == "1h06m"
    assert render.human_duration(None) == "-" and render.human_duration(float("nan")) == "-"
    assert render.number(1234567) == "1,234,567" and render.number(0.123456) == "0.123"
    assert render.number(12345.678) == "12,346" and render.mib(123.4) == "123 MiB"
    ts = time.mktime((2025, 1, 31, 14, 5, 9, 0, 0, -1)) + 0.25
    assert render.stamp(ts) == "2025-01-31T14:05:09"
    assert render.stamp(ts, millis=True) == "2025-01-31T14:05:09.250"
    assert render.clock(ts) == "14:05:09.250"
    utc = "2025-01-31T00:00:00+00:00"
    assert render.local_stamp(utc) == render.stamp(1738281600.0)
    line = render.key_data({"waited": 0.0012, "eta": ts, "cpu_s": 2.5, "ratio": 0.333333,
                            "lsn": 3})
    assert line == "waited=1ms eta=14:05:09.250 cpu_s=2.5s ratio=0.333"


def test_rendering_helpers():
    text = render.table(["A", "NUM"], [["x", 5], ["longer", 1234], ["y", None]])
    lines = text.splitlines()
    assert lines[0].startswith("A       NUM")
    assert lines[2].endswith("1234") and lines[1].endswith("   5") and lines[3].endswith("-")
    assert events.split_pattern("task.") == ("task.", None)
    assert events.split_pattern("task.*") == ("task.", "task.*")
    assert events.split_pattern("*.failed") == ("", "*.failed")
    line = render.event_line({"ts": 10.5, "source": "scheduler", "type": "task.dispatched",
                              "task": "t1", "worker": "w1",
                              "data": {"worker": "w1", "waited": 0.0012, "lsn": 3}}, base=10.0)
    assert "+500ms" in line and "waited=1ms" in line
    assert "lsn" not in line and line.count("w1") == 1


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and re.fullmatch(r"cortex \d+\.\d+\.\d+\S*\n", out), out


@pytest.mark.parametrize("argv, words", [
    (["stauts"], "did you mean 'status'?"),
    (["task", "lsit"], "did you mean 'list'?"),
    (["task", "list", "--sate", "queued"], "did you mean '--state'?"),
    (["status", "--jsn"], "did you mean '--json'?"),
    (["task", "create", "--type", "e", "-d", "x", "-p", "hihg"], "did you mean 'high'?"),
    (["frobnicate"], "the commands: budget,"),
])
def test_a_mistyped_word_gets_a_suggestion(capsys, argv, words):
    code, out, err = run(capsys, *argv)
    assert code == Exit.USAGE and words in err and err.count("\n") == 1 and not out, err


def test_help_lists_the_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for exit_code in Exit:
        assert re.search(rf"^\s+{exit_code.value}\s+{exit_code.name.lower()}$", out, re.M)


def test_help_of_every_command_exits_zero(capsys):
    paths = {()} | set(registry.COMMANDS) | {p[:1] for p in registry.COMMANDS}
    for path in sorted(paths):
        code, out, err = run(capsys, *path, "--help")
        assert code == 0, (path, err)
        assert "usage: cortex" in out
        cmd = registry.COMMANDS.get(path)
        if cmd is not None:  # the docstring is the help
            assert cmd.summary in " ".join(out.split())


def test_the_model_train_reason_is_said():
    assert "started" in model.train_text({"started": True, "reason": None})
    text = model.train_text({"started": False, "reason": "only 3 completed tasks, need 50"})
    assert text == "training did not start: only 3 completed tasks, need 50"


def test_task_filters_are_checked_on_our_side_too():
    listed = [{"id": "1", "state": "queued", "type": "echo", "agent": "a"},
              {"id": "2", "state": "queued", "type": "sleep", "agent": "a"},
              {"id": "3", "state": "running", "type": "echo", "agent": "b"}]
    assert [t["id"] for t in listed if tasks.matches(t, "queued", "echo", None)] == ["1"]
    assert [t["id"] for t in listed if tasks.matches(t, None, None, "b")] == ["3"]
    assert tasks.list_body("queued", "echo", None, 10, newest=True) == {
        "limit": 10, "state": "queued", "type": "echo", "newest": True}


def test_dashboard_says_when_it_is_not_running(capsys):
    import socket

    home = short_home()
    try:
        (home / "run").mkdir()
        code, out, err = run(capsys, "--home", home, "dashboard")
        assert code == Exit.UNAVAILABLE and "not running" in err and "cortex.toml" in err
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            url = f"http://127.0.0.1:{listener.getsockname()[1]}/?token=abc"
            (home / "run" / "dashboard.url").write_text(url + "\n")
            code, out, err = run(capsys, "--home", home, "dashboard")
            assert code == Exit.OK and out == url + "\n", err
            browser = home / "browser"  # $BROWSER, as `--open` uses it: records the URL
            browser.write_text(f'#!/bin/sh\necho "$1" > {home}/opened\n')
            browser.chmod(0o700)
            done = subprocess.run([sys.executable, "-m", "cortex.services.cli", "--home",
                                   str(home), "dashboard", "--open"], capture_output=True,
                                  text=True, timeout=60, env={**os.environ,
                                                              "BROWSER": str(browser)})
            assert done.returncode == 0 and done.stdout == url + "\n", done.stderr
            assert (home / "opened").read_text() == url + "\n"
        code, out, err = run(capsys, "--home", home, "dashboard")  # left from a dead one
        assert code == Exit.UNAVAILABLE and "earlier run" in err
    finally:
        shutil.rmtree(home, ignore_errors=True)
