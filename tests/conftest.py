"""Shared fixtures: a real suite in a short temporary home, and leak checks.

pytest makes itself a child subreaper, so anything a test orphans (a daemonized
supervisord, a worker whose pool died) is re-parented here and reaped, even where PID 1
does not reap. Every suite a test starts is stopped, and the test fails if any of its
processes or socket files is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pytest

# A run started in the background by a non-interactive shell ignores SIGINT, and every
# process the tests start would inherit that (the Ctrl-C tests of the CLI then hang): a
# handler, unlike "ignore", is reset to the default in a child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from cortex.services.control import Suite, become_subreaper, reap_orphans, zombies

become_subreaper()


# What keeps a test out of the `pure` tier (logic alone, in seconds): fixtures that start
# processes (a suite, PostgreSQL), a fixture shared by a module (a suite or a trained
# model, built once because it is costly), a property search (hypothesis), these modules.
PROCESS_FIXTURES = frozenset({"suites", "suite", "shared_suite", "pg_server", "postgres_url"})
NOT_PURE_MODULES = {
    "test_cli.py": "runs the cortex command in subprocesses",
    "test_prediction.py": "trains scikit-learn models",
    "test_classify_rows.py": "trains the router in a child process",
    "test_llm.py": "talks to a real HTTP server speaking the provider protocol",
    "test_agents.py": "runs agents' command lines in subprocesses",
}


def pytest_addoption(parser):
    parser.addoption("--heavy", action="store_true",
                     help="run the heavy tests too (chaos, soak, outages; CI's second pass)")


def _uses_a_wider_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        if defs and defs[-1].scope in ("module", "package", "class"):
            return True
    return False


def _join_group(item, group: str) -> None:
    """Put `item` in an xdist group. xdist's worker reads the xdist_group markers in its
    own collection hook and names the group by a suffix on the node id; pytest 9.2 keeps
    node ids structured and ignores the field xdist writes, so the groups silently stop
    working (https://github.com/pytest-dev/pytest-xdist/issues/1386): write the suffix
    where this pytest reads it. Older pytest: xdist's hook does it, after this one."""
    item.add_marker(pytest.mark.xdist_group(group))
    if hasattr(item, "_id") and getattr(item.config.option, "loadgroup", False):
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(f"{item.nodeid}@{group}")


# First, before xdist's hook (a plugin registered after this file, so otherwise called
# before it), which must see the groups: a group split across the two workers starts its
# module-scoped suite once per piece.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Two tiers. Heavy tests run only with --heavy (or when `-m` names them); every test
    that starts no process, searches no property space and is not heavy is marked
    `pure`, so `-m pure` runs the logic alone in seconds."""
    run_heavy = config.getoption("--heavy") or "heavy" in (config.option.markexpr or "")
    for item in items:
        # Tests sharing a module-scoped fixture (a suite, a trained model) go to one xdist
        # worker, so it is built once; the others spread one by one (--dist loadgroup).
        if _uses_a_wider_fixture(item):
            _join_group(item, item.path.name)
    skip = pytest.mark.skip(reason="heavy: run with --heavy (CI runs them in a second pass)")
    for item in items:
        heavy = item.get_closest_marker("heavy") is not None
        if heavy and not run_heavy:
            item.add_marker(skip)
        if not (heavy or PROCESS_FIXTURES & set(item.fixturenames)
                or _uses_a_wider_fixture(item)
                or item.get_closest_marker("postgres") or item.get_closest_marker("processes")
                or getattr(item.obj, "is_hypothesis_test", False)
                or item.path.name in NOT_PURE_MODULES):
            item.add_marker(pytest.mark.pure)
    if hasattr(config, "workerinput"):  # an xdist worker: the collection it reports
        # xdist hands out the groups first (most tests first), then single tests in this
        # order: the slow ones (processes, suites) go first, so the two workers end on
        # the quick pure tests instead of one waiting for the other's long tail.
        items.sort(key=lambda item: item.get_closest_marker("pure") is not None)


def short_home(prefix: str = "cx") -> Path:
    # ipc paths must stay under 107 bytes: keep homes short, under /tmp.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


DEFAULT_TYPES = ("echo", "sleep", "simulated_agent", "fail")


def suite_config(workers: int = 4, types=DEFAULT_TYPES, *, fsync: str = "off",
                 snapshot_interval: float | None = 2.0, task_heartbeat: float | None = 1.0,
                 scheduler: str = "", tables: str = "", pool: str = "",
                 extra: str = "", dashboard: bool = False) -> str:
    """The config every test suite starts from: fast heartbeats, no fsync, one pool group
    (`default`, `workers` of them, taking `types`). `scheduler` adds lines to [scheduler],
    `pool` to the default group; `tables` are whole tables written before the pool's,
    `extra` after it. A None interval is left to the service's default. The dashboard is
    switched off (an interpreter less per start) unless asked for or a [dashboard] table
    is given in `tables` or `extra`."""
    text = f'[suite]\nfsync = "{fsync}"\nheartbeat_interval = 0.5\n'
    if snapshot_interval is not None:
        text += f"snapshot_interval = {snapshot_interval}\n"
    if task_heartbeat is not None or scheduler:
        text += "[scheduler]\n"
        if task_heartbeat is not None:
            text += f"task_heartbeat = {task_heartbeat}\n"
        text += scheduler
    types_list = ", ".join(f'"{t}"' for t in types)
    text += (tables + f"[pool.groups.default]\ncount = {workers}\n{pool}"
             f"types = [{types_list}]\n" + extra)
    if not dashboard and "[dashboard]" not in tables + extra:
        text += "\n[dashboard]\nenabled = false\n"
    return text


def write_config(home: Path, text: str) -> None:
    (home / "cortex.toml").write_text(text)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)  # polling an outside condition with a deadline


def pid_alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent): asked in one step, since a
    process can be reaped between asking whether it exists and asking its status."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def jsonl_events_of(home: Path) -> list[dict]:
    """Every event in a home's JSONL files, in file order."""
    import orjson

    events = []
    for path in sorted((home / "events").glob("events-*.jsonl")):
        for line in path.read_bytes().splitlines():
            if line.strip():
                events.append(orjson.loads(line))
    return events


zombies_of = zombies


class SuiteRunner:
    """Starts suites for a test and checks, at the end, that they left nothing behind."""

    def __init__(self):
        self.suites: list[tuple[Suite, set[int]]] = []

    def start(self, config: str | None = None, workers: int = 4, fsync: str = "off",
              extra: str = "", dashboard: bool = False) -> Suite:
        home = short_home()
        write_config(home, config if config is not None else suite_config(
            workers, fsync=fsync, extra=extra, dashboard=dashboard))
        suite = Suite(home)
        entry = (suite, set())
        self.suites.append(entry)
        suite.start(attached=True, timeout=60)
        entry[1].update(suite.pids())
        return suite

    def seen(self, suite: Suite) -> None:
        """Remember the suite's current pids so the final check covers them too."""
        for s, pids in self.suites:
            if s is suite:
                pids.update(suite.pids())

    def stop_all(self) -> list[str]:
        problems = []
        for suite, pids in self.suites:
            pids.update(suite.pids())
            suite.stop()
            reap_orphans()
            left = [p for p in pids if psutil.pid_exists(p) and not zombies_of([p])]
            if left:
                problems.append(f"processes left: {left}")
            zombies = zombies_of(pids)
            if zombies:
                problems.append(f"zombies left: {zombies}")
            sockets = list((suite.home / "run").glob("*.sock"))
            if sockets:
                problems.append(f"socket files left: {sockets}")
            if not os.environ.get("CORTEX_KEEP_HOMES"):  # keep them to read their logs
                shutil.rmtree(suite.home, ignore_errors=True)
        return problems


def module_suite(config: str | None = None, **options):
    """The body of a module-scoped suite fixture (`yield from module_suite(...)`): one
    suite for the tests of a module that share its configuration and leave it as they
    found it, stopped and checked for leftovers after the last of them."""
    runner = SuiteRunner()
    try:
        yield runner.start(config, **options)
    finally:
        problems = runner.stop_all()
        assert not problems, "; ".join(problems)


@pytest.fixture(autouse=True)
def reap_what_earlier_tests_orphaned():
    """As a subreaper this process inherits whatever a test orphans; reap those before
    each test, so a test counting zombies sees only its own (a worker runs many modules
    one after another)."""
    reap_orphans()


@pytest.fixture
def suites():
    runner = SuiteRunner()
    try:
        yield runner
    finally:
        problems = runner.stop_all()
        assert not problems, "; ".join(problems)


@pytest.fixture
def suite(suites):
    return suites.start()


@pytest.fixture(scope="session")
def shared_suite():
    """One suite (four workers, the default config, the dashboard on) for every test that
    leaves it as it found it: its tasks and agents are its own (unique names), what it
    stops it restarts, what it queues it cancels. Each xdist worker starts its own, once,
    on first use."""
    runner = SuiteRunner()
    try:
        yield runner.start(dashboard=True)
    finally:
        problems = runner.stop_all()
        assert not problems, "; ".join(problems)
