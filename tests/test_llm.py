"""The `llm` handler against a real HTTP server speaking the OpenAI chat-completions
protocol (tests/openai_server.py, on 127.0.0.1), without a suite: the task context is the
real TaskContext, its worker a recorder of what would go to the scheduler.

Covered: streaming and not, usage reported or not, a stream stopped at the reservation,
400 / 401 / 429 with Retry-After / 500, slow streams, dropped connections, refused
connections, cancel and deadline closing the connection at once, keys from a 0600 file
or the environment and never in any error, and payload checks."""

from __future__ import annotations

import json
import threading
import time

import pytest

from cortex.loadtest.openai_server import WORD, OpenAIServer, prompt_tokens
from cortex.protocol.handling import failure
from cortex.protocol.worker import BudgetExceeded, Cancelled, TaskContext
from cortex.services.pool import llm, providers
from cortex.services.scheduler.ratelimit import Limits, RateLimits
from tests.conftest import wait_for

KEY = "sk-test-0123456789abcdef"


class Recorder:
    """Stands in for the Worker: keeps what the handler posts."""

    def __init__(self):
        self.posts = []

    def _post(self, kind, data):
        self.posts.append((kind, data))


def context(payload=None, *, tokens=1000, description="", timeout=300.0) -> TaskContext:
    task = {"id": "t-1", "attempt": 1, "type": "llm", "description": description,
            "payload": payload, "tokens": tokens, "timeout": timeout}
    ctx = TaskContext(Recorder(), task)
    ctx.started_at = time.time()
    return ctx


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(api_key=KEY) as s:
        yield s


@pytest.fixture
def home(tmp_path, server, monkeypatch):
    """A home naming the server as the only provider, its key in a 0600 file."""
    key_file = tmp_path / "secret" / "key"
    key_file.parent.mkdir()
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    (tmp_path / "home").mkdir()
    write_providers(tmp_path / "home", f'api_key_file = "{key_file}"\ntimeout = 5\n',
                    server.base_url)
    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def write_providers(home, extra: str, base_url: str, name: str = "test") -> None:
    (home / "cortex.toml").write_text(
        f'[providers.{name}]\nbase_url = "{base_url}"\nmodel = "plain"\n{extra}')


def run(payload, **kw):
    """Run the handler; (result or None, the exception or None, the context)."""
    ctx = context(payload, **kw)
    try:
        return llm.llm(ctx), None, ctx
    except Exception as e:  # the worker turns it into the task's error
        return None, e, ctx


def category(exc) -> str:
    if isinstance(exc, BudgetExceeded):
        return "budget_exceeded"
    if isinstance(exc, Cancelled):
        return "cancelled"
    return failure(exc)["category"]


def messages(text="say something"):
    return [{"role": "user", "content": text}]


# --- answers and their tokens -------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
def test_reported_tokens_are_the_providers_usage(home, server, stream):
    result, error, ctx = run({"messages": messages(), "model": "usage-ok;n=12",
                              "stream": stream})
    assert error is None
    request = server.of_model("usage-ok;n=12")[-1]
    assert request["body"]["stream"] is stream
    assert result["content"] == WORD * 12 and result["estimated"] is False
    assert result["usage"] == request["usage"] == {
        "prompt_tokens": prompt_tokens(messages()), "completion_tokens": 12,
        "total_tokens": prompt_tokens(messages()) + 12}
    assert ctx.tokens_used == result["usage"]["total_tokens"]
    assert ctx._worker.posts[-1] == ("tokens", {"used": ctx.tokens_used})
    assert result["provider"] == "test" and result["model"] == "usage-ok;n=12"
    assert result["finish_reason"] == "stop" and result["throttled"] == 0
    if stream:
        assert request["body"]["stream_options"] == {"include_usage": True}
    # max_tokens is what the reservation leaves after the prompt's estimate.
    assert request["body"]["max_tokens"] == 1000 - providers.estimate_prompt(messages())
    assert request["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("stream", [True, False])
def test_without_usage_the_counted_tokens_are_reported_and_flagged(home, server, stream):
    result, error, ctx = run({"messages": messages(), "model": "no-usage;usage=0;n=9",
                              "stream": stream})
    assert error is None and result["estimated"] is True
    assert server.of_model("no-usage;usage=0;n=9")[-1]["usage"] is None
    prompt = providers.estimate_prompt(messages())
    assert result["usage"] == {"prompt_tokens": prompt, "completion_tokens": 9,
                               "total_tokens": prompt + 9}
    assert ctx.tokens_used == prompt + 9


def test_the_description_is_the_prompt_without_messages(home, server):
    result, error, _ = run({"model": "desc;n=2"}, description="summarize the design")
    assert error is None
    body = server.of_model("desc;n=2")[-1]["body"]
    assert body["messages"] == [{"role": "user", "content": "summarize the design"}]


def test_system_and_options_reach_the_provider(home, server):
    run({"messages": messages(), "model": "opts;n=1", "system": "be brief",
         "temperature": 0.2, "seed": 7, "max_tokens": 50})
    body = server.of_model("opts;n=1")[-1]["body"]
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["temperature"] == 0.2 and body["seed"] == 7 and body["max_tokens"] == 50


def test_a_stream_past_the_reservation_is_stopped_before_it(home, server):
    # The server ignores max_tokens and would send 2,000 tokens: the handler stops it.
    result, error, ctx = run({"messages": messages(), "model": "runaway;n=2000;ignore_max=1"},
                             tokens=120)
    assert error is None
    allowance = 120 - providers.estimate_prompt(messages())
    assert result["finish_reason"] == "length" and result["estimated"] is True
    assert result["usage"]["completion_tokens"] == allowance
    assert result["content"] == WORD * allowance
    assert ctx.tokens_used <= 120
    request = server.of_model("runaway")[-1]
    wait_for(lambda: request["closed_at"], 10, "the server to see the stream closed")
    assert request["sent"] < 2000


# --- errors in their categories -----------------------------------------------------------

def test_400_is_a_bad_request_and_not_retried(home, server):
    _, error, ctx = run({"messages": messages(), "model": "bad;status=400"})
    assert category(error) == "bad_request" and "400" in str(error)
    assert len(server.of_model("bad;status=400")) == 1 and ctx.tokens_used == 0


def test_401_is_auth_and_the_echoed_key_is_scrubbed(home, server, monkeypatch):
    wrong = "sk-wrong-key-fedcba9876543210"
    monkeypatch.setenv("H6_WRONG_KEY", wrong)
    write_providers(home, 'api_key_env = "H6_WRONG_KEY"\n', server.base_url)
    _, error, _ = run({"messages": messages(), "model": "wrongkey"})
    sent = failure(error)
    assert sent["category"] == "auth" and sent["status"] == 401
    assert wrong not in json.dumps(sent) and "[key]" in sent["message"]


def test_429_is_retried_after_retry_after_and_counted(home, server):
    started = time.monotonic()
    result, error, _ = run({"messages": messages(),
                            "model": "busy;status=429;retry_after=0.3;fail_times=2;n=3"})
    assert error is None and result["content"] == WORD * 3
    assert result["throttled"] == 2 and result["retry_after"] == 0.3
    assert len(server.of_model("busy;status=429;retry_after=0.3;fail_times=2")) == 3
    assert time.monotonic() - started >= 0.6  # it waited what it was told, twice


def test_429_past_the_retries_is_rate_limited_with_retry_after(home, server):
    _, error, _ = run({"messages": messages(), "retries": 1,
                       "model": "full;status=429;retry_after=0.1"})
    sent = failure(error)
    assert sent["category"] == "rate_limited" and sent["retry_after"] == 0.1
    assert sent["throttled"] == 2 and sent["provider"] == "test" and sent["status"] == 429
    assert len(server.of_model("full;status=429")) == 2
    # What the scheduler will do with it: that provider's limits shrink and pause.
    rl = RateLimits({"test": Limits(requests=10, window=2.0)})
    rl.throttled(sent["provider"], 100.0, sent["retry_after"])
    assert rl.check("test", 0, 100.0).limit == "paused"
    assert rl.status(100.0)["test"]["allowed"]["requests"] == 5


def test_a_long_retry_after_fails_at_once_with_it(home, server):
    _, error, _ = run({"messages": messages(), "model": "later;status=429;retry_after=3600"})
    sent = failure(error)
    assert sent["category"] == "rate_limited" and sent["retry_after"] == 3600
    assert len(server.of_model("later;status=429")) == 1


def test_500_is_overloaded_and_retried_with_backoff(home, server):
    result, error, _ = run({"messages": messages(), "model": "flaky;status=500;fail_times=1"})
    assert error is None and result["throttled"] == 0
    assert len(server.of_model("flaky;status=500")) == 2
    _, error, _ = run({"messages": messages(), "retries": 1, "model": "down;status=503"})
    assert category(error) == "overloaded" and len(server.of_model("down;status=503")) == 2


def test_a_slow_stream_within_the_timeout_completes(home, server):
    result, error, _ = run({"messages": messages(), "model": "slow;delay=0.2;n=5"})
    assert error is None and result["content"] == WORD * 5 and not result["estimated"]


def test_a_provider_silent_past_its_timeout_is_a_timeout(home, server):
    write_providers(home, f'api_key_file = "{home.parent / "secret" / "key"}"\ntimeout = 0.5\n',
                    server.base_url)
    _, error, ctx = run({"messages": messages(), "model": "stalled;delay=2.0;n=3"})
    assert category(error) == "timeout"
    request = server.of_model("stalled")[-1]
    wait_for(lambda: request["closed_at"], 10, "the stalled connection to close")


@pytest.mark.parametrize("stream", [True, False])
def test_a_dropped_connection_is_network_and_counts_what_came(home, server, stream):
    model = f"dropped-{stream};drop=3;n=10"
    _, error, ctx = run({"messages": messages(), "model": model, "stream": stream})
    assert category(error) == "network"
    assert len(server.of_model(model)) == 1  # tokens may have been spent: not retried
    if stream:
        assert ctx.tokens_used == providers.estimate_prompt(messages()) + 3


def test_a_refused_connection_is_network_after_the_retries(home, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_providers(home, "", f"http://127.0.0.1:{port}/v1")
    _, error, _ = run({"messages": messages(), "retries": 1})
    assert category(error) == "network" and "ConnectError" in str(error)


# --- cancel and deadline --------------------------------------------------------------------

@pytest.mark.parametrize("model", ["hung;hang=1", "trickle;delay=0.5;n=100"])
def test_a_cancel_closes_the_connection_at_once(home, server, model):
    ctx = context({"messages": messages(), "model": model, "stream": "hang" not in model})
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(run=_catch(llm.llm, ctx)))
    thread.start()
    request = wait_for(lambda: (server.of_model(model) or [None])[-1], 10, "the request")
    if "trickle" in model:  # mid-stream, blocked between two chunks
        wait_for(lambda: request["sent"] >= 1, 10, "the first chunk")
    cancelled_at = time.monotonic()
    ctx.cancelled.set()
    wait_for(lambda: request["closed_at"], 10, "the server to see the connection close")
    thread.join(timeout=10)
    print(f"\n{model}: connection closed {1000 * (request['closed_at'] - cancelled_at):.1f} ms "
          "after the cancel")
    assert isinstance(outcome["run"], Cancelled)


def test_the_tasks_deadline_closes_the_connection_as_a_timeout(home, server):
    ctx = context({"messages": messages(), "model": "past-deadline;hang=1"}, timeout=0.8)
    error = _catch(llm.llm, ctx)
    request = server.of_model("past-deadline")[-1]
    wait_for(lambda: request["closed_at"], 10, "the server to see the connection close")
    assert category(error) == "timeout"


def _catch(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return e


# --- keys -----------------------------------------------------------------------------------

def test_a_key_file_others_can_read_is_refused_at_call_time(home, server):
    result, error, _ = run({"messages": messages(), "model": "perm-ok;n=1"})
    assert error is None and server.of_model("perm-ok")[-1]["authorization"] == f"Bearer {KEY}"
    key_file = home.parent / "secret" / "key"
    key_file.chmod(0o644)  # after the settings were read: the call looks again
    _, error, _ = run({"messages": messages(), "model": "perm-open"})
    assert category(error) == "auth" and "chmod 600" in str(error)
    assert KEY not in str(error) and not server.of_model("perm-open")


def test_settings_refuse_a_key_file_others_can_read(home, server):
    from cortex.services.runtime import settings as config

    (home.parent / "secret" / "key").chmod(0o640)
    with pytest.raises(config.ConfigError, match="chmod 600"):
        config.load(home)


def test_a_key_from_the_environment(home, server, monkeypatch):
    monkeypatch.setenv("H6_TEST_KEY", KEY)
    write_providers(home, 'api_key_env = "H6_TEST_KEY"\n', server.base_url)
    result, error, _ = run({"messages": messages(), "model": "envkey;n=1"})
    assert error is None and server.of_model("envkey")[-1]["authorization"] == f"Bearer {KEY}"
    monkeypatch.delenv("H6_TEST_KEY")
    _, error, _ = run({"messages": messages(), "model": "envkey;n=1"})
    assert category(error) == "auth" and "H6_TEST_KEY" in str(error)


# --- payload and settings checks --------------------------------------------------------------

@pytest.mark.parametrize("payload, words", [
    ({"messages": messages(), "colour": "blue"}, "unknown payload key"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, "role and a content"),
    ({"messages": messages(), "stream": "yes"}, "stream"),
    ({"messages": messages(), "retries": -1}, "retries"),
    ({"messages": messages(), "max_tokens": 0}, "max_tokens"),
    ({"messages": messages(), "provider": "elsewhere"}, "unknown provider"),
    ([1, 2], "must be a map"),
    ({}, "description"),
])
def test_bad_payloads_are_bad_requests(home, server, payload, words):
    _, error, _ = run(payload)
    assert category(error) == "bad_request" and words in str(error)


def test_a_reservation_the_prompt_fills_is_budget_exceeded(home, server):
    _, error, ctx = run({"messages": messages("x " * 100), "model": "tiny"}, tokens=20)
    assert category(error) == "budget_exceeded" and "reserve more tokens" in str(error)
    assert not server.of_model("tiny") and ctx.tokens_used == 0


def test_without_a_provider_or_a_model_it_says_what_to_configure(home, server):
    (home / "cortex.toml").write_text("")
    _, error, _ = run({"messages": messages()})
    assert category(error) == "bad_request" and "[providers.NAME]" in str(error)
    (home / "cortex.toml").write_text(
        f'[providers.a]\nbase_url = "{server.base_url}"\n'
        f'[providers.b]\nbase_url = "{server.base_url}"\n')
    _, error, _ = run({"messages": messages()})
    assert category(error) == "bad_request" and "payload['provider']" in str(error)
    _, error, _ = run({"messages": messages(), "provider": "a"})
    assert category(error) == "bad_request" and "no model" in str(error)


def test_the_workers_error_carries_the_traceback_category_and_details(home, server):
    _, error, _ = run({"messages": messages(), "retries": 0,
                       "model": "tb;status=429;retry_after=0.1"})
    sent = failure(error)
    assert sent["traceback"].startswith("Traceback") and "ProviderError" in sent["traceback"]
    assert "providers.py" in sent["traceback"]
    assert set(sent) >= {"category", "message", "traceback", "retry_after", "provider"}


def test_a_huge_traceback_keeps_its_last_16_kib():
    def deep(n):
        if n == 0:
            raise RuntimeError("the bottom " + "x" * 30_000)
        deep(n - 1)

    try:
        deep(50)
    except RuntimeError as e:
        sent = failure(e)
    assert len(sent["traceback"].encode()) <= 16 * 1024
    assert sent["traceback"].startswith("...") and sent["traceback"].rstrip().endswith("x")
    assert sent["category"] == "handler_error"
