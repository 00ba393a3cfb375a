"""The client library agents use: one core, a synchronous `Client` and an `AsyncClient`.

    from cortex.protocol import Client
    with Client() as c:                      # finds the suite like the CLI does
        task = c.submit("echo", "say hello", payload={"text": "hi"}, tokens=100)
        done = c.wait(task["id"], timeout=30)
        print(done["state"], done["result"])

Every call is a REQUEST with a correlation id and a deadline. While the deadline lasts the
call is re-sent (same correlation id) when a service is restarting or silent, which is safe:
submits carry an idempotency key (one is made up when the caller gives none), and every
other operation is idempotent. Errors raise the typed exceptions of `cortex.protocol.errors`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid

import msgpack
import zmq
import zmq.asyncio

from . import errors, locate, wire
from .peer import BusLink, make_socket, poll_ms, send_frames, unique_name
from .vocabulary import PRIORITIES  # noqa: F401 - part of the client's API

RESEND_AFTER = 1.0  # seconds of silence before an attempt is re-sent
WAIT_HOLD = 5.0  # the scheduler holds a wait at most this long; the client asks again


class _Core:
    """What both faces share: request building, reply matching, retry decisions."""

    def __init__(self, home, name, agent, timeout, endpoint):
        self.home = locate.find_home(home)
        self.endpoint = endpoint or locate.endpoints(self.home)["bus"]
        self.name = name or unique_name("client")
        self.agent = agent or os.environ.get("CORTEX_AGENT") or self.name
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().bytes[:6]

    def new_corr(self) -> bytes:
        return self._prefix + next(self._ids).to_bytes(6, "big")

    @staticmethod
    def check_size(frames: list) -> None:
        size = sum(len(f) for f in frames[2:])
        if size > wire.MAX_MESSAGE_BYTES:
            raise errors.BadRequest(
                f"request of {size} bytes exceeds the {wire.MAX_MESSAGE_BYTES}-byte limit",
                code="too_large")

    def submit_body(self, task_type, description, priority, tokens, timeout, retries,
                    deadline, payload, idempotency_key, agent) -> dict:
        body = {"op": "task.submit", "type": task_type, "description": description,
                "priority": priority, "tokens": tokens, "agent": agent or self.agent,
                "idempotency_key": idempotency_key or uuid.uuid4().hex}
        if timeout is not None:
            body["timeout"] = timeout
        if retries is not None:
            body["retries"] = retries
        if deadline is not None:
            body["deadline"] = deadline
        if payload is not None:
            body["payload"] = payload
        return body

    @staticmethod
    def outcome(msg: wire.Message, corr: bytes):
        """(done, value): a matching REPLY is a value, a matching ERROR an exception."""
        if msg.corr != corr or msg.type not in (wire.REPLY, wire.ERROR):
            return False, None  # a late reply to an earlier call, or a stray message
        try:
            body = msg.decoded()
        except wire.ProtocolError as e:
            return True, errors.CortexError(str(e), code="bad_request")
        if msg.type == wire.REPLY:
            return True, body
        return True, errors.from_reply(body)


class Client(_Core):
    """Synchronous client. Not thread-safe: give each thread its own instance."""

    def __init__(self, home=None, *, name: str | None = None, agent: str | None = None,
                 timeout: float = 30.0, endpoint: str | None = None):
        super().__init__(home, name, agent, timeout, endpoint)
        self._ctx = zmq.Context.instance()
        self._link = BusLink(self._ctx, self.endpoint, self.name, "client", heartbeat=False)
        self._poller = zmq.Poller()
        self._poller.register(self._link.socket, zmq.POLLIN)

    # -- the one request path ------------------------------------------------------------
    def call(self, service: str, op: str, body: dict | None = None,
             timeout: float | None = None, resend_after: float = RESEND_AFTER):
        body = {"op": op, **(body or {})}
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        corr = self.new_corr()
        frames = wire.frames(wire.REQUEST, service.encode(), corr, body)
        self.check_size(frames)
        backoff = 0.05
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise errors.Timeout(f"{service} did not answer {op} in time")
            send_frames(self._link.socket, frames, block=True)
            attempt_end = min(deadline, now + resend_after)
            while True:
                left = attempt_end - time.monotonic()
                if left <= 0:
                    break
                if not self._poller.poll(poll_ms(left)):
                    continue
                msg = self._link.receive()
                if msg is None:
                    continue
                done, value = self.outcome(msg, corr)
                if not done:
                    continue
                if isinstance(value, errors.Unavailable):
                    # Service restarting: back off (capped) and try again within the deadline.
                    pause = min(backoff, max(0.0, deadline - time.monotonic()))
                    backoff = min(backoff * 2, 1.0)
                    self._poller.poll(poll_ms(pause))
                    attempt_end = 0  # re-send now
                    break
                if isinstance(value, Exception):
                    raise value
                return value

    # -- the API -------------------------------------------------------------------------
    def submit(self, task_type: str, description: str = "", *, priority: str = "medium",
               tokens: int = 0, timeout: float | None = None, retries: int | None = None,
               deadline: float | None = None, payload=None, idempotency_key: str | None = None,
               agent: str | None = None) -> dict:
        """Queue a task; returns its summary (id, state, eta). Same key twice: same task."""
        return self.call("scheduler", "task.submit", self.submit_body(
            task_type, description, priority, tokens, timeout, retries, deadline, payload,
            idempotency_key, agent))

    def status(self, task_id: str) -> dict:
        return self.call("scheduler", "task.status", {"id": task_id})

    def wait(self, task_id: str, timeout: float | None = None) -> dict:
        """Block until the task ends; returns it. Raises Timeout if it does not end in time."""
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            hold = max(0.0, min(WAIT_HOLD, end - time.monotonic()))
            try:
                task = self.call("scheduler", "task.wait", {"id": task_id, "hold": hold},
                                 timeout=hold + 10.0, resend_after=hold + 1.0)
            except errors.Timeout:
                if time.monotonic() >= end:
                    raise
                continue  # the scheduler is restarting: keep asking until our deadline
            if task.get("final"):
                return task
            if time.monotonic() >= end:
                raise errors.Timeout(f"task {task_id} still {task.get('state')}",
                                     details=task)

    def cancel(self, task_id: str) -> dict:
        return self.call("scheduler", "task.cancel", {"id": task_id})

    def list_tasks(self, state: str | None = None, limit: int = 100) -> list[dict]:
        body = {"limit": limit}
        if state:
            body["state"] = state
        return self.call("scheduler", "task.list", body)["tasks"]

    def workers(self) -> list[dict]:
        return self.call("scheduler", "worker.list")["workers"]

    def progress(self, task_id: str, attempt: int, fraction: float, message: str = "") -> dict:
        return self.call("scheduler", "task.progress", {"id": task_id, "attempt": attempt,
                                                        "fraction": fraction,
                                                        "message": message})

    def reserve(self, task_id: str, amount: int, attempt: int = 1, task_type: str | None = None
                ) -> dict:
        """Reserve tokens for work done outside the pool; raises BudgetExceeded if refused."""
        body = {"task": task_id, "attempt": attempt, "amount": amount, "agent": self.agent}
        if task_type:
            body["type"] = task_type
        reply = self.call("ledger", "ledger.reserve", body)
        if not reply.get("granted"):
            raise errors.BudgetExceeded(reply.get("reason", "token budget exceeded"),
                                        details=reply)
        return reply

    def release(self, task_id: str, attempt: int = 1) -> dict:
        return self.call("ledger", "ledger.release", {"task": task_id, "attempt": attempt})

    def commit(self, task_id: str, used: int, attempt: int = 1) -> dict:
        return self.call("ledger", "ledger.commit",
                         {"task": task_id, "attempt": attempt, "used": used})

    def budget(self) -> dict:
        return self.call("ledger", "ledger.status")

    def subscribe(self, pattern: str = "", timeout: float | None = None):
        """Yield live events whose type starts with `pattern` (e.g. "task."); stops after
        `timeout` seconds without an event when given."""
        sub = make_socket(self._ctx, zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, pattern.encode())
        sub.connect(locate.endpoints(self.home)["events_live"])
        try:
            while True:
                if not sub.poll(poll_ms(timeout)):
                    return
                _topic, raw = sub.recv_multipart()
                yield msgpack.unpackb(raw, raw=False)
        finally:
            sub.close()

    def close(self) -> None:
        self._link.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Core):
    """asyncio client with the same calls as `Client`, each a coroutine."""

    def __init__(self, home=None, *, name: str | None = None, agent: str | None = None,
                 timeout: float = 30.0, endpoint: str | None = None):
        super().__init__(home, name, agent, timeout, endpoint)
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = make_socket(self._ctx, zmq.DEALER, name=self.name)
        self._sock.connect(self.endpoint)
        self._waiters: dict[bytes, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._hello_sent = False

    async def _send(self, frames) -> None:
        await self._sock.send_multipart(frames)

    async def _read(self) -> None:
        # One reader task routes replies to their waiters, so calls may run concurrently.
        while True:
            parts = await self._sock.recv_multipart()
            try:
                msg = wire.parse(parts)
            except wire.ProtocolError:
                continue
            if msg.type == wire.WHO:
                await self._send(self._hello())
                continue
            fut = self._waiters.get(msg.corr)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _hello(self):
        return wire.frames(wire.HELLO, wire.BROKER, body={"role": "client", "name": self.name,
                                                          "version": wire.VERSION})

    async def call(self, service: str, op: str, body: dict | None = None,
                   timeout: float | None = None, resend_after: float = RESEND_AFTER):
        if self._reader is None:
            await self._send(self._hello())
            self._reader = asyncio.ensure_future(self._read())
        body = {"op": op, **(body or {})}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        corr = self.new_corr()
        frames = wire.frames(wire.REQUEST, service.encode(), corr, body)
        self.check_size(frames)
        backoff = 0.05
        try:
            while loop.time() < deadline:
                fut = loop.create_future()
                self._waiters[corr] = fut
                await self._send(frames)
                left = min(resend_after, deadline - loop.time())
                try:
                    msg = await asyncio.wait_for(fut, max(left, 0.0))
                except TimeoutError:
                    continue
                _, value = self.outcome(msg, corr)
                if isinstance(value, errors.Unavailable):
                    await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
                    backoff = min(backoff * 2, 1.0)
                    continue
                if isinstance(value, Exception):
                    raise value
                return value
            raise errors.Timeout(f"{service} did not answer {op} in time")
        finally:
            self._waiters.pop(corr, None)

    async def submit(self, task_type: str, description: str = "", *, priority: str = "medium",
                     tokens: int = 0, timeout: float | None = None, retries: int | None = None,
                     deadline: float | None = None, payload=None,
                     idempotency_key: str | None = None, agent: str | None = None) -> dict:
        return await self.call("scheduler", "task.submit", self.submit_body(
            task_type, description, priority, tokens, timeout, retries, deadline, payload,
            idempotency_key, agent))

    async def status(self, task_id: str) -> dict:
        return await self.call("scheduler", "task.status", {"id": task_id})

    async def wait(self, task_id: str, timeout: float | None = None) -> dict:
        loop = asyncio.get_running_loop()
        end = loop.time() + (self.timeout if timeout is None else timeout)
        while True:
            hold = max(0.0, min(WAIT_HOLD, end - loop.time()))
            task = await self.call("scheduler", "task.wait", {"id": task_id, "hold": hold},
                                   timeout=hold + 10.0, resend_after=hold + 1.0)
            if task.get("final"):
                return task
            if loop.time() >= end:
                raise errors.Timeout(f"task {task_id} still {task.get('state')}", details=task)

    async def cancel(self, task_id: str) -> dict:
        return await self.call("scheduler", "task.cancel", {"id": task_id})

    async def list_tasks(self, state: str | None = None, limit: int = 100) -> list[dict]:
        body = {"limit": limit, **({"state": state} if state else {})}
        return (await self.call("scheduler", "task.list", body))["tasks"]

    async def workers(self) -> list[dict]:
        return (await self.call("scheduler", "worker.list"))["workers"]

    async def budget(self) -> dict:
        return await self.call("ledger", "ledger.status")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._sock.close(linger=200)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()
