"""The CLI against one shared real suite: the task commands, status, budget, workers and
tail; list filters, bulk cancel, the model-train reason, the events-query truncation
notice, safe text output end to end, logs, lines written in one piece, `tail` through
the client, the terminal views in a pseudo-terminal, and (last, as it stops a service)
the status health check."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid

from cortex.protocol import Client
from cortex.protocol import client as client_module
from cortex.services.cli import app, events
from cortex.services.cli.registry import Exit
from cortex.services.control import SERVICES

from .conftest import short_home, wait_for
from .test_cli_render import HOSTILE, UNSAFE

HOSTILE_TEXT = HOSTILE.replace("\x00", "")  # the wire refuses NUL in strings

CLI = [sys.executable, "-m", "cortex.services.cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = app.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Terminal:
    """A command on a pseudo-terminal (200x60), its output collected as it comes."""

    def __init__(self, argv: list[str]):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, env=env)
        os.close(slave)
        self.master = master
        self.raw = ""

    def read(self) -> str:
        ready, _, _ = select.select([self.master], [], [], 0.2)
        if ready:
            try:
                self.raw += os.read(self.master, 1 << 16).decode(errors="replace")
            except OSError:
                pass  # EIO: the command exited and closed its side
        return self.raw

    def finish(self, timeout: float = 20) -> int:
        """Ctrl-C (as a signal: the command runs in a session of its own), then the rest
        of its output and its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        while select.select([self.master], [], [], 0.2)[0] and self.read_more():
            pass
        return code

    def read_more(self) -> bool:
        before = len(self.raw)
        self.read()
        return len(self.raw) > before

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def test_task_commands_against_a_real_suite(shared_suite, capsys):
    suite = shared_suite
    home = ["--home", suite.home]
    code, out, err = run(capsys, *home, "task", "create", "--type", "simulated_agent",
                         "--description", "write a poem", "--priority", "high",
                         "--tokens", "500", "--payload",
                         '{"tokens": 300, "seconds": 0.05, "steps": 2}')
    assert code == 0, err
    task_id = out.strip()
    assert task_id.startswith("t") and len(out.splitlines()) == 1

    code, out, _ = run(capsys, *home, "task", "wait", task_id, "--timeout", "20")
    assert code == Exit.OK and "completed" in out

    def settled():  # with leases the commit reaches the ledger within 50 ms of the end
        code, out, _ = run(capsys, *home, "task", "show", task_id, "--json")
        shown = json.loads(out) if code == 0 else {}
        return (shown.get("ledger") or {}).get("state") == "committed" and shown

    shown = wait_for(settled, 20, "the ledger's commit of the task")
    assert shown["tokens_used"] == 300 and shown["ledger"]["used"] == 300
    code, out, _ = run(capsys, *home, "task", "show", task_id)
    assert code == 0
    for words in ("write a poem", "high", "completed", "used 300", "granted 500"):
        assert words in out, out

    # --json create returns the whole task; the same key twice is the same task.
    code, out, _ = run(capsys, *home, "task", "create", "--type", "sleep", "-d", "nap",
                       "--payload", '{"seconds": 30}', "--key", "nap-1", "--json")
    nap = json.loads(out)
    assert code == 0 and nap["type"] == "sleep" and nap["priority"] == "medium"
    code, out, _ = run(capsys, *home, "task", "create", "--type", "sleep", "-d", "nap",
                       "--payload", '{"seconds": 30}', "--key", "nap-1")
    assert out.strip() == nap["id"]
    with Client(suite.home, timeout=10) as c:
        wait_for(lambda: c.status(nap["id"])["state"] == "running", 10, "nap running")

    code, out, _ = run(capsys, *home, "task", "list")
    assert code == 0
    header = out.splitlines()[0].split()
    assert header == ["ID", "TYPE", "PRIORITY", "STATE", "ATTEMPT", "WORKER", "WAITING/ETA",
                      "AGE"]
    assert task_id in out and nap["id"] in out
    code, out, _ = run(capsys, *home, "task", "list", "--state", "running", "--json")
    assert [t["id"] for t in json.loads(out)] == [nap["id"]]

    code, out, err = run(capsys, *home, "task", "wait", nap["id"], "--timeout", "0.5")
    assert code == Exit.TIMEOUT and "running" in err and err.count("\n") == 1
    code, out, _ = run(capsys, *home, "task", "cancel", nap["id"])
    assert code == 0 and "cancelled" in out
    code, out, _ = run(capsys, *home, "task", "wait", nap["id"], "--timeout", "10")
    assert code == Exit.FAILED and "cancelled" in out
    code, _, err = run(capsys, *home, "task", "cancel", task_id)
    assert code == Exit.CONFLICT and "completed" in err

    code, out, _ = run(capsys, *home, "task", "create", "--type", "fail", "-d", "boom",
                       "--retries", "0")
    code, out, _ = run(capsys, *home, "task", "wait", out.strip(), "--timeout", "20")
    assert code == Exit.FAILED and "failed" in out and "handler_error" in out

    code, _, err = run(capsys, *home, "task", "show", "t-nope")
    assert code == Exit.NOT_FOUND and err.count("\n") == 1

    # The trace: every step in time order, from the JSONL files.
    def trace_types():
        code, out, _ = run(capsys, *home, "task", "trace", task_id, "--json")
        types = [json.loads(line)["type"] for line in out.splitlines()] if code == 0 else []
        return "ledger.committed" in types and types

    types = wait_for(trace_types, 10, "the task's events in JSONL")
    for expected in ("task.created", "ledger.reserved", "task.dispatched", "task.started",
                     "task.completed", "ledger.committed"):
        assert expected in types
    assert types.index("task.created") < types.index("task.dispatched") < types.index(
        "task.completed")
    code, out, _ = run(capsys, *home, "task", "trace", task_id)
    lines = out.splitlines()
    assert code == 0 and "simulated_agent" in lines[0] and len(lines) == len(types) + 1
    assert lines[1].split()[0] == "+0s" and "task.created" in lines[1]
    assert any("task.dispatched" in line and "worker=w-" in line for line in lines)

    code, out, _ = run(capsys, *home, "events", "query", "--task", task_id, "--type",
                       "task.*", "--json")
    assert code == 0
    assert {json.loads(line)["type"] for line in out.splitlines()} >= {
        "task.created", "task.dispatched", "task.completed"}
    code, out, _ = run(capsys, *home, "events", "query", "--text", "write a poem",
                       "--since", "5m")
    assert code == 0 and "task.created" in out


def test_status_budget_workers_and_tail(shared_suite, capsys):
    suite = shared_suite
    home = ["--home", suite.home]
    with Client(suite.home, timeout=10) as c:
        wait_for(lambda: [w["state"] for w in c.workers()] == ["idle"] * 4, 20,
                 "4 workers registered and idle")
    code, out, err = run(capsys, *home, "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert set(status["services"]) == set(SERVICES)
    for name, row in status["services"].items():
        assert row["state"] == "RUNNING" and row["alive"] and row["pid"] > 0, name
    assert {k: v for k, v in status["workers"]["echo"].items() if v} == {"idle": 4}
    assert set(status["queue"]) == {"critical", "high", "medium", "low"}
    assert "rejected" in status["counters"]
    assert status["budget"]["scope"] == "global" and status["budget"]["limit"] == 100_000_000
    assert {"written", "gaps", "unwritable"} <= set(status["events"])
    code, out, _ = run(capsys, *home, "status")
    assert code == 0 and out.count("alive") == 5 and "queue" in out and "budget" in out

    code, out, _ = run(capsys, *home, "budget", "set", "type:echo", "1000", "--window",
                       "daily")
    assert code == 0 and "limit 1,000" in out and "daily" in out
    code, out, _ = run(capsys, *home, "budget", "set", "type:echo", "2000")  # keeps window
    assert code == 0 and "limit 2,000" in out and "daily" in out
    code, out, _ = run(capsys, *home, "budget", "set", "agent:bob", "unlimited")
    assert code == 0 and "unlimited" in out
    code, out, _ = run(capsys, *home, "budget", "--json")
    budgets = {b["scope"]: b for b in json.loads(out)}
    assert budgets["type:echo"]["limit"] == 2000 and budgets["type:echo"]["window"] == "daily"
    assert budgets["agent:bob"]["limit"] is None
    code, out, _ = run(capsys, *home, "budget")
    assert code == 0 and out.splitlines()[0].split()[:4] == ["SCOPE", "LIMIT", "RESERVED",
                                                             "LEASED"]
    assert budgets["global"]["leased"] >= 0 and "leased" in budgets["type:echo"]
    assert "type:echo" in out and "2,000" in out
    code, _, err = run(capsys, *home, "budget", "set", "nonsense", "5")
    assert code == Exit.USAGE and "scope" in err and err.count("\n") == 1

    code, out, _ = run(capsys, *home, "workers", "--json")
    workers = json.loads(out)
    assert code == 0 and len(workers) == 4
    assert all(w["pid"] and w["state"] == "idle" and "rss_mb" in w for w in workers)

    # tail --json in a real process: it sees a task created meanwhile.
    tail = subprocess.Popen([*CLI, *map(str, home), "tail", "--json", "--type", "task.c",
                             "--count", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        with Client(suite.home, timeout=10) as c:
            deadline = time.monotonic() + 20
            while tail.poll() is None and time.monotonic() < deadline:
                c.submit("echo", "for the tail")  # until the tail has subscribed
                try:
                    tail.wait(0.3)
                except subprocess.TimeoutExpired:
                    pass
        out, err = tail.communicate(timeout=5)
    finally:
        tail.kill()
        tail.wait()
    assert tail.returncode == 0, err
    event = json.loads(out.splitlines()[0])
    assert event["type"] == "task.created" and event["data"]["description"] == "for the tail"

    # --last, then Ctrl-C: exit 0, readable lines.
    tail = subprocess.Popen([*CLI, *map(str, home), "tail", "--last", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: tail.stdout.readline().strip(), 10, "recent events from tail")
        tail.send_signal(signal.SIGINT)
        out, err = tail.communicate(timeout=10)
    finally:
        tail.kill()
        tail.wait()
    assert tail.returncode == 0 and "Traceback" not in err


def test_task_list_filters_by_type_and_agent(shared_suite, capsys):
    home = ["--home", shared_suite.home]
    alice, bob = unique("alice"), unique("bob")
    with Client(shared_suite.home, timeout=10) as c:
        mine = {(agent, kind): [c.submit(kind, f"{kind} of {agent}", agent=agent,
                                         payload={"seconds": 0.01})["id"] for _ in range(2)]
                for agent in (alice, bob) for kind in ("echo", "sleep")}
        for ids in mine.values():
            for task_id in ids:
                c.wait(task_id, timeout=30)
        body = {"agent": alice, "limit": 1}
        filtered_by_scheduler = "truncated" in c.call("scheduler", "task.list", body)
    code, out, err = run(capsys, *home, "task", "list", "--type", "sleep", "--agent", alice,
                         "--json")
    assert code == 0, err
    assert sorted(t["id"] for t in json.loads(out)) == sorted(mine[(alice, "sleep")])
    code, out, _ = run(capsys, *home, "task", "list", "--agent", bob)
    assert code == 0 and set(out.split()) >= {*mine[(bob, "echo")], *mine[(bob, "sleep")]}
    assert not set(out.split()) & {*mine[(alice, "echo")], *mine[(alice, "sleep")]}
    code, out, _ = run(capsys, *home, "task", "list", "--type", "echo", "--state", "completed",
                       "--agent", alice, "--json")
    assert sorted(t["id"] for t in json.loads(out)) == sorted(mine[(alice, "echo")])
    if filtered_by_scheduler:  # the count of all matching comes from the scheduler
        code, out, err = run(capsys, *home, "task", "list", "--agent", alice, "--limit", "1")
        assert code == 0 and "showing 1 of 4 matching" in err


def test_bulk_cancel_takes_only_what_matches(shared_suite, capsys):
    """Tasks held queued by their agents' budgets (one token window an hour long): the
    bulk cancel takes exactly the queued sleep tasks of one agent."""
    home = ["--home", shared_suite.home]
    alice, carol = unique("alice"), unique("carol")
    with Client(shared_suite.home, timeout=10) as c:
        for agent in (alice, carol):
            c.call("ledger", "ledger.set", {"scope": f"agent:{agent}", "limit": 10,
                                            "window": "rolling:3600"})

        def submit(agent, kind):
            return c.submit(kind, f"held {kind}", agent=agent, tokens=10,
                            payload={"seconds": 60})["id"]

        running = submit(alice, "sleep")
        wait_for(lambda: c.status(running)["state"] == "running", 20, "the first one running")
        alice_sleeps = [submit(alice, "sleep") for _ in range(3)]
        alice_echo = submit(alice, "echo")
        carol_sleeps = [submit(carol, "sleep") for _ in range(2)]
        held = alice_sleeps + [alice_echo] + carol_sleeps[1:]
        # Carol's first has tokens: running before the cleanup's "--state running" looks
        # (dispatched until its worker reports the start).
        wait_for(lambda: c.status(carol_sleeps[0])["state"] == "running", 20,
                 "carol's first running")
        wait_for(lambda: all(c.status(t)["waiting"] == "tokens" for t in held), 20,
                 "the others waiting for tokens")
        code, out, err = run(capsys, *home, "task", "cancel", "--state", "queued", "--type",
                             "sleep", "--agent", alice)
        assert code == 0 and "cancelled 3 tasks (state queued, type sleep, agent " in out, err
        states = {t: c.status(t)["state"] for t in [running, *alice_sleeps, alice_echo,
                                                    *carol_sleeps]}
        assert [states[t] for t in alice_sleeps] == ["cancelled"] * 3
        assert states[running] == "running" and states[alice_echo] == "queued"
        assert states[carol_sleeps[1]] == "queued"
        # Cleaning up is the same command: everything of both agents, in two calls.
        for agent in (alice, carol):
            for state in ("queued", "running"):
                code, out, _ = run(capsys, *home, "task", "cancel", "--state", state,
                                   "--agent", agent, "--json")
                assert code == 0
        code, out, _ = run(capsys, *home, "task", "cancel", running, alice_echo)
        assert code == 0 and out.split() == [running, "cancelled", alice_echo, "cancelled"]
        for agent in (alice, carol):
            leftover = [t for t in c.list_tasks(limit=10_000) if t["agent"] == agent
                        and not t["final"]]
            assert leftover == []


def test_model_train_says_why_it_did_not_train(shared_suite, capsys):
    home = ["--home", shared_suite.home]
    answers = [run(capsys, *home, "model", "train") for _ in range(2)]
    refused = [(code, out) for code, out, _ in answers if code != Exit.OK]
    assert refused, answers  # too few tasks to learn from, or the first one still running
    for code, out in refused:
        assert code == Exit.REFUSED and re.match(r"training did not start: \S", out), out
    code, out, _ = run(capsys, *home, "model", "train", "--json")
    assert "started" in json.loads(out)


def test_events_query_says_when_it_truncated_and_gives_the_newest_first(shared_suite,
                                                                          capsys):
    home = ["--home", shared_suite.home]
    marker = unique("needle")
    with Client(shared_suite.home, timeout=10) as c:
        ids = [c.submit("echo", f"{marker} {i}")["id"] for i in range(3)]
    query = ["events", "query", "--text", marker, "--type", "task.created"]

    def all_written():
        code, out, _ = run(capsys, *home, *query, "--json")
        return code == 0 and len(out.splitlines()) == 3

    wait_for(all_written, 20, "the three task.created events in JSONL")
    code, out, err = run(capsys, *home, *query, "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 2
    assert "# 2 events (truncated at --limit 2" in err
    code, out, err = run(capsys, *home, *query, "--limit", "3")
    assert "truncated" not in err and "# 3 events" in err
    code, out, err = run(capsys, *home, *query, "--newest", "--json")
    assert [json.loads(line)["task"] for line in out.splitlines()] == ids[::-1]
    code, out, err = run(capsys, *home, *query, "--newest", "--limit", "1", "--json")
    assert [json.loads(line)["task"] for line in out.splitlines()] == ids[-1:]
    assert "truncated" in err
    code, out, _ = run(capsys, *home, *query)  # text: the full local date and time
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} ", out)


def test_text_output_never_passes_control_characters(shared_suite, capsys):
    home = ["--home", shared_suite.home]
    with Client(shared_suite.home, timeout=10) as c:
        task = c.submit("fail", HOSTILE_TEXT, agent=unique("mallory\x1b[2J"), retries=0,
                        payload={"message": HOSTILE_TEXT})
        c.wait(task["id"], timeout=30)
    # End to end, in a real process: the bytes on stdout carry no control character.
    done = subprocess.run([*CLI, *map(str, home), "task", "show", task["id"]],
                          capture_output=True, timeout=60)
    text = done.stdout.decode()
    assert done.returncode == 0 and "\\x1b[2J" in text and "\\u202e" in text
    assert not UNSAFE.search(text)
    code, out, _ = run(capsys, *home, "task", "show", task["id"], "--json")
    shown = json.loads(out)
    assert shown["description"] == HOSTILE_TEXT
    assert shown["error"]["message"].endswith(HOSTILE_TEXT)  # the exception, exactly
    for argv in (["task", "list"], ["task", "wait", task["id"]], ["task", "trace", task["id"]],
                 ["events", "query", "--task", task["id"]]):
        code, out, err = run(capsys, *home, *argv)
        assert not UNSAFE.search(out + err), argv
        assert argv == ["task", "list"] or "\\x1b" in out, argv  # (the list shows no text)


def test_logs_of_a_running_service(shared_suite, capsys):
    home = ["--home", shared_suite.home]
    code, out, err = run(capsys, *home, "logs", "scheduler", "-n", "3")
    assert code == 0 and 1 <= len(out.splitlines()) <= 3, err
    code, _, err = run(capsys, *home, "logs", "schedulr")
    assert code == Exit.USAGE and "did you mean 'scheduler'?" in err and "ledger" in err


def test_logs_follow_across_a_rotation():
    home = short_home()
    logs = home / "logs"
    logs.mkdir()
    log = logs / "ledger.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "evil \x1b[2J\n")
    proc = subprocess.Popen([*CLI, "--home", str(home), "logs", "ledger", "-n", "2", "-f"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "line 99\n"
        assert proc.stdout.readline() == "evil \\x1b[2J\n"
        with log.open("a") as f:
            f.write("appended\n")
        assert proc.stdout.readline() == "appended\n"
        log.rename(logs / "ledger.log.1")  # as supervisord rotates
        log.write_text("after rotation\n")
        assert proc.stdout.readline() == "after rotation\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        shutil.rmtree(home, ignore_errors=True)


def test_parallel_creates_write_whole_lines(shared_suite):
    """Six `cortex task create` at once on one pipe, unbuffered: one id a line."""
    cmd = " ".join([*CLI, "--home", str(shared_suite.home), "task", "create", "--type",
                    "echo", "-d", "parallel-{}"])
    done = subprocess.run(["bash", "-c", f"seq 1 12 | xargs -P 6 -I{{}} {cmd}"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 13
    assert all(re.fullmatch(r"t[\w-]+", line) for line in lines[:-1]), done.stdout


def test_tail_reads_through_the_client(shared_suite, capsys, monkeypatch):
    home = ["--home", shared_suite.home]
    assert not hasattr(events, "zmq")  # no socket of its own
    patterns = []
    subscribe = client_module.Client.subscribe

    def recording(self, *args, **kwargs):
        patterns.append(args[0] if args else kwargs.get("pattern", ""))
        return subscribe(self, *args, **kwargs)

    monkeypatch.setattr(client_module.Client, "subscribe", recording)
    with Client(shared_suite.home, timeout=10) as c:
        before = [c.submit("echo", f"before the tail {i}")["id"] for i in range(3)]
        # A submit is answered before its events reach the router (they go in batches).
        wait_for(lambda: set(before) <= {e["task"] for e in c.call(
            "events", "events.recent", {"n": 50, "type": "task.created"})["events"]},
                 10, "the three task.created events in the router's ring")
    stop = threading.Event()
    marker = unique("live")

    def keep_submitting():  # until the tail has subscribed and seen one
        with Client(shared_suite.home, timeout=10) as c:
            while not stop.wait(0.2):
                c.submit("echo", marker)

    feeder = threading.Thread(target=keep_submitting, daemon=True)
    feeder.start()
    try:
        code, out, err = run(capsys, *home, "tail", "--json", "--type", "task.created",
                             "--last", "3", "--count", "2")
    finally:
        stop.set()
        feeder.join(20)
    assert code == 0, err
    assert patterns == ["task.created"]
    shown = [json.loads(line) for line in out.splitlines()]
    assert len(shown) == 5 and all(e["type"] == "task.created" for e in shown)
    assert len({e["id"] for e in shown}) == 5  # the buffered ones are not repeated
    assert all(e["data"]["description"] == marker for e in shown[3:])
    # The feed's thread ends at the next event after the command returned.
    with Client(shared_suite.home, timeout=10) as c:
        wait_for(lambda: c.submit("echo", "wake the feed") and not any(
            t.name == "tail-feed" for t in threading.enumerate()), 20, "the feed thread gone")


def test_status_watch_redraws_in_place_in_a_terminal(shared_suite):
    term = Terminal([*CLI, "--home", str(shared_suite.home), "status", "--watch",
                     "--interval", "0.3"])
    try:
        def frames() -> list[str]:
            return [ANSI.sub("", f) for f in term.read().split("\x1b[H")[1:]]

        def completed(frame: str) -> int | None:
            found = re.search(r"tasks .*?completed ([\d,]+)", frame)
            return int(found[1].replace(",", "")) if found else None

        first = wait_for(lambda: [f for f in frames() if completed(f) is not None], 30,
                         "a first frame with the task counts")
        before = completed(first[-1])
        with Client(shared_suite.home, timeout=10) as c:
            c.wait(c.submit("echo", "seen by the watch")["id"], timeout=30)
        drawn = len(frames())
        wait_for(lambda: any((completed(f) or 0) > before for f in frames()[drawn:]), 30,
                 "a frame showing one more completed task")
        change = next(i for i, f in enumerate(frames()[drawn:]) if (completed(f) or 0) > before)
        assert change <= 3  # within a few redraws of the change
        assert "\x1b[?1049h" in term.raw  # drawn on the alternate screen
        assert term.finish() == 0
        assert term.raw.rstrip().endswith("\x1b[?1049l")  # the terminal given back
    finally:
        term.close()


def test_task_wait_shows_progress_in_a_terminal(shared_suite):
    with Client(shared_suite.home, timeout=10) as c:
        task = c.submit("simulated_agent", "three steps", payload={"seconds": 3, "steps": 3})
    term = Terminal([*CLI, "--home", str(shared_suite.home), "task", "wait", task["id"]])
    try:
        wait_for(lambda: re.search(r"running \d+% step \d of 3", ANSI.sub("", term.read())),
                 30, "a progress line")
        wait_for(lambda: term.proc.poll() is not None and term.read() and not term.read_more(),
                 30, "the end of the wait")
        assert term.proc.returncode == 0
        assert f"{task['id']} completed after" in term.raw
    finally:
        term.close()


def test_status_is_a_health_check(shared_suite, capsys):
    """Last in the module: stops one service, then brings it back."""
    home = ["--home", shared_suite.home]
    code, out, err = run(capsys, *home, "status")
    assert code == 0 and "health     ok" in out, out + err
    rpc = shared_suite.rpc().supervisor
    rpc.stopProcess("ledger")
    try:
        code, out, err = run(capsys, *home, "status")
        assert code == Exit.UNAVAILABLE and "health     NOT OK: ledger is STOPPED" in out
        code, out, _ = run(capsys, *home, "status", "--json")
        report = json.loads(out)
        assert code == Exit.UNAVAILABLE and report["healthy"] is False
        assert report["problems"] == ["ledger is STOPPED"]
    finally:
        rpc.startProcess("ledger")
    wait_for(lambda: run(capsys, *home, "status")[0] == Exit.OK, 60, "healthy again")
