"""run_task: a handler's outcome is always one the worker can send (pure logic)."""

from __future__ import annotations

from types import SimpleNamespace

import msgpack

from cortex.protocol import wire
from cortex.protocol.handling import MAX_OUTCOME_BYTES, TaskMemory, run_task


def ctx():
    return SimpleNamespace(id="t1", type="echo", tokens_used=0, started_at=None)


def sendable(outcome: dict) -> bool:
    body = {"op": "task.finished", "id": "t1", "attempt": 1, "fold": True, **outcome}
    return len(wire.encode_body(body)) <= wire.MAX_MESSAGE_BYTES


def test_a_result_too_large_for_a_message_fails_the_task_with_an_outcome_that_fits():
    outcome = run_task(lambda c: "x" * wire.MAX_MESSAGE_BYTES, ctx(), TaskMemory())
    assert outcome["ok"] is False and outcome["result"] is None
    assert outcome["error"]["category"] == "handler_error"
    assert str(MAX_OUTCOME_BYTES) in outcome["error"]["message"]
    assert sendable(outcome)


def test_a_huge_exception_message_fails_the_task_with_an_outcome_that_fits():
    def handler(c):
        raise RuntimeError("y" * (2 * wire.MAX_MESSAGE_BYTES))

    outcome = run_task(handler, ctx(), TaskMemory())
    assert outcome["ok"] is False and sendable(outcome)


def test_a_result_msgpack_cannot_carry_fails_the_task():
    outcome = run_task(lambda c: {"a set": {1, 2}}, ctx(), TaskMemory())
    assert outcome["ok"] is False and "not serialisable" in outcome["error"]["message"]
    msgpack.packb(outcome)


def test_a_result_that_fits_is_kept_whole():
    result = {"text": "z" * (MAX_OUTCOME_BYTES // 2)}
    outcome = run_task(lambda c: result, ctx(), TaskMemory())
    assert outcome["ok"] is True and outcome["result"] == result and sendable(outcome)


def test_a_task_that_touches_memory_reports_its_growth():
    memory = TaskMemory()

    def grows(c):
        block = bytearray(b"x") * (64 << 20)  # written, so resident
        return len(block)

    outcome = run_task(grows, ctx(), memory)
    assert outcome["ok"] is True
    assert outcome["mem_mb"] >= 48 and outcome["rss_mb"] > 0


def test_short_tasks_read_the_process_status_at_most_once_a_second(monkeypatch):
    memory = TaskMemory()
    reads = []
    real_read = memory._read
    monkeypatch.setattr(memory, "_read", lambda: reads.append(1) or real_read())
    for _ in range(50):
        outcome = run_task(lambda c: None, ctx(), memory)
        assert outcome["mem_mb"] == 0.0 and outcome["rss_mb"] == memory._current > 0
    assert reads == []  # read when it was made, well under a second ago
    memory._read_at -= TaskMemory.READ_EVERY  # a second on: the next short task reads
    run_task(lambda c: None, ctx(), memory)
    assert reads == [1]
