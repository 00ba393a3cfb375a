"""An idempotency key cannot be misused: the same submit again is the same task, the same
key with different content is refused with `conflict`, before and after the scheduler
restarts from its journal."""

from __future__ import annotations

import os
import signal

import pytest

from cortex.protocol import Client, errors, wire
from cortex.services.scheduler.clients import content_digest

from .conftest import wait_for
from .trust_peers import RawPeer

SUBMIT = {"op": "task.submit", "type": "echo", "idempotency_key": "trust-key-1",
          "description": "the first", "payload": {"n": 1}, "priority": "low"}


@pytest.mark.parametrize("change", [{"payload": {"n": 2}}, {"description": "another"},
                                    {"type": "sleep"}, {"priority": "high"}, {"tokens": 5},
                                    {"payload": None}])
def test_other_content_gives_another_digest(change):
    assert content_digest(SUBMIT | change) != content_digest(SUBMIT)


def test_the_digest_ignores_the_wait_the_agent_and_the_order_of_fields():
    assert content_digest(SUBMIT | {"wait": 5.0, "agent": "a restarted client"}) == \
        content_digest(dict(reversed(list(SUBMIT.items()))))


def scheduler_pid(peer: RawPeer) -> int | None:
    try:
        kind, body = peer.request("scheduler", {"op": "scheduler.status"}, timeout=5)
    except AssertionError:
        return None
    return body["pid"] if kind == wire.REPLY else None


def test_a_reused_key_with_other_content_is_a_conflict_even_after_a_restart(suite):
    peer = RawPeer(suite.home, "client")
    try:
        kind, first = peer.request("scheduler", SUBMIT)
        assert kind == wire.REPLY, first
        kind, again = peer.request("scheduler", SUBMIT | {"wait": 0.0})
        assert (kind, again["id"]) == (wire.REPLY, first["id"])
        for change in ({"payload": {"n": 2}}, {"description": "changed"}):
            kind, body = peer.request("scheduler", SUBMIT | change)
            assert (kind, body["code"]) == (wire.ERROR, "conflict"), body
            assert first["id"] in body["message"]

        old = scheduler_pid(peer)
        os.kill(old, signal.SIGKILL)  # recovery from the journal alone
        wait_for(lambda: scheduler_pid(peer) not in (None, old), 90, "a new scheduler")
        kind, body = peer.request("scheduler", SUBMIT | {"payload": {"n": 3}})
        assert (kind, body["code"]) == (wire.ERROR, "conflict"), body
        kind, again = peer.request("scheduler", SUBMIT)
        assert (kind, again["id"]) == (wire.REPLY, first["id"])
    finally:
        peer.close()
    with Client(suite.home, timeout=30) as c:  # the client library sees a CortexError
        with pytest.raises(errors.CortexError) as info:
            c.submit("echo", "different", idempotency_key="trust-key-1")
        assert "conflict" in str(info.value) or getattr(info.value, "code", "") == "conflict"


def test_a_refused_key_with_other_content_is_a_conflict_not_the_old_refusal():
    from cortex.services.runtime.effects import Effects
    from cortex.services.scheduler.clock import Now

    from .test_scheduling import new_state

    state = new_state(max_queue_per_type=0)
    now = Now(1_700_000_000.0, 100.0)

    def submit(body):
        fx = Effects()
        state.submit(fx, b"c", b"k", {"idempotency_key": "r1", "type": "echo"} | body, now)
        [(_, kind, _, reply)] = fx.sends
        return fx, kind, reply

    fx, kind, first = submit({"payload": 1})
    assert (kind, first["code"]) == (wire.ERROR, "queue_full")
    assert fx.records[-1]["digest"]  # journaled with the refusal
    assert submit({"payload": 1})[2] == first  # a re-send: the same refusal
    _, kind, other = submit({"payload": 2})
    assert (kind, other["code"]) == (wire.ERROR, "conflict")
    fresh = new_state(max_queue_per_type=0)  # after a restart
    for record in fx.records:
        fresh.apply(record)
    fresh.load_snapshot(state.snapshot() | {"tasks": []})
    state = fresh
    assert submit({"payload": 2})[2]["code"] == "conflict"
    assert submit({"payload": 1})[2] == first
