"""Publishing events to the event router without losing them.

Each service keeps every event it emitted until the router acknowledges it (the router
acknowledges after its JSONL write), and re-sends unacknowledged events when the router
was silent or restarted. The router de-duplicates by (source, epoch, seq), so a re-send
never doubles an event. PUB/SUB would drop them silently (see docs/pitfalls.md).

A service that journals its events (they survive its kill -9 there) lets them wait up to
`linger` seconds for company: at light load every turn emits a few, and one batch for
several turns is one turn of the router's instead of several (its CPU per task halves).

The router takes events only from the suite's own processes: every batch carries the
suite's secret (a file under the home's run/, readable by its owner alone).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque

import zmq

from cortex.protocol import wire
from cortex.protocol.peer import CurveKeys, make_socket, recv_frames, send_frames, use_keys

log = logging.getLogger(__name__)

BATCH_MAX = 500  # events per EVENTS message
BATCH_BYTES = wire.MAX_MESSAGE_BYTES - 64 * 1024  # and bytes, under the message size limit
RESEND_AFTER = 1.0  # seconds without an acknowledgement before re-sending
RESEND_MAX = 20_000  # events re-sent per silence, oldest first
IDLE_WAKE = 3600.0  # seconds tick() asks to sleep with nothing unacknowledged
MAX_UNACKED = 1_000_000  # past this the oldest are dropped and counted (a visible gap)


class EventPublisher:
    def __init__(self, ctx: zmq.Context, endpoint: str, source: str, epoch: int,
                 secret: str | None = None, keys: CurveKeys | None = None):
        self.source = source
        # Seconds emitted events may wait to be sent with later ones: only for a publisher
        # whose events are journaled (an event held here is lost with the process).
        self.linger = 0.0
        self.secret = secret
        self.epoch = epoch
        self.seq = 0
        self.socket = make_socket(ctx, zmq.DEALER)  # libzmq picks the routing id
        use_keys(self.socket, keys)  # CurveZMQ on tcp
        self.socket.connect(endpoint)
        self._pending: list[dict] = []  # emitted, not yet sent
        self._pending_since: float | None = None  # when the oldest of them was held
        self._unacked: deque[dict] = deque()  # sent, not yet acknowledged
        # When the oldest unacknowledged event was last sent or the head last advanced: a
        # head stuck past RESEND_AFTER is re-sent even while newer events keep flowing
        # (they would otherwise hide a batch lost with a killed router).
        self._head_since = time.monotonic()
        self.dropped = 0

    def emit(self, type_: str, data: dict | None = None, *, task: str | None = None,
             trace: str | None = None, worker: str | None = None) -> dict:
        self.seq += 1
        event = {"id": f"{self.source}:{self.epoch}:{self.seq}", "source": self.source,
                 "epoch": self.epoch, "seq": self.seq, "ts": time.time(), "type": type_,
                 "trace": trace or task, "task": task, "worker": worker, "data": data or {}}
        self._pending.append(event)
        return event

    def _send(self, events: list[dict]) -> None:
        for i in range(0, len(events), BATCH_MAX):
            if not self._send_batch(events[i:i + BATCH_MAX]):
                return  # the router is away: the resend timer will deliver them later

    def _send_batch(self, chunk: list[dict]) -> bool:
        """Send `chunk` in messages under the size limit (halved until each fits: an
        event may carry a result of up to half a MiB); False if the router is away."""
        body = {"events": chunk}
        if self.secret is not None:
            body["secret"] = self.secret
        try:
            frames = wire.frames(wire.EVENTS, b"events", b"", body)
        except (TypeError, ValueError) as e:
            log.error("event batch not encodable, dropping %d events: %s", len(chunk), e)
            self.dropped += len(chunk)
            return True
        if len(frames[-1]) > BATCH_BYTES and len(chunk) > 1:
            half = len(chunk) // 2
            return self._send_batch(chunk[:half]) and self._send_batch(chunk[half:])
        try:
            send_frames(self.socket, frames)
        except zmq.Again:
            return False
        return True

    def flush(self, force: bool = False) -> None:
        """Send what was emitted since the last flush (call once per loop turn), or hold
        it while it is younger than `linger` (`tick` sends it then) unless `force`."""
        if not self._pending:
            return
        if self.linger and not force and len(self._pending) < BATCH_MAX:
            now = time.monotonic()
            if self._pending_since is None:
                self._pending_since = now
            if now - self._pending_since < self.linger:
                return
        self._pending_since = None
        batch, self._pending = self._pending, []
        if not self._unacked:
            self._head_since = time.monotonic()
        self._unacked.extend(batch)
        while len(self._unacked) > MAX_UNACKED:
            self._unacked.popleft()
            self.dropped += 1
        self._send(batch)

    def on_message(self) -> None:
        """Read acknowledgements waiting on the socket."""
        while True:
            parts = recv_frames(self.socket)
            if parts is None:
                return
            try:
                msg = wire.parse(parts)
                body = msg.decoded() if msg.type == wire.ACK else None
            except wire.ProtocolError:
                continue
            if not body:
                continue
            epoch, upto = body.get("epoch"), body.get("upto", 0)
            # Oldest first: events re-sent from a previous incarnation precede ours.
            advanced = False
            while self._unacked and self._unacked[0]["epoch"] == epoch \
                    and self._unacked[0]["seq"] <= upto:
                self._unacked.popleft()
                advanced = True
            if advanced:
                self._head_since = time.monotonic()

    def requeue(self, events: list[dict]) -> None:
        """Events of an earlier incarnation, recovered from the journal: send them first."""
        seen = set()
        for event in sorted(events, key=lambda e: (e.get("epoch", 0), e.get("seq", 0))):
            key = (event.get("epoch"), event.get("seq"))
            if key not in seen:
                seen.add(key)
                self._unacked.append(event)
        if self._unacked:
            self._send(list(itertools.islice(self._unacked, RESEND_MAX)))

    def unacked_events(self) -> list[dict]:
        return list(self._unacked) + self._pending

    @property
    def unacked(self) -> int:
        return len(self._unacked) + len(self._pending)

    def tick(self, now: float) -> float:
        """Send held events that have waited `linger`; re-send the unacknowledged backlog
        after a silence. Returns the time to the next check."""
        wait = IDLE_WAKE  # nothing held or unacknowledged: flush() starts the clocks
        if self._pending_since is not None:
            due = self._pending_since + self.linger
            if now < due:
                wait = due - now
            else:
                self.flush(force=True)
        if not self._unacked:
            return wait
        due = self._head_since + RESEND_AFTER
        if now >= due:
            # Oldest first and bounded: the router acknowledges contiguous sequences only.
            self._send(list(itertools.islice(self._unacked, RESEND_MAX)))
            self._head_since = now
            return min(wait, RESEND_AFTER)
        return min(wait, due - now)

    def close(self) -> None:
        self.socket.close(linger=200)
