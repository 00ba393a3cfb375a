"""A real HTTP server speaking the OpenAI chat-completions protocol, for the tests and the
load test (its `mixed` scenario's `llm` share).

    with OpenAIServer(api_key="sk-test") as server:
        server.base_url                     # http://127.0.0.1:PORT/v1

It listens on 127.0.0.1 in threads of the test process and answers
`POST /v1/chat/completions`, streamed (server-sent events, chunked) or not. What it does
is chosen by the request's `model`, so a test steers it even from a worker process:
"NAME;key=value;..." with keys
    n=20          completion tokens to produce (each chunk is one 4-character token)
    ignore_max=1  produce n tokens even past the request's max_tokens
    usage=0       report no usage (streamed: even when asked for it)
    delay=0.1     seconds before each chunk (streamed) or before the answer
    drop=3        close the connection after 3 chunks (streamed) or before answering
    status=429    answer with this error status; retry_after=1 adds the header
    fail_times=2  fail (status) only the first 2 requests of this exact model string
    hang=1        answer nothing until the client goes away
Every request is recorded in `requests`, with the usage it was told and when the server
saw its connection close (`closed_at`, time.monotonic()).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORD = "abc "  # one token, by the server's count and by a 4-characters-a-token estimate


def scenario(model: str) -> dict:
    name, *pairs = model.split(";")
    options = {"name": name}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options[key] = float(value) if "." in value else int(value)
    return options


def prompt_tokens(messages: list) -> int:
    """The server's own count of a prompt: words plus 4 per message."""
    words = sum(len(str(m.get("content", "")).split()) for m in messages)
    return words + 4 * len(messages)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):  # quiet: the tests read `requests`
        pass

    def do_POST(self):  # noqa: N802 - the stdlib's name
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        record = {"body": body, "authorization": self.headers.get("Authorization"),
                  "at": time.monotonic(), "closed_at": None, "usage": None, "sent": 0}
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(record)
            seen = owner.seen[body.get("model", "")] = owner.seen.get(body.get("model", ""),
                                                                       0) + 1
        try:
            self._answer(body, record, seen)
        except (BrokenPipeError, ConnectionResetError):
            record["closed_at"] = record["closed_at"] or time.monotonic()
        self.close_connection = True

    # -- what to answer -------------------------------------------------------------------
    def _answer(self, body: dict, record: dict, seen: int) -> None:
        owner = self.server.owner
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, "no such route", "invalid_request_error")
        keys = {owner.api_key} if isinstance(owner.api_key, str) else set(owner.api_key or ())
        if keys and self.headers.get("Authorization") not in {f"Bearer {k}" for k in keys}:
            presented = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            # Echoed in full, as careless providers do: the client must not pass it on.
            return self._error(401, f"Incorrect API key provided: {presented}",
                               "invalid_api_key")
        opts = scenario(str(body.get("model", "")))
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return self._error(400, "'messages' is required", "invalid_request_error")
        status = opts.get("status")
        if status and seen <= opts.get("fail_times", 10**9):
            headers = {"Retry-After": str(opts["retry_after"])} if "retry_after" in opts else {}
            return self._error(status, f"scenario status {status}", "scenario", headers)
        if opts.get("hang"):
            return self._wait_for_close(record, forever=True)
        limit = body.get("max_tokens")
        count = int(opts.get("n", 20))
        if limit is not None and not opts.get("ignore_max"):
            count = min(count, int(limit))
        finish = "length" if limit is not None and count >= int(limit) else "stop"
        usage = {"prompt_tokens": prompt_tokens(body["messages"]), "completion_tokens": count}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream"):
            self._stream(body, opts, record, count, finish, usage)
        else:
            if self._wait_for_close(record, opts.get("delay", 0)) or "drop" in opts:
                return  # gone, or dropped on purpose before answering
            message = {"role": "assistant", "content": WORD * count}
            answer = {"id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                      "model": body["model"], "choices": [
                          {"index": 0, "message": message, "finish_reason": finish}]}
            if opts.get("usage", 1):
                answer["usage"] = usage
                record["usage"] = usage
            self._json(200, answer)
            record["sent"] = count

    def _stream(self, body, opts, record, count, finish, usage) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0,
                "model": body["model"]}
        for i in range(count):
            if "drop" in opts and i >= opts["drop"]:
                self._drop(record)
                return
            if self._wait_for_close(record, opts.get("delay", 0)):
                return
            delta = {"content": WORD} if i else {"role": "assistant", "content": WORD}
            self._event({**base, "choices": [{"index": 0, "delta": delta,
                                              "finish_reason": None}]})
            record["sent"] = i + 1
        self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        wants_usage = (body.get("stream_options") or {}).get("include_usage")
        if wants_usage and opts.get("usage", 1):
            self._event({**base, "choices": [], "usage": usage})
            record["usage"] = usage
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- I/O ----------------------------------------------------------------------------
    def _wait_for_close(self, record: dict, seconds: float = 0, forever: bool = False) -> bool:
        """Wait `seconds` (or until the client leaves, with `forever`); True if it left."""
        deadline = time.monotonic() + seconds
        while forever or time.monotonic() < deadline:
            left = 0.05 if forever else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable:
                try:
                    gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    gone = True
                if gone:
                    record["closed_at"] = time.monotonic()
                    return True
            if not forever and left <= 0:
                break
            if self.server.owner.stopping.is_set():
                return True
        return False

    def _drop(self, record: dict) -> None:
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        record["dropped"] = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, data: dict) -> None:
        self._chunk(b"data: " + json.dumps(data).encode() + b"\n\n")

    def _json(self, status: int, data: dict, headers: dict | None = None) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(raw)
        self.wfile.flush()

    def _error(self, status: int, message: str, code: str, headers: dict | None = None):
        self._json(status, {"error": {"message": message, "type": code, "code": code}},
                   headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: OpenAIServer


class OpenAIServer:
    def __init__(self, api_key: str | set[str] | None = None):  # the key(s) it accepts
        self.api_key = api_key
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._http = _Server(("127.0.0.1", 0), _Handler)
        self._http.owner = self
        self._thread = threading.Thread(target=self._http.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def start(self) -> OpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def of_model(self, prefix: str) -> list[dict]:
        """The requests whose model starts with `prefix`."""
        with self.lock:
            return [r for r in self.requests if str(r["body"].get("model", "")).startswith(
                prefix)]
