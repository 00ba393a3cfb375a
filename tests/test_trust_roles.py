"""Roles on a live suite: a client (or a worker) cannot give the orders kept for the
suite's own processes, cannot write events, cannot take a service's name; a real
external `Worker` still takes and finishes tasks."""

from __future__ import annotations

import threading

import pytest
import zmq

from cortex.protocol import Client, Worker, wire
from cortex.protocol.peer import make_socket, unique_name

from .conftest import jsonl_events_of, wait_for
from .trust_peers import RawPeer


@pytest.fixture
def client(shared_suite):
    peer = RawPeer(shared_suite.home, "client")
    yield peer
    peer.close()


def bad_messages(peer: RawPeer, service: str) -> int:
    kind, body = peer.request(service, {"op": f"{service}.status"})
    assert kind == wire.REPLY, body
    return body["bad_messages"]


def a_worker(suite) -> dict:
    with Client(suite.home, timeout=30) as c:
        return wait_for(lambda: [w for w in c.workers() if w["state"] == "idle"], 60,
                        "an idle worker")[0]


def still_serves(suite) -> None:
    with Client(suite.home, timeout=30) as c:
        done = c.submit_and_wait("echo", "still here", payload=[1], timeout=60)
        assert (done["state"], done["result"]) == ("completed", [1])


@pytest.mark.parametrize("role", ["client", "worker"])
def test_no_client_or_worker_can_kill_a_worker_or_say_it_was_lost(shared_suite, role):
    peer = RawPeer(shared_suite.home, role)
    try:
        worker = a_worker(shared_suite)
        pool_bad, scheduler_bad = bad_messages(peer, "pool"), bad_messages(peer, "scheduler")
        peer.notify("pool", {"op": "pool.kill", "worker": worker["name"], "grace": 0})
        peer.notify("pool", {"op": "peer.lost", "name": worker["name"], "role": "worker"})
        peer.notify("scheduler", {"op": "peer.lost", "name": worker["name"],
                                  "role": "worker"})
        # Each is refused (counted) by the service it was sent to.
        wait_for(lambda: bad_messages(peer, "pool") >= pool_bad + 2, 30, "pool refusals")
        wait_for(lambda: bad_messages(peer, "scheduler") >= scheduler_bad + 1, 30,
                 "scheduler refusal")
        with Client(shared_suite.home, timeout=30) as c:
            names = {w["name"]: w for w in c.workers()}
            assert worker["name"] in names and names[worker["name"]]["state"] != "leaving"
            kind, pool = peer.request("pool", {"op": "pool.status"})
        procs = pool.get("workers") or pool.get("children") or []
        assert any(worker["name"] in str(p) for p in procs), pool
    finally:
        peer.close()
    still_serves(shared_suite)


def test_a_client_cannot_register_as_a_worker_nor_report_a_task(shared_suite, client):
    before = bad_messages(client, "scheduler")
    client.notify("scheduler", {"op": "worker.ready", "types": ["echo"], "pid": 1})
    kind, body = client.request("scheduler", {"op": "task.finished", "id": "x", "attempt": 1,
                                              "ok": True})
    assert (kind, body["code"]) == (wire.ERROR, "unauthorized")
    wait_for(lambda: bad_messages(client, "scheduler") >= before + 2, 30, "refusals")
    with Client(shared_suite.home, timeout=30) as c:
        assert client.name not in {w["name"] for w in c.workers()}
    still_serves(shared_suite)


def test_a_client_cannot_send_events_on_the_bus_or_the_fan_in(shared_suite, client):
    marker = unique_name("forged")
    event = {"id": f"{marker}:1:1", "source": marker, "epoch": 1, "seq": 1, "ts": 1.0,
             "type": "task.completed", "task": marker, "worker": None, "trace": None,
             "data": {}}
    kind, body = client.request("events", {"op": "events.status"})
    unauthorized = body["unauthorized"]
    # On the bus: the broker routes no EVENTS.
    client.socket.send_multipart(wire.frames(wire.EVENTS, b"events", b"ev",
                                             {"events": [event]}))
    reply = client.receive(lambda m: m.type == wire.ERROR and m.corr == b"ev", 30)
    assert reply.decoded()["code"] == "unknown_type"
    # On the fan-in: without the suite's secret, or with a wrong one, nothing is taken.
    fan_in = make_socket(zmq.Context.instance(), zmq.DEALER)
    try:
        fan_in.connect(f"ipc://{shared_suite.home}/run/events-in.sock")
        for extra in ({}, {"secret": "0" * 64}, {"secret": 5}):
            fan_in.send_multipart(wire.frames(wire.EVENTS, b"events", b"",
                                              {"events": [event], **extra}))

        def refused():
            _, now = client.request("events", {"op": "events.status"})
            return now["unauthorized"] >= unauthorized + 3
        wait_for(refused, 30, "the fan-in's refusals")
        assert fan_in.poll(0) == 0  # and no ACK: a publisher it does not know
    finally:
        fan_in.close(linger=0)
    still_serves(shared_suite)  # events written after the forgery: the log is flushed
    assert not [e for e in jsonl_events_of(shared_suite.home) if e.get("task") == marker]


@pytest.mark.parametrize("role, name, secret, why", [
    ("client", "scheduler", False, "kept for the suite"),
    ("worker", "pool", False, "kept for the suite"),
    ("service", "trust-svc", False, "kept for the suite"),
    ("client", "broker", False, "kept for the suite"),
])
def test_no_peer_without_the_secret_takes_a_service_name_or_role(shared_suite, role, name,
                                                                 secret, why):
    peer = RawPeer(shared_suite.home, role, name=name, secret=secret)
    try:
        assert peer.welcome["type"] == "ERROR", peer.welcome
        assert (peer.welcome["code"], why in peer.welcome["message"]) == ("unauthorized", True)
    finally:
        peer.close()
    still_serves(shared_suite)


def test_a_wrong_secret_proves_nothing_and_a_live_name_is_not_taken(shared_suite, client):
    forger = RawPeer(shared_suite.home, "client", name=unique_name("forger"))
    forger.secret = "f" * 64
    forger.role = "service"
    forger.name = "scheduler"
    try:
        answer = forger.hello()
        assert (answer["type"], answer["code"]) == ("ERROR", "unauthorized")
    finally:
        forger.close()
    twin = RawPeer(shared_suite.home, "client", name=client.name)
    try:
        assert (twin.welcome["type"], twin.welcome["code"]) == ("ERROR", "unauthorized")
        assert "in use" in twin.welcome["message"]
    finally:
        twin.close()
    kind, _ = client.request("scheduler", {"op": "scheduler.status"})  # still its own
    assert kind == wire.REPLY
    still_serves(shared_suite)


def test_a_real_external_worker_still_takes_and_finishes_tasks(shared_suite):
    seen = []

    def shout(ctx):
        seen.append(ctx.id)
        ctx.progress(0.5, "half")
        return {"loud": str(ctx.payload["text"]).upper()}

    name = unique_name("ext-worker")
    worker = Worker("trust-shout", shout, home=shared_suite.home, name=name,
                    install_signals=False)
    thread = threading.Thread(target=worker.run, name="external-worker")
    thread.start()
    try:
        with Client(shared_suite.home, timeout=30) as c:
            # The scheduler refuses a type no registered worker serves: wait for ours.
            wait_for(lambda: any(w["name"] == name for w in c.workers()), 60,
                     "the external worker registered")
            done = c.submit_and_wait("trust-shout", "external", payload={"text": "hi"},
                                     timeout=60)
        assert (done["state"], done["result"]) == ("completed", {"loud": "HI"})
        assert seen == [done["id"]]
    finally:
        worker.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()
