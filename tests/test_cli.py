"""The `cortex` CLI: in-process (main() with capsys) for most commands, as a real
subprocess where the process matters (tail, up/down, tracebacks). The pure parts are in
test_cli_render.py, the commands against a shared suite in test_cli_suite.py, the demo
in test_cli_demo.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cortex.protocol import Client
from cortex.services.cli import app as cli
from cortex.services.cli.registry import Exit
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
        assert code == Exit.OK
        assert (home / "cortex.toml").read_text() == config.DEFAULT_CONFIG
        assert "wrote" in out
        settings = config.load(home)
        assert settings.groups[0].count == 20
        for sub in ("run", "state", "wal", "events", "logs", "models"):
            assert (home / sub).is_dir()
        assert (home / "run").stat().st_mode & 0o777 == 0o700

        code, _, err = run(capsys, "--home", home, "init")
        assert code == Exit.CONFLICT and "--force" in err and err.count("\n") == 1
        (home / "cortex.toml").write_text("# mine\n")
        assert run(capsys, "init", "--force", "--home", home)[0] == Exit.OK
        assert (home / "cortex.toml").read_text() == config.DEFAULT_CONFIG
    finally:
        shutil.rmtree(home, ignore_errors=True)


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
    (["logs", "scheduler"], 5, "no logs"),
    (["task", "cancel"], 2, "--state"),
    (["task", "cancel", "t1", "--state", "queued"], 2, "not both"),
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


def test_events_query_from_jsonl_gives_the_exact_oldest_and_newest_in_time_order(capsys):
    """Files hold events in arrival order; two sources interleave, one's earlier events
    written after the other's later ones: --limit N is still the first (or last) N by
    time, not the first N lines."""
    home = short_home()
    try:
        (home / "events").mkdir()
        order = [("b", 5.0), ("b", 6.0), ("b", 7.0), ("a", 1.0), ("a", 2.0), ("a", 8.0)]
        with open(home / "events" / "events-20261129-001.jsonl", "w") as f:
            for seq, (source, ts) in enumerate(order):
                f.write(json.dumps({"id": f"e{ts:g}", "ts": 1.8e9 + ts, "type": "task.created",
                                    "source": source, "epoch": 1, "seq": seq,
                                    "data": {}}) + "\n")

        def ids(*argv):
            code, out, err = run(capsys, "--home", home, "events", "query", "--from",
                                 "jsonl", "--json", *argv)
            assert code == 0, err
            return [json.loads(line)["id"] for line in out.splitlines()], err
        oldest, note = ids("--limit", "3")
        assert oldest == ["e1", "e2", "e5"] and "truncated" in note
        assert ids("--limit", "3", "--newest")[0] == ["e8", "e7", "e6"]
        assert ids("--limit", "10")[0] == ["e1", "e2", "e5", "e6", "e7", "e8"]
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_real_process_fails_in_one_line_without_a_traceback():
    home = short_home()
    try:
        done = run_proc("--home", home, "task", "create", "--type", "echo", "-d", "x")
        assert done.returncode == Exit.NOT_RUNNING
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        done = run_proc("--home", home, "task", "create", "--type", "e", "-d", "x",
                        "--priority", "urgent")
        assert done.returncode == Exit.USAGE and done.stderr.count("\n") == 1
        (home / "cortex.toml").write_text("[scheduler]\nmax_wait = -1\n")
        done = run_proc("--home", home, "up", "--timeout", "5")
        assert done.returncode == Exit.CONFIG and "max_wait" in done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert not Suite(home).pids()
    finally:
        shutil.rmtree(home, ignore_errors=True)


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


def readme_block(heading: str) -> list[str]:
    """The command lines of the first indented block under a README heading."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    lines, started = [], False
    for line in section.splitlines()[1:]:
        if line.startswith("    ") and line.strip():
            lines.append(line.strip())
            started = True
        elif started and line.strip():
            break
    return lines


def test_up_down_and_the_readme_supervisorctl_lines_as_written():
    """The README's supervisorctl lines, run by bash from a checkout with its .venv, in a
    fresh environment without CORTEX_HOME; then up/down leave nothing behind."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "cortex").exists() or not (venv / "bin" / "supervisorctl").exists():
        pytest.skip("needs the cortex and supervisorctl commands of an installed venv")
    lines = readme_block("## Operating it with supervisorctl")
    assert any("supervisorctl" in line for line in lines), lines
    checkout = short_home()
    home = checkout / ".cortex"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    try:
        (checkout / "supervisord.conf").symlink_to(REPO / "supervisord.conf")
        (checkout / ".venv").symlink_to(venv)
        home.mkdir()
        (home / "cortex.toml").write_text(
            '[suite]\nfsync = "off"\nheartbeat_interval = 0.5\n'
            '[pool.groups.default]\ncount = 2\n')
        outputs = {}
        for line in lines:
            if line.split()[0].endswith("cortex") and line.split()[1] == "down":
                continue  # after the other checks, below
            done = subprocess.run(["bash", "-c", line], cwd=checkout, env=env, text=True,
                                  capture_output=True, timeout=120)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            outputs[line.split()[-1]] = done.stdout
        listed = {row.split()[0]: row.split()[1] for row in outputs["status"].splitlines()}
        # The five services and the supervisor event listener, running.
        assert {name: listed.get(name) for name in (*SERVICES, "supervisor-events")} == \
            dict.fromkeys((*SERVICES, "supervisor-events"), "RUNNING"), outputs["status"]
        assert "scheduler: started" in outputs["scheduler"]
        assert len(Suite(home).pids()) >= 1 + len(SERVICES) + 2
        env["CORTEX_HOME"] = str(home)
        done = run_proc("up", env=env)  # already running: says so, still exit 0
        assert done.returncode == 0 and "already running" in done.stdout

        down = [line for line in lines if line.split()[1:2] == ["down"]]
        assert down, "the README's block ends by stopping the suite"
        done = subprocess.run(["bash", "-c", down[0]], cwd=checkout, env=env, text=True,
                              capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        reap_orphans()  # the daemonized supervisord was re-parented to us (subreaper)
        assert Suite(home).pids() == []
        assert list((home / "run").glob("*.sock")) == []
        done = run_proc("status", env=env)
        assert done.returncode == Exit.NOT_RUNNING
        done = run_proc("down", env=env)
        assert done.returncode == 0 and "nothing running" in done.stdout
    finally:
        Suite(home).stop(timeout=30)
        reap_orphans()
        shutil.rmtree(checkout, ignore_errors=True)
