"""The ledger process: the only authority on tokens.

    python -m cortex.services.ledger [--home DIR]

Requests (REQUEST ops): ledger.reserve {task, attempt, amount, type?, agent?},
ledger.extend {task, attempt, amount}, ledger.commit {task, attempt, used},
ledger.release {task, attempt}, ledger.set {scope, limit, window?}, ledger.status,
ledger.task {task}; from the scheduler only: ledger.lease {lease, amount, type?, agent?},
ledger.assign {items}, ledger.settle {orders}, ledger.return {lease} (leases.py; the
replies to assign and settle list the named leases found `closed`). The logic is
leases.LeaseLedger (budgets.LedgerState with leases); every change is journaled before
the reply leaves.
"""

from __future__ import annotations

import os
import time

from cortex.protocol import wire
from cortex.protocol.catalogue import ASSIGN_BATCH, SETTLE_BATCH
from cortex.services.ledger.leases import LeaseLedger as LedgerState
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.entry import serve
from cortex.services.runtime.loop import BusService, serves
from cortex.services.runtime.settings import ConfigError


class Ledger(BusService):
    name = "ledger"
    snapshot_name = "token-budget.json"

    def __init__(self, home=None):
        super().__init__(home)
        try:
            self.state = LedgerState(self.settings.ledger.budgets, now=time.time())
        except ValueError as e:  # the operator's to fix: exit as a bad configuration
            raise ConfigError(f"[ledger] {e}") from None
        self.open_journal()

    def snapshot(self) -> dict:
        return self.state.snapshot() | {"configured": self.settings.ledger.budgets}

    def restore(self, snapshot, records) -> None:
        if snapshot:
            self.state = LedgerState.from_snapshot(snapshot)
        for record in records:
            try:
                self.state.apply_journal(record["rec"])
            except Exception as e:  # never crash-loop on a bad record: report and skip
                self.log.error("skipping journal record %s: %r", record.get("lsn"), e)
        # A budget edited in cortex.toml since the last start wins; one changed at run time
        # (`cortex budget set`) and untouched in the file keeps its run-time value.
        before = (snapshot or {}).get("configured", {})
        fx = Effects()
        for scope, spec in self.settings.ledger.budgets.items():
            if snapshot and before.get(scope) == spec:
                continue
            outcome = self.state.set_budget(scope, spec["limit"], spec["window"], now=time.time())
            if outcome.journal is not None:
                fx.records.append({"k": "ledger", "rec": outcome.journal})
        for record in fx.records:
            self.journal.append(record)

    # -- operations (bodies already checked against the catalogue) ------------------------
    @serves("ledger.reserve")
    def reserve(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        # Leases standing in its way are taken back first (leases.py: reclaim).
        *reclaimed, outcome = self.state.reserve_reclaiming(
            body["task"], body["attempt"], body["amount"], task_type=body["type"],
            agent=body["agent"], now=now)
        for first in reclaimed:
            self.record(fx, body, first)
        self.answer(fx, msg, body, outcome)

    @serves("ledger.extend")
    def extend(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        *assigned, outcome = self.state.extend_carved(
            body["task"], body["attempt"], body["amount"], now, body["seq"], body["lease"],
            body["carved"])
        for first in assigned:
            self.record(fx, body, first)
        self.answer(fx, msg, body, outcome)

    @serves("ledger.commit")
    def commit(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        self.answer(fx, msg, body, self.state.commit(
            body["task"], body["attempt"], body["used"], now=now, task_type=body["type"],
            agent=body["agent"]))

    @serves("ledger.release")
    def release(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        self.answer(fx, msg, body, self.state.release(body["task"], body["attempt"], now=now))

    @serves("ledger.lease")
    def lease(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        self.answer(fx, msg, body, self.state.lease(
            body["lease"], body["amount"], task_type=body["type"], agent=body["agent"],
            now=now))

    @serves("ledger.return")
    def return_lease(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        self.answer(fx, msg, body, self.state.return_lease(body["lease"], now=now))

    @serves("ledger.assign")
    def assign(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        fx.reply(msg.peer, msg.corr, {"ok": True,
                                      "results": self.assigned(fx, body["items"], now),
                                      **self.closed(body["items"])})

    def closed(self, *batches) -> dict:
        """The leases a batch names that are closed (returned, or reclaimed for a direct
        reservation): the scheduler carves no more from them."""
        named = [x.get("lease") for batch in batches for x in batch or ()
                 if isinstance(x, dict)]
        closed = self.state.closed(x for x in named if isinstance(x, str))
        return {"closed": closed} if closed else {}

    def assigned(self, fx: Effects, items: list, now: float) -> list[dict]:
        results = []
        for index, raw in enumerate(items):
            try:
                item = ASSIGN_BATCH.item("items", index, raw)
            except wire.ProtocolError as e:
                results.append({"ok": False, "code": e.code, "message": e.message})
                continue
            outcome = self.state.assign(item["task"], item["attempt"], item["amount"],
                                        item["lease"], now=now, task_type=item["type"],
                                        agent=item["agent"])
            results.append(self.record(fx, item, outcome))
        return results

    @serves("ledger.settle")
    def settle(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        assigned = self.assigned(fx, body["items"] or [], now)
        results = []
        for index, raw in enumerate(body["orders"]):
            try:
                order = SETTLE_BATCH.item("orders", index, raw)
            except wire.ProtocolError as e:
                results.append({"ok": False, "code": e.code, "message": e.message})
                continue
            order["op"] = order["op"].removeprefix("ledger.")
            # The last outcome settles; an assign before it is its first step.
            results.append([self.record(fx, order, o)
                            for o in self.state.settle(order, now=now)][-1])
        fx.reply(msg.peer, msg.corr, {"ok": True, "results": results, "assigned": assigned,
                                      **self.closed(body["items"], body["orders"])})

    @serves("ledger.set")
    def set_budget(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        outcome = self.state.set_budget(body["scope"], body["limit"], body["window"], now=now)
        if outcome.ok:  # sent before the reply, so no submit that follows it comes first
            fx.notify("scheduler", {"op": "ledger.budgets", "budgets": self.state.status(now)})
        self.answer(fx, msg, body, outcome)

    @serves("ledger.status")
    def status(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        fx.reply(msg.peer, msg.corr, {"budgets": self.state.status(now),
                                      "leases": self.state.leases(), "pid": os.getpid(),
                                      "started": self.rt.started,
                                      "bad_messages": self.bad_messages,
                                      "internal_errors": self.internal_errors})

    @serves("ledger.task")
    def task(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        fx.reply(msg.peer, msg.corr, {"reservation": self.state.reservation(body["task"])})

    def record(self, fx: Effects, item: dict, outcome) -> dict:
        """Journal and publish one outcome of a batch; returns its result."""
        if outcome.journal is not None:
            fx.records.append({"k": "ledger", "rec": outcome.journal})
        for type_, data in outcome.events:
            fx.emit(type_, data, data.get("task_id") or item.get("task"))
        return {"ok": outcome.ok, "code": outcome.code, **outcome.reply}

    def answer(self, fx: Effects, msg: wire.Message, body: dict, outcome) -> None:
        """Journal the change, emit its events, then reply: a refusal is an answer, not an
        error (the scheduler keeps the task waiting)."""
        if outcome.journal is not None:
            # Wrapped: the journal stamps its own lsn; LedgerState keeps its own sequence.
            fx.records.append({"k": "ledger", "rec": outcome.journal})
        for type_, data in outcome.events:
            fx.emit(type_, data, data.get("task_id") or body.get("task"))
        if outcome.code in ("bad_request", "not_found"):
            fx.error(msg.peer, msg.corr, outcome.code, outcome.reply.get("reason")
                     or outcome.reply.get("message") or outcome.code)
        else:
            fx.reply(msg.peer, msg.corr, {"ok": outcome.ok, **outcome.reply})

    def on_tick(self, fx: Effects, now: float) -> float:
        for type_, data in self.state.tick(now):
            fx.emit(type_, data)
        return 1.0


def main(argv=None) -> None:
    serve("cortex-ledger", __doc__, Ledger, argv)
