"""What one turn of a service loop must do once its journal records are durable."""

from __future__ import annotations

from dataclasses import dataclass, field

from cortex.protocol import wire


@dataclass
class Effects:
    """What a turn of the loop must do after the journal commit."""

    sends: list = field(default_factory=list)  # (peer bytes, type bytes, corr bytes, body dict)
    events: list = field(default_factory=list)  # (type, data, task id, worker)
    records: list = field(default_factory=list)  # journal records

    def reply(self, peer: bytes, corr: bytes, body: dict) -> None:
        self.sends.append((peer, wire.REPLY, corr, body))

    def error(self, peer: bytes, corr: bytes, code: str, message: str) -> None:
        self.sends.append((peer, wire.ERROR, corr, wire.error_body(code, message)))

    def notify(self, peer: str, body: dict) -> None:
        self.sends.append((peer.encode(), wire.NOTIFY, b"", body))

    def emit(self, type_: str, data: dict, task: str | None = None,
             worker: str | None = None) -> None:
        self.events.append((type_, data, task, worker))
