"""The broker's bound in bytes on what waits for a peer, the accounting alone: probes,
their echoes (unknown or replayed tokens confirm nothing), the bound and who is exempt."""

from __future__ import annotations

import time

import pytest
import zmq

from cortex.protocol import wire
from cortex.protocol.peer import BusLink, recv_frames, send_frames
from cortex.services.broker.peers import MIB, PROBES_KEPT, PeerTable

from .conftest import wait_for

T0 = 1000.0


def joined(table: PeerTable, name: str = "c1", role: str = "client"):
    proven = role == "service"
    assert table.hello(name.encode(), name, role, proven, T0).ok
    return table.by_name[name]


def send(table: PeerTable, peer, size: int) -> list[bytes]:
    """Account `size` bytes sent as the broker does; the probes that would go out."""
    tokens = []
    peer.sent += size
    if peer.sent >= peer.probe_due:
        tokens.append(table.probe(peer))
    return tokens


def test_an_echo_confirms_what_was_sent_before_its_probe_and_not_after():
    table = PeerTable(max_unread=8 * MIB)
    peer = joined(table)
    assert peer.probe_due == table.probe_step == MIB  # at least 1 MiB between probes
    [token] = send(table, peer, MIB)
    send(table, peer, 300_000)  # after the probe: not proven read by its echo
    assert table.unread(peer) == MIB + 300_000
    assert table.echoed(peer, token)
    assert peer.confirmed == MIB and table.unread(peer) == 300_000


def test_unknown_replayed_and_empty_tokens_confirm_nothing():
    table = PeerTable(max_unread=8 * MIB)
    peer = joined(table)
    [token] = send(table, peer, 2 * MIB)
    assert not table.echoed(peer, b"guessed!")
    assert not table.echoed(peer, b"")
    assert table.unread(peer) == 2 * MIB
    assert table.echoed(peer, token)
    send(table, peer, MIB // 2)
    assert not table.echoed(peer, token)  # replayed: already used
    assert peer.confirmed == 2 * MIB and table.unread(peer) == MIB // 2


def test_probes_are_unguessable_and_an_echo_confirms_the_ones_before_it_too():
    table = PeerTable(max_unread=8 * MIB)
    peer = joined(table)
    tokens = [t for _ in range(5) for t in send(table, peer, MIB)]
    assert len(tokens) == 5 and len(set(tokens)) == 5 and all(len(t) == 8 for t in tokens)
    assert table.echoed(peer, tokens[2])  # FIFO: the first two were read as well
    assert peer.confirmed == 3 * MIB and len(peer.probes) == 2
    assert not table.echoed(peer, tokens[0])  # older than one echoed: gone
    assert table.echoed(peer, tokens[4]) and table.unread(peer) == 0


def test_a_peer_that_never_echoes_is_a_slow_reader_past_the_bound_and_a_reader_never_is():
    table = PeerTable(max_unread=8 * MIB)
    silent, reader = joined(table, "silent"), joined(table, "reader", "worker")
    for _ in range(40):  # 200 KiB messages, 8 MiB in all
        send(table, silent, 200 * 1024)
        for token in send(table, reader, 200 * 1024):
            assert not table.slow_reader(reader)
            table.echoed(reader, token)
    assert not table.slow_reader(silent)  # at the bound, not past it
    send(table, silent, 200 * 1024)
    assert table.slow_reader(silent) and table.unread(silent) > 8 * MIB
    assert not table.slow_reader(reader) and table.unread(reader) < 2 * MIB
    assert len(silent.probes) <= PROBES_KEPT


def test_the_suites_services_are_exempt_and_the_kept_probes_are_bounded():
    table = PeerTable(max_unread=4 * MIB)
    service = joined(table, "scheduler", "service")
    for _ in range(10 * PROBES_KEPT):
        send(table, service, MIB)
    assert table.unread(service) > 4 * MIB and not table.slow_reader(service)
    assert len(service.probes) == PROBES_KEPT


def test_a_timed_beat_probes_only_when_something_was_sent_since_the_last_probe():
    table = PeerTable(max_unread=8 * MIB)
    peer = joined(table, "w1", "worker")
    assert not table.probe_pending(peer)
    send(table, peer, 1000)
    assert table.probe_pending(peer)
    token = table.probe(peer)
    assert not table.probe_pending(peer)
    assert table.echoed(peer, token) and peer.confirmed == 1000
    assert not table.probe_pending(peer)
    assert table.describe(T0)[0]["unread"] == 0


def test_the_probe_step_grows_with_the_bound():
    assert PeerTable(max_unread=4 * MIB).probe_step == MIB
    assert PeerTable(max_unread=64 * MIB).probe_step == 2 * MIB


def test_the_bound_is_a_bus_setting_well_above_the_message_limit(tmp_path):
    from cortex.services.runtime.settings import ConfigError, load

    assert load(tmp_path).bus.max_unread_mb == 64.0
    (tmp_path / "cortex.toml").write_text("[bus]\nmax_unread_mb = 16\n")
    assert load(tmp_path).bus.max_unread_mb == 16.0
    for bad in ("1", "-3", '"lots"', "nan", "1e12"):
        (tmp_path / "cortex.toml").write_text(f"[bus]\nmax_unread_mb = {bad}\n")
        with pytest.raises(ConfigError, match="max_unread_mb"):
            load(tmp_path)


def test_every_link_echoes_a_probes_token_and_a_client_answers_no_plain_beat():
    ctx = zmq.Context()
    broker = ctx.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    endpoint = f"inproc://probe-{time.monotonic_ns()}"
    broker.bind(endpoint)
    link = BusLink(ctx, endpoint, "c-probe", "client", heartbeat=False)
    try:
        hello = wait_for(lambda: recv_frames(broker), 10, "the HELLO")
        rid = hello[0]
        send_frames(broker, [rid, *wire.frames(wire.WELCOME, wire.BROKER, b"hello",
                                                {"heartbeat_ms": 1000}, role=b"broker")])
        send_frames(broker, [rid, *wire.frames(wire.HEARTBEAT, wire.BROKER, role=b"broker")])
        send_frames(broker, [rid, *wire.frames(wire.HEARTBEAT, wire.BROKER, b"\x01token!",
                                                role=b"broker")])
        wait_for(lambda: link.socket.poll(0) and link.receive() is None and link.welcomed
                 and not link.socket.poll(0), 10, "the three messages")
        echo = wait_for(lambda: recv_frames(broker), 10, "the echo")
        assert echo[0] == rid and echo[2] == wire.HEARTBEAT and echo[5] == b"\x01token!"
        assert recv_frames(broker) is None  # the plain beat: a client does not answer it
    finally:
        link.close()
        broker.close(linger=0)
        ctx.term()
