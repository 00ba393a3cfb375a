"""Every operation of the catalogue, each field set to each wrong type, sent to a live
suite as a role that may send it: one reply or a counted drop each, no service restarts,
an `internal_error` event (with the traceback) for every handler exception, and a normal
task completes afterwards.

The wrong values: an int for a list, a list for a str, a list nested 300 deep, NaN, the
largest integer msgpack carries (2**64 - 1: 2**64 itself cannot be encoded), bytes, and
None (which means "absent": a default or `bad_request` for a required field).
"""

from __future__ import annotations

import logging
import math

import psutil

from cortex.protocol import Client, wire
from cortex.protocol import catalogue as cat
from cortex.protocol.catalogue import OPERATIONS, Catalogue
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.loop import BusService

from .conftest import jsonl_events_of, wait_for
from .trust_peers import RawPeer

NESTED: list = []
for _ in range(300):
    NESTED = [NESTED]
WRONG = {"int": 5, "list": ["x"], "nested 300": NESTED, "NaN": math.nan,
         "2**64-1": 2**64 - 1, "bytes": b"\xff\x00", "None": None}
STATUS = {"scheduler": "scheduler.status", "ledger": "ledger.status",
          "events": "events.status", "pool": "pool.status"}
FUZZ_TYPE = "trust-fuzz-type"  # a task type no worker takes: nothing fuzzed ever runs


def good(name: str, kind):
    """A valid value that changes nothing a later task depends on."""
    if name == "types":
        return [FUZZ_TYPE]
    if name == "scope":
        return f"type:{FUZZ_TYPE}"
    if isinstance(kind, cat.Str):
        return FUZZ_TYPE
    if isinstance(kind, cat.Name):
        return "trust-nobody"
    if isinstance(kind, cat.Int):
        return kind.lo if kind.lo > 0 else min(kind.hi, 1)
    if isinstance(kind, cat.Num):
        return kind.lo
    if isinstance(kind, cat.Bool):
        return False
    if isinstance(kind, cat.Choice):
        return kind.choices[0]
    if isinstance(kind, cat.Json):
        return {"k": 1}
    if isinstance(kind, cat.ListOf):
        return [good(name, kind.item)] * max(1, kind.min_items)
    if isinstance(kind, cat.Map):
        return {f.name: good(f.name, f.kind) for f in kind.fields}
    if isinstance(kind, cat.Batch):
        return [{f.name: good(f.name, f.kind) for f in kind.fields}]
    raise AssertionError(kind)


def variants(op):
    """(label, body) for every field of `op` set to every wrong value."""
    base = {"op": op.name, **{f.name: good(f.name, f.kind) for f in op.fields}}
    for f in op.fields:
        for label, wrong in WRONG.items():
            yield f"{f.name}={label}", base | {f.name: wrong}
        if isinstance(f.kind, cat.Map):  # and every field inside it
            for inner in f.kind.fields:
                for label, wrong in WRONG.items():
                    yield (f"{f.name}.{inner.name}={label}",
                           base | {f.name: base[f.name] | {inner.name: wrong}})
        if isinstance(f.kind, cat.Batch):  # every field of its task: that task's error
            for inner in f.kind.fields:
                for label, wrong in WRONG.items():
                    yield (f"{f.name}[0].{inner.name}={label}",
                           base | {f.name: [base[f.name][0] | {inner.name: wrong}]})


def sender_role(op) -> str:
    """A role that may send `op`; the broker's own notices go out as a service (which
    must be refused: no peer can pose as the broker)."""
    roles = sorted(op.roles - {"broker"})
    return roles[0] if roles else "service"


def expected_error(op, body, role: str, name: str) -> str | None:
    """The code the catalogue refuses this body with, None if it passes."""
    try:
        Catalogue(op.service).check(op.type, body, role, name)
    except wire.ProtocolError as e:
        return e.code
    return None


def counters(peer: RawPeer) -> dict:
    """Each service's (bad_messages, internal_errors)."""
    out = {}
    for service, op in STATUS.items():
        kind, body = peer.request(service, {"op": op})
        assert kind == wire.REPLY, body
        out[service] = (body["bad_messages"], body["internal_errors"])
    return out


def service_pids(suite) -> set[int]:
    return {p.pid for p in psutil.Process(suite.supervisord_pid()).children()}


def test_every_operation_with_every_wrong_field_is_answered_and_nothing_dies(shared_suite):
    suite = shared_suite
    pids = service_pids(suite)
    peers = {role: RawPeer(suite.home, role, secret=role == "service")
             for role in ("client", "worker", "service")}
    try:
        assert all(p.welcome["type"] == "WELCOME" for p in peers.values())
        with Client(suite.home, timeout=30) as c:
            worker = wait_for(c.workers, 60, "a worker")[0]["name"]
        before = counters(peers["service"])
        drops = dict.fromkeys(STATUS, 0)
        refused = dict.fromkeys(STATUS, 0)
        sent = answered = 0
        for op in OPERATIONS:
            role = sender_role(op)
            peer = peers[role]
            dest = worker if op.service == "worker" else op.service
            for label, body in variants(op):
                code = expected_error(op, body, role, peer.name)
                sent += 1
                if op.type == wire.REQUEST:
                    kind, reply = peer.request(dest, body)
                    answered += 1
                    if code is not None:
                        assert (kind, reply.get("code")) == (wire.ERROR, code), \
                            (op.name, label, reply)
                    if code is not None and op.service in STATUS:
                        refused[op.service] += 1  # counted as a bad message
                else:
                    peer.notify(dest, body)
                    if code is not None and op.service in STATUS:
                        drops[op.service] += 1
        assert answered > 200 and sum(drops.values()) > 200, (answered, drops)
        # Stray replies on the correlation ids the services use for their own requests
        # (the broker's peer list, ledger orders, the router's gauges): ignored.
        for role in ("client", "service"):
            for dest in STATUS:
                for corr in (b"sync-peers", b"L1", b"gauges-scheduler", b"gauges-ledger"):
                    for wrong in WRONG.values():
                        body = dict.fromkeys(("peers", "granted", "queue", "workers",
                                              "budgets", "code"), wrong)
                        for kind in (wire.REPLY, wire.ERROR):
                            peers[role].beat()
                            peers[role].socket.send_multipart(
                                wire.frames(kind, dest.encode(), corr, body))
                            sent += 1

        def all_counted():
            now = counters(peers["service"])
            return now if all(now[s][0] - before[s][0] >= drops[s] + refused[s]
                              for s in STATUS) else None

        try:
            after = wait_for(all_counted, 60, "every refused message counted")
        except AssertionError:
            now = counters(peers["service"])
            raise AssertionError(f"counted {now} from {before}; expected at least the "
                                 f"drops {drops} and the refusals {refused}") from None
    finally:
        for p in peers.values():
            p.close()

    assert service_pids(suite) == pids, "a service restarted"
    failures = sum(after[s][1] - before[s][1] for s in STATUS)
    if failures:  # every handler exception is an event with its traceback
        traced = wait_for(lambda: [e for e in jsonl_events_of(suite.home)
                                   if e["type"].endswith(".internal_error")
                                   and "Traceback" in e["data"]["traceback"]],
                          60, "the internal_error events")
        assert len(traced) >= failures
    with Client(suite.home, timeout=30) as c:
        task = c.submit("echo", "after the fuzz", payload={"still": "here"})
        done = c.wait(task["id"], timeout=60)
        assert (done["state"], done["result"]) == ("completed", {"still": "here"})
    print(f"fuzz: {sent} messages, {answered} requests answered, drops {drops}, "
          f"handler failures {failures}")



# -- the machinery for a handler that fails (the fuzz above finds none) -----------------
def failing_service(service: str, handler) -> BusService:
    """A BusService with no sockets whose every operation is served by `handler`."""
    svc = object.__new__(BusService)
    svc.name = service
    svc.log = logging.getLogger("trust-test")
    svc.bad_messages = svc.internal_errors = 0
    svc.halted = None
    svc.catalogue = Catalogue(service)
    svc.handlers = dict.fromkeys(svc.catalogue.ops, handler)
    return svc


def message(type_: bytes, body: dict, peer: bytes, role: bytes) -> wire.Message:
    return wire.Message(type_, peer, b"k1", wire.encode_body(body), role)


def test_a_failing_handler_is_answered_internal_with_a_traced_event_and_its_effects_dropped():
    def boom(fx, msg, body, now):
        fx.reply(msg.peer, msg.corr, {"half": "done"})
        fx.records.append({"k": "half"})
        return 1 / 0

    svc = failing_service("ledger", boom)
    fx = Effects()
    svc._decode(fx, message(wire.REQUEST, {"op": "ledger.status"}, b"c1", b"client"), 0.0)
    assert svc.internal_errors == 1 and fx.records == []
    [(peer, kind, corr, body)] = fx.sends
    assert (peer, kind, corr, body["code"]) == (b"c1", wire.ERROR, b"k1", "internal")
    [(event, data, _, _)] = fx.events
    assert event == "ledger.internal_error" and data["op"] == "ledger.status"
    assert "ZeroDivisionError" in data["traceback"] and "Traceback" in data["traceback"]


def test_a_failing_notify_is_a_counted_drop_and_an_unencodable_event_a_failure():
    def unencodable(fx, msg, body, now):
        fx.emit("pool.odd", {"deep": NESTED, "nan": math.nan, "raw": b"\xff"})

    svc = failing_service("pool", unencodable)
    fx = Effects()
    body = {"op": "pool.kill", "worker": "w-1"}
    svc._decode(fx, message(wire.NOTIFY, body, b"scheduler", b"service"), 0.0)
    assert svc.internal_errors == 1 and fx.sends == []  # no reply to a NOTIFY
    assert [e[0] for e in fx.events] == ["pool.internal_error"]
    # The refusal of a sender who may not send it is a bad message, not a failure.
    svc._decode(fx, message(wire.NOTIFY, body, b"trust-x", b"service"), 0.0)
    assert (svc.bad_messages, svc.internal_errors) == (1, 1)
