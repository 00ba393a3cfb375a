"""Quiet peers are beaten less often: a worker or service with no call to or from it for
a few intervals gets the broker's beat every `quiet_heartbeat_every` intervals, told so
in the beat, and both sides allow that much more silence. The rule (pure), the link's
reading of a beat (boundary), the setting, and a real idle suite."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from cortex.protocol import Client, locate, wire
from cortex.protocol.peer import ANSWERED_BEAT_SLACK, BusLink
from cortex.services.broker.peers import BEAT, QUIET_BEAT, SKIP, PeerTable

from .conftest import suite_config, wait_for

T0 = 1000.0


def joined(table: PeerTable, name: str, role: str = "worker"):
    assert table.hello(name.encode(), name, role, role == "service", T0).ok
    return table.by_name[name]


def beats(table: PeerTable, peer, start: float, end: float) -> list[tuple[float, int]]:
    """The broker's timed beats for `peer` from `start` to `end`, one per interval."""
    out, now = [], start
    while now < end:
        out.append((now, table.beat_kind(peer, now)))
        now += table.interval
    return out


def test_a_peer_without_calls_is_beaten_every_third_interval_and_a_call_ends_its_quiet():
    table = PeerTable(interval=1.0, quiet_every=3)
    worker = joined(table, "w1")
    quiet_from = T0 + wire.QUIET_AFTER_BEATS
    early = beats(table, worker, T0 + 1, quiet_from)
    assert {kind for _, kind in early} == {BEAT}  # active since its HELLO
    later = beats(table, worker, quiet_from, quiet_from + 12)
    assert [kind for _, kind in later] == [QUIET_BEAT, SKIP, SKIP] * 4
    assert table.describe(quiet_from)[0]["beat_every"] == 3.0
    # A call to or from it (the broker notes `active` when it routes one): every beat.
    worker.active = called = quiet_from + 12.2
    after = beats(table, worker, quiet_from + 13, quiet_from + 13 + wire.QUIET_AFTER_BEATS + 1)
    assert [kind for at, kind in after] == \
        [BEAT if at - called < wire.QUIET_AFTER_BEATS else QUIET_BEAT for at, _ in after]
    assert after[0][1] == BEAT and after[-1][1] == QUIET_BEAT  # quiet again later
    assert table.describe(quiet_from + 13)[0]["beat_every"] == 1.0


def test_jittered_beats_keep_the_quiet_cadence():
    table = PeerTable(interval=1.0, quiet_every=3)
    worker = joined(table, "w1")
    worker.active = T0 - 100
    kinds = [table.beat_kind(worker, T0 + i + (0.04 if i % 2 else -0.04)) for i in range(30)]
    assert kinds == [QUIET_BEAT, SKIP, SKIP] * 10


def test_every_one_or_a_client_is_never_quiet():
    table = PeerTable(interval=1.0, quiet_every=1)
    worker = joined(table, "w1")
    worker.active = T0 - 100
    assert {kind for _, kind in beats(table, worker, T0, T0 + 20)} == {BEAT}
    assert not PeerTable(interval=1.0, quiet_every=3).quiet(
        joined(PeerTable(), "c1", "client"), T0 + 100)


def test_a_quiet_peer_that_answers_is_never_lost_and_one_that_stops_is():
    table = PeerTable(interval=1.0, quiet_every=3)
    answering, hung = joined(table, "w-answers"), joined(table, "w-hung")
    lost_at = {}
    now = T0
    while now < T0 + 120:
        for peer in (answering, hung):
            kind = table.beat_kind(peer, now)
            if kind != SKIP and (peer is answering or now < T0 + 40):
                table.heard(peer.rid, now + 0.001)  # it answers a beat at once
        for peer in table.expire(now):
            lost_at[peer.name] = now
        now += 1.0
    assert "w-answers" not in lost_at
    # Silent from its last answer (before T0 + 40): lost within the quiet allowance.
    assert T0 + 40 < lost_at["w-hung"] <= T0 + 40 + 3 * 3 + 3


def test_the_allowance_stays_long_until_the_peer_had_time_to_hear_beats_are_fast_again():
    table = PeerTable(interval=1.0, quiet_every=3)
    worker = joined(table, "w1")
    worker.active = T0 - 100
    assert table.silence_limit(worker, T0) == 3.0
    assert table.beat_kind(worker, T0) == QUIET_BEAT
    table.heard(worker.rid, T0)
    assert table.silence_limit(worker, T0 + 1) == 9.0
    worker.active = T0 + 2.5  # a call: the next beat is a normal one
    assert table.beat_kind(worker, T0 + 3) == BEAT
    # It was told 3 s and last answered at T0: not lost 3.5 s later.
    assert table.expire(T0 + 3.5) == []
    assert table.silence_limit(worker, T0 + 9.5) == 3.0  # the quiet promise has run out
    assert table.silence_limit(joined(table, "c1", "client"), T0) == wire.CLIENT_SILENCE


# -- the link's side: a beat's announced spacing, read at the boundary -------------------

@pytest.fixture
def link():
    ctx = zmq.Context()
    link = BusLink(ctx, f"inproc://quiet-{time.monotonic_ns()}", "w-link", "worker",
                   interval=1.0)
    link.welcomed = True
    yield link
    link.close()
    ctx.term()


def beat_from_broker(body=None) -> list[bytes]:
    raw = body if isinstance(body, bytes) else wire.encode_body(body)
    return wire.frames(wire.HEARTBEAT, wire.BROKER, b"", raw, role=b"broker")


def test_a_quiet_beat_sets_the_links_wait_and_its_tolerance_and_a_plain_beat_resets_them(link):
    before = time.monotonic()
    assert link.accept(beat_from_broker({"next_ms": 3000})) is None
    assert link.spacing == 3.0
    assert link.next_beat >= before + 3.0 * ANSWERED_BEAT_SLACK
    link.last_heard = time.monotonic() - 5.0  # 5 s of silence: fine for a 3 s spacing
    assert link.broker_alive
    assert link.accept(beat_from_broker()) is None
    assert link.spacing == 1.0
    assert link.next_beat <= time.monotonic() + 1.0 * ANSWERED_BEAT_SLACK
    link.last_heard = time.monotonic() - 5.0
    assert not link.broker_alive


@pytest.mark.parametrize("body", [
    {"next_ms": "3000"}, {"next_ms": True}, {"next_ms": 0}, {"next_ms": -5},
    {"next_ms": wire.MAX_BEAT_SPACING_MS + 1}, {"next_ms": 2.5}, {"other": 1},
    msgpack.packb([1, 2]), b"\xc1not msgpack", msgpack.packb({1: 2}),
])
def test_a_malformed_beat_is_counted_and_means_the_normal_interval(link, body):
    link.accept(beat_from_broker({"next_ms": 3000}))
    assert link.accept(beat_from_broker(body)) is None  # never raises
    assert link.spacing == 1.0
    assert link.dropped == 1


def test_a_quiet_probe_is_echoed_and_keeps_the_spacing(link):
    sent = []
    link.send = lambda type_, peer, corr=b"", body=None: sent.append((type_, corr)) or True
    link.accept(wire.frames(wire.HEARTBEAT, wire.BROKER, b"token-01",
                            wire.encode_body({"next_ms": 3000}), role=b"broker"))
    assert sent == [(wire.HEARTBEAT, b"token-01")]
    assert link.spacing == 3.0


def test_a_spacing_below_the_interval_is_the_interval(link):
    link.accept(beat_from_broker({"next_ms": 10}))
    assert link.spacing == 1.0


def test_the_setting_is_a_whole_number_from_1_within_ten_minutes_of_spacing(tmp_path):
    from cortex.services.runtime.settings import ConfigError, load

    assert load(tmp_path).suite.quiet_heartbeat_every == 3
    (tmp_path / "cortex.toml").write_text("[suite]\nquiet_heartbeat_every = 1\n")
    assert load(tmp_path).suite.quiet_heartbeat_every == 1
    for bad in ("0", "2.5", '"3"', "true", "61", "-1"):
        (tmp_path / "cortex.toml").write_text(f"[suite]\nquiet_heartbeat_every = {bad}\n")
        with pytest.raises(ConfigError, match="quiet_heartbeat_every"):
            load(tmp_path)
    (tmp_path / "cortex.toml").write_text(
        "[suite]\nheartbeat_interval = 20.0\nquiet_heartbeat_every = 31\n")
    with pytest.raises(ConfigError, match="quiet_heartbeat_every"):
        load(tmp_path)


# -- a real suite, idle ---------------------------------------------------------------------

def heartbeats(client: Client) -> tuple[int, int, dict]:
    """The broker's counts of beats to workers and from them, and its stats."""
    status = client.call("broker", "broker.status")
    count = {(f["from"], f["to"]): f["count"] for f in status["flows"]
             if f["type"] == "HEARTBEAT"}
    return count.get(("broker", "worker"), 0), count.get(("worker", "broker"), 0), \
        status["stats"]


def test_an_idle_suites_workers_are_beaten_less_and_none_is_lost(suites):
    # heartbeat_interval = 0.5 (the tests' config): quiet after 1 s, beaten every 1.5 s.
    suite = suites.start(config=suite_config(4))
    with Client(suite.home, timeout=30) as c:
        assert c.wait(c.submit("echo", "wake them", payload=1)["id"])["state"] == "completed"
        peers = wait_for(lambda: (p := [x for x in c.call("broker", "broker.peers")["peers"]
                                        if x["role"] == "worker"])
                         and len(p) == 4 and all(x["beat_every"] == 1.5 for x in p) and p,
                         30, "four quiet workers")
        assert len(peers) == 4
        before, _, _ = heartbeats(c)
        began = time.monotonic()
        time.sleep(6.0)  # the idle stretch under test (longer than the 4.5 s allowance)
        after, _, stats = heartbeats(c)
        elapsed = time.monotonic() - began
        # Every 1.5 s instead of every 0.5 s: about a third of the normal count.
        normal = 4 * elapsed / 0.5
        assert after - before <= normal / 2, (after - before, normal)
        assert after - before >= 4 * (elapsed / 1.5 - 2)  # still beaten
        assert stats["lost_peers"] == 0
        # They still take work at once, and the workers that did are beaten normally.
        done = c.wait(c.submit("echo", "after the quiet", payload=2)["id"])
        assert done["state"] == "completed"
        busy = wait_for(lambda: [x for x in c.call("broker", "broker.peers")["peers"]
                                 if x["name"] == done["worker"] and x["beat_every"] == 0.5],
                        10, "the worker that ran it beaten normally")
        assert busy
    log = (suite.home / "logs").glob("*.log")
    assert not any("lost: silent" in p.read_text(errors="replace") for p in log)


def test_a_quiet_worker_sent_notices_gets_probes_that_keep_it_quiet(suites):
    # Something sent to a quiet worker (here a client's NOTIFY, which the worker drops)
    # makes the broker's next beat a probe: it must still say the quiet spacing, or the
    # worker would expect beats every interval, beat unprompted and say HELLO again.
    suite = suites.start(config=suite_config(2))
    with Client(suite.home, timeout=30) as c:
        quiet = wait_for(lambda: (p := [x for x in c.call("broker", "broker.peers")["peers"]
                                        if x["role"] == "worker"])
                         and len(p) == 2 and all(x["beat_every"] == 1.5 for x in p) and p,
                         30, "two quiet workers")
        target = quiet[0]["name"].encode()

        ctx = zmq.Context()
        sender = BusLink(ctx, locate.endpoints(suite.home)["bus"], "c-notices", "client",
                         heartbeat=False)
        try:
            wait_for(lambda: sender.socket.poll(100) and (sender.receive() or True)
                     and sender.welcomed, 10, "the sender welcomed")
            to_worker0, from_worker0, _ = heartbeats(c)
            for n in range(8):  # one notice per 0.75 s: a probe due at every quiet beat
                sender.send(wire.NOTIFY, target, b"", {"op": "task.recall", "n": n})
                time.sleep(0.75)
            to_worker, from_worker, _ = heartbeats(c)
        finally:
            sender.close()
            ctx.term()
        # Each worker answers each beat once and beats on its own only if the broker is
        # silent for 1.5 spacings: no more beats from workers than to them (+1 in flight).
        assert from_worker - from_worker0 <= to_worker - to_worker0 + 2
        peers = {x["name"]: x for x in c.call("broker", "broker.peers")["peers"]}
        assert peers[target.decode()]["beat_every"] == 1.5
        assert c.call("broker", "broker.status")["stats"]["lost_peers"] == 0
        # The probes' echoes proved the notices read.
        wait_for(lambda: {x["name"]: x for x in c.call("broker", "broker.peers")["peers"]}
                 [target.decode()]["unread"] == 0, 10, "the notices proven read")
