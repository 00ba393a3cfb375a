"""The broker's state: who is connected, under which name and role, and who is alive.

Pure logic with an injected clock; the broker process owns the socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cortex.protocol import wire


@dataclass
class Peer:
    name: str
    role: str  # client | service | worker | unknown (heard from but no HELLO yet)
    joined: float
    last_seen: float


@dataclass
class PeerTable:
    interval: float = wire.HEARTBEAT_INTERVAL
    liveness: int = wire.HEARTBEAT_LIVENESS
    peers: dict[str, Peer] = field(default_factory=dict)

    def hello(self, name: str, role: str, now: float) -> bool:
        """Register or refresh a peer; True when it is new (or came back)."""
        peer = self.peers.get(name)
        if peer is None or peer.role != role:
            self.peers[name] = Peer(name, role, now, now)
            return True
        peer.last_seen = now
        return False

    def heard(self, name: str, now: float) -> bool:
        """Note a sign of life; False when the sender is unknown (it must say HELLO)."""
        peer = self.peers.get(name)
        if peer is None:
            self.peers[name] = Peer(name, "unknown", now, now)
            return False
        peer.last_seen = now
        return peer.role != "unknown"

    def forget(self, name: str) -> Peer | None:
        return self.peers.pop(name, None)

    def heartbeat_targets(self) -> list[str]:
        # Clients heartbeat only while they wait, so the broker does not beat them.
        return [p.name for p in self.peers.values() if p.role in ("service", "worker")]

    def expire(self, now: float) -> list[Peer]:
        """Forget and return peers silent for `liveness` intervals (clients: a minute)."""
        lost = []
        for peer in list(self.peers.values()):
            limit = self.interval * self.liveness
            if peer.role in ("client", "unknown"):
                limit = max(limit, 60.0)
            if now - peer.last_seen > limit:
                lost.append(self.peers.pop(peer.name))
        return lost

    def describe(self, now: float) -> list[dict]:
        return [{"name": p.name, "role": p.role, "uptime": round(now - p.joined, 3),
                 "silent_for": round(now - p.last_seen, 3)}
                for p in sorted(self.peers.values(), key=lambda p: (p.role, p.name))]
