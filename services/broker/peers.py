"""The broker's state: which connection holds which name and role, who is alive, and
what each peer is waiting for.

Pure logic with an injected clock; the broker process owns the socket. A connection is
known by its routing id (chosen by libzmq, never by the peer); its name and role are
bound at HELLO. A name held by a live peer is refused to anyone else, except that a
service proven by the suite's secret takes its name over (a restarted scheduler replaces
the one that died).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cortex.protocol import wire

IN_FLIGHT_TTL = 120.0  # seconds after which an unanswered request no longer counts


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


@dataclass
class PeerTable:
    interval: float = wire.HEARTBEAT_INTERVAL
    liveness: int = wire.HEARTBEAT_LIVENESS
    max_in_flight: int = wire.MAX_IN_FLIGHT
    by_rid: dict[bytes, Peer] = field(default_factory=dict)
    by_name: dict[str, Peer] = field(default_factory=dict)

    def silence_limit(self, peer: Peer) -> float:
        if peer.role == "client":
            return max(self.interval * self.liveness, wire.CLIENT_SILENCE)
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
            if not proven and now - holder.last_seen <= self.silence_limit(holder):
                return Hello(False, f"the name {name!r} is in use by a live peer")
            replaced = self.forget(holder.rid)
        peer = self.by_rid.get(rid)
        if peer is not None and (peer.name != name or peer.role != role):
            self.forget(rid)  # the same connection under a new name: start afresh
            peer = None
        if peer is None:
            peer = Peer(rid, name, role, now, now)
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

    # -- liveness -------------------------------------------------------------------------
    def heartbeat_targets(self) -> list[Peer]:
        # Clients send no heartbeats and get none; they are forgotten when silent.
        return [p for p in self.by_rid.values() if p.role in ("service", "worker")]

    def expire(self, now: float) -> list[Peer]:
        """Forget and return peers silent past their limit."""
        lost = [p for p in self.by_rid.values() if now - p.last_seen > self.silence_limit(p)]
        for peer in lost:
            self.forget(peer.rid)
        return lost

    def holding(self, keys: set[str]) -> list[Peer]:
        """Peers whose connection was admitted with one of these keys."""
        return [p for p in self.by_rid.values() if p.key and p.key in keys]

    def describe(self, now: float) -> list[dict]:
        return [{"name": p.name, "role": p.role, "uptime": round(now - p.joined, 3),
                 "silent_for": round(now - p.last_seen, 3), "in_flight": len(p.in_flight),
                 **({"key": p.key} if p.key else {})}
                for p in sorted(self.by_rid.values(), key=lambda p: (p.role, p.name))]
