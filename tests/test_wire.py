"""Pure unit tests of the protocol: body codec, envelope, field checks, error codes (the
client core's own are in test_client_calls.py). No sockets, no processes."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.protocol import errors, wire

ROOT = Path(__file__).resolve().parent.parent


def code_of(call, *args, **kwargs) -> str:
    with pytest.raises(wire.ProtocolError) as info:
        call(*args, **kwargs)
    assert info.value.code in wire.ERROR_CODES
    return info.value.code


# --- body codec ---------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    {"op": "task.submit", "n": 1},
    {"nested": {"a": [1, 2, {"b": None}], "c": {"d": {"e": True}}}},
    {"text": "résumé ✓ 你好 🚀", "ключ": "значение"},
    {"blob": b"\x00\xff\x80binary", "empty": b""},
    {"big": wire.MAX_INT, "neg": -(1 << 63), "f": 1.5, "t": True, "f2": False},
    {"list": [], "map": {}},
], ids=["flat", "nested", "unicode", "bytes", "numbers", "empty_containers"])
def test_body_round_trip(body):
    assert wire.decode_body(wire.encode_body(body)) == body


def test_empty_body_is_an_empty_frame_both_ways():
    assert wire.encode_body(None) == b""
    assert wire.encode_body({}) == b""
    assert wire.decode_body(b"") == {}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_any_str_keyed_map_round_trips(body):
    assert wire.decode_body(wire.encode_body(body)) == body


@pytest.mark.parametrize("raw", [
    b"\xc1",  # the one never-used msgpack byte
    b"\x81\xa1a",  # map of one whose value is missing
    b"\x81\xa1a\x01\x01",  # extra data after the map
    b"not msgpack at all { json }",
    b"\xdf\xff\xff\xff\xff",  # a map header claiming 4 billion entries
    b"\x91" * 3000 + b"\x80",  # nesting deeper than the unpacker's stack
], ids=["reserved_byte", "truncated", "extra_data", "text", "huge_header", "too_deep"])
def test_decode_rejects_non_msgpack(raw):
    assert code_of(wire.decode_body, raw) == "bad_request"


@pytest.mark.parametrize("value", [[1, 2], "str", 7, None, b"bin", 1.5],
                         ids=["array", "str", "int", "nil", "bin", "float"])
def test_decode_rejects_a_body_that_is_not_a_map(value):
    assert code_of(wire.decode_body, msgpack.packb(value, use_bin_type=True)) == "bad_request"


@pytest.mark.parametrize("key", [1, 1.5, None, True],
                         ids=["int", "float", "nil", "bool"])
def test_decode_rejects_non_string_map_keys(key):
    assert code_of(wire.decode_body, msgpack.packb({key: 1})) == "bad_request"


@pytest.mark.parametrize("body", [{b"op": "x"}], ids=["top_level"])
def test_decode_rejects_bytes_map_keys(body):
    assert code_of(wire.decode_body, msgpack.packb(body, use_bin_type=True)) == "bad_request"


@pytest.mark.parametrize("value", [{b"k": 1}, msgpack.Timestamp(1, 0), b"raw"],
                         ids=["bytes_key", "timestamp", "bytes"])
def test_nested_values_the_journal_cannot_hold_are_refused_by_json_safe(value):
    # decode_body checks the top level only (a full walk would tax every message); values
    # that go on to a journal (payloads, results) pass json_safe at the service boundary.
    assert code_of(wire.json_safe, value, "payload", 1 << 20) == "bad_request"


@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
def test_decode_rejects_ext_types(nested):
    ext = msgpack.ExtType(5, b"data")
    raw = msgpack.packb({"a": {"b": [ext]}} if nested else {"a": ext})
    assert code_of(wire.decode_body, raw) == "bad_request"


def test_timestamp_ext_is_refused_by_the_field_checks():
    # msgpack decodes the Timestamp extension itself (ext_hook never sees it); no field
    # check accepts one, so it ends as bad_request there.
    body = wire.decode_body(msgpack.packb({"at": msgpack.Timestamp(1_700_000_000, 0)}))
    assert code_of(wire.field_number, body, "at", lo=0, hi=1e12) == "bad_request"


def test_decode_rejects_invalid_utf8_in_a_str():
    # fixstr of length 2 holding bytes that are not UTF-8.
    assert code_of(wire.decode_body, b"\x81\xa1k\xa2\xff\xfe") == "bad_request"
    assert code_of(wire.decode_body, b"\x81\xa2\xff\xfe\x01") == "bad_request"  # as a key


def test_decode_keeps_the_cause():
    with pytest.raises(wire.ProtocolError) as info:
        wire.decode_body(b"\xc1")
    assert info.value.__cause__ is not None


# --- envelope -----------------------------------------------------------------------------

def test_frames_stacks_the_six_frame_envelope():
    parts = wire.frames(wire.REQUEST, b"scheduler", b"c1", {"op": "x"})
    assert len(parts) == wire.FRAME_COUNT == 6
    assert parts[:5] == [wire.TAG, wire.REQUEST, b"scheduler", b"", b"c1"]
    assert wire.decode_body(parts[5]) == {"op": "x"}
    assert wire.frames(wire.NOTIFY, b"w", role=b"service")[3] == b"service"


def test_frames_passes_an_encoded_body_through_and_empty_body_is_empty():
    assert wire.frames(wire.REPLY, b"p", b"", b"\x80")[5] == b"\x80"
    assert wire.frames(wire.HEARTBEAT, b"p")[3:] == [b"", b"", b""]


@pytest.mark.parametrize("type_", sorted(wire.TYPES))
def test_parse_accepts_every_type_and_round_trips(type_):
    msg = wire.parse(wire.frames(type_, b"peer", b"corr", {"k": "v"}))
    assert (msg.type, msg.peer, msg.corr, msg.decoded()) == (type_, b"peer", b"corr",
                                                               {"k": "v"})


@pytest.mark.parametrize("count", [0, 1, 4, 5, 7, 10])
def test_parse_wrong_frame_count_is_bad_request(count):
    parts = (wire.frames(wire.REQUEST, b"p", b"c", {}) * 2)[:count]
    assert code_of(wire.parse, parts) == "bad_request"


@pytest.mark.parametrize("tag", [b"CX1", b"CX3", b"cx2", b"", b"CX2 ", b"ZMQ"])
def test_parse_wrong_tag_is_bad_protocol(tag):
    assert code_of(wire.parse, [tag, wire.HELLO, b"", b"", b"", b""]) == "bad_protocol"


def test_parse_checks_the_tag_before_the_type():
    assert code_of(wire.parse, [b"XX", b"NOPE", b"", b"", b"", b""]) == "bad_protocol"


@pytest.mark.parametrize("type_", [b"hello", b"", b"PING", b"REQUEST\x00", b"X" * 1000])
def test_parse_unknown_type_is_unknown_type(type_):
    assert code_of(wire.parse, [wire.TAG, type_, b"", b"", b"", b""]) == "unknown_type"


def test_parse_accepts_exactly_the_size_limit():
    body = b"x" * (wire.MAX_MESSAGE_BYTES - 10)
    msg = wire.parse([wire.TAG, wire.NOTIFY, b"peer", b"", b"corr01", body])
    assert len(msg.peer) + len(msg.corr) + len(msg.body) == wire.MAX_MESSAGE_BYTES


def test_parse_one_byte_above_the_size_limit_is_too_large():
    body = b"x" * (wire.MAX_MESSAGE_BYTES - 9)
    assert code_of(wire.parse, [wire.TAG, wire.NOTIFY, b"peer", b"", b"corr01", body]) \
        == "too_large"


def test_parse_size_counts_peer_and_corr_frames_too():
    body = b"x" * wire.MAX_MESSAGE_BYTES
    wire.parse([wire.TAG, wire.NOTIFY, b"", b"", b"", body])
    assert code_of(wire.parse, [wire.TAG, wire.NOTIFY, b"p", b"", b"", body]) == "too_large"
    assert code_of(wire.parse, [wire.TAG, wire.NOTIFY, b"", b"", b"c", body]) == "too_large"
    assert code_of(wire.parse, [wire.TAG, wire.NOTIFY, b"", b"x", b"", body]) == "too_large"


@pytest.mark.parametrize("peer,corr", [
    (b"p" * (wire.MAX_NAME_BYTES + 1), b""),
    (b"", b"c" * (wire.MAX_CORR_BYTES + 1)),
], ids=["long_peer", "long_corr"])
def test_parse_long_peer_or_corr_is_bad_request(peer, corr):
    assert code_of(wire.parse, [wire.TAG, wire.REQUEST, peer, b"", corr, b""]) == "bad_request"
    assert code_of(wire.parse, [wire.TAG, wire.REQUEST, b"", b"r" * 17, b"", b""]) \
        == "bad_request"


def test_parse_peer_and_corr_at_their_limits_pass():
    msg = wire.parse([wire.TAG, wire.REQUEST, b"p" * wire.MAX_NAME_BYTES, b"",
                      b"c" * wire.MAX_CORR_BYTES, b""])
    assert msg.decoded() == {}


def test_parse_does_not_decode_the_body():
    msg = wire.parse([wire.TAG, wire.REQUEST, b"p", b"", b"c", b"\xc1"])  # only decoded() checks
    assert code_of(msg.decoded) == "bad_request"


# --- field checks -------------------------------------------------------------------------

def test_field_str_returns_the_value():
    assert wire.field_str({"k": "v"}, "k") == "v"


@pytest.mark.parametrize("body", [{}, {"k": None}], ids=["absent", "nil"])
def test_field_str_missing_required_is_bad_request(body):
    assert code_of(wire.field_str, body, "k") == "bad_request"


def test_field_str_missing_optional_gives_the_default():
    assert wire.field_str({}, "k", required=False) is None
    assert wire.field_str({}, "k", required=False, default="d") == "d"


@pytest.mark.parametrize("value", [1, 1.5, True, b"bytes", ["a"], {"a": 1}])
def test_field_str_wrong_type_is_bad_request(value):
    assert code_of(wire.field_str, {"k": value}, "k") == "bad_request"


def test_field_str_empty_is_refused_unless_allowed():
    assert code_of(wire.field_str, {"k": ""}, "k") == "bad_request"
    assert wire.field_str({"k": ""}, "k", allow_empty=True) == ""


def test_field_str_length_limit_is_inclusive():
    assert wire.field_str({"k": "x" * 10}, "k", max_len=10) == "x" * 10
    assert code_of(wire.field_str, {"k": "x" * 11}, "k", max_len=10) == "bad_request"


def test_field_str_default_limit_is_4096():
    assert wire.field_str({"k": "é" * 4096}, "k") == "é" * 4096
    assert code_of(wire.field_str, {"k": "x" * 4097}, "k") == "bad_request"


@pytest.mark.parametrize("value", ["\x00", "a\x00b", "abc\x00"])
def test_field_str_nul_is_bad_request(value):
    assert code_of(wire.field_str, {"k": value}, "k") == "bad_request"


def test_field_int_returns_the_value():
    assert wire.field_int({"k": 0}, "k") == 0
    assert wire.field_int({"k": wire.MAX_INT}, "k") == wire.MAX_INT


@pytest.mark.parametrize("value", [True, False, 1.0, 1.5, math.nan, math.inf, "1", b"1", [1]],
                         ids=["true", "false", "float_whole", "float", "nan", "inf", "str",
                              "bytes", "list"])
def test_field_int_wrong_type_is_bad_request(value):
    assert code_of(wire.field_int, {"k": value}, "k") == "bad_request"


@pytest.mark.parametrize("value", [-1, -(1 << 63), wire.MAX_INT + 1, (1 << 64) - 1],
                         ids=["minus_one", "min_int64", "max_int_plus_one", "max_uint64"])
def test_field_int_out_of_default_range_is_bad_request(value):
    assert code_of(wire.field_int, {"k": value}, "k") == "bad_request"


def test_field_int_after_a_msgpack_round_trip_of_uint64_is_refused():
    body = wire.decode_body(wire.encode_body({"k": (1 << 64) - 1}))
    assert code_of(wire.field_int, body, "k") == "bad_request"


def test_field_int_lo_and_hi_are_inclusive():
    assert wire.field_int({"k": 1}, "k", lo=1, hi=3) == 1
    assert wire.field_int({"k": 3}, "k", lo=1, hi=3) == 3
    assert code_of(wire.field_int, {"k": 0}, "k", lo=1, hi=3) == "bad_request"
    assert code_of(wire.field_int, {"k": 4}, "k", lo=1, hi=3) == "bad_request"
    assert wire.field_int({"k": -5}, "k", lo=-10) == -5


def test_field_int_missing():
    assert code_of(wire.field_int, {}, "k") == "bad_request"
    assert wire.field_int({}, "k", required=False, default=7) == 7


def test_field_number_accepts_ints_and_returns_float():
    value = wire.field_number({"k": 3}, "k", lo=0, hi=10)
    assert value == 3.0 and isinstance(value, float)
    assert wire.field_number({"k": 2.5}, "k", lo=0, hi=10) == 2.5


@pytest.mark.parametrize("value", [True, False, "1.0", b"1", [1.0]],
                         ids=["true", "false", "str", "bytes", "list"])
def test_field_number_wrong_type_is_bad_request(value):
    assert code_of(wire.field_number, {"k": value}, "k", lo=0, hi=10) == "bad_request"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf],
                         ids=["nan", "inf", "minus_inf"])
def test_field_number_non_finite_is_bad_request(value):
    assert code_of(wire.field_number, {"k": value}, "k", lo=-math.inf,
                   hi=math.inf) == "bad_request"


def test_field_number_range_is_inclusive():
    assert wire.field_number({"k": 0}, "k", lo=0, hi=1) == 0.0
    assert wire.field_number({"k": 1}, "k", lo=0, hi=1) == 1.0
    assert code_of(wire.field_number, {"k": -0.001}, "k", lo=0, hi=1) == "bad_request"
    assert code_of(wire.field_number, {"k": 1.001}, "k", lo=0, hi=1) == "bad_request"
    assert code_of(wire.field_number, {"k": 1 << 70}, "k", lo=0, hi=1e11) == "bad_request"


def test_field_number_missing():
    assert code_of(wire.field_number, {}, "k", lo=0, hi=1) == "bad_request"
    assert wire.field_number({}, "k", lo=0, hi=1, required=False, default=0.5) == 0.5


def test_field_choice():
    choices = ("low", "high")
    assert wire.field_choice({"k": "low"}, "k", choices) == "low"
    assert wire.field_choice({}, "k", choices, required=False, default="high") == "high"
    assert code_of(wire.field_choice, {}, "k", choices) == "bad_request"
    for bad in ("LOW", "", "medium", 1, ["low"], b"low", True):
        assert code_of(wire.field_choice, {"k": bad}, "k", frozenset(choices)) == "bad_request"


@pytest.mark.parametrize("name", ["scheduler", "a", "w-1.host_2:x", "n" * wire.MAX_NAME_BYTES])
def test_valid_name_accepts(name):
    assert wire.valid_name(name)


@pytest.mark.parametrize("name", [
    "", "n" * (wire.MAX_NAME_BYTES + 1), "has space", "tab\there", "nl\n", "\x00lead",
    "nul\x00", "é", "\x7f", b"bytes", None, 7,
], ids=["empty", "too_long", "space", "tab", "newline", "leading_nul", "nul", "non_ascii",
        "del", "bytes", "none", "int"])
def test_valid_name_refuses(name):
    assert not wire.valid_name(name)


# --- error codes --------------------------------------------------------------------------

def test_error_body_shape():
    assert wire.error_body("not_found", "no task t1") == {"code": "not_found",
                                                          "message": "no task t1"}


def test_error_codes_are_snake_case_and_described():
    for code, meaning in wire.ERROR_CODES.items():
        assert code.isidentifier() and code.islower(), code
        assert meaning and isinstance(meaning, str)


# Calls that carry an error code as a positional string argument.
CODE_CALLS = {"ProtocolError", "error_body", "error", "_reject"}


def _codes_in_source() -> set[str]:
    """Every code-like string literal (a lowercase identifier) passed to a call that
    carries an error code, in protocol/ and services/."""
    found = set()
    for path in [*ROOT.joinpath("protocol").glob("*.py"),
                 *ROOT.joinpath("services").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if path.name == "admission.py" and isinstance(node, ast.Return) \
                    and isinstance(node.value, ast.Tuple) \
                    and len(node.value.elts) == 2 and isinstance(node.value.elts[0], ast.Constant) \
                    and isinstance(node.value.elts[0].value, str) \
                    and node.value.elts[0].value.isidentifier() \
                    and node.value.elts[0].value.islower():
                found.add(node.value.elts[0].value)  # admission's refusal: (code, why)
                continue
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue  # (code, message) at least: not some other ProtocolError class
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(getattr(func, "value", None), "id", "")
            if name not in CODE_CALLS or (name == "error" and owner != "fx"):
                continue  # log.error and friends
            found.update(arg.value for arg in node.args
                         if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                         and arg.value.isidentifier() and arg.value.islower())
    return found


def test_every_error_code_raised_in_the_source_is_listed():
    codes = _codes_in_source()
    assert {"bad_request", "not_found", "queue_full"} <= codes  # the scan sees them
    assert codes <= set(wire.ERROR_CODES), codes - set(wire.ERROR_CODES)


def test_protocol_error_carries_code_and_message():
    e = wire.ProtocolError("conflict", "no")
    assert (e.code, e.message, str(e)) == ("conflict", "no", "no")


# --- errors.from_reply --------------------------------------------------------------------

EXPECTED_CLASS = {
    "bad_request": errors.BadRequest,
    "unavailable": errors.Unavailable,
    "timeout": errors.Timeout,
    "not_found": errors.NotFound,
    "queue_full": errors.QueueFull,
    "rejected": errors.Rejected,
    "budget_exceeded": errors.BudgetExceeded,
}


@pytest.mark.parametrize("code", sorted(wire.ERROR_CODES))
def test_from_reply_maps_every_code(code):
    body = wire.error_body(code, f"about {code}")
    exc = errors.from_reply(body)
    assert type(exc) is EXPECTED_CLASS.get(code, errors.CortexError)
    assert isinstance(exc, errors.CortexError)
    assert exc.code == code
    assert str(exc) == f"about {code}"
    assert exc.details == body


def test_every_typed_error_code_is_a_wire_code():
    assert set(errors._BY_CODE) <= set(wire.ERROR_CODES)
    assert errors.TaskFailed.code not in wire.ERROR_CODES  # client-side only


def test_from_reply_unknown_and_missing_code():
    exc = errors.from_reply({"code": "martian", "message": "?"})
    assert type(exc) is errors.CortexError and exc.code == "martian"
    exc = errors.from_reply({})
    assert type(exc) is errors.CortexError and exc.code == "internal" and str(exc) == "internal"


def test_from_reply_non_string_fields_do_not_break_it():
    exc = errors.from_reply({"code": 404, "message": None})
    assert exc.code == "404" and str(exc) == "None"


def test_cortex_error_class_code_is_not_shared_between_instances():
    a = errors.CortexError("x", code="conflict")
    b = errors.CortexError("y")
    assert (a.code, b.code) == ("conflict", "internal")
