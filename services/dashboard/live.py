"""The dashboard's live feed: the event router's live events, while someone watches.

A SUB socket on the router's live PUB. Subscribed, it receives every event (a subscriber
that may drop under load and catches up with the next poll, never a blocker); dormant,
it has unsubscribed, so the router's PUB filters the events out and sends it nothing:
a dashboard no one watches costs nothing per task. The socket stays connected either
way, and subscribing again takes effect at the router within a moment.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import zmq

from cortex.protocol import locate
from cortex.protocol.peer import keys_for, make_socket, recv_frames, use_keys
from cortex.services.runtime.settings import ConfigError

SUB_HWM = 20_000  # live events queued for us at most; past it the router drops ours
DRAIN_BATCH = 5000  # live events read per wake-up before others get a turn
EVERYTHING = b""  # the topic prefix every event matches
# Seconds with no page open and no request before the live feed is switched off; the
# environment variable sets it at start (tests use a second).
DORMANT_AFTER = 60.0
DORMANT_AFTER_ENV = "CORTEX_DASHBOARD_DORMANT_AFTER"


def dormant_after_from(environ) -> float:
    """`DORMANT_AFTER`, or the seconds the environment sets (a positive number)."""
    raw = environ.get(DORMANT_AFTER_ENV)
    if raw is None:
        return DORMANT_AFTER
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"{DORMANT_AFTER_ENV} must be a positive number of seconds, "
                          f"not {raw[:40]!r}")
    return seconds


class LiveFeed:
    """Decodes the live events and hands each to `deliver(event, monotonic now)`."""

    def __init__(self, home: Path, deliver: Callable[[dict, float], None]):
        self.home = home
        self.deliver = deliver
        self.sub: zmq.Socket | None = None
        self.subscribed = False
        self.dropped = 0  # live events that could not be decoded

    def open(self, ctx: zmq.Context) -> None:
        """Connect and subscribe; the socket's fd wakes the asyncio loop."""
        sub = self.sub = make_socket(ctx, zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, SUB_HWM)
        endpoint = locate.endpoints(self.home)["events_live"]
        use_keys(sub, keys_for(self.home, endpoint))  # CurveZMQ on tcp
        sub.connect(endpoint)
        self.subscribe()
        loop = asyncio.get_running_loop()
        loop.add_reader(sub.getsockopt(zmq.FD), self.drain)
        loop.call_soon(self.drain)

    def subscribe(self) -> None:
        if not self.subscribed:
            self.sub.setsockopt(zmq.SUBSCRIBE, EVERYTHING)
            self.subscribed = True

    def unsubscribe(self) -> None:
        """The router stops sending us events (what was already queued here still comes)."""
        if self.subscribed:
            self.sub.setsockopt(zmq.UNSUBSCRIBE, EVERYTHING)
            self.subscribed = False

    def close(self) -> None:
        if self.sub is None:
            return
        asyncio.get_running_loop().remove_reader(self.sub.getsockopt(zmq.FD))
        self.sub.close(linger=0)
        self.sub = None

    def drain(self) -> None:
        # The fd is edge-triggered: read everything there is, or come back for the rest.
        if self.sub is None:
            return
        mono = time.monotonic()
        for _ in range(DRAIN_BATCH):
            parts = recv_frames(self.sub)
            if parts is None:
                return
            try:
                event = msgpack.unpackb(parts[-1], raw=False, strict_map_key=False)
            except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                    msgpack.StackError):
                self.dropped += 1
                continue
            if not isinstance(event, dict):
                self.dropped += 1
                continue
            self.deliver(event, mono)
        asyncio.get_running_loop().call_soon(self.drain)
