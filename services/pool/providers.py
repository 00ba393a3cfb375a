"""One call to an OpenAI-compatible chat-completions endpoint, over httpx.

`exchange()` sends one request and reads its answer, streamed (server-sent events) or
not, counting completion tokens as they arrive and stopping a stream before it passes
the allowance it was given. Failures become a `ProviderError` with a category:

    rate_limited  429 (retried after the provider's Retry-After)
    overloaded    5xx, 529 (retried with capped backoff)
    auth          401, 403, no key, a key file others can read
    bad_request   other 4xx
    timeout       the provider silent past `timeout`, or the task's deadline
    network       no connection, a dropped one, an unreadable answer

An `Abort` watches the task's cancel flag and deadline from a thread of its own and
shuts the connection's socket down, which wakes a read blocked in another thread at
once. Each call opens its own connection (no keep-alive), so the socket to shut is
always the one the call is using; httpx's `trace` extension hands it over.

Keys are read when a call is made (`read_key`) and go only into the Authorization
header; every text that leaves this module is scrubbed of them.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cortex.services.runtime.settings import ProviderSettings, key_file_problem

CATEGORIES = ("rate_limited", "overloaded", "auth", "bad_request", "timeout", "network")
CONNECT_TIMEOUT = 10.0  # seconds to open a connection (within the provider's timeout)
MAX_ERROR_TEXT = 500


class ProviderError(Exception):
    """A failed call; `category` is one of CATEGORIES, `details` travels with the task's
    error (status, retry_after, provider)."""

    def __init__(self, category: str, message: str, *, provider: str = "",
                 status: int | None = None, retry_after: float | None = None,
                 retryable: bool | None = None):
        super().__init__(message)
        self.category = category
        self.status = status
        self.retry_after = retry_after
        self.retryable = category in ("rate_limited", "overloaded") if retryable is None \
            else retryable
        self.counted = 0  # completion tokens counted before a stream failed
        self.details = {k: v for k, v in (("provider", provider), ("status", status),
                                          ("retry_after", retry_after)) if v not in (None, "")}


def read_key(provider: ProviderSettings) -> str | None:
    """The provider's key, read now from its environment variable or 0600 file (None
    when the provider needs none)."""
    if provider.api_key_env:
        key = os.environ.get(provider.api_key_env, "").strip()
        if not key:
            raise ProviderError("auth", f"the key of provider {provider.name!r} is read from "
                                f"${provider.api_key_env}, which is not set",
                                provider=provider.name)
        return key
    if provider.api_key_file:
        path = Path(provider.api_key_file)
        problem = key_file_problem(path)
        if problem is None:
            try:
                key = path.read_text().strip()
            except (OSError, UnicodeDecodeError) as e:
                problem = f"cannot read {path}: {e}"
            else:
                if key:
                    return key
                problem = f"{path} is empty"
        raise ProviderError("auth", f"the key of provider {provider.name!r}: {problem}",
                            provider=provider.name)
    return None


def scrub(text: str, key: str | None) -> str:
    return text.replace(key, "[key]") if key else text


def estimate_tokens(text: str) -> int:
    """Tokens in a piece of generated text, by the usual 4 characters a token."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def estimate_prompt(messages: list[dict]) -> int:
    """Tokens a prompt will cost, on the high side (a UTF-8 byte count over 3, plus the
    per-message framing), so a completion sized from it stays within the reservation."""
    size = len(json.dumps([m.get("content") for m in messages], ensure_ascii=False).encode())
    return math.ceil(size / 3) + 4 * len(messages) + 3


def retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds the provider asks us to wait: retry-after-ms, else Retry-After (seconds
    or an HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            value = float(raw_ms) / 1000
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def status_category(status: int) -> str:
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "auth"
    if status == 408:
        return "timeout"
    if status >= 500:
        return "overloaded"
    return "bad_request"


class Abort:
    """Ends a call from outside: on cancel or at the deadline (monotonic), the socket of
    the connection in use is shut down, so the thread reading it wakes at once."""

    def __init__(self, cancelled: threading.Event, deadline: float | None):
        self.cancelled = cancelled
        self.deadline = deadline
        self.reason: str | None = None  # "cancelled" | "timeout"
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._done = False
        self._thread = threading.Thread(target=self._watch, name="llm-abort", daemon=True)
        self._thread.start()

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def _watch(self) -> None:
        while True:
            # Woken at once by a cancel; looks at `_done` at least every 0.2 s.
            if self.cancelled.wait(max(0.0, min(0.2, self.left()))):
                reason = "cancelled"
            elif self.left() <= 0:
                reason = "timeout"
            else:
                with self._lock:
                    if self._done:
                        return
                continue
            with self._lock:
                if not self._done:
                    self.reason = reason
                    self._shut()
            return

    def _shut(self) -> None:  # with the lock held
        if self._sock is not None:
            try:
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def trace(self, event: str, info: dict) -> None:
        """httpx's `trace` extension: learns the call's socket, forgets it before httpcore
        closes it (so a late abort never touches a reused descriptor)."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            with self._lock:
                self._sock = sock
                if self.reason is not None:
                    self._shut()
        elif event == "http11.response_closed.started":
            with self._lock:
                self._sock = None

    def sleep(self, seconds: float) -> bool:
        """Wait before a retry; False when cancelled or the deadline comes first."""
        if seconds >= self.left():
            return False
        return not self.cancelled.wait(seconds)

    def close(self) -> None:
        with self._lock:
            self._done = True


@dataclass
class Reply:
    content: str = ""
    usage: dict | None = None  # the provider's, when it reported one
    model: str = ""
    finish_reason: str | None = None
    counted: int = 0  # completion tokens counted as they arrived (estimated)
    parts: list = field(default_factory=list)


def exchange(provider: ProviderSettings, key: str | None, body: dict, allowance: int,
             abort: Abort) -> Reply:
    """Send one chat-completions request and read its answer (see the module doc)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    timeout = httpx.Timeout(provider.timeout, connect=min(CONNECT_TIMEOUT, provider.timeout))
    reply = Reply(model=str(body.get("model", "")))
    url = f"{provider.base_url}/chat/completions"
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False) as client, \
                client.stream("POST", url, json=body, headers=headers,
                              extensions={"trace": abort.trace}) as response:
            if response.status_code >= 400:
                response.read()
                raise _status_error(provider, response, key)
            if body.get("stream"):
                _read_stream(response, reply, allowance, provider, key)
            else:
                _read_whole(response, reply, provider, key)
    except ProviderError as e:
        e.counted = reply.counted
        raise _aborted(abort, provider, reply) or e from None
    except httpx.HTTPError as e:
        failure = _aborted(abort, provider, reply) or _transport_error(e, provider, key)
        failure.counted = reply.counted
        raise failure from None
    if abort.reason is not None:  # aborted as the answer completed: it stands
        abort.reason = None
    reply.content = "".join(reply.parts)
    return reply


def _aborted(abort: Abort, provider: ProviderSettings, reply: Reply) -> ProviderError | None:
    if abort.reason is None:
        return None
    failure = ProviderError("timeout" if abort.reason == "timeout" else "cancelled",
                            f"call to {provider.name} {abort.reason} after "
                            f"{reply.counted} completion tokens", provider=provider.name,
                            retryable=False)
    failure.counted = reply.counted
    return failure


def _status_error(provider: ProviderSettings, response: httpx.Response,
                  key: str | None) -> ProviderError:
    status = response.status_code
    try:
        detail = response.json().get("error") or {}
        message = detail.get("message") if isinstance(detail, dict) else str(detail)
        code = detail.get("code") if isinstance(detail, dict) else None
    except (ValueError, AttributeError):
        message, code = response.text, None
    text = scrub(str(message or response.reason_phrase), key)[:MAX_ERROR_TEXT]
    category = status_category(status)
    return ProviderError(category, f"{provider.name} answered {status}: {text}",
                         provider=provider.name, status=status,
                         retry_after=retry_after(response.headers),
                         # Out of credit also comes as a 429, and waiting will not help.
                         retryable=False if code == "insufficient_quota" else None)


def _transport_error(e: httpx.HTTPError, provider: ProviderSettings,
                     key: str | None) -> ProviderError:
    text = scrub(f"{type(e).__name__}: {e}", key)[:MAX_ERROR_TEXT]
    if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
        return ProviderError("timeout", f"{provider.name} silent for {provider.timeout} s "
                             f"({text})", provider=provider.name)
    # Nothing was sent when the connection could not be made: safe to try again.
    retryable = isinstance(e, httpx.ConnectError | httpx.ConnectTimeout)
    return ProviderError("network", f"{provider.name}: {text}", provider=provider.name,
                         retryable=retryable)


def _json(line: str, provider: ProviderSettings, key: str | None):
    try:
        return json.loads(line)
    except ValueError:
        raise ProviderError("network", f"{provider.name} sent an unreadable answer: "
                            f"{scrub(line, key)[:200]!r}", provider=provider.name) from None


def _read_whole(response: httpx.Response, reply: Reply, provider, key) -> None:
    data = _json(response.read().decode(errors="replace"), provider, key)
    choice = ((data.get("choices") or [{}])[0] if isinstance(data, dict) else None) or {}
    if not isinstance(data, dict) or not isinstance(choice, dict):
        raise ProviderError("network", f"{provider.name} sent no choices",
                            provider=provider.name)
    content = (choice.get("message") or {}).get("content") or ""
    reply.parts.append(str(content))
    reply.counted = estimate_tokens(str(content))
    reply.finish_reason = choice.get("finish_reason")
    reply.model = str(data.get("model") or reply.model)
    reply.usage = _usage(data.get("usage"))


def _read_stream(response: httpx.Response, reply: Reply, allowance: int, provider,
                 key) -> None:
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # comments (": keep-alive"), event names, blank separators
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = _json(data, provider, key)
        if not isinstance(chunk, dict):
            continue
        if chunk.get("error"):
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            category = "rate_limited" if "rate" in str(error.get("type", "")) else "overloaded"
            raise ProviderError(category, f"{provider.name} failed mid-stream: "
                                f"{scrub(str(error.get('message', chunk['error'])), key)[:200]}",
                                provider=provider.name, retryable=False)
        reply.model = str(chunk.get("model") or reply.model)
        if chunk.get("usage"):
            reply.usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            text = str(delta.get("content") or "")
            # Reasoning some servers stream beside the content costs tokens as well.
            spent = estimate_tokens(text + str(delta.get("reasoning_content") or ""))
            if spent and reply.counted + spent > allowance:
                reply.finish_reason = "length"  # stop before passing the reservation
                return
            reply.counted += spent
            reply.parts.append(text)
            if choice.get("finish_reason"):
                reply.finish_reason = choice["finish_reason"]


def _usage(raw) -> dict | None:
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in (prompt, completion)):
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
