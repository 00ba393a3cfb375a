"""Live events from the event router's XPUB socket, for `Client.subscribe` and
`AsyncClient.subscribe`.

A subscription connects when it is made, not when first read, so a reader can
subscribe first, then fetch what the router already holds (`events.recent`), then
iterate, dropping the repeats by event id. (The subscription reaches the router a moment
after it is made: an event published in that moment is in `events.recent` when that is
asked after it.) It ends after `timeout` seconds without an event (None: never) or
when closed.
"""

from __future__ import annotations

import zmq

from .calls import decode_event
from .peer import CurveKeys, TimedReceiver, has_message, make_socket, recv_frames, use_keys


def _connect(ctx: zmq.Context, endpoint: str, pattern: str,
             keys: CurveKeys | None = None) -> zmq.Socket:
    sock = make_socket(ctx, zmq.SUB)
    use_keys(sock, keys)
    sock.setsockopt(zmq.SUBSCRIBE, pattern.encode())
    sock.connect(endpoint)
    return sock


class Subscription:
    """An iterator of live events (dicts) whose type starts with the pattern."""

    def __init__(self, ctx: zmq.Context, endpoint: str, pattern: str, timeout: float | None,
                 keys: CurveKeys | None = None):
        self._socket = _connect(ctx, endpoint, pattern, keys)
        self._receiver = TimedReceiver(self._socket)
        self.timeout = timeout

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while not self._socket.closed:
            parts = self._receiver.within(self.timeout)
            if parts is None:
                break
            event = decode_event(parts)
            if event is not None:
                return event
        self.close()
        raise StopIteration

    def close(self) -> None:
        self._socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncSubscription:
    """An async iterator of live events; made inside the event loop that reads it."""

    def __init__(self, ctx: zmq.Context, endpoint: str, pattern: str, timeout: float | None,
                 keys: CurveKeys | None = None):
        import asyncio  # here, not at the top: the sync faces (the CLI) never load it

        self._loop = asyncio.get_running_loop()
        self._socket = _connect(ctx, endpoint, pattern, keys)
        self.timeout = timeout
        self._readable = asyncio.Event()
        self._fd = self._socket.getsockopt(zmq.FD)
        # The fd only says "look again"; asking whether a message waits re-arms it, so a
        # slow reader cannot make the loop spin.
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        if has_message(self._socket):
            self._readable.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        import asyncio

        while not self._socket.closed:
            parts = recv_frames(self._socket)
            if parts is None:
                self._readable.clear()
                try:
                    await asyncio.wait_for(self._readable.wait(), self.timeout)
                except TimeoutError:
                    break
                continue
            event = decode_event(parts)
            if event is not None:
                return event
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self._socket.closed:
            self._loop.remove_reader(self._fd)
            self._socket.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
