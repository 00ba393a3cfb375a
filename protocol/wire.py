"""The Cortex bus protocol, version 2 (`CX2`): frames, types, codes, checks.

Every message on the bus is a multipart ZeroMQ message of exactly six frames:

    0  tag     b"CX2"                      protocol and version
    1  type    b"HELLO" | b"WELCOME" | ...   see TYPES below
    2  peer    destination name when sent to the broker (a service such as b"scheduler",
               or a peer's name); the broker replaces it with the sender's name on delivery,
               so the receiver replies by sending to that name
    3  role    empty when sent; on delivery the broker puts the sender's role there, as
               fixed (and for services proven) at its HELLO: b"client" | b"worker" |
               b"service" | b"broker". A sender cannot choose it.
    4  corr    correlation id (0-64 bytes, chosen by the requester, echoed by the reply)
    5  body    one msgpack map with str keys (an empty frame means {})

A ROUTER adds the sender's routing id in front. Peers do not choose routing ids: the
broker binds the name a peer gives in its HELLO to the connection it came from, and
routes by name. A name already bound to a live peer is refused to anyone else, and the
service names (SERVICE_NAMES) only go to a peer that proves, with the suite's secret
(a file in the home's run/ directory, readable by its owner alone), that the suite
started it; such a peer takes the name over from a predecessor. Nothing here touches a
socket.

Types and who sends them:
    HELLO      peer -> broker     {"role": "client"|"service"|"worker", "name": str,
                                   "version": 2, "secret": str (services only)}
    WELCOME    broker -> peer     {"heartbeat_ms": int}
    HEARTBEAT  both ways          {} ; any message counts as a sign of life. From the
                                  broker, corr may hold a probe token: echo it at once;
                                  a quiet peer's beat says {"next_ms": int}; a worker's
                                  says {"busy": true} when it took a task since its last
                                  (its calls may go over the scheduler's direct line)
    WHO        broker -> peer     {} ; "I do not know you" (after a broker restart): say HELLO again
    BYE        peer -> broker     {} ; leaving on purpose
    REQUEST    peer -> peer       {"op": str, ...}; exactly one REPLY or ERROR comes back
    REPLY      peer -> peer       result body
    ERROR      any -> peer        {"code": str, "message": str}
    NOTIFY     peer -> peer       {"op": str, ...}; one-way, no reply (dispatch, worker reports)
    EVENTS     publisher -> events router (its own fan-in socket)
                                  {"events": [event, ...], "secret": str}
    ACK        events router -> publisher {"source": str, "epoch": int, "upto": int}

What each operation's body holds, who serves it and who may send it is the operation
catalogue (catalogue.py); services check every body against it before a handler runs.

Liveness (Paranoid Pirate): the broker sends HEARTBEAT to every service and worker every
HEARTBEAT_INTERVAL and each answers it at once with its own (one burst for the broker, not
one wake-up per peer); a peer sends one unprompted only when the broker has been silent
for an interval and a half. A peer not heard from for HEARTBEAT_LIVENESS intervals is dead.
A peer with no call (REQUEST, REPLY or ERROR) to or from it for QUIET_AFTER_BEATS
intervals is quiet (an idle worker: its repeated worker.ready is a NOTIFY): the broker
beats it every QUIET_HEARTBEAT_EVERY intervals instead (`[suite] quiet_heartbeat_every`),
and such a beat's body says when the next comes, {"next_ms": int}; the peer then waits
that long (and a half) before beating unprompted, and both sides allow
HEARTBEAT_LIVENESS of those spacings of silence. A beat without a body means the normal
interval again (the next timed beat after a call to or from the peer).
Clients send no heartbeats and the broker sends them none: it forgets a client silent
for CLIENT_SILENCE seconds, and greets one that speaks again with WHO (the client says
HELLO anew). A client that waits long asks again every few seconds (held task.wait), so
it is heard. A client or worker may have at most MAX_IN_FLIGHT requests waiting for
their replies; the broker answers further ones with `too_many`.

Probes bound in bytes what waits to be sent to a peer. The broker counts the bytes it
sends each peer; on its timed beats (when something was sent since the last probe) and
whenever another step of bytes went out it sends a probe, a HEARTBEAT whose corr is an
unguessable token (PROBE_TOKEN_BYTES random bytes). Every peer, clients too, answers a probe
at once with a HEARTBEAT carrying the same corr; its own heartbeats carry none. A pipe
is FIFO, so the echo proves the peer read all that was sent before the probe. A client
or worker whose unproven bytes pass `[bus] max_unread_mb` is a slow reader: the broker
forgets it (as a lost peer) and closes its connection; its library reconnects and is
greeted with WHO. Unknown or replayed tokens confirm nothing.

Re-sends: a requester that hears nothing re-sends the same REQUEST with the same corr
until its deadline (the client core, calls.py), so every operation must be safe to
receive twice: task.submit by its idempotency key, the rest by being idempotent.

Error codes are stable strings (ERROR_CODES); messages are for humans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgpack

TAG = b"CX2"
VERSION = 2

HELLO = b"HELLO"
WELCOME = b"WELCOME"
HEARTBEAT = b"HEARTBEAT"
WHO = b"WHO"
BYE = b"BYE"
REQUEST = b"REQUEST"
REPLY = b"REPLY"
ERROR = b"ERROR"
NOTIFY = b"NOTIFY"
EVENTS = b"EVENTS"
ACK = b"ACK"
TYPES = frozenset({HELLO, WELCOME, HEARTBEAT, WHO, BYE, REQUEST, REPLY, ERROR, NOTIFY, EVENTS, ACK})

FRAME_COUNT = 6
BROKER = b"broker"  # destination for the broker's own requests
ROLES_DELIVERED = frozenset({b"client", b"worker", b"service", b"broker"})
# Names only a process the suite started may take (it proves it with the suite secret).
SERVICE_NAMES = frozenset({"broker", "scheduler", "ledger", "events", "pool", "dashboard",
                           "supervisor-events"})
MAX_IN_FLIGHT = 64  # requests one peer may have waiting for replies
CLIENT_SILENCE = 60.0  # seconds after which the broker forgets a silent client
PROBE_TOKEN_BYTES = 8  # a broker probe's token (the corr of its HEARTBEAT)

# Seconds between heartbeats, and how many may be missed before a peer is dead.
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_LIVENESS = 3
# A peer with no call to or from it for this many intervals is quiet, and the broker
# beats it every QUIET_HEARTBEAT_EVERY intervals, saying so in the beat: "next_ms".
QUIET_AFTER_BEATS = 2
QUIET_HEARTBEAT_EVERY = 3
MAX_BEAT_SPACING_MS = 600_000  # a larger announced spacing is not believed

# Application limit on a whole message; ZMQ_MAXMSGSIZE is set far above it only as a
# backstop, because libzmq enforces it per frame by silently dropping the connection.
MAX_MESSAGE_BYTES = 1 << 20
MAXMSGSIZE_BACKSTOP = 128 << 20
MAX_NAME_BYTES = 64
MAX_CORR_BYTES = 64
# A `task.submit` with `follow` is answered twice: at once, and when the task ends (as a
# held `task.wait`), the second under the submit's corr with this appended.
FOLLOW_SUFFIX = b"+"
MAX_INT = (1 << 63) - 1

ROLES = frozenset({"client", "service", "worker"})

# Stable error codes and what they mean.
ERROR_CODES = {
    "bad_protocol": "wrong protocol tag or version",
    "bad_request": "malformed frames, body or fields",
    "unknown_type": "unknown message type or operation",
    "too_large": "message above the size limit",
    "unavailable": "destination not connected or not answering",
    "queue_full": "the queue for this task type is full",
    "budget_exceeded": "the token budget cannot cover the request",
    "not_served": "no worker serves this task type (the reason lists the served types)",
    "not_found": "no such task, worker or budget",
    "conflict": "the operation does not apply in the current state",
    "timeout": "no answer within the deadline",
    "rejected": "admission refused the task",
    "unauthorized": "the peer may not do this",
    "too_many": "too many requests of this peer are waiting for replies",
    "no_line": "the scheduler has no direct line (a tcp bus, or no epoll or SEQPACKET)",
    "internal": "the service failed while handling the request",
}


class ProtocolError(Exception):
    """A message that breaks the protocol; `.code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class Message:
    type: bytes
    peer: bytes
    corr: bytes
    body: bytes  # still encoded: only the final receiver pays for decoding
    role: bytes = b""  # the sender's role, stamped by the broker (empty when sent)

    def decoded(self) -> dict:
        return decode_body(self.body)


def _no_ext(code: int, data: bytes):
    raise ProtocolError("bad_request", f"msgpack extension type {code} is not allowed")


def encode_body(body: dict | None) -> bytes:
    return b"" if not body else msgpack.packb(body, use_bin_type=True)


_STR_ONLY = frozenset((str,))  # the key types a body may have (asked in C, not per key)


def decode_body(raw: bytes) -> dict:
    """Decode a body frame: a msgpack map with str keys, nothing else."""
    if not raw:
        return {}
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, UnicodeDecodeError) as e:
        raise ProtocolError("bad_request", f"body is not valid msgpack: {e}") from e
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", "body must be a msgpack map")
    if not _STR_ONLY.issuperset(map(type, body)):  # strict_map_key still allows bytes
        raise ProtocolError("bad_request", "body keys must be strings")
    return body


def json_safe(value, what: str, limit: int) -> int:
    """Check that `value` (a payload or result) can be journaled as JSON and fits `limit`
    bytes; returns its encoded size. Bytes, msgpack Timestamps, non-str keys and integers
    beyond 64 bits are refused here, at the boundary, not later by the journal."""
    import orjson

    try:
        size = len(orjson.dumps(value))
    except (TypeError, orjson.JSONEncodeError) as e:
        raise ProtocolError("bad_request", f"{what} must be plain JSON data: {e}") from e
    if size > limit:
        raise ProtocolError("too_large", f"{what} of {size} bytes exceeds {limit}")
    return size


def frames(type_: bytes, peer: bytes, corr: bytes = b"", body: dict | bytes | None = None,
           role: bytes = b""):
    """Build the six frames of a message; the one place the envelope is stacked."""
    raw = body if isinstance(body, bytes) else encode_body(body)
    return [TAG, type_, peer, role, corr, raw]


def parse(parts: list[bytes]) -> Message:
    """Check the envelope of a received message (after any routing id was removed)."""
    if len(parts) != FRAME_COUNT:
        raise ProtocolError("bad_request", f"expected {FRAME_COUNT} frames, got {len(parts)}")
    tag, type_, peer, role, corr, body = parts
    if tag != TAG:
        raise ProtocolError("bad_protocol", f"unsupported protocol tag {bytes(tag[:16])!r}")
    if type_ not in TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {bytes(type_[:32])!r}")
    size = len(peer) + len(corr) + len(body) + len(role)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message of {size} bytes exceeds {MAX_MESSAGE_BYTES}")
    if len(peer) > MAX_NAME_BYTES or len(corr) > MAX_CORR_BYTES or len(role) > 16:
        raise ProtocolError("bad_request", "peer, role or correlation frame too long")
    return Message(type_, peer, corr, body, role)


def error_body(code: str, message: str) -> dict:
    return {"code": code, "message": message}


def valid_name(name) -> bool:
    """Peer names are routing ids: short, printable ASCII, not starting with NUL."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME_BYTES
        and name.isascii()
        and name.isprintable()
        and " " not in name
    )


# --- field checks: type first (int, not bool), then range -------------------------------

def field_str(body: dict, key: str, *, max_len: int = 4096, required: bool = True,
              default: str | None = None, allow_empty: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ProtocolError("bad_request", f"missing field {key!r}")
        return default
    if not isinstance(value, str):
        raise ProtocolError("bad_request", f"field {key!r} must be a string")
    if not value and not allow_empty:
        raise ProtocolError("bad_request", f"field {key!r} must not be empty")
    if len(value) > max_len:
        raise ProtocolError("bad_request", f"field {key!r} longer than {max_len} characters")
    if "\x00" in value:
        raise ProtocolError("bad_request", f"field {key!r} contains a NUL character")
    return value


def field_int(body: dict, key: str, *, lo: int = 0, hi: int = MAX_INT, required: bool = True,
              default: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ProtocolError("bad_request", f"missing field {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("bad_request", f"field {key!r} must be an integer")
    if not lo <= value <= hi:
        raise ProtocolError("bad_request", f"field {key!r} must be between {lo} and {hi}")
    return value


def field_number(body: dict, key: str, *, lo: float, hi: float, required: bool = True,
                 default: float | None = None) -> float | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ProtocolError("bad_request", f"missing field {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError("bad_request", f"field {key!r} must be a number")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ProtocolError("bad_request", f"field {key!r} must be between {lo} and {hi}")
    return float(value)


def field_choice(body: dict, key: str, choices, *, required: bool = True, default=None):
    value = body.get(key)
    if value is None:
        if required:
            raise ProtocolError("bad_request", f"missing field {key!r}")
        return default
    if not isinstance(value, str) or value not in choices:
        raise ProtocolError(
            "bad_request", f"field {key!r} must be one of {', '.join(sorted(choices))}")
    return value
