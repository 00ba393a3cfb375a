"""The broker's state: which connection holds which name and role, who is alive, and
what each peer is waiting for.

Pure logic with an injected clock; the broker process owns the socket. A connection is
known by its routing id (chosen by libzmq, never by the peer); its name and role are
bound at HELLO. A name held by a live peer is refused to anyone else, except that a
service proven by the suite's secret takes its name over (a restarted scheduler replaces
the one that died).

What waits to be sent to a peer is bounded in bytes by proving reading, since libzmq
cannot tell how much waits in a pipe: the broker counts the bytes it hands libzmq for
each peer (`sent`) and now and then sends a probe, a HEARTBEAT whose correlation frame
is an unguessable token. The peer's link echoes it at once; a pipe is FIFO, so the echo
proves everything sent before the probe was read (`confirmed`). `sent - confirmed` past
`max_unread` makes a client or worker a slow reader, cut off by the broker.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass, field

from cortex.protocol import wire

IN_FLIGHT_TTL = 120.0  # seconds after which an unanswered request no longer counts
MIB = 1 << 20
MAX_UNREAD = 64 * MIB  # bytes sent to a peer and not yet proven read, at most
MIN_PROBE_STEP = MIB
# Probes waiting for their echo, per peer. With a probe every max_unread/32 bytes the
# newest ones span twice the bound, so a peer reading within it always echoes a kept one
# (an older, dropped token is ignored: its echo would only confirm less).
PROBES_KEPT = 64
ENVELOPE_BYTES = 64  # counted per message besides its body (names, role, corr, frames)


@dataclass
class Peer:
    rid: bytes  # routing id of its connection
    name: str
    role: str  # client | worker | service
    joined: float
    last_seen: float
    in_flight: dict[bytes, float] = field(default_factory=dict)  # corr -> when sent
    # Stamped on every message it sends: encoded once, not per message.
    name_bytes: bytes = b""
    role_bytes: bytes = b""
    label: str = ""  # in the broker's counters: a service by name, others by role
    key: str = ""  # on tcp: the name of the CurveZMQ key its connection was admitted with
    fd: int = -1  # on tcp: its connection's descriptor (to cut it off when the key goes)
    address: tuple | None = None  # that connection's remote address, when fd was noted
    connection: int = 0  # the inode of the socket on fd (a reused number has another)
    # Bytes handed to libzmq for it; the part its echoes proved read; the next probe.
    sent: int = 0
    confirmed: int = 0
    probe_due: int = 0
    probes: deque = field(default_factory=lambda: deque(maxlen=PROBES_KEPT))  # (token, sent)
    # When it last made or answered a call (a REQUEST, REPLY or ERROR to or from it:
    # reports and orders, NOTIFY, do not count, so an idle worker's repeated worker.ready
    # leaves it quiet); a quiet peer's next beat; when it was last promised a slow one.
    active: float = 0.0
    quiet_beat_due: float = 0.0
    quiet_beat_at: float = -math.inf

    def __post_init__(self):
        self.name_bytes = self.name.encode()
        self.role_bytes = self.role.encode()
        self.label = self.name if self.role == "service" else self.role


@dataclass
class Hello:
    """The outcome of a HELLO: accepted (with the peer it replaced, if any) or why not."""

    ok: bool
    reason: str = ""
    replaced: Peer | None = None


# What the broker's timed beat to a peer is this time (see `beat_kind`).
SKIP, BEAT, QUIET_BEAT = 0, 1, 2


@dataclass
class PeerTable:
    interval: float = wire.HEARTBEAT_INTERVAL
    liveness: int = wire.HEARTBEAT_LIVENESS
    max_in_flight: int = wire.MAX_IN_FLIGHT
    max_unread: int = MAX_UNREAD
    # A peer that has had no call for QUIET_AFTER_BEATS intervals is beaten
    # every `quiet_every` intervals (1: never slower): an idle fleet wakes that much less.
    quiet_every: int = wire.QUIET_HEARTBEAT_EVERY
    by_rid: dict[bytes, Peer] = field(default_factory=dict)
    by_name: dict[str, Peer] = field(default_factory=dict)

    @property
    def quiet_spacing(self) -> float:
        return self.interval * self.quiet_every

    def silence_limit(self, peer: Peer, now: float) -> float:
        if peer.role == "client":
            return max(self.interval * self.liveness, wire.CLIENT_SILENCE)
        if now - peer.quiet_beat_at < self.quiet_spacing * self.liveness:
            # Promised a slow beat lately: it may be as silent as that promise allows,
            # until it has had the time to hear that beats are fast again.
            return self.quiet_spacing * self.liveness
        return self.interval * self.liveness

    def hello(self, rid: bytes, name: str, role: str, proven: bool, now: float) -> Hello:
        """Bind `name` and `role` to the connection `rid`. `proven`: the HELLO carried
        the suite's secret. Refused: a service role or a service name without the proof,
        or a name a live peer holds (unless proven)."""
        if (role == "service" or name in wire.SERVICE_NAMES) and not proven:
            return Hello(False, f"the name {name!r} and the service role are kept for the "
                                "suite's own processes")
        holder = self.by_name.get(name)
        replaced = None
        if holder is not None and holder.rid != rid:
            if not proven and now - holder.last_seen <= self.silence_limit(holder, now):
                return Hello(False, f"the name {name!r} is in use by a live peer")
            replaced = self.forget(holder.rid)
        peer = self.by_rid.get(rid)
        if peer is not None and (peer.name != name or peer.role != role):
            self.forget(rid)  # the same connection under a new name: start afresh
            peer = None
        if peer is None:
            peer = Peer(rid, name, role, now, now, probe_due=self.probe_step, active=now)
            self.by_rid[rid] = peer
            self.by_name[name] = peer
        peer.last_seen = now
        return Hello(True, replaced=replaced)

    def heard(self, rid: bytes, now: float) -> Peer | None:
        """Note a sign of life; None when the connection has not said HELLO."""
        peer = self.by_rid.get(rid)
        if peer is not None:
            peer.last_seen = now
        return peer

    def route(self, name: bytes) -> Peer | None:
        try:
            return self.by_name.get(name.decode())
        except UnicodeDecodeError:
            return None

    def forget(self, rid: bytes) -> Peer | None:
        peer = self.by_rid.pop(rid, None)
        if peer is not None and self.by_name.get(peer.name) is peer:
            del self.by_name[peer.name]
        return peer

    # -- requests waiting for replies -------------------------------------------------------
    def request_sent(self, peer: Peer, corr: bytes, now: float) -> bool:
        """Count a request `peer` sends; False (do not forward) past `max_in_flight`.
        A re-sent request (same corr) counts once."""
        waiting = peer.in_flight
        if corr not in waiting and len(waiting) >= self.max_in_flight:
            for old in [c for c, t in waiting.items() if now - t > IN_FLIGHT_TTL]:
                del waiting[old]  # answers lost with a restarted service
            if len(waiting) >= self.max_in_flight:
                return False
        waiting[corr] = now
        return True

    @staticmethod
    def reply_delivered(peer: Peer, corr: bytes) -> None:
        peer.in_flight.pop(corr, None)

    # -- bytes waiting to be read ---------------------------------------------------------
    @property
    def probe_step(self) -> int:
        return max(MIN_PROBE_STEP, self.max_unread // 32)

    def probe(self, peer: Peer) -> bytes:
        """A new probe's token, noted with what was sent before it. The broker calls it
        when `peer.sent` reaches `peer.probe_due` (one compare per message sent)."""
        token = os.urandom(wire.PROBE_TOKEN_BYTES)
        peer.probes.append((token, peer.sent))
        peer.probe_due = peer.sent + self.probe_step
        return token

    @staticmethod
    def echoed(peer: Peer, token: bytes) -> bool:
        """The peer echoed `token`: what was sent before that probe is read, and so are
        the probes before it (FIFO). An unknown or replayed token confirms nothing."""
        probes = peer.probes
        for i, (known, sent) in enumerate(probes):
            if known == token:
                for _ in range(i + 1):
                    probes.popleft()
                peer.confirmed = max(peer.confirmed, sent)
                return True
        return False

    @staticmethod
    def unread(peer: Peer) -> int:
        return peer.sent - peer.confirmed

    def slow_reader(self, peer: Peer) -> bool:
        """Past the bound; the suite's own services are trusted and never are."""
        return peer.role != "service" and peer.sent - peer.confirmed > self.max_unread

    @staticmethod
    def probe_pending(peer: Peer) -> bool:
        """Sent anything since the last probe (a timed beat then carries a token)?"""
        return peer.sent > (peer.probes[-1][1] if peer.probes else peer.confirmed)

    # -- liveness -------------------------------------------------------------------------
    def heartbeat_targets(self) -> list[Peer]:
        # Clients send no heartbeats and get none; they are forgotten when silent.
        return [p for p in self.by_rid.values() if p.role in ("service", "worker")]

    def quiet(self, peer: Peer, now: float) -> bool:
        return self.quiet_every > 1 and peer.role != "client" \
            and now - peer.active >= self.interval * wire.QUIET_AFTER_BEATS

    def beat_kind(self, peer: Peer, now: float) -> int:
        """This timed beat for `peer`: BEAT; or, when it has been quiet (no call to or
        from it) for QUIET_AFTER_BEATS intervals, a QUIET_BEAT every `quiet_every` beats
        (it announces how long until the next) and SKIP in between."""
        if not self.quiet(peer, now):
            return BEAT
        if now < peer.quiet_beat_due:
            return SKIP
        # Beats come on a grid of intervals: half a step early is still this one's turn.
        peer.quiet_beat_due = now + self.quiet_spacing - self.interval / 2
        peer.quiet_beat_at = now
        return QUIET_BEAT

    def expire(self, now: float) -> list[Peer]:
        """Forget and return peers silent past their limit."""
        lost = [p for p in self.by_rid.values()
                if now - p.last_seen > self.silence_limit(p, now)]
        for peer in lost:
            self.forget(peer.rid)
        return lost

    def holding(self, keys: set[str]) -> list[Peer]:
        """Peers whose connection was admitted with one of these keys."""
        return [p for p in self.by_rid.values() if p.key and p.key in keys]

    def describe(self, now: float) -> list[dict]:
        return [{"name": p.name, "role": p.role, "uptime": round(now - p.joined, 3),
                 "silent_for": round(now - p.last_seen, 3), "in_flight": len(p.in_flight),
                 "sent": p.sent, "unread": p.sent - p.confirmed,
                 "beat_every": round(self.quiet_spacing if self.quiet(p, now)
                                     else self.interval, 3),
                 **({"key": p.key} if p.key else {})}
                for p in sorted(self.by_rid.values(), key=lambda p: (p.role, p.name))]
