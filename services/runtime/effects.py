"""What one turn of a service loop must do once its journal records are durable."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

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

    # -- one message's share of the turn -------------------------------------------------
    def mark(self) -> tuple[int, int, int]:
        return len(self.sends), len(self.events), len(self.records)

    def rollback(self, mark: tuple[int, int, int]) -> None:
        """Drop what was added since `mark` (a message whose handling failed)."""
        del self.sends[mark[0]:]
        del self.events[mark[1]:]
        del self.records[mark[2]:]

    def check_encodable(self, mark: tuple[int, int, int]) -> None:
        """What was added since `mark` must encode as JSON (the journal and the event log
        take nothing else): checked now, so a value that cannot be written never reaches
        a commit. Raises TypeError naming the record or event."""
        for record in self.records[mark[2]:]:
            _encodes(record, "journal record")
        for type_, data, _task, _worker in self.events[mark[1]:]:
            _encodes(data, f"event {type_}")


def _encodes(value, what: str) -> None:
    try:
        orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as e:
        raise TypeError(f"{what} cannot be encoded: {e}") from None
