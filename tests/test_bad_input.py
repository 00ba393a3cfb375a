"""Bad input over the wire gets an error with its code, and the services keep serving."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from cortex.protocol import Client, wire
from cortex.protocol.peer import make_socket, unique_name


@pytest.fixture
def raw(shared_suite):
    """A raw DEALER on the bus, so we can send what the client library never would."""
    ctx = zmq.Context.instance()
    sock = make_socket(ctx, zmq.DEALER)
    sock.connect(f"ipc://{shared_suite.home}/run/bus.sock")
    sock.send_multipart(wire.frames(wire.HELLO, wire.BROKER, b"", {
        "role": "client", "name": unique_name("raw-tester"), "version": wire.VERSION}))
    yield sock
    sock.close(linger=0)


def exchange(sock, parts, corr=None, timeout=10.0):
    """Send `parts`; return the first ERROR/REPLY (matching corr when given)."""
    sock.send_multipart(parts)
    while sock.poll(timeout * 1000):
        msg = wire.parse(sock.recv_multipart())
        if msg.type in (wire.ERROR, wire.REPLY) and (corr is None or msg.corr == corr):
            return msg.type, msg.decoded()
    raise AssertionError("no reply")


def submit_frames(corr: bytes, **fields) -> list:
    body = {"op": "task.submit", "type": "echo", "idempotency_key": corr.hex(), **fields}
    return wire.frames(wire.REQUEST, b"scheduler", corr, body)


def still_serves(suite) -> None:
    with Client(suite.home, timeout=20) as c:
        task = c.submit("echo", "still here", payload="ok")
        assert c.wait(task["id"], timeout=20)["result"] == "ok"


@pytest.mark.parametrize("parts, code", [
    ([b"CX9", wire.REQUEST, b"scheduler", b"", b"c1", b""], "bad_protocol"),
    ([wire.TAG, wire.REQUEST, b"scheduler"], "bad_request"),
    ([wire.TAG, b"NONSENSE", b"scheduler", b"", b"c1", b""], "unknown_type"),
    ([wire.TAG, wire.REQUEST, b"scheduler", b"", b"c1", b"\xc1\xff not msgpack"], "bad_request"),
    ([wire.TAG, wire.REQUEST, b"scheduler", b"", b"c1", msgpack.packb({"op": "task.fly"})],
     "unknown_type"),
    ([wire.TAG, wire.REQUEST, b"scheduler", b"", b"c1", msgpack.packb([1, 2])], "bad_request"),
    ([wire.TAG, wire.REQUEST, b"nobody-here", b"", b"c1", msgpack.packb({"op": "x"})],
     "unavailable"),
])
def test_malformed_messages_get_their_code(shared_suite, raw, parts, code):
    kind, body = exchange(raw, parts)
    assert kind == wire.ERROR
    assert body["code"] == code
    still_serves(shared_suite)


def test_hundred_megabyte_frame_is_too_large(shared_suite, raw):
    huge = b"x" * (100 << 20)
    kind, body = exchange(raw, [wire.TAG, wire.REQUEST, b"scheduler", b"", b"big", huge], b"big",
                          timeout=60)
    assert (kind, body["code"]) == (wire.ERROR, "too_large")
    still_serves(shared_suite)


@pytest.mark.parametrize("fields, code", [
    ({"tokens": -5}, "bad_request"),
    ({"tokens": True}, "bad_request"),
    ({"tokens": 2**64 - 1}, "bad_request"),
    ({"tokens": float("nan")}, "bad_request"),
    ({"priority": "urgent"}, "bad_request"),
    ({"description": "nul \x00 inside"}, "bad_request"),
    ({"timeout": float("inf")}, "bad_request"),
    ({"type": ""}, "bad_request"),
    ({"follow": -1}, "bad_request"),
    ({"follow": 61}, "bad_request"),
    ({"follow": "soon"}, "bad_request"),
])
def test_bad_fields_are_refused(shared_suite, raw, fields, code):
    corr = b"f" + str(sorted(fields)).encode()[:40]
    kind, body = exchange(raw, submit_frames(corr, **fields), corr)
    assert (kind, body["code"]) == (wire.ERROR, code), body
    still_serves(shared_suite)


def test_non_utf8_description_is_refused(shared_suite, raw):
    # msgpack str type holding invalid UTF-8 (raw bytes packed as str).
    body = msgpack.packb({"op": "task.submit", "type": "echo", "idempotency_key": "k-utf",
                          "description": "PLACEHOLDER"})
    body = body.replace(b"\xabPLACEHOLDER", b"\xab\xff\xfe\xfdPLACEHO")
    kind, reply = exchange(raw, [wire.TAG, wire.REQUEST, b"scheduler", b"", b"u8", body], b"u8")
    assert (kind, reply["code"]) == (wire.ERROR, "bad_request")
    still_serves(shared_suite)


def test_negative_token_amount_to_ledger_is_refused(shared_suite, raw):
    # The shared suite's other tests may have spent tokens: the refusal changes nothing.
    def spent(c):
        glob = next(b for b in c.budget()["budgets"] if b["scope"] == "global")
        return glob["reserved"], glob["committed"]

    with Client(shared_suite.home) as c:
        before = spent(c)
        body = {"op": "ledger.reserve", "task": "t1", "attempt": 1, "amount": -1}
        kind, reply = exchange(raw, wire.frames(wire.REQUEST, b"ledger", b"neg", body), b"neg")
        assert (kind, reply["code"]) == (wire.ERROR, "bad_request")
        assert spent(c) == before


def test_unicode_is_fine(shared_suite):
    with Client(shared_suite.home) as c:
        task = c.submit("echo", "résumé ✓ 你好 🚀", payload={"t": "ünïcödé"})
        done = c.wait(task["id"], timeout=20)
    assert done["description"] == "résumé ✓ 你好 🚀"
    assert done["result"] == {"t": "ünïcödé"}


def test_client_vanishing_mid_request_harms_nothing(shared_suite):
    ctx = zmq.Context.instance()
    for i in range(20):
        sock = make_socket(ctx, zmq.DEALER)
        sock.connect(f"ipc://{shared_suite.home}/run/bus.sock")
        sock.send_multipart(wire.frames(wire.HELLO, wire.BROKER, b"", {
            "role": "client", "name": f"ghost-{i}", "version": wire.VERSION}))
        sock.send_multipart(wire.frames(wire.REQUEST, b"scheduler", b"w", {
            "op": "task.wait", "id": "t-none", "hold": 5}))
        sock.send_multipart(submit_frames(b"g%d" % i, payload=i))
        sock.close(linger=0)
    still_serves(shared_suite)


def test_client_refuses_oversized_request_itself(shared_suite):
    with Client(shared_suite.home) as c, pytest.raises(Exception) as info:
        c.submit("echo", "big", payload="x" * (2 << 20))
    assert getattr(info.value, "code", None) == "too_large"
