"""The client library agents use: a synchronous `Client` and an `AsyncClient`.

    from cortex.protocol import Client
    with Client() as c:                      # finds the suite like the CLI does
        done = c.submit_and_wait("echo", "say hello", payload={"text": "hi"}, timeout=30)
        print(done["state"], done["result"])

Both are thin faces over one core: the operations are written once as plans
(`operations.py`) and every call is run by the sans-IO call machine (`calls.py`:
correlation ids, deadlines, re-sends, capped backoff with jitter, typed errors). A face
only moves bytes and time, so the two expose the same operations with the same
parameters; the async ones are coroutines (`subscribe` gives an async iterator).

Calls fail fast with `Unavailable` when no suite is running in the home (no bus socket,
or nothing heard on the bus within `connect_timeout`); once the bus has answered, a
service or broker restart is ridden out by re-sending until the call's deadline.
Clients send no heartbeats: the broker forgets a client silent for a minute, and a
client that speaks again is simply greeted anew.

On the suite's machine a `Client` that keeps calling the scheduler takes the scheduler's
direct line (direct.py) after its first few calls: its submits, waits and their answers
then skip the broker (one hop each way instead of two). It asks for the line over the
bus (`line.open`), so the broker's name for it is what the scheduler knows it by; any
trouble on the line sends it back to the bus. The async face stays on the bus.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import zmq

from . import errors, locate
from .calls import CONNECT_TIMEOUT, Request, Session, drive, drive_async, exchange, within
from .direct import SCHEDULER, DirectLink
from .live import AsyncSubscription, Subscription
from .operations import Plans
from .peer import (
    BusLink,
    TimedReceiver,
    has_message,
    keys_for,
    recv_frames,
    send_frames,
    unique_name,
)
from .vocabulary import PRIORITIES  # noqa: F401 - part of the client's API

if TYPE_CHECKING:  # asyncio is imported where the async face runs: a sync CLI never needs it
    import asyncio

SEND_WAIT_MS = 1000
LINE_AFTER_CALLS = 4  # scheduler calls over the bus before a client asks for the line
LINE_RETRY_CALLS = 100  # and after the line failed or was refused, before it asks again
LINE_OPEN_TIMEOUT = 2.0  # seconds for the token and the WELCOME
LINE_LOOK_AT_BUS = 0.5  # on the line, the bus is looked at this often too (a fallback)


class _Face:
    """What both faces hold: where the suite is, who we are, the session and plans."""

    def __init__(self, home, name: str | None, agent: str | None, timeout: float,
                 endpoint: str | None, connect_timeout: float, key_file):
        self.home = locate.find_home(home)
        self.endpoint = endpoint or locate.endpoints(self.home)["bus"]
        # On tcp: CurveZMQ with the key file given, else $CORTEX_KEY_FILE, [bus] key_file
        # or the suite's own key pair (on its machine).
        self._key_file = key_file
        self._keys = keys_for(self.home, self.endpoint, key_file)
        self.name = name or unique_name("client")
        self.agent = agent or os.environ.get("CORTEX_AGENT") or self.name
        self._session = Session(self.home, timeout=timeout, connect_timeout=connect_timeout)
        self._plans = Plans(self._session, self.agent)
        self._ctx = zmq.Context.instance()
        self._link = BusLink(self._ctx, self.endpoint, self.name, "client", heartbeat=False,
                             keys=self._keys)

    @property
    def timeout(self) -> float:
        """Seconds a call may take when it names no timeout of its own."""
        return self._session.timeout

    def _check_running(self, endpoint: str) -> None:
        """Refuse at once when plainly no suite is running: its socket file is absent.
        Only until the bus has answered once: after that a missing file is a restart."""
        if self._session.connected:
            return
        path = locate.ipc_path(endpoint)
        if path is not None and not path.exists():
            raise errors.Unavailable(f"no suite is running in {self.home} ({path} does not "
                                     "exist; start it with `cortex up`)")

    def _live_endpoint(self, pattern: str) -> str:
        """Where live events come from, refusing at once when plainly nothing is there."""
        if not isinstance(pattern, str):
            raise errors.BadRequest("the event pattern must be a string")
        self._check_running(self.endpoint)
        endpoint = locate.endpoints(self.home)["events_live"]
        path = locate.ipc_path(endpoint)
        if path is not None and not path.exists():
            raise errors.Unavailable(f"the event router is not running in {self.home} "
                                     f"({path} does not exist)")
        return endpoint

    def _live_keys(self):
        """The keys for the live events socket (None unless it is on tcp)."""
        return keys_for(self.home, locate.endpoints(self.home)["events_live"], self._key_file)


def _blocking(plan):
    """A sync face's method: runs the plan with blocking calls."""
    @functools.wraps(plan)
    def method(self, *args, **kwargs):
        return drive(plan(self._plans, *args, **kwargs), self._perform)
    return method


def _awaitable(plan):
    """An async face's method: runs the plan with awaited calls."""
    @functools.wraps(plan)
    async def method(self, *args, **kwargs):
        return await drive_async(plan(self._plans, *args, **kwargs), self._perform)
    return method


class Client(_Face):
    """Synchronous client. Not thread-safe: give each thread its own instance.

    `home`: the suite's home (default $CORTEX_HOME, else ./.cortex); `agent`: who the
    tasks are for (default $CORTEX_AGENT, else the client's name); `timeout`: seconds a
    call may take unless it says otherwise; `connect_timeout`: seconds to hear from a bus
    never heard before, after which a call fails with Unavailable (naming the cause on
    tcp: timeout, server key mismatch, not admitted); `key_file`: the CurveZMQ key file
    for a suite on tcp (`cortex keys make`; default $CORTEX_KEY_FILE or [bus] key_file)."""

    def __init__(self, home=None, *, name: str | None = None, agent: str | None = None,
                 timeout: float = 30.0, endpoint: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, key_file=None):
        super().__init__(home, name, agent, timeout, endpoint, connect_timeout, key_file)
        self._inbox = TimedReceiver(self._link.socket)
        # A send waits at most this long: a DEALER with no connection (its handshakes
        # refused) would block for ever; the call's re-send timer tries again.
        self._link.socket.setsockopt(zmq.SNDTIMEO, SEND_WAIT_MS)
        self._line_endpoint = locate.direct_endpoint(self.endpoint)  # None: not local
        self._line: DirectLink | None = None
        self._line_calls = 0  # scheduler calls since the last look at the line
        self._on_line = False  # the call under way goes over the line
        self._line_sent: list | None = None  # the frames last sent on it

    call = _blocking(Plans.call)
    submit = _blocking(Plans.submit)
    submit_many = _blocking(Plans.submit_many)
    submit_and_wait = _blocking(Plans.submit_and_wait)
    status = _blocking(Plans.status)
    wait = _blocking(Plans.wait)
    cancel = _blocking(Plans.cancel)
    list_tasks = _blocking(Plans.list_tasks)
    workers = _blocking(Plans.workers)
    progress = _blocking(Plans.progress)
    reserve = _blocking(Plans.reserve)
    commit = _blocking(Plans.commit)
    release = _blocking(Plans.release)
    budget = _blocking(Plans.budget)
    query_events = _blocking(Plans.query_events)

    def subscribe(self, pattern: str = "", timeout: float | None = None) -> Subscription:
        """Live events whose type starts with `pattern` (e.g. "task."): iterate it, and
        close it (or use it in a `with`). It connects now, not when first read, and ends
        after `timeout` seconds without an event when given. What the router published
        before is in `events.recent` (see `live.py`)."""
        return Subscription(self._ctx, self._live_endpoint(pattern), pattern, within(timeout),
                            keys=self._live_keys())

    def close(self) -> None:
        self._drop_line(bye=True)
        self._link.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the scheduler's direct line ------------------------------------------------------
    def _maybe_open_line(self, request) -> None:
        if self._line is not None or self._line_endpoint is None \
                or request.service != "scheduler":
            return
        self._line_calls += 1
        if self._line_calls < LINE_AFTER_CALLS:
            return
        self._line_calls = -LINE_RETRY_CALLS  # whatever happens, not again for a while
        try:
            token = exchange(self._session, Request("scheduler", "line.open", {},
                                                    timeout=LINE_OPEN_TIMEOUT),
                             self._send, self._receive)["token"]
        except errors.CortexError as e:
            if e.code == "no_line":  # none here (portable mode): never ask again
                self._line_endpoint = None
            return  # stay on the bus
        except (KeyError, TypeError):
            return
        link = DirectLink(self._line_endpoint, self.name, str(token)[:64], role="client")
        deadline = self._session.clock() + LINE_OPEN_TIMEOUT
        while not (link.welcomed or link.closed):
            left = deadline - self._session.clock()
            if left <= 0:
                break
            parts = link.within(left)
            if parts is not None:
                link.accept(parts)
        if link.welcomed:
            self._line, self._line_calls = link, 0
        else:
            link.close()

    def _drop_line(self, bye: bool = False) -> None:
        if self._line is not None:
            self._line.close(bye=bye)
            self._line = None

    # -- moving bytes and time -----------------------------------------------------------
    def _perform(self, request):
        self._check_running(self.endpoint)
        self._on_line = self._line is not None and request.service == "scheduler"
        try:
            answer = exchange(self._session, request, self._send, self._receive)
        except (errors.Unavailable, errors.Timeout) as e:
            raise self._link.explain(e) from None
        finally:
            self._on_line = False
        # After the call that earns it, not before: opening the line is a round trip
        # through the broker and a handshake (tens of ms on a busy machine), which the
        # call's own answer, and the task it submitted, never wait for.
        self._maybe_open_line(request)
        return answer

    def _send(self, frames: list) -> None:
        line = self._line
        if line is not None and frames[2] == SCHEDULER:
            if frames is self._line_sent:
                # A re-send: the line gave no answer in time (the scheduler is down or
                # restarting). The bus says why (`unavailable`) and carries it meanwhile.
                self._drop_line()
                self._on_line = False
            elif line.send_frames(frames):
                self._line_sent = frames
                return
            elif line.closed:  # the scheduler is gone or forgot us: the bus, from now
                self._drop_line()
                self._on_line = False
        try:
            send_frames(self._link.socket, frames, block=True)
        except zmq.Again:
            pass  # nothing takes messages now: re-sent until the call's deadline

    def _receive(self, seconds: float):
        if not self._on_line:
            parts = self._inbox.within(seconds)
            if parts is None:
                return None
            self._session.heard()
            return self._link.accept(parts)
        # On the line; what the bus holds (a reply that fell back to it) is looked at too.
        # Asked, not received: the bus is nearly always empty here, and a receive that
        # finds nothing costs pyzmq an exception (~5 us against ~2 for asking).
        if has_message(self._link.socket):
            parts = recv_frames(self._link.socket)
            if parts is not None:
                return self._link.accept(parts)
        line = self._line
        parts = line.within(min(seconds, LINE_LOOK_AT_BUS))
        msg = None
        if parts is not None:
            self._session.heard()
            msg = line.accept(parts)
        if line.closed:  # WHO or its end: the scheduler restarted or forgot us; re-sent
            self._drop_line()  # on the bus
            self._on_line = False
        return msg


class AsyncClient(_Face):
    """asyncio client: the same operations and parameters as `Client`, each a coroutine;
    calls may run concurrently. It belongs to the event loop that first uses it; close it
    (`async with`, or `await close()`) to take it off that loop."""

    def __init__(self, home=None, *, name: str | None = None, agent: str | None = None,
                 timeout: float = 30.0, endpoint: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, key_file=None):
        super().__init__(home, name, agent, timeout, endpoint, connect_timeout, key_file)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakers: dict[bytes, asyncio.Future] = {}  # corr -> the coroutine waiting on it

    call = _awaitable(Plans.call)
    submit = _awaitable(Plans.submit)
    submit_many = _awaitable(Plans.submit_many)
    submit_and_wait = _awaitable(Plans.submit_and_wait)
    status = _awaitable(Plans.status)
    wait = _awaitable(Plans.wait)
    cancel = _awaitable(Plans.cancel)
    list_tasks = _awaitable(Plans.list_tasks)
    workers = _awaitable(Plans.workers)
    progress = _awaitable(Plans.progress)
    reserve = _awaitable(Plans.reserve)
    commit = _awaitable(Plans.commit)
    release = _awaitable(Plans.release)
    budget = _awaitable(Plans.budget)
    query_events = _awaitable(Plans.query_events)

    def subscribe(self, pattern: str = "", timeout: float | None = None
                  ) -> AsyncSubscription:
        """As `Client.subscribe`, an async iterator (`async for`, `async with`); made
        inside the event loop that reads it."""
        return AsyncSubscription(self._ctx, self._live_endpoint(pattern), pattern,
                                 within(timeout), keys=self._live_keys())

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._link.socket.getsockopt(zmq.FD))
            self._loop = None
        for waker in self._wakers.values():
            if not waker.done():
                waker.cancel()
        self._link.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # -- moving bytes and time -----------------------------------------------------------
    async def _perform(self, request):
        loop = self._attach()
        session = self._session
        self._check_running(self.endpoint)
        call = session.start(request)
        try:
            now = session.clock()
            while True:
                frames = call.frames_due(now)
                if frames is not None:
                    self._send(frames)
                if not call.done:
                    waker = self._wakers[call.corr] = loop.create_future()
                    timer = loop.call_later(call.wakeup(now), _wake, waker)
                    try:
                        await waker
                    finally:
                        timer.cancel()
                        self._wakers.pop(call.corr, None)
                session.on_clock(call)
                if call.done:
                    try:
                        return call.outcome()
                    except (errors.Unavailable, errors.Timeout) as e:
                        raise self._link.explain(e) from None
                now = session.clock()
        finally:
            session.forget(call)

    def _attach(self) -> asyncio.AbstractEventLoop:
        import asyncio

        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._link.socket.getsockopt(zmq.FD), self._drain)
            self._drain()
        elif loop is not self._loop:
            raise RuntimeError("an AsyncClient belongs to the event loop that first used it")
        return loop

    def _drain(self) -> None:
        """Read everything waiting (the socket's fd only says "look again") and wake the
        calls it answers."""
        session = self._session
        while (parts := recv_frames(self._link.socket)) is not None:
            session.heard()
            msg = self._link.accept(parts)
            if msg is not None and (call := session.on_message(msg)) is not None:
                _wake(self._wakers.get(call.corr))

    def _send(self, frames: list) -> None:
        try:
            send_frames(self._link.socket, frames)
        except zmq.Again:
            pass  # the outgoing queue is full: the call's re-send timer tries again
        self._drain()  # a send may have taken the wake-up meant for waiting replies


def _wake(waker: asyncio.Future | None) -> None:
    if waker is not None and not waker.done():
        waker.set_result(None)
