"""Leases: blocks of tokens the ledger grants the scheduler ahead of its tasks.

``LeaseLedger`` is budgets.LedgerState with leases (pure logic like it: no sockets, files
or clocks); the ledger process runs it.

A lease is granted for one scope key (task type, agent) and counted as *leased* in
every scope it touches (global, ``type:T``, ``agent:A``: whichever exist), so the
ledger's invariant ``committed - overrun + reserved + leased <= limit`` covers it as it
covers a task's reservation, and a budget shows what leases hold apart from what tasks
hold. The scheduler carves its tasks' reservations from a lease without asking, and tells
the ledger in batches:

    lease   grant `amount` under the id the scheduler chose (and journaled first): a
            repeated id gets the first answer, so a re-sent request never grants twice.
            Refused when it would take more than half of what any of its scopes has
            left, so direct reservations are never starved and a budget near its limit
            is decided task by task, as without leases.
    assign  part of a lease becomes the reservation of (task, attempt): it moves from
            leased to reserved. Idempotent by (task, attempt).
    settle  commit / release orders, many in one message; an order naming a lease and
            an amount assigns first if that has not happened (the assign may be behind).
    return  the lease's unassigned rest is released and the lease closed. Its id is
            remembered: a lease request arriving after its return grants nothing.

A direct reservation or extension (a client's, an agent's, the scheduler's per-task
one) that only the unassigned rest of leases stands in the way of takes those leases
back first (`reclaim`: journaled, the rest released and the lease closed as by a return),
so no lease starves it. The scheduler learns it from the `closed` list of its next assign
or settle reply naming the lease, and takes the per-task path for that key a while.

An assign or settle naming a lease that cannot cover it (returned, reclaimed, unknown,
spent) falls back to an ordinary reservation in the same scopes, decided against the
budgets (a carve on its way while its lease was reclaimed: refused only if the budget is
full, and then its use is charged at its commit as an overrun).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cortex.services.ledger.budgets import (
    LedgerState,
    Outcome,
    _Attempt,
    _bad,
    _check_amount,
    _check_key,
    _check_names,
)

MAX_LEASES = 10_000  # closed leases remembered (so a late request for one grants nothing)


@dataclass
class Lease:
    lease_id: str
    scopes: list[str]
    granted: int
    assigned: int = 0
    returned: bool = False

    @property
    def left(self) -> int:
        return 0 if self.returned else self.granted - self.assigned

    def to_json(self) -> dict:
        return {"lease": self.lease_id, "scopes": self.scopes, "granted": self.granted,
                "assigned": self.assigned, "returned": self.returned}

    @classmethod
    def from_json(cls, d: dict) -> Lease:
        return cls(d["lease"], list(d["scopes"]), d["granted"], d["assigned"], d["returned"])


class LeaseLedger(LedgerState):
    """LedgerState with the lease operations (journaled and replayed like the others)."""

    def __init__(self, *args, **kw):
        self._leases: OrderedDict[str, Lease] = OrderedDict()  # open, then closed by age
        super().__init__(*args, **kw)

    def lease(self, lease_id, amount, task_type=None, agent=None, *, now):
        err = (None if _valid_id(lease_id) else "lease must be a non-empty string of at "
               "most 256 characters") or _check_amount("amount", amount) \
            or _check_names(task_type, agent)
        if err:
            return _bad(err)
        now, events = self._advance(now)
        known = self._leases.get(lease_id)
        if known is not None:
            return Outcome(True, None, _lease_reply(known), events)
        scopes = self._scopes_for(task_type, agent)
        refused = self._refuse("lease", None, None, amount, scopes, now, lease=lease_id) \
            or self._lease_too_big(lease_id, amount, scopes, now)
        if refused:
            refused.events[:0] = events
            return refused
        record = {"op": "lease", "lease": lease_id, "amount": amount, "scopes": scopes}
        self._journal(record, now)
        events.append(("ledger.leased", self._event(record, scopes, task_type=task_type,
                                                    agent=agent)))
        return Outcome(True, None, _lease_reply(self._leases[lease_id]), events, record)

    def assign(self, task_id, attempt, amount, lease_id, *, now, task_type=None,
               agent=None):
        """Make `amount` of the lease the reservation of (task_id, attempt)."""
        err = _check_key(task_id, attempt) or _check_amount("amount", amount) \
            or (None if _valid_id(lease_id) else "lease must be a non-empty string")
        if err:
            return _bad(err)
        now, events = self._advance(now)
        rec = self._attempts.get((task_id, attempt))
        if rec is not None:  # assigned (or reserved) already: the same answer
            return Outcome(True, None, {**self._reserve_reply(rec), "lease": lease_id},
                           events)
        lease = self._leases.get(lease_id)
        if lease is None or lease.left < amount:
            # Nothing left to carve from: an ordinary reservation, decided on the budgets.
            outcome = self.reserve(task_id, attempt, amount, task_type, agent, now=now)
            outcome.events[:0] = events
            return outcome
        record = {"op": "assign", "lease": lease_id, "task_id": task_id, "attempt": attempt,
                  "amount": amount}
        self._journal(record, now)
        rec = self._attempts[(task_id, attempt)]
        # Shaped like a reserve's event (its scopes named), marked with the lease.
        events.append(("ledger.reserved", self._event(
            {**record, "scopes": lease.scopes}, lease.scopes, task_type=task_type,
            agent=agent)))
        return Outcome(True, None, {**self._reserve_reply(rec), "lease": lease_id}, events,
                       record)

    def reserve_reclaiming(self, task_id, attempt, amount, task_type=None, agent=None, *,
                           now) -> list[Outcome]:
        """A direct reservation (`ledger.reserve`): the leases standing in its way taken
        back (one outcome each), then the reservation's own outcome."""
        before = []
        if not (_check_key(task_id, attempt) or _check_amount("amount", amount)
                or _check_names(task_type, agent)) and (task_id, attempt) not in self._attempts:
            before = self._reclaim(amount, self._scopes_for(task_type, agent), now,
                                   task_id, attempt)
        return [*before, self.reserve(task_id, attempt, amount, task_type, agent, now=now)]

    def extend_carved(self, task_id, attempt, amount, now, seq, lease_id, carved) -> list:
        """An extension of a reservation carved from `lease_id` (`carved` tokens): the
        assign first if it has not arrived, the leases standing in its way taken back,
        then the extension."""
        outcomes = []
        if lease_id and carved and (task_id, attempt) not in self._attempts:
            outcomes.append(self.assign(task_id, attempt, carved, lease_id, now=now))
        rec = self._attempts.get((task_id, attempt))
        if rec is not None and rec.is_open and seq not in rec.extends and \
                not _check_amount("amount", amount):
            outcomes += self._reclaim(amount, rec.scopes, now, task_id, attempt)
        outcomes.append(self.extend(task_id, attempt, amount, now=now, seq=seq))
        return outcomes

    def closed(self, lease_ids) -> list[str]:
        """Those of `lease_ids` that are closed (returned or reclaimed), for the reply to
        a batch that names them."""
        return [x for x in dict.fromkeys(lease_ids)
                if (lease := self._leases.get(x)) is not None and lease.returned]

    def settle(self, order: dict, *, now) -> list:
        """One settle order (commit or release); returns its outcomes, an assign first
        when the order names a lease whose assign has not been seen."""
        outcomes = []
        task_id, attempt = order.get("task"), order.get("attempt")
        lease_id, amount = order.get("lease"), order.get("amount")
        if lease_id is not None and amount and (task_id, attempt) not in self._attempts:
            assigned = self.assign(task_id, attempt, amount, lease_id, now=now,
                                   task_type=order.get("type"), agent=order.get("agent"))
            outcomes.append(assigned)
        if order.get("op") == "commit":
            outcomes.append(self.commit(task_id, attempt, order.get("used"), now=now,
                                        task_type=order.get("type"), agent=order.get("agent")))
        else:
            outcomes.append(self.release(task_id, attempt, now=now))
        return outcomes

    def return_lease(self, lease_id, *, now):
        """Release what is left of a lease and close it (idempotent; an unknown id is
        closed too, so a lease request still on its way grants nothing)."""
        if not _valid_id(lease_id):
            return _bad("lease must be a non-empty string of at most 256 characters")
        now, events = self._advance(now)
        lease = self._leases.get(lease_id)
        if lease is not None and lease.returned:
            return Outcome(True, None, {"lease": lease_id, "returned": 0}, events)
        left = lease.left if lease is not None else 0
        record = {"op": "return", "lease": lease_id, "amount": left}
        self._journal(record, now)
        scopes = lease.scopes if lease is not None else []
        events.append(("ledger.lease_returned", self._event(record, scopes)))
        return Outcome(True, None, {"lease": lease_id, "returned": left}, events, record)

    def snapshot(self) -> dict:
        return {**super().snapshot(), "leases": [x.to_json() for x in self._leases.values()]}

    @classmethod
    def from_snapshot(cls, data: dict) -> LeaseLedger:
        state = super().from_snapshot(data)
        for d in data.get("leases", []):
            state._remember_lease(Lease.from_json(d))
        if any("leased" not in b for b in data["budgets"].values()):
            # Written when a lease's rest counted as reserved: it is leased.
            for lease in state._leases.values():
                state._charge(lease.scopes, reserved=-lease.left, leased=lease.left)
        return state

    def leases(self) -> list[dict]:
        return [lease.to_json() for lease in self._leases.values() if not lease.returned]

    # -- internals -----------------------------------------------------------------------
    def _reclaim(self, amount, scopes, now, task_id, attempt) -> list[Outcome]:
        """Take back the open leases (oldest first) whose unassigned rest keeps `amount`
        from fitting in `scopes`, if taking them back makes it fit; else none."""
        now, events = self._advance(now)
        short = {s: b.held + amount - b.limit for s in scopes
                 if (b := self._budgets[s]).limit is not None and b.held + amount > b.limit}
        chosen = []
        for lease in self._leases.values():
            if not short or max(short.values()) <= 0:
                break
            if lease.left and any(s in short for s in lease.scopes):
                chosen.append(lease)
                for s in lease.scopes:
                    if s in short:
                        short[s] -= lease.left
        if not chosen or max(short.values()) > 0:
            return [Outcome(True, None, {}, events)] if events else []
        outcomes = []
        for lease in chosen:
            record = {"op": "reclaim", "lease": lease.lease_id, "amount": lease.left,
                      "task_id": task_id, "attempt": attempt}
            self._journal(record, now)
            outcomes.append(Outcome(True, None, {"lease": lease.lease_id}, [
                ("ledger.lease_reclaimed", self._event(record, lease.scopes))], record))
        outcomes[0].events[:0] = events
        return outcomes

    def _lease_too_big(self, lease_id, amount, scopes, now):
        for scope in scopes:
            b = self._budgets[scope]
            if b.limit is None:
                continue
            available = max(0, b.limit - b.held)
            if 2 * amount > available:
                reply = {"granted": False, "lease": lease_id, "scope": scope,
                         "requested": amount, "available": available, "limit": b.limit,
                         "reason": f"a lease takes at most half of what {scope} has left "
                                   f"({available})"}
                return Outcome(False, "budget_exceeded", reply, [("ledger.lease_refused", {
                    **reply, "now": now})])
        return None

    def _apply_extra(self, r: dict) -> bool:
        """Apply a lease journal record; False if `r` is not one."""
        op = r["op"]
        if op == "lease":
            self._remember_lease(Lease(r["lease"], list(r["scopes"]), r["amount"]))
            self._charge(r["scopes"], leased=r["amount"])
        elif op == "assign":
            lease = self._leases[r["lease"]]
            lease.assigned += r["amount"]
            self._charge(lease.scopes, leased=-r["amount"], reserved=r["amount"])
            self._add(_Attempt(r["task_id"], r["attempt"], list(lease.scopes), r["amount"]))
        elif op in ("return", "reclaim"):
            lease = self._leases.get(r["lease"])
            if lease is None:
                self._remember_lease(Lease(r["lease"], [], 0, returned=True))
            else:
                self._charge(lease.scopes, leased=-lease.left)
                lease.returned = True
                self._leases.move_to_end(r["lease"])
            self._forget_closed()
        else:
            return False
        return True

    def _remember_lease(self, lease: Lease) -> None:
        self._leases[lease.lease_id] = lease

    def _forget_closed(self) -> None:
        while len(self._leases) > MAX_LEASES:
            oldest = next(iter(self._leases.values()))
            if not oldest.returned:
                break  # open leases are never forgotten
            self._leases.popitem(last=False)


def _valid_id(x: object) -> bool:
    return isinstance(x, str) and 0 < len(x) <= 256


def _lease_reply(lease: Lease) -> dict:
    return {"granted": not lease.returned, "lease": lease.lease_id, "amount": lease.granted,
            "scopes": lease.scopes, "returned": lease.returned}
