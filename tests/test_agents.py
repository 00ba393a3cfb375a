"""Pure unit tests of `@agent` and the module loading of the agent runner
(protocol/agents.py): registration, payload binding, bad input, module discovery."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cortex.protocol import agents
from cortex.protocol.agents import AgentInputError, agent
from cortex.protocol.handling import failure
from cortex.protocol.worker import TaskContext


class Recorder:
    def __init__(self):
        self.posts = []

    def _post(self, kind, data):
        self.posts.append((kind, data))


def ctx(payload=None) -> TaskContext:
    return TaskContext(Recorder(), {"id": "t", "attempt": 1, "type": "x", "payload": payload,
                                    "tokens": 0, "timeout": 10.0})


@pytest.fixture(autouse=True)
def clean_registry():
    saved = dict(agents.REGISTRY)
    agents.REGISTRY.clear()
    yield
    agents.REGISTRY.clear()
    agents.REGISTRY.update(saved)


def test_a_function_taking_ctx_gets_the_payload_on_it():
    @agent("t.ctx")
    def handle(c):
        return {"payload": c.payload}

    assert handle(ctx(7)) == {"payload": 7}  # the function itself is left as it was
    assert agents.REGISTRY["t.ctx"](ctx([1, 2])) == {"payload": [1, 2]}


def test_payload_keys_become_keyword_arguments():
    @agent("t.kw")
    def summarize(c, text, max_words=3):
        return " ".join(text.split()[:max_words])

    run = agents.REGISTRY["t.kw"]
    assert run(ctx({"text": "a b c d e"})) == "a b c"
    assert run(ctx({"text": "a b c d e", "max_words": 1})) == "a"


@pytest.mark.parametrize("payload, words", [
    ({"text": "ok", "txt": "typo"}, "unexpected keyword"),
    ({}, "missing a required argument"),
    ([1], "must be a map"),
    ("text", "must be a map"),
])
def test_a_payload_that_does_not_fit_is_a_bad_request(payload, words):
    @agent("t.fit")
    def summarize(c, text):
        return text

    with pytest.raises(AgentInputError) as info:
        agents.REGISTRY["t.fit"](ctx(payload))
    assert words in str(info.value) and "summarize(c, text)" in str(info.value)
    assert failure(info.value)["category"] == "bad_request"


def test_an_exception_category_becomes_the_error_category():
    class Refused(Exception):
        category = "refused_by_policy"
        details = {"policy": "no weekends", "limit": 3, "nested": {"dropped": True}}

    @agent("t.cat")
    def handle(c):
        raise Refused("not today")

    with pytest.raises(Refused) as info:
        agents.REGISTRY["t.cat"](ctx())
    sent = failure(info.value)
    assert sent["category"] == "refused_by_policy" and sent["message"] == "Refused: not today"
    assert sent["policy"] == "no weekends" and sent["limit"] == 3 and "nested" not in sent
    assert "raise Refused" in sent["traceback"]


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, None, 3, "a\x00b"])
def test_bad_task_types_are_refused(name):
    with pytest.raises(ValueError):
        agent(name)


def test_a_function_without_a_context_parameter_is_refused():
    with pytest.raises(TypeError):
        agent("t.none")(lambda: None)
    with pytest.raises(TypeError):
        agent("t.kwonly")(lambda *, ctx: None)


def test_one_type_one_function():
    @agent("t.once")
    def first(c):
        return 1

    agent("t.once")(first)  # the same function again (a re-import) is fine
    with pytest.raises(ValueError, match="already"):
        @agent("t.once")
        def second(c):
            return 2


def test_load_finds_a_module_in_the_working_directory_or_by_path(tmp_path, monkeypatch):
    (tmp_path / "h6_unit_agents.py").write_text(
        "from cortex.protocol.agents import agent\n\n"
        "@agent('unit.one')\ndef one(ctx):\n    return 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert set(agents.load("h6_unit_agents")) == {"unit.one"}
    agents.REGISTRY.clear()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.py").write_text(
        "from cortex.protocol.agents import agent\n\n"
        "@agent('unit.two')\ndef two(ctx):\n    return 2\n")
    assert set(agents.load(str(tmp_path / "sub" / "other.py"))) == {"unit.two"}
    sys.modules.pop("h6_unit_agents", None)
    sys.modules.pop("other", None)


def test_a_module_without_agents_or_missing_is_an_import_error(tmp_path, monkeypatch):
    (tmp_path / "h6_empty.py").write_text("x = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ImportError, match="registers no agent"):
        agents.load("h6_empty")
    with pytest.raises(ImportError):
        agents.load("h6_no_such_module")
    with pytest.raises(ImportError, match="no such file"):
        agents.load(str(tmp_path / "nope.py"))
    sys.modules.pop("h6_empty", None)


@pytest.mark.parametrize("concurrency", [0, -1, 1001, 1.5, True])
def test_the_runner_refuses_a_bad_concurrency(concurrency, tmp_path):
    with pytest.raises(ValueError):
        agents.Runner("anything", concurrency, tmp_path)


def test_the_command_line_says_why_it_cannot_serve(tmp_path):
    (tmp_path / "h6_broken.py").write_text("raise RuntimeError('broken at import')\n")
    (tmp_path / "h6_none.py").write_text("x = 1\n")
    for module, words in (("h6_none", "registers no agent"), ("h6_missing", "No module")):
        done = subprocess.run([sys.executable, "-m", "cortex.protocol.agents", module,
                               "--home", str(tmp_path)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and words in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "cortex.protocol.agents", "h6_broken",
                           "--home", str(tmp_path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "broken at import" in done.stderr
