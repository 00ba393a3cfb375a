"""What the router learns from: the examples file, the typed-task history in a real event
log, and retraining from that history in a training child process."""

from __future__ import annotations

import subprocess
import sys
import time

import orjson
import pytest

from cortex.loadtest.routing_data import labelled_descriptions, split
from cortex.services.runtime.eventlog import EventLogWriter, read_events
from cortex.services.scheduler import classify
from cortex.services.scheduler.classify_rows import (
    RoutingError,
    history_rows,
    read_examples,
    too_little_data,
    training_rows,
)


def write_jsonl(path, rows) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def created(seq: int, task_type: str, description: str, **extra) -> dict:
    """A task.created event as the scheduler emits it."""
    return {"id": f"scheduler:1:{seq}", "source": "scheduler", "epoch": 1, "seq": seq,
            "ts": time.time(), "type": "task.created", "trace": f"t{seq}", "task": f"t{seq}",
            "worker": None, "data": {"type": task_type, "priority": "medium", "tokens": 0,
                                     "agent": "a", "eta": 0.0,
                                     "description": description[:200], **extra}}


def write_events(events_dir, events) -> None:
    with EventLogWriter(events_dir, fsync="off") as writer:
        writer.append(events)


# ---------------------------------------------------------------- the examples file


def test_examples_file_is_read(tmp_path):
    path = tmp_path / "examples.jsonl"
    path.write_text('{"type": "translate", "description": "into French please"}\n\n'
                    '{"type": "bug_fix", "description": "fix the crash", "note": "kept out"}\n')
    assert read_examples(path) == [
        {"type": "translate", "description": "into French please"},
        {"type": "bug_fix", "description": "fix the crash"}]


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('["translate", "x"]', "expected an object"),
    ('{"description": "x"}', "type must be"),
    ('{"type": "auto", "description": "x"}', "not 'auto'"),
    ('{"type": "' + "t" * 65 + '", "description": "x"}', "type must be"),
    ('{"type": "translate", "description": "  "}', "description must be"),
    ('{"type": "translate", "description": 3}', "description must be"),
])
def test_a_bad_examples_line_is_named(tmp_path, line, message):
    path = tmp_path / "examples.jsonl"
    path.write_text('{"type": "translate", "description": "fine"}\n' + line + "\n")
    with pytest.raises(RoutingError, match=message) as info:
        read_examples(path)
    assert info.value.code == "bad_examples" and f"{path}:2" in str(info.value)


def test_a_missing_examples_file_is_reported(tmp_path):
    with pytest.raises(RoutingError, match="cannot read examples") as info:
        read_examples(tmp_path / "nope.jsonl")
    assert info.value.code == "bad_examples"


# ---------------------------------------------------------------- the history


def test_history_is_typed_tasks_from_the_event_log(tmp_path):
    write_events(tmp_path / "events", [
        created(1, "translate", "into German"),
        created(2, "translate", "into German again", routing={"chosen": "translate"}),
        created(3, "summarize", ""),  # nothing to learn from
        created(4, "auto", "never a label"),
        {**created(5, "x", "y"), "type": "task.completed"},
        created(6, "summarize", "recap " * 60),  # cut at 200 characters by the scheduler
    ])
    rows = list(history_rows(read_events(tmp_path / "events", type_pattern="task.created")))
    assert rows == [{"type": "translate", "description": "into German"},
                    {"type": "summarize", "description": ("recap " * 60)[:200]}]


def test_history_skips_malformed_events():
    events = [None, {"type": "task.created"}, {"type": "task.created", "data": "x"},
              {"type": "task.created", "data": {"type": 3, "description": "d"}},
              {"type": "task.created", "data": {"type": "a", "description": None}}]
    assert list(history_rows(events)) == []


def test_training_rows_dedupe_cut_and_cap():
    examples = [{"type": "a", "description": "Same words"},
                {"type": "a", "description": "other " * 50}]
    history = [{"type": "a", "description": "same   WORDS"},  # a duplicate of an example
               {"type": "b", "description": "old"}, {"type": "b", "description": "mid"},
               {"type": "b", "description": "new"}, {"type": "a", "description": "newest a"}]
    rows, counts = training_rows(examples, history, per_type_limit=2)
    assert rows == [{"type": "a", "description": "Same words"},
                    {"type": "a", "description": ("other " * 50)[:200]},
                    {"type": "b", "description": "new"}, {"type": "b", "description": "mid"}]
    assert counts == {"examples": 2, "history": 2, "duplicates": 1}


# ---------------------------------------------------------------- retraining from history


def test_retraining_in_a_child_learns_a_type_from_the_history(tmp_path):
    home = tmp_path
    train_rows, held_out = split(labelled_descriptions(600, 3), 500)
    # The examples file knows seven types; write_docs is only ever submitted typed.
    write_jsonl(home / "examples.jsonl", [r for r in train_rows if r["type"] != "write_docs"])
    (home / "cortex.toml").write_text('[routing]\nexamples = "examples.jsonl"\n')
    first = classify.train_from_home(home)
    assert "write_docs" not in first.labels
    assert first.report["sources"]["history"] == 0

    docs = [r for r in train_rows if r["type"] == "write_docs"]
    events = [created(i, r["type"], r["description"]) for i, r in enumerate(docs, 1)]
    # Routed tasks are the router's own guesses: they must not teach it.
    events += [created(1000 + i, "summarize", r["description"], routing={"outcome": "routed"})
               for i, r in enumerate(docs)]
    write_events(home / "events", events)

    done = subprocess.run(
        [sys.executable, "-m", "cortex.services.scheduler.classify", "train", "--home",
         str(home)], capture_output=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    report = orjson.loads(done.stdout)
    assert report["sources"] == {"examples": len(train_rows) - len(docs),
                                 "history": len(docs), "duplicates": 0}
    retrained = classify.load(home / "models")
    assert "write_docs" in retrained.labels and retrained.report == report
    docs_held_out = [r for r in held_out if r["type"] == "write_docs"]
    right = sum(retrained.route(r["description"]).type == "write_docs" for r in docs_held_out)
    assert right >= 0.9 * len(docs_held_out)


def run_main(home, capsys, *args) -> tuple[int, dict]:
    code = classify.main([*args, "--home", str(home)])
    return code, orjson.loads(capsys.readouterr().out)


def test_training_failures_exit_1_with_the_reason(tmp_path, capsys):
    code, out = run_main(tmp_path, capsys, "train")
    assert code == 1 and out["code"] == "too_little_data"
    (tmp_path / "cortex.toml").write_text('[routing]\nexamples = "missing.jsonl"\n')
    code, out = run_main(tmp_path, capsys, "train")
    assert code == 1 and out["code"] == "bad_examples" and "missing.jsonl" in out["reason"]
    (tmp_path / "cortex.toml").write_text("[routing]\nmin_confidence = 2\n")
    code, out = run_main(tmp_path, capsys, "train")
    assert code == 1 and out["code"] == "bad_config"
    (tmp_path / "cortex.toml").unlink()
    code, out = run_main(tmp_path, capsys, "explain", "anything")
    assert code == 1 and out["code"] == "no_model"


def test_explain_entry_uses_the_saved_model(tmp_path, capsys):
    write_jsonl(tmp_path / "examples.jsonl", labelled_descriptions(200, 4))
    (tmp_path / "cortex.toml").write_text('[routing]\nexamples = "examples.jsonl"\n')
    code, report = run_main(tmp_path, capsys, "train")
    assert code == 0 and report["sources"]["examples"] == 200
    code, out = run_main(tmp_path, capsys, "explain", "fix the crash in billing")
    assert code == 0 and out["type"] == "bug_fix" and len(out["types"]) == 3


@pytest.mark.parametrize(("rows", "reason"), [
    ([], "have 0 descriptions, 0 such types"),
    ([{"type": "work", "description": f"job {i}"} for i in range(50)], "1 such types"),
    ([{"type": t, "description": f"job {i}"} for i in range(4) for t in "ab"],
     "0 such types"),  # two types, but too few descriptions of each
    ([{"type": t, "description": f"job {i}"} for i in range(5) for t in "ab"], None),
])
def test_what_rows_can_teach_a_router(rows, reason):
    got = too_little_data(rows)
    assert got == reason if reason is None else reason in got


def test_the_training_child_refuses_one_type_before_it_loads_scikit_learn(tmp_path):
    write_events(tmp_path / "events", [created(i, "work", f"job number {i}")
                                       for i in range(1, 60)])
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cortex.services.scheduler.classify_child",
         "train", "--home", str(tmp_path)], capture_output=True, timeout=300, check=False)
    assert done.returncode == 1
    out = orjson.loads(done.stdout)
    assert out["code"] == "too_little_data" and "1 such types" in out["reason"]
    assert b"sklearn" not in done.stderr  # the import log: it never loaded scikit-learn
    assert not (tmp_path / "models").exists()
