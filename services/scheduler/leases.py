"""The scheduler's leases of tokens from the ledger (`[scheduler] lease = true`).

A lease is a block of tokens the ledger holds for us under one scope key (task type,
agent), counted as reserved in every budget it touches (services/ledger/leases.py). A
task with tokens is *carved* from a lease of its key with enough left and dispatched at
once; the carve is journaled with the task (`reserved`, `lease`). Carves and settle
orders (journaled with their task until confirmed, as without leases) are gathered for
at most GATHER seconds and sent together in one `ledger.settle`. A settle order and a
worker's `ledger.extend` name the lease and the carved amount, so the ledger assigns
first when they overtake the batch.

    asked    its id is journaled ({"k": "lease"}) before `ledger.lease` goes out, so a
             restarted scheduler knows every lease that may have been granted
    granted  carved from until it is spent; a spent one is replaced by a new one
    returned when unused for LEASE_IDLE seconds (at once when replaced), and only once
             no assign or settle order naming it is unconfirmed: a carve the ledger has
             not seen must still find its tokens there. Journaled ({"k": "lease",
             "gone": true}) once the ledger confirms.
    closed   by the ledger, for a direct reservation that only its rest stood in the way
             of (a reply's `closed`): no more carves from it, it is returned as a
             replaced one (the ledger answers 0), and its key takes the per-task path
             for LEASE_RETRY seconds, since its budget is contested.

When no lease fits (none yet, being asked, refused near a limit), the task takes the
per-task reservation path, so refusals, waiting reasons and ETAs near a limit are as
without leases. After a restart the leases found in the journal are only returned (once
the assigns and settles re-sent for their tasks are confirmed); new ones are asked anew.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from cortex.protocol.catalogue import MAX_LEDGER_BATCH
from cortex.services.runtime.effects import Effects

LEASE_TASKS = 16  # a first lease covers this many tasks the size of the one that asked
MAX_LEASE_TASKS = 512  # a key whose leases are spent fast gets bigger ones, up to this
LEASE_IDLE = 2.0  # seconds unused before a lease goes back
LEASE_RETRY = 5.0  # seconds a key waits after a refused lease before asking again
GATHER = 0.05  # seconds carves and settle orders are gathered before they go out


@dataclass
class HeldLease:
    lease_id: str
    key: tuple  # (task type, agent)
    last_used: float
    granted: bool = False
    granted_at: float = 0.0
    left: int = 0
    orders: int = 0  # assigns and settle orders naming it, not yet confirmed
    retiring: bool = False  # found in the journal after a restart: only given back
    returning: bool = False


class Leases:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.held: dict[str, HeldLease] = {}
        self.in_use: dict[tuple, list[str]] = {}  # key -> granted leases carved from
        self.asking: dict[tuple, str] = {}  # key -> the lease asked, not yet answered
        self.size: dict[tuple, int] = {}  # key -> tasks its next lease covers
        self.refused_until: dict[tuple, float] = {}
        self.assigns: list[dict] = []  # this turn's carves, for one ledger.assign
        self.settles: list[dict] = []  # this turn's settle orders, for one ledger.settle
        self.unassigned = 0  # carves the ledger could not cover from their lease
        self.reclaimed = 0  # leases the ledger took back for a direct reservation
        self.gathering_since: float | None = None

    # -- carving ---------------------------------------------------------------------------
    def carve(self, fx: Effects, ledger, task, now: float) -> str | None:
        """The lease `task`'s tokens were carved from, or None (none fits: a lease of its
        key is asked for, and the task takes the per-task path meanwhile)."""
        key = (task.type, task.agent)
        in_use = self.in_use.setdefault(key, [])
        carved = None
        for lease_id in list(in_use):
            lease = self.held[lease_id]
            if lease.left >= task.tokens:
                lease.left -= task.tokens
                lease.last_used = now
                lease.orders += 1
                self._gather(now)
                self.assigns.append({"task": task.id, "attempt": task.attempt,
                                     "amount": task.tokens, "lease": lease_id,
                                     "type": task.type, "agent": task.agent})
                carved = lease_id
                break
            in_use.remove(lease_id)  # spent for tasks this size: it goes back (give_back)
            if now - lease.granted_at < LEASE_IDLE:  # spent fast: the next is bigger
                self.size[key] = min(2 * self.size.get(key, LEASE_TASKS), MAX_LEASE_TASKS)
        # The next lease is asked while this one still covers half a lease of tasks, so
        # a steady stream of tasks never waits for one.
        size = self.size.get(key, LEASE_TASKS)
        left = sum(self.held[x].left for x in in_use)
        if left < task.tokens * size // 2 and key not in self.asking and \
                now >= self.refused_until.get(key, 0.0):
            self._ask(fx, ledger, key, task.tokens * size, now)
        return carved

    def settle(self, body: dict, now: float) -> None:
        """A settle order for the next batch."""
        lease = self.held.get(body.get("lease") or "")
        if lease is not None:
            lease.orders += 1
        self._gather(now)
        self.settles.append(body)

    def due(self, now: float) -> bool:
        """Time to send what was gathered (or it fills a message)."""
        if self.gathering_since is None:
            return False
        return now - self.gathering_since >= GATHER or \
            len(self.assigns) + len(self.settles) >= MAX_LEDGER_BATCH

    def _gather(self, now: float) -> None:
        if self.gathering_since is None:
            self.gathering_since = now

    def flush(self, fx: Effects, ledger, now: float) -> None:
        """The turn's carves and settle orders in as few messages as fit: one
        `ledger.settle` carrying both when there are both (a worker's finish and its next
        task usually share a turn)."""
        n = MAX_LEDGER_BATCH
        assigns = [self.assigns[i:i + n] for i in range(0, len(self.assigns), n)]
        for i in range(0, len(self.settles), n):
            body = {"op": "ledger.settle", "orders": self.settles[i:i + n]}
            if assigns:
                body["items"] = assigns.pop(0)
            ledger.send(fx, body, now)
        for items in assigns:
            ledger.send(fx, {"op": "ledger.assign", "items": items}, now)
        self.assigns, self.settles = [], []
        self.gathering_since = None

    # -- the ledger's answers --------------------------------------------------------------
    def answered(self, fx: Effects, request: dict, ok: bool, body: dict,
                 now: float) -> None:
        """A lease, assign or return request answered (settles: `confirmed`)."""
        op = request["op"]
        if op == "ledger.lease":
            lease = self.held.get(request["lease"])
            if lease is None:
                return
            if self.asking.get(lease.key) == lease.lease_id:
                del self.asking[lease.key]
            if ok and body.get("granted") is True and not lease.retiring:
                lease.granted, lease.left = True, int(body.get("amount", 0))
                lease.last_used = lease.granted_at = now
                self.in_use.setdefault(lease.key, []).append(lease.lease_id)
                return
            # Refused: nothing is held under it; the key takes the per-task path a while.
            self.refused_until[lease.key] = now + LEASE_RETRY
            self._forget(fx, lease.lease_id)
        elif op == "ledger.assign":
            results = body.get("results") if ok else None
            for index, item in enumerate(request["items"]):
                self._confirmed(item.get("lease"))
                result = results[index] if isinstance(results, list) and \
                    index < len(results) else None
                if not (isinstance(result, dict) and result.get("ok")):
                    self.unassigned += 1  # its commit is charged as an overrun
        elif op == "ledger.return":
            self._forget(fx, request["lease"])

    def closed(self, lease_ids, now: float) -> None:
        """Leases the ledger says are closed (reclaimed): carve no more from them."""
        for lease_id in lease_ids if isinstance(lease_ids, list) else ():
            lease = self.held.get(lease_id) if isinstance(lease_id, str) else None
            if lease is None or lease.returning or not lease.granted:
                continue
            lease.left = 0
            in_use = self.in_use.get(lease.key, [])
            if lease_id in in_use:
                in_use.remove(lease_id)
            self.refused_until[lease.key] = now + LEASE_RETRY
            self.reclaimed += 1

    def confirmed(self, order: dict) -> None:
        """A settle order the ledger answered."""
        self._confirmed(order.get("lease"))

    def _confirmed(self, lease_id) -> None:
        lease = self.held.get(lease_id or "")
        if lease is not None and lease.orders > 0:
            lease.orders -= 1

    # -- giving back -----------------------------------------------------------------------
    def give_back(self, fx: Effects, ledger, now: float) -> None:
        """Return the leases idle (or replaced, or recovered) whose carves the ledger has
        all seen."""
        for lease in list(self.held.values()):
            in_use = self.in_use.get(lease.key, [])
            if lease.returning or lease.orders or not (lease.granted or lease.retiring):
                continue
            replaced = lease.lease_id not in in_use
            if lease.retiring or replaced or now - lease.last_used >= LEASE_IDLE:
                if not replaced and not lease.retiring:  # idle: the next one smaller
                    self.size[lease.key] = LEASE_TASKS
                if not replaced:
                    in_use.remove(lease.lease_id)
                lease.returning = True
                ledger.send(fx, {"op": "ledger.return", "lease": lease.lease_id}, now)

    def return_all(self, fx: Effects, ledger, now: float) -> None:
        """At shutdown: every lease whose carves the ledger has all seen goes back (the
        replies are not waited for; the next start returns again what is still
        journaled, which the ledger answers as already done)."""
        for lease in self.held.values():
            if not (lease.returning or lease.orders) and (lease.granted or lease.retiring):
                lease.returning = True
                ledger.send(fx, {"op": "ledger.return", "lease": lease.lease_id}, now)

    # -- journal and recovery --------------------------------------------------------------
    def apply(self, record: dict) -> None:
        """Replay a {"k": "lease"} record: every lease asked and not confirmed returned
        comes back as one to return."""
        if record.get("gone"):
            self.held.pop(record["id"], None)
        else:
            self.held[record["id"]] = HeldLease(record["id"], (record["type"], record["agent"]),
                                                0.0, retiring=True)

    def snapshot(self) -> list[dict]:
        return [{"id": x.lease_id, "type": x.key[0], "agent": x.key[1]}
                for x in self.held.values()]

    def restored(self, tasks) -> None:
        """After replay: re-send the carves of the tasks that still hold one (the ledger
        may not have seen them), so the leases they came from go back only after."""
        for task in tasks:
            if not task.final and task.lease and task.reserved > 0:
                lease = self.held.get(task.lease)
                if lease is not None:
                    lease.orders += 1
                self._gather(0.0)
                self.assigns.append({"task": task.id, "attempt": task.attempt,
                                     "amount": task.reserved, "lease": task.lease,
                                     "type": task.type, "agent": task.agent})

    def _ask(self, fx: Effects, ledger, key: tuple, amount: int, now: float) -> None:
        lease_id = uuid.uuid4().hex[:20]
        self.held[lease_id] = HeldLease(lease_id, key, now)
        self.asking[key] = lease_id
        fx.records.append({"k": "lease", "id": lease_id, "type": key[0], "agent": key[1]})
        ledger.send(fx, {"op": "ledger.lease", "lease": lease_id, "amount": amount,
                         "type": key[0], "agent": key[1]}, now)

    def _forget(self, fx: Effects, lease_id: str) -> None:
        if self.held.pop(lease_id, None) is not None:
            fx.records.append({"k": "lease", "id": lease_id, "gone": True})
