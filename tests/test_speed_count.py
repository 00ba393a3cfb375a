"""What a no-op task costs on the bus (loadtest/count.py), and the heartbeat answered at
once and saying a worker works (protocol/peer.py)."""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import pytest
import zmq

from cortex.loadtest.count import parse_strace, run
from cortex.loadtest.harness import cpu_per_task
from cortex.protocol import wire
from cortex.protocol.peer import BusLink, recv_frames, send_frames

from .conftest import wait_for

STRACE_SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 41.20    0.004120           2      1800           poll
 30.00    0.003000           1      2100        12 getpid
  0.00    0.000000           0         3           close
------ ----------- ----------- --------- --------- ----------------
100.00    0.007120           1      3903        12 total
"""


def test_strace_summary_is_read_row_by_row():
    rows = dict(parse_strace(STRACE_SUMMARY))
    assert rows == {"poll": 1800, "getpid": 2100, "close": 3, "total": 3903}
    assert parse_strace("") == []


def test_cpu_per_task_by_process_and_for_the_suite():
    per = cpu_per_task({"broker": 0.5, "scheduler": 1.0, "model-training": 3.0}, 2.0, 1000)
    assert per == {"broker": 0.5, "model-training": 3.0, "scheduler": 1.0, "agents": 2.0,
                   "suite": 1.5}
    assert cpu_per_task({"broker": 1.0}, 1.0, 0) == {}


@contextmanager
def a_broker_and_a_link(name: str):
    """A ROUTER playing the broker and a worker's BusLink to it: (broker, link, heard),
    `heard()` being the next message the broker has, or None."""
    ctx = zmq.Context()
    broker = ctx.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    endpoint = f"inproc://{name}-{time.monotonic_ns()}"
    broker.bind(endpoint)
    link = BusLink(ctx, endpoint, name, "worker", interval=30.0)
    try:
        yield broker, link, lambda: recv_frames(broker)
    finally:
        link.close()
        broker.close(linger=0)
        ctx.term()


def test_a_welcomed_peer_answers_the_brokers_heartbeat_at_once():
    with a_broker_and_a_link("w-beat") as (broker, link, heard):
        hello = wait_for(heard, 10, "the HELLO")
        rid = hello[0]
        assert hello[2] == wire.HELLO
        # Before WELCOME a beat is not answered (the peer's own timer says hello again).
        send_frames(broker, [rid, *wire.frames(wire.HEARTBEAT, wire.BROKER, role=b"broker")])
        wait_for(lambda: link.socket.poll(0) and link.receive() is None, 10, "the beat")
        send_frames(broker, [rid, *wire.frames(wire.WELCOME, wire.BROKER, b"hello",
                                                {"heartbeat_ms": 30000}, role=b"broker")])
        wait_for(lambda: link.socket.poll(0) and (link.receive() or True) and link.welcomed,
                 10, "the WELCOME")
        assert recv_frames(broker) is None  # nothing answered the early beat
        before = time.monotonic()
        send_frames(broker, [rid, *wire.frames(wire.HEARTBEAT, wire.BROKER, role=b"broker")])
        wait_for(lambda: link.socket.poll(0) and link.receive() is None, 10, "the beat")
        answer = wait_for(heard, 10, "the answer")
        assert answer[0] == rid and answer[2] == wire.HEARTBEAT
        # Its own beat waits until the broker has been silent past an interval.
        assert link.next_beat >= before + link.interval


def test_a_worker_that_took_work_says_so_in_its_beats_at_once_when_quiet():
    """Its calls go over the scheduler's direct line, so its beats tell the broker it
    works (a peer without calls is beaten as a quiet one, and found lost later)."""
    with a_broker_and_a_link("w-busy") as (broker, link, heard):
        rid = wait_for(heard, 10, "the HELLO")[0]
        send_frames(broker, [rid, *wire.frames(wire.WELCOME, wire.BROKER, b"hello",
                                                {"heartbeat_ms": 30000}, role=b"broker")])
        wait_for(lambda: link.socket.poll(0) and (link.receive() or True) and link.welcomed,
                 10, "the WELCOME")

        def beat(body: dict | None = None) -> list:
            send_frames(broker, [rid, *wire.frames(wire.HEARTBEAT, wire.BROKER, b"", body,
                                                    role=b"broker")])
            wait_for(lambda: link.socket.poll(0) and link.receive() is None, 10, "the beat")
            return wait_for(heard, 10, "the answer")

        link.working()  # beaten normally: the next answer says it, nothing sent now
        assert recv_frames(broker) is None
        assert wire.decode_body(beat()[-1]) == {"busy": True}
        assert beat()[-1] == b""  # nothing taken since
        beat({"next_ms": 90000})  # now quiet: beaten every 90 s
        link.working()
        told = wait_for(heard, 10, "the busy beat, unprompted")
        assert told[2] == wire.HEARTBEAT and wire.decode_body(told[-1]) == {"busy": True}
        link.working()  # once per beat
        assert recv_frames(broker) is None


@pytest.mark.processes
def test_count_no_op_tasks_by_hop(tmp_path):
    args = argparse.Namespace(tasks=40, agents=4, workers=2, mode="one", no_strace=True,
                              out=str(tmp_path / "count"), json=None, tokens=0)
    result = run(args)
    assert result["failed"] == 0 and result["tasks"] == 40
    hops = {(r["from"], r["to"], r["type"]): r["messages"] for r in result["routed"]}
    line = {(r["from"], r["to"], r["type"]): r["messages"] for r in result["direct"]}
    # One dispatch and one finished report (and its acknowledgement) per task, on the
    # scheduler's direct line, none through the broker; an idle worker taking back a
    # prefetched task adds a task.recall to its holder; a prefetched task may ride on the
    # reply to its worker's finish instead of a task.run of its own.
    assert 0 < line[("scheduler", "worker", "NOTIFY")] <= 2 * 40
    assert line[("worker", "scheduler", "REQUEST")] == 40
    assert line[("scheduler", "worker", "REPLY")] == 40
    assert not {k: n for k, n in hops.items() if "worker" in k[:2] and k[2] != "HEARTBEAT"}
    assert result["direct_per_task"] >= 2
    # The agents' submits and waits: on the line too, once each agent has taken it.
    asked = hops.get(("client", "scheduler", "REQUEST"), 0) \
        + line.get(("client", "scheduler", "REQUEST"), 0)
    answered = hops.get(("scheduler", "client", "REPLY"), 0) \
        + line.get(("scheduler", "client", "REPLY"), 0)
    assert asked >= 40 and answered == asked
    assert line.get(("client", "scheduler", "REQUEST"), 0) > 0
    fan_in = {r["publisher"]: r for r in result["fan_in"]}
    # Created, dispatched, completed at least: every event of a task reached the router.
    assert fan_in["scheduler"]["events"] >= 3 * 40
    assert 0 < fan_in["scheduler"]["batches"] <= fan_in["scheduler"]["events"]
    assert result["syscalls"] == {} and "skipped" in result["syscalls_note"]


@pytest.mark.processes
def test_count_token_tasks_their_ledger_orders_carved_from_leases(tmp_path):
    """With tokens and the default settings (leases): fewer scheduler-to-ledger requests
    than the per-task protocol's reserve and settle for each task."""
    args = argparse.Namespace(tasks=40, agents=4, workers=2, mode="one", no_strace=True,
                              out=str(tmp_path / "count"), json=None, tokens=100)
    result = run(args)
    assert result["failed"] == 0 and result["tokens"] == 100
    hops = {(r["from"], r["to"], r["type"]): r["messages"] for r in result["routed"]}
    assert 0 < hops[("scheduler", "ledger", "REQUEST")] < 2 * 40
    assert hops[("ledger", "scheduler", "REPLY")] == hops[("scheduler", "ledger", "REQUEST")]
