"""The `cortex` CLI: in-process (main() with capsys) for most commands, as a real
subprocess where the process matters (tail, up/down, tracebacks)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cortex.protocol import Client
from cortex.services.cli import app as cli
from cortex.services.control import SERVICES, Suite, reap_orphans
from cortex.services.runtime import settings as config

from .conftest import short_home, wait_for
from .pg import fresh_database, pg_server, postgres_url  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cortex.services.cli"]


def run(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_proc(*argv, timeout: float = 60, env: dict | None = None):
    return subprocess.run([*CLI, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# -- without a suite -------------------------------------------------------------------


def test_init_writes_a_config_that_loads(capsys):
    home = short_home()
    try:
        code, out, _ = run(capsys, "--home", home, "init")
        assert code == cli.Exit.OK
        assert (home / "cortex.toml").read_text() == config.DEFAULT_CONFIG
        assert "wrote" in out
        settings = config.load(home)
        assert settings.groups[0].count == 20
        for sub in ("run", "state", "wal", "events", "logs", "models"):
            assert (home / sub).is_dir()
        assert (home / "run").stat().st_mode & 0o777 == 0o700

        code, _, err = run(capsys, "--home", home, "init")
        assert code == cli.Exit.CONFLICT and "--force" in err and err.count("\n") == 1
        (home / "cortex.toml").write_text("# mine\n")
        assert run(capsys, "init", "--force", "--home", home)[0] == cli.Exit.OK
        assert (home / "cortex.toml").read_text() == config.DEFAULT_CONFIG
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_help_of_every_command_exits_zero(capsys):
    paths = {()} | set(cli.COMMANDS) | {p[:1] for p in cli.COMMANDS}
    for path in sorted(paths):
        code, out, err = run(capsys, *path, "--help")
        assert code == 0, (path, err)
        assert "usage: cortex" in out
        cmd = cli.COMMANDS.get(path)
        if cmd is not None:  # the docstring is the help
            assert cmd.summary in " ".join(out.split())


@pytest.mark.parametrize("argv, code, words", [
    (["task", "create", "--type", "echo", "-d", "x", "--priority", "urgent"], 2, "urgent"),
    (["task", "create", "--type", "echo", "-d", "x", "--tokens", "-5"], 2, "--tokens"),
    (["task", "create", "--type", "echo", "-d", "x", "--payload", "{bad"], 2, "JSON"),
    (["task", "create", "--type", "echo", "-d", "x", "--timeout", "0"], 2, "--timeout"),
    (["task", "create", "--type", "echo", "-d", "x", "--deadline", "soon"], 2, "--deadline"),
    (["task", "list", "--state", "sleeping"], 2, "sleeping"),
    (["budget", "set", "global", "lots"], 2, "LIMIT"),
    (["budget", "set", "global", "5", "--window", "weekly"], 2, "window"),
    (["events", "query", "--since", "yesterday-ish"], 2, "--since"),
    (["frobnicate"], 2, "frobnicate"),
    (["task", "create", "--type", "echo", "-d", "x"], 3, "no suite is running"),
    (["task", "list"], 3, "no suite is running"),
    (["status"], 3, "no suite is running"),
    (["tail"], 3, "no suite is running"),
])
def test_bad_arguments_give_one_line_and_an_exit_code(capsys, argv, code, words):
    home = short_home()
    try:
        got, out, err = run(capsys, "--home", home, *argv)
        assert got == code, err
        assert err.count("\n") == 1 and words in err, err
        assert "Traceback" not in out + err
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_real_process_fails_in_one_line_without_a_traceback():
    home = short_home()
    try:
        done = run_proc("--home", home, "task", "create", "--type", "echo", "-d", "x")
        assert done.returncode == cli.Exit.NOT_RUNNING
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        done = run_proc("--home", home, "task", "create", "--type", "e", "-d", "x",
                        "--priority", "urgent")
        assert done.returncode == cli.Exit.USAGE and done.stderr.count("\n") == 1
        (home / "cortex.toml").write_text("[scheduler]\nmax_wait = -1\n")
        done = run_proc("--home", home, "up", "--timeout", "5")
        assert done.returncode == cli.Exit.CONFIG and "max_wait" in done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert not Suite(home).pids()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_rendering_helpers():
    text = cli.table(["A", "NUM"], [["x", 5], ["longer", 1234], ["y", None]])
    lines = text.splitlines()
    assert lines[0].startswith("A       NUM")
    assert lines[2].endswith("1234") and lines[1].endswith("   5") and lines[3].endswith("-")
    assert cli.human_duration(0.0123) == "12ms" and cli.human_duration(125) == "2m05s"
    assert cli.split_pattern("task.") == ("task.", None)
    assert cli.split_pattern("task.*") == ("task.", "task.*")
    assert cli.split_pattern("*.failed") == ("", "*.failed")
    line = cli.event_line({"ts": 10.5, "source": "scheduler", "type": "task.dispatched",
                           "task": "t1", "worker": "w1",
                           "data": {"worker": "w1", "waited": 0.0012, "lsn": 3}}, base=10.0)
    assert "+0.500s" in line and "waited=0.0012" in line
    assert "lsn" not in line and line.count("w1") == 1


# -- against a real suite --------------------------------------------------------------


def test_task_commands_against_a_real_suite(suite, capsys):
    home = ["--home", suite.home]
    code, out, err = run(capsys, *home, "task", "create", "--type", "simulated_agent",
                         "--description", "write a poem", "--priority", "high",
                         "--tokens", "500", "--payload",
                         '{"tokens": 300, "seconds": 0.05, "steps": 2}')
    assert code == 0, err
    task_id = out.strip()
    assert task_id.startswith("t") and len(out.splitlines()) == 1

    code, out, _ = run(capsys, *home, "task", "wait", task_id, "--timeout", "20")
    assert code == cli.Exit.OK and "completed" in out
    code, out, _ = run(capsys, *home, "task", "show", task_id)
    assert code == 0
    for words in ("write a poem", "high", "completed", "used 300", "granted 500"):
        assert words in out, out
    code, out, _ = run(capsys, *home, "task", "show", task_id, "--json")
    shown = json.loads(out)
    assert shown["tokens_used"] == 300 and shown["ledger"]["used"] == 300

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
    assert code == cli.Exit.TIMEOUT and "running" in err and err.count("\n") == 1
    code, out, _ = run(capsys, *home, "task", "cancel", nap["id"])
    assert code == 0 and "cancelled" in out
    code, out, _ = run(capsys, *home, "task", "wait", nap["id"], "--timeout", "10")
    assert code == cli.Exit.FAILED and "cancelled" in out
    code, _, err = run(capsys, *home, "task", "cancel", task_id)
    assert code == cli.Exit.CONFLICT and "completed" in err

    code, out, _ = run(capsys, *home, "task", "create", "--type", "fail", "-d", "boom",
                       "--retries", "0")
    code, out, _ = run(capsys, *home, "task", "wait", out.strip(), "--timeout", "20")
    assert code == cli.Exit.FAILED and "failed" in out and "handler_error" in out

    code, _, err = run(capsys, *home, "task", "show", "t-nope")
    assert code == cli.Exit.NOT_FOUND and err.count("\n") == 1

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
    assert lines[1].split()[0] == "+0.000s" and "task.created" in lines[1]
    assert any("task.dispatched" in line and "worker=w-" in line for line in lines)

    code, out, _ = run(capsys, *home, "events", "query", "--task", task_id, "--type",
                       "task.*", "--json")
    assert code == 0
    assert {json.loads(line)["type"] for line in out.splitlines()} >= {
        "task.created", "task.dispatched", "task.completed"}
    code, out, _ = run(capsys, *home, "events", "query", "--text", "write a poem",
                       "--since", "5m")
    assert code == 0 and "task.created" in out

    # The demo on a suite that is already running: uses it, leaves it running.
    code, out, err = run(capsys, *home, "demo", "--tasks", "30", "--agents", "3")
    assert code == 0, out + err
    assert "completed 30" in out and "match" in out and "demo OK" in out
    assert all(Suite(suite.home).ping().values())


def test_status_budget_workers_and_tail(suite, capsys):
    home = ["--home", suite.home]
    with Client(suite.home, timeout=10) as c:
        wait_for(lambda: len(c.workers()) == 4, 20, "4 workers registered")
    code, out, err = run(capsys, *home, "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert set(status["services"]) == set(SERVICES)
    for name, row in status["services"].items():
        assert row["state"] == "RUNNING" and row["alive"] and row["pid"] > 0, name
    assert status["workers"]["echo"] == {"idle": 4, "busy": 0}
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
    assert code == 0 and out.splitlines()[0].split()[:3] == ["SCOPE", "LIMIT", "RESERVED"]
    assert "type:echo" in out and "2,000" in out
    code, _, err = run(capsys, *home, "budget", "set", "nonsense", "5")
    assert code == cli.Exit.USAGE and "scope" in err and err.count("\n") == 1

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


@pytest.mark.postgres
def test_events_query_and_status_with_postgres(suites, capsys, postgres_url):  # noqa: F811
    url = fresh_database(postgres_url, f"cli_{uuid.uuid4().hex[:12]}")
    suite = suites.start(extra=f"[events]\npostgres_url = {json.dumps(url)}\n")
    home = ["--home", suite.home]
    with Client(suite.home, timeout=10) as c:
        task = c.submit("echo", "into the database", payload={"x": 1})
        c.wait(task["id"], timeout=20)

    def drained():
        code, out, _ = run(capsys, *home, "status", "--json")
        pg = json.loads(out)["events"]["postgres"] if code == 0 else None
        return pg and pg["lag"] == 0 and pg["inserted"] > 0 and pg

    wait_for(drained, 20, "events copied to PostgreSQL")
    code, out, _ = run(capsys, *home, "status")
    assert code == 0 and "postgres   lag 0" in out

    def query(source):
        code, out, err = run(capsys, *home, "events", "query", "--task", task["id"],
                             "--from", source, "--json")
        assert code == 0, err
        return [json.loads(line) for line in out.splitlines()]

    wait_for(lambda: any(e["type"] == "task.completed" for e in query("postgres")), 10,
             "the task's completion in PostgreSQL")
    from_pg, from_jsonl = query("postgres"), query("jsonl")
    assert {e["id"] for e in from_pg} == {e["id"] for e in from_jsonl}
    code, out, _ = run(capsys, *home, "events", "query", "--text", "into the database")
    assert code == 0 and "task.created" in out


def test_up_and_down_leave_nothing_behind():
    home = short_home()
    env = {**os.environ, "CORTEX_HOME": str(home)}
    try:
        (home / "cortex.toml").write_text(
            '[suite]\nfsync = "off"\nheartbeat_interval = 0.5\n'
            '[pool.groups.default]\ncount = 2\n')
        done = run_proc("up", "--timeout", "60", env=env)
        assert done.returncode == 0, done.stderr
        assert "up" in done.stdout
        assert len(Suite(home).pids()) >= 1 + len(SERVICES) + 2

        done = run_proc("up", env=env)  # already running: says so, still exit 0
        assert done.returncode == 0 and "already running" in done.stdout

        ctl = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c",
                              str(REPO / "supervisord.conf"), "status"],
                             capture_output=True, text=True, env=env, timeout=30)
        listed = {line.split()[0]: line.split()[1] for line in ctl.stdout.splitlines()}
        # The five services, the supervisor event listener and the dashboard beside them.
        assert listed == dict.fromkeys((*SERVICES, "supervisor-events", "dashboard"),
                                       "RUNNING"), \
            ctl.stdout + ctl.stderr

        done = run_proc("down", env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        reap_orphans()  # the daemonized supervisord was re-parented to us (subreaper)
        assert Suite(home).pids() == []
        assert list((home / "run").glob("*.sock")) == []
        done = run_proc("status", env=env)
        assert done.returncode == cli.Exit.NOT_RUNNING
        done = run_proc("down", env=env)
        assert done.returncode == 0 and "nothing running" in done.stdout
    finally:
        Suite(home).stop(timeout=30)
        reap_orphans()
        shutil.rmtree(home, ignore_errors=True)
