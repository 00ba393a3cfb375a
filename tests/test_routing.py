"""Pure unit tests of the broker's peer table, driven with explicit clock values."""

from __future__ import annotations

import pytest

from cortex.protocol import wire
from cortex.services.broker.peers import Peer, PeerTable

T0 = 1000.0
LIMIT = wire.HEARTBEAT_INTERVAL * wire.HEARTBEAT_LIVENESS  # 3 s by default
CLIENT_LIMIT = 60.0


def test_hello_registers_a_new_peer():
    table = PeerTable()
    assert table.hello("scheduler", "service", T0) is True
    assert table.peers["scheduler"] == Peer("scheduler", "service", T0, T0)


def test_hello_again_with_the_same_role_refreshes_only():
    table = PeerTable()
    table.hello("w1", "worker", T0)
    assert table.hello("w1", "worker", T0 + 2) is False
    assert (table.peers["w1"].joined, table.peers["w1"].last_seen) == (T0, T0 + 2)


def test_hello_with_another_role_is_a_new_peer():
    table = PeerTable()
    table.hello("x", "client", T0)
    assert table.hello("x", "worker", T0 + 5) is True
    assert table.peers["x"] == Peer("x", "worker", T0 + 5, T0 + 5)


def test_heard_from_a_stranger_records_it_as_unknown_and_says_so():
    table = PeerTable()
    assert table.heard("ghost", T0) is False
    assert table.peers["ghost"].role == "unknown"
    assert table.heard("ghost", T0 + 1) is False  # still no HELLO
    assert table.peers["ghost"].last_seen == T0 + 1


def test_heard_from_a_known_peer_refreshes_it():
    table = PeerTable()
    table.hello("w1", "worker", T0)
    assert table.heard("w1", T0 + 1.5) is True
    assert table.peers["w1"].last_seen == T0 + 1.5


def test_hello_after_heard_promotes_the_unknown_peer():
    table = PeerTable()
    table.heard("w1", T0)
    assert table.hello("w1", "worker", T0 + 1) is True
    assert table.peers["w1"].role == "worker"
    assert table.heard("w1", T0 + 2) is True


def test_forget_returns_the_peer_once():
    table = PeerTable()
    table.hello("c", "client", T0)
    assert table.forget("c").name == "c"
    assert table.forget("c") is None
    assert table.forget("never") is None


def test_heartbeat_targets_are_services_and_workers_only():
    table = PeerTable()
    for name, role in [("s", "service"), ("w", "worker"), ("c", "client")]:
        table.hello(name, role, T0)
    table.heard("u", T0)
    assert sorted(table.heartbeat_targets()) == ["s", "w"]


@pytest.mark.parametrize("role", ["service", "worker"])
def test_expire_service_or_worker_at_the_limit_is_kept(role):
    table = PeerTable()
    table.hello("p", role, T0)
    assert table.expire(T0 + LIMIT) == []
    assert "p" in table.peers


@pytest.mark.parametrize("role", ["service", "worker"])
def test_expire_service_or_worker_past_the_limit_is_forgotten(role):
    table = PeerTable()
    table.hello("p", role, T0)
    lost = table.expire(T0 + LIMIT + 0.001)
    assert [p.name for p in lost] == ["p"] and lost[0].role == role
    assert table.peers == {}


@pytest.mark.parametrize("role", ["client", "unknown"])
def test_expire_clients_and_unknown_peers_get_a_minute(role):
    table = PeerTable()
    table.hello("p", role, T0) if role == "client" else table.heard("p", T0)
    assert table.expire(T0 + LIMIT + 1) == []
    assert table.expire(T0 + CLIENT_LIMIT) == []
    assert [p.name for p in table.expire(T0 + CLIENT_LIMIT + 0.001)] == ["p"]


def test_expire_client_limit_is_the_longer_of_a_minute_and_liveness():
    table = PeerTable(interval=30.0, liveness=3)  # 90 s > 60 s
    table.hello("c", "client", T0)
    table.hello("s", "service", T0)
    assert table.expire(T0 + 61) == []
    assert sorted(p.name for p in table.expire(T0 + 90.5)) == ["c", "s"]


def test_expire_uses_custom_interval_and_liveness():
    table = PeerTable(interval=0.5, liveness=2)
    table.hello("w", "worker", T0)
    assert table.expire(T0 + 1.0) == []
    assert [p.name for p in table.expire(T0 + 1.01)] == ["w"]


def test_expire_counts_from_the_last_sign_of_life():
    table = PeerTable()
    table.hello("w", "worker", T0)
    table.heard("w", T0 + 10)
    assert table.expire(T0 + 10 + LIMIT) == []
    assert len(table.expire(T0 + 10 + LIMIT + 0.1)) == 1


def test_expire_returns_only_the_silent_ones():
    table = PeerTable()
    table.hello("old", "worker", T0)
    table.hello("new", "worker", T0 + 2)
    table.hello("c", "client", T0)
    assert [p.name for p in table.expire(T0 + LIMIT + 1)] == ["old"]
    assert sorted(table.peers) == ["c", "new"]


def test_describe_sorts_by_role_then_name_and_rounds():
    table = PeerTable()
    table.hello("w2", "worker", T0)
    table.hello("w1", "worker", T0 + 0.5)
    table.hello("scheduler", "service", T0)
    table.hello("cli", "client", T0)
    table.heard("w1", T0 + 1.23456)
    rows = table.describe(T0 + 2.0)
    assert [(r["role"], r["name"]) for r in rows] == [
        ("client", "cli"), ("service", "scheduler"), ("worker", "w1"), ("worker", "w2")]
    w1 = rows[2]
    assert w1 == {"name": "w1", "role": "worker", "uptime": 1.5, "silent_for": 0.765}


def test_describe_empty_table():
    assert PeerTable().describe(T0) == []
