"""Setting up and running a suite: `cortex init`, `cortex up`, `cortex down`."""

from __future__ import annotations

import os
import signal
import time

from cortex.protocol import locate
from cortex.services.control import SERVICES, Suite, SuiteError, become_subreaper
from cortex.services.runtime import settings as config
from cortex.services.runtime.process import make_private, prepare_home

from .argtypes import seconds
from .reach import home_of, load_settings
from .registry import CliError, Exit, arg, command
from .render import emit, human_duration


@command("init",
         arg("--force", action="store_true", help="overwrite an existing cortex.toml"))
def cmd_init(args):
    """Write the commented default configuration into the home (and create its dirs).

    Writes <home>/cortex.toml with every setting at its default, explained, and creates
    run/, state/, wal/, events/, logs/ and models/. An existing cortex.toml is kept
    unless --force is given.
    """
    home = home_of(args)
    locate.endpoints(home)  # socket paths must fit: say so now, not at `cortex up`
    path = home / "cortex.toml"
    if path.exists() and not args.force:
        raise CliError(Exit.CONFLICT, f"{path} already exists (use --force to overwrite)")
    prepare_home(home)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(config.DEFAULT_CONFIG)
    os.replace(tmp, path)
    make_private(home)  # a home made before, or by hand: the owner's alone from now on
    emit(f"wrote {path}\nnext: cortex up")
    return Exit.OK


@command("up",
         arg("--timeout", type=seconds, default=60.0, metavar="S",
             help="seconds to wait for all five services to answer (default 60)"),
         arg("--foreground", action="store_true",
             help="keep supervisord attached to this terminal; Ctrl-C stops the suite"))
def cmd_up(args):
    """Start the suite (supervisord and the five services) and wait until all answer.

    Returns once broker, events, ledger, scheduler and pool all answer on the bus, and
    supervisord counts them past their first second (RUNNING, not STARTING), or fails
    (non-zero, with the services that did not answer) after --timeout seconds.
    Already running: says so and checks that it answers.
    """
    home = home_of(args)
    load_settings(home)  # a bad config would crash-loop every service: refuse it here
    suite = Suite(home)
    if suite.supervisord_pid():
        suite.wait_ready(args.timeout)
        emit(f"already running in {home}")
        return Exit.OK
    if args.foreground:
        return run_foreground(suite, args.timeout)
    started = time.monotonic()
    try:
        suite.start(attached=False, timeout=args.timeout)
    except SuiteError as e:
        running = " (supervisord is still running: `cortex down` stops it)" \
            if suite.supervisord_pid() else ""
        raise CliError(Exit.UNAVAILABLE, f"{e}{running}") from e
    if suite.ended_earlier:
        emit(f"stopped {len(suite.ended_earlier)} processes of an earlier start of this "
             f"home: {', '.join(suite.ended_earlier)}", err=True)
    emit(f"suite up in {home} ({human_duration(time.monotonic() - started)}): "
         f"{', '.join(SERVICES)} answering")
    return Exit.OK


def run_foreground(suite: Suite, timeout: float) -> int:
    become_subreaper()
    # SIGINT too: a shell starting us in the background may have set it to "ignore".
    previous = {sig: signal.signal(sig, _raise_interrupt)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        suite.start(attached=True, timeout=timeout)
        emit(f"suite up in {suite.home}; Ctrl-C stops it")
        suite.proc.wait()
        emit(f"supervisord exited with {suite.proc.returncode}", err=True)
        return Exit.FAILED
    except KeyboardInterrupt:
        emit("stopping…", err=True)
        return Exit.OK
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        suite.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@command("down",
         arg("--timeout", type=seconds, default=90.0, metavar="S",
             help="seconds before what is left is killed (default 90)"))
def cmd_down(args):
    """Stop the suite; return only when every process of it, workers included, is gone.

    Services stop gracefully (workers finish the task in hand); whatever is still alive
    after --timeout seconds is killed. Nothing running: says so, exit 0.
    """
    home = home_of(args)
    suite = Suite(home)
    pids = suite.pids()
    if not pids and not suite.leftovers():
        suite.stop(timeout=1.0)  # clears stale socket files, if any
        emit(f"nothing running in {home}")
        return Exit.OK
    started = time.monotonic()
    suite.stop(timeout=args.timeout)
    if suite.killed:
        emit(f"had to kill {len(suite.killed)} processes: {', '.join(suite.killed)}",
             err=True)
    left = suite.pids() + [p.pid for p in suite.leftovers()]
    if left:
        raise CliError(Exit.FAILED, f"processes still alive after stop: {left}")
    emit(f"suite down in {home} ({len(pids)} processes stopped in "
         f"{human_duration(time.monotonic() - started)})")
    return Exit.OK
