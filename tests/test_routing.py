"""Pure unit tests of the broker's peer table, driven with explicit clock values: names
bound at HELLO to connections, service names kept for proven processes, liveness, and
the bound on requests waiting for replies."""

from __future__ import annotations

from cortex.protocol import wire
from cortex.services.broker.peers import IN_FLIGHT_TTL, PeerTable

T0 = 1000.0
LIMIT = wire.HEARTBEAT_INTERVAL * wire.HEARTBEAT_LIVENESS  # 3 s by default


def test_hello_binds_a_name_and_role_to_a_connection():
    table = PeerTable()
    assert table.hello(b"r1", "w1", "worker", False, T0).ok
    peer = table.route(b"w1")
    assert (peer.rid, peer.name, peer.role, peer.joined) == (b"r1", "w1", "worker", T0)
    assert table.heard(b"r1", T0 + 1) is peer and peer.last_seen == T0 + 1


def test_an_unknown_connection_is_not_heard():
    assert PeerTable().heard(b"ghost", T0) is None


def test_a_service_role_or_name_needs_the_proof():
    table = PeerTable()
    for name, role in (("scheduler", "client"), ("scheduler", "service"),
                       ("my-service", "service"), ("pool", "worker")):
        outcome = table.hello(b"r", name, role, False, T0)
        assert not outcome.ok and "kept for the suite" in outcome.reason, (name, role)
    assert table.hello(b"r", "scheduler", "service", True, T0).ok


def test_a_live_name_is_refused_to_anyone_else():
    table = PeerTable()
    table.hello(b"r1", "w1", "worker", False, T0)
    outcome = table.hello(b"r2", "w1", "worker", False, T0 + 1)
    assert not outcome.ok and "in use" in outcome.reason
    assert table.route(b"w1").rid == b"r1"


def test_a_silent_holder_gives_its_name_up():
    table = PeerTable()
    table.hello(b"r1", "w1", "worker", False, T0)
    outcome = table.hello(b"r2", "w1", "worker", False, T0 + LIMIT + 0.1)
    assert outcome.ok and outcome.replaced.rid == b"r1"
    assert table.route(b"w1").rid == b"r2" and b"r1" not in table.by_rid


def test_a_proven_service_takes_its_name_over_at_once():
    table = PeerTable()
    table.hello(b"old", "scheduler", "service", True, T0)
    outcome = table.hello(b"new", "scheduler", "service", True, T0 + 0.1)
    assert outcome.ok and outcome.replaced.rid == b"old"
    assert table.route(b"scheduler").rid == b"new"


def test_a_connection_that_renames_itself_releases_its_old_name():
    table = PeerTable()
    table.hello(b"r1", "a", "client", False, T0)
    table.hello(b"r1", "b", "client", False, T0 + 1)
    assert table.route(b"a") is None and table.route(b"b").rid == b"r1"


def test_forget_and_route():
    table = PeerTable()
    table.hello(b"r1", "c", "client", False, T0)
    assert table.forget(b"r1").name == "c"
    assert table.forget(b"r1") is None and table.route(b"c") is None
    assert table.route(b"\xff\xfe") is None  # not UTF-8: no such name


def test_services_and_workers_expire_after_liveness_clients_after_a_minute():
    table = PeerTable()
    table.hello(b"s", "scheduler", "service", True, T0)
    table.hello(b"w", "w1", "worker", False, T0)
    table.hello(b"c", "c1", "client", False, T0)
    assert table.expire(T0 + LIMIT) == []
    assert {p.name for p in table.expire(T0 + LIMIT + 0.01)} == {"scheduler", "w1"}
    assert table.expire(T0 + wire.CLIENT_SILENCE) == []
    assert [p.name for p in table.expire(T0 + wire.CLIENT_SILENCE + 0.01)] == ["c1"]


def test_heartbeats_go_to_services_and_workers_only():
    table = PeerTable()
    table.hello(b"s", "pool", "service", True, T0)
    table.hello(b"w", "w1", "worker", False, T0)
    table.hello(b"c", "c1", "client", False, T0)
    assert {p.name for p in table.heartbeat_targets()} == {"pool", "w1"}


def test_requests_waiting_for_replies_are_bounded_per_peer():
    table = PeerTable(max_in_flight=3)
    table.hello(b"c", "c1", "client", False, T0)
    peer = table.route(b"c1")
    assert all(table.request_sent(peer, b"%d" % i, T0) for i in range(3))
    assert table.request_sent(peer, b"1", T0)  # a re-send of one already counted
    assert not table.request_sent(peer, b"9", T0)
    table.reply_delivered(peer, b"0")
    assert table.request_sent(peer, b"9", T0)
    # Requests whose answers were lost (a restarted service) stop counting after a while.
    assert not table.request_sent(peer, b"10", T0 + 1)
    assert table.request_sent(peer, b"10", T0 + IN_FLIGHT_TTL + 1)


def test_describe_lists_peers_by_role_then_name():
    table = PeerTable()
    table.hello(b"w", "w1", "worker", False, T0)
    table.hello(b"c", "c1", "client", False, T0)
    rows = table.describe(T0 + 2)
    assert [(r["name"], r["role"]) for r in rows] == [("c1", "client"), ("w1", "worker")]
    assert rows[0]["uptime"] == 2 and rows[0]["in_flight"] == 0
