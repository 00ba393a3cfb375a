"""The scheduler's requests to the ledger: reservations before dispatch, and the orders
that settle an attempt's tokens when it ends, re-sent until answered.

A settle order (commit what the attempt used and release the rest, or release the
reservation) is journaled with its task (`task.settle`) until the ledger confirms it, so
a scheduler restart sends it again; the ledger is idempotent by (task, attempt). With
leases (leases.py) the orders of a turn go in one `ledger.settle`. A task
with a token budget is released even when no grant was seen: the grant may have been
made just before a crash.
"""

from __future__ import annotations

from cortex.protocol import wire
from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.tasks import Task

LEDGER_RESEND = 1.0  # seconds before an unanswered ledger request is sent again


def settle_order(task: Task) -> dict | None:
    """The ledger order that settles the task's current attempt, or None (no tokens)."""
    if task.tokens_used > 0:
        order = {"op": "ledger.commit", "task": task.id, "attempt": task.attempt,
                 "used": task.tokens_used, "type": task.type, "agent": task.agent}
    elif task.reserved > 0 or task.tokens > 0:
        order = {"op": "ledger.release", "task": task.id, "attempt": task.attempt}
    else:
        return None
    if task.lease and task.reserved > 0:
        # Carved from a lease: the ledger assigns it first if the assign is still behind.
        order.update(lease=task.lease, amount=task.reserved)
    return order


def refusal_detail(reply: dict, now_wall: float) -> dict:
    """A refused reservation, as the task's waiting detail: which limit blocked, how much
    was left, how much was asked (and when the window resets, if the ledger says)."""
    detail = {"message": str(reply.get("reason") or reply.get("message")
                             or "token budget")[:300]}
    if isinstance(reply.get("scope"), str):
        detail["scope"] = reply["scope"]
    for key in ("limit", "available", "requested"):
        value = reply.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            detail[key] = value
    reset = reply.get("next_reset")
    if isinstance(reset, int | float) and not isinstance(reset, bool):
        detail["resets_at"] = float(reset)
        detail["resets_in_s"] = max(0.0, float(reset) - now_wall)
    return detail


class LedgerOrders:
    """Ledger requests in flight, by correlation id (b"L" + a sequence number)."""

    def __init__(self):
        self.pending: dict[bytes, tuple[float, dict]] = {}  # corr -> (re-send at, body)
        self._seq = 0

    def send(self, fx: Effects, body: dict, now: float) -> bytes:
        corr = self._new(body, now)
        fx.sends.append((b"ledger", wire.REQUEST, corr, body))
        return corr

    def resend_soon(self, body: dict, now: float) -> None:
        """Send `body` at the next re-send scan (an order recovered after a restart)."""
        self._new(body, now - LEDGER_RESEND)

    def answered(self, corr: bytes) -> dict | None:
        """The request this reply answers (None: unknown or answered already)."""
        pending = self.pending.pop(corr, None)
        return None if pending is None else pending[1]

    def again_later(self, corr: bytes, body: dict, now: float) -> None:
        """The ledger is restarting: keep the request and send it again later."""
        self.pending[corr] = (now + LEDGER_RESEND, body)

    def resend_due(self, fx: Effects, now: float) -> None:
        for corr, (due, body) in list(self.pending.items()):
            if now >= due:
                self.pending[corr] = (now + LEDGER_RESEND, body)
                fx.sends.append((b"ledger", wire.REQUEST, corr, body))

    def _new(self, body: dict, now: float) -> bytes:
        self._seq += 1
        corr = b"L" + self._seq.to_bytes(8, "big")
        self.pending[corr] = (now + LEDGER_RESEND, body)
        return corr
