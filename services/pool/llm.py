"""The `llm` handler: a chat completion from an OpenAI-compatible provider, kept within
the task's token reservation. Needs the `llm` extra (`pip install 'cortex-agents[llm]'`).

Payload (every key optional; unknown keys are refused):
    provider     a `[providers.NAME]` of cortex.toml (default: the only one configured)
    messages     [{"role", "content"}, ...]; without it the task's description is the prompt
    system       a system message put first
    model        default: the provider's `model`
    temperature, top_p, stop, seed, response_format   passed to the provider
    stream       default true: read the answer as it is generated
    max_tokens   at most this many completion tokens (never more than the reservation allows)
    retries      how many times a 429, 5xx or refused connection is tried again (default 4)

`max_tokens` is what the reservation (`ctx.reserved`, less what the task already used)
leaves after an estimate of the prompt. A stream is stopped before it would pass that.
The tokens reported are the provider's usage (prompt + completion); when it reports
none, the tokens counted as they arrived, and the result says `"estimated": true`.

Result: {"content", "usage", "estimated", "model", "finish_reason", "provider",
"throttled" (429s met on the way), "retry_after" (the last one's, in seconds)}.
A failure carries its category (see providers.py), and for a 429 its `retry_after`.

Agent functions call the same path with `complete(ctx, messages, ...)`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from cortex.protocol import backoff, locate
from cortex.protocol.worker import BudgetExceeded, Cancelled, TaskContext
from cortex.services.runtime import settings as config

DEFAULT_RETRIES = 4
MAX_RETRIES = 10
BACKOFF_BASE, BACKOFF_CAP = 0.5, 8.0  # seconds, for 5xx without a Retry-After
MAX_RETRY_AFTER = 60.0  # a longer wait fails the task instead (with its retry_after)
PASSED_THROUGH = ("temperature", "top_p", "stop", "seed", "response_format")
PAYLOAD_KEYS = frozenset({"provider", "messages", "system", "model", "stream", "max_tokens",
                          "retries", *PASSED_THROUGH})


class LLMInputError(ValueError):
    """A payload or setting the handler cannot use: the task's error category."""

    category = "bad_request"


def _providers():
    try:
        from cortex.services.pool import providers
    except ImportError as e:
        raise RuntimeError("the llm handler needs httpx: "
                           "pip install 'cortex-agents[llm]'") from e
    return providers


_settings_cache: dict[Path, tuple[int, config.Settings]] = {}


def _settings(home) -> config.Settings:
    """The home's settings, read again only when cortex.toml changes."""
    home = locate.find_home(home)
    try:
        stamp = (home / "cortex.toml").stat().st_mtime_ns
    except OSError:
        stamp = 0
    cached = _settings_cache.get(home)
    if cached is None or cached[0] != stamp:
        cached = _settings_cache[home] = (stamp, config.load(home))
    return cached[1]


def llm(ctx: TaskContext):
    """The handler: the task's payload is the call."""
    payload = ctx.payload if ctx.payload is not None else {}
    if not isinstance(payload, dict):
        raise LLMInputError("an llm task's payload must be a map (or empty)")
    unknown = set(payload) - PAYLOAD_KEYS
    if unknown:
        raise LLMInputError(f"unknown payload key(s) {sorted(unknown)}; "
                            f"known: {sorted(PAYLOAD_KEYS)}")
    messages = payload.get("messages")
    if messages is None:
        if not ctx.description.strip():
            raise LLMInputError("an llm task needs payload['messages'] or a description")
        messages = [{"role": "user", "content": ctx.description}]
    return complete(ctx, messages, **{k: v for k, v in payload.items() if k != "messages"})


def _check_messages(messages, system) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise LLMInputError("messages must be a non-empty list of {role, content}")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str | list)):
            raise LLMInputError(f"each message needs a role and a content, got {m!r:.200}")
    if system is not None:
        if not isinstance(system, str):
            raise LLMInputError("system must be a string")
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def _whole(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise LLMInputError(f"{name} must be a whole number in {lo}..{hi}, got {value!r}")
    return value


def complete(ctx: TaskContext, messages: list[dict], *, provider: str | None = None,
             model: str | None = None, system: str | None = None, stream: bool = True,
             max_tokens: int | None = None, retries: int = DEFAULT_RETRIES, home=None,
             **options) -> dict:
    """One chat completion within the task's reservation; returns the result described
    in the module doc and reports its tokens to the task (`ctx.report_tokens`)."""
    providers = _providers()
    messages = _check_messages(messages, system)
    if set(options) - set(PASSED_THROUGH):
        raise LLMInputError(f"unknown option(s) {sorted(set(options) - set(PASSED_THROUGH))}")
    if not isinstance(stream, bool):
        raise LLMInputError("stream must be true or false")
    retries = _whole(retries, "retries", 0, MAX_RETRIES)
    try:
        spec = _settings(home).provider_for({} if provider is None else {"provider": provider})
    except config.ConfigError as e:
        raise LLMInputError(str(e)) from None
    model = model if model is not None else spec.model
    if not isinstance(model, str) or not model:
        raise LLMInputError(f"no model: give payload['model'] or set model in "
                            f"[providers.{spec.name}]")

    before = ctx.tokens_used
    prompt = providers.estimate_prompt(messages)
    allowance = ctx.reserved - before - prompt
    if max_tokens is not None:
        allowance = min(allowance, _whole(max_tokens, "max_tokens", 1, 2**31))
    if allowance < 1:
        raise BudgetExceeded(
            f"the prompt (about {prompt} tokens) leaves nothing of the reservation of "
            f"{ctx.reserved} ({before} used): reserve more tokens for this task",
            details={"reserved": ctx.reserved, "used": before, "prompt_estimate": prompt})
    body = {"model": model, "messages": messages, "max_tokens": allowance, "stream": stream,
            **options}
    if stream:
        body["stream_options"] = {"include_usage": True}

    abort = providers.Abort(ctx.cancelled, _deadline(ctx))
    throttled, last_retry_after, attempt = 0, None, 0
    try:
        while True:
            try:
                reply = providers.exchange(spec, providers.read_key(spec), body, allowance,
                                           abort)
                break
            except providers.ProviderError as e:
                if e.counted:  # part of an answer came: the provider counts it, so do we
                    ctx.report_tokens(before + prompt + e.counted)
                if e.category == "cancelled":
                    raise Cancelled(f"task {ctx.id} was cancelled during its call to "
                                    f"{spec.name}") from None
                if e.category == "rate_limited":
                    throttled += 1
                    last_retry_after = e.retry_after
                e.details["throttled"] = throttled
                attempt += 1
                wait = e.retry_after if e.retry_after is not None else \
                    backoff.delay(attempt, BACKOFF_BASE, BACKOFF_CAP)
                if not e.retryable or attempt > retries or wait > MAX_RETRY_AFTER:
                    raise
                if not abort.sleep(wait):
                    ctx.check_cancelled()
                    raise  # the deadline comes before the retry would
    finally:
        abort.close()

    estimated = reply.usage is None
    usage = reply.usage or {"prompt_tokens": prompt, "completion_tokens": reply.counted,
                            "total_tokens": prompt + reply.counted}
    ctx.report_tokens(before + usage["total_tokens"])
    return {"content": reply.content, "usage": usage, "estimated": estimated,
            "model": reply.model, "finish_reason": reply.finish_reason, "provider": spec.name,
            "throttled": throttled, "retry_after": last_retry_after}


def _deadline(ctx: TaskContext) -> float | None:
    """The task's timeout as a time.monotonic() moment (None: no timeout known)."""
    timeout = ctx.task.get("timeout") if isinstance(ctx.task, dict) else None
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) \
            or not math.isfinite(timeout) or timeout <= 0:
        return None
    started = ctx.started_at if ctx.started_at is not None else time.time()
    return time.monotonic() + (started + timeout - time.time())
