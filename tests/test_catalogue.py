"""The operation catalogue: every operation's fields refuse every wrong type with a clean
error, roles and senders are enforced, and the docs table is made from it."""

from __future__ import annotations

import math

import pytest

from cortex.protocol import wire
from cortex.protocol.catalogue import (
    OPERATIONS,
    REPLIES,
    Catalogue,
    ListOf,
    Map,
    check_fields,
    check_reply,
    table,
)

NESTED = [[[[]]]]
for _ in range(300):
    NESTED = [NESTED]
WRONG = {"int for a list": 5, "list for a str": ["x"], "nested 300 deep": NESTED,
         "NaN": math.nan, "2**64": 2**64, "bytes": b"\xff\x00", "negative": -1,
         "bool": True, "map": {"a": 1}, "huge string": "x" * 2_000_000}
SERVICES = sorted({op.service for op in OPERATIONS})


def good_value(kind):
    from cortex.protocol import catalogue as c

    if isinstance(kind, c.Str):
        return "x"
    if isinstance(kind, c.Name):
        return "peer-1"
    if isinstance(kind, c.Int):
        return max(kind.lo, min(kind.hi, 1))
    if isinstance(kind, c.Num):
        return max(kind.lo, min(kind.hi, 1.0))
    if isinstance(kind, c.Bool):
        return True
    if isinstance(kind, c.Choice):
        return kind.choices[0]
    if isinstance(kind, c.Json):
        return {"k": [1, 2]}
    if isinstance(kind, ListOf):
        return [good_value(kind.item)] * max(1, kind.min_items)
    if isinstance(kind, Map):
        return {f.name: good_value(f.kind) for f in kind.fields}
    if isinstance(kind, c.Batch):  # its items are checked one by one by the handler
        return [{f.name: good_value(f.kind) for f in kind.fields}]
    raise AssertionError(kind)


def good_body(op) -> dict:
    return {"op": op.name, **{f.name: good_value(f.kind) for f in op.fields}}


def role_for(op) -> tuple[str, str]:
    role = sorted(op.roles)[0]
    return role, (sorted(op.senders)[0] if op.senders else "peer-1")


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: f"{op.service}:{op.name}")
def test_every_operation_accepts_its_good_body(op):
    role, sender = role_for(op)
    found, checked = Catalogue(op.service).check(op.type, good_body(op), role, sender)
    assert found is op and set(checked) == {f.name for f in op.fields}


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: f"{op.service}:{op.name}")
def test_every_field_refuses_every_wrong_type_cleanly(op):
    role, sender = role_for(op)
    cat = Catalogue(op.service)
    for f in op.fields:
        for label, wrong in WRONG.items():
            body = good_body(op) | {f.name: wrong}
            try:
                _, checked = cat.check(op.type, body, role, sender)
            except wire.ProtocolError as e:
                assert e.code in ("bad_request", "too_large"), (f.name, label, e.code)
                assert f.name in e.message, (f.name, label, e.message)
            else:  # accepted: a value of the field's own kind (a map: its known keys)
                if isinstance(f.kind, Map):
                    assert isinstance(checked[f.name], dict), (op.name, f.name, label)
                else:
                    assert checked[f.name] == wrong, (op.name, f.name, label)


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: f"{op.service}:{op.name}")
def test_roles_and_senders_are_enforced(op):
    cat = Catalogue(op.service)
    for role in ("client", "worker", "service", "broker"):
        for sender in ("scheduler", "pool", "broker", "client-x"):
            allowed = role in op.roles and (not op.senders or sender in op.senders)
            if allowed:
                cat.check(op.type, good_body(op), role, sender)
            else:
                with pytest.raises(wire.ProtocolError) as e:
                    cat.check(op.type, good_body(op), role, sender)
                assert e.value.code == "unauthorized"


def test_what_a_client_may_not_do():
    for service, type_, op in (("pool", wire.NOTIFY, "pool.kill"),
                               ("pool", wire.NOTIFY, "pool.scale"),
                               ("scheduler", wire.NOTIFY, "peer.lost"),
                               ("scheduler", wire.NOTIFY, "worker.ready"),
                               ("scheduler", wire.REQUEST, "task.finished"),
                               ("worker", wire.NOTIFY, "task.run")):
        with pytest.raises(wire.ProtocolError) as e:
            Catalogue(service).check(type_, {"op": op}, "client", "client-x")
        assert e.value.code == "unauthorized", op


@pytest.mark.parametrize("service", SERVICES)
def test_unknown_operations_and_op_values(service):
    cat = Catalogue(service)
    for op in ("nope", 5, None, ["task.submit"], "x" * 10_000):
        with pytest.raises(wire.ProtocolError) as e:
            cat.check(wire.REQUEST, {"op": op}, "client", "c")
        assert e.value.code == "unknown_type" and len(e.value.message) < 200


def test_unknown_fields_are_dropped_and_defaults_filled():
    _, body = Catalogue("scheduler").check(wire.REQUEST, {
        "op": "task.submit", "type": "echo", "idempotency_key": "k", "_size": 9,
        "evil": {"x": 1}}, "client", "c")
    assert "evil" not in body and "_size" not in body
    assert body["priority"] == "medium" and body["tokens"] == 0 and body["wait"] == 0.0


def test_replies_are_checked():
    assert check_reply("broker.peers", {"peers": [{"name": "w-1", "role": "worker"}]}) == {
        "peers": [{"name": "w-1", "role": "worker"}]}
    with pytest.raises(wire.ProtocolError):
        check_reply("broker.peers", {"peers": [1]})
    assert set(REPLIES) >= {"broker.peers"}


def test_the_docs_table_lists_every_operation():
    rows = table()
    assert len(rows) == 2 + len(OPERATIONS)
    assert all(f"`{op.name}`" in "\n".join(rows) for op in OPERATIONS)


def test_nested_maps_name_the_inner_field():
    with pytest.raises(wire.ProtocolError) as e:
        Catalogue("worker").check(wire.NOTIFY, {"op": "task.run", "task": {
            "id": "t1", "attempt": "one", "type": "echo"}}, "service", "scheduler")
    assert "task.attempt" in e.value.message
    assert check_fields((), {"x": 1}) == {}


def test_the_protocol_readme_shows_the_catalogue_as_it_is():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "protocol" / "README.md").read_text()
    start = readme.index("<!-- operations: generated from catalogue.py -->\n")
    end = readme.index("<!-- end of operations -->")
    shown = readme[start:end].splitlines()[1:]
    assert shown == table(), "regenerate the table in protocol/README.md"
