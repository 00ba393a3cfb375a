"""Agents as plain functions, and the runner that serves them in worker processes.

    # summarize.py
    from cortex.protocol.agents import agent

    @agent("summarize")
    def summarize(ctx, text, max_words=100):   # ctx: TaskContext; the rest: payload keys
        ctx.use_tokens(1200)
        return {"summary": " ".join(text.split()[:max_words])}

    python -m cortex.protocol.agents summarize --concurrency 3 [--home DIR]

A function taking only `ctx` gets the task's payload as `ctx.payload`; one taking more
gets the payload's keys as keyword arguments (a payload that does not fit its signature
fails the task as `bad_request`). An exception may carry a `category` attribute, which
becomes the task's error category; the full traceback travels with the failure.

The runner imports MODULE (a dotted name found from the working directory, or a path to
a .py file), then keeps N processes, each the `Worker` helper serving every agent the
module registered: heartbeats, token enforcement and cancels are the built-in pool's.
It restarts a process that dies (at once after a clean exit, with capped backoff after
a crash), ends a process whose task runs past its timeout (as the pool would), and on
SIGTERM or SIGINT lets each process finish its task in hand, then exits (a second
SIGINT stops at once). Its processes die with it even when it is killed: a parent-death
signal on Linux, a watch on the parent's pid elsewhere.

`run(module_name, concurrency, home)` is the runner, for the `cortex` CLI to call.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import backoff, locate

log = logging.getLogger("cortex.agents")

TASK_TYPE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
STOP_GRACE = 25.0  # seconds a process gets to finish its task when stopping
TIMEOUT_GRACE = 5.0  # past a task's timeout, seconds before its process is ended
RESTART_BASE, RESTART_CAP = 0.2, 10.0  # crash restart backoff, seconds
STEADY = 10.0  # a process that ran this long before crashing starts the backoff afresh
EXIT_TIMEOUT = 75  # a process ended itself over a task past its timeout
PR_SET_PDEATHSIG = 1


class AgentInputError(TypeError):
    """A payload that does not fit the agent function's signature."""

    category = "bad_request"


@dataclass(frozen=True)
class Agent:
    task_type: str
    function: object
    signature: inspect.Signature
    takes_payload: bool  # the function has parameters past ctx: payload keys go there

    def __call__(self, ctx):
        if not self.takes_payload:
            return self.function(ctx)
        payload = ctx.payload if ctx.payload is not None else {}
        if not isinstance(payload, dict):
            raise AgentInputError(f"{self.task_type}: the payload must be a map of the "
                                  f"arguments of {self.function.__name__}{self.signature}, "
                                  f"got {type(payload).__name__}")
        try:
            self.signature.bind(ctx, **payload)
        except TypeError as e:
            raise AgentInputError(f"{self.task_type}: payload does not fit "
                                  f"{self.function.__name__}{self.signature}: {e}") from None
        return self.function(ctx, **payload)


REGISTRY: dict[str, Agent] = {}


def agent(task_type: str):
    """Register the decorated function as the handler of `task_type` tasks."""
    if not isinstance(task_type, str) or not TASK_TYPE.fullmatch(task_type):
        raise ValueError(f"a task type is 1-64 letters, digits or _ . : -, got {task_type!r}")

    def register(function):
        if not callable(function):
            raise TypeError(f"@agent({task_type!r}) must decorate a function")
        signature = inspect.signature(function)
        params = list(signature.parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY,
                                                params[0].POSITIONAL_OR_KEYWORD):
            raise TypeError(f"{function.__name__} must take the task context first")
        known = REGISTRY.get(task_type)
        if known is not None and _origin(known.function) != _origin(function):
            raise ValueError(f"task type {task_type!r} is already the agent "
                             f"{_origin(known.function)}")
        REGISTRY[task_type] = Agent(task_type, function, signature,
                                    takes_payload=len(params) > 1)
        return function

    return register


def _origin(function) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', '?')}"


def load(module: str) -> dict[str, Agent]:
    """Import `module` (dotted name, from the working directory too, or a .py path) and
    return the agents registered by the time it is imported."""
    if module.endswith(".py") or os.sep in module:
        path = Path(module).resolve()
        if not path.is_file():
            raise ImportError(f"no such file: {path}")
        name = path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        spec.loader.exec_module(loaded)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` and `celery -A` find modules
        importlib.import_module(module)
    if not REGISTRY:
        raise ImportError(f"{module} registers no agent: decorate functions with "
                          "@agent(\"task_type\")")
    return dict(REGISTRY)


# -- one worker process ----------------------------------------------------------------------

class Watchdog:
    """Ends this process when its task runs past the task's timeout plus a grace (the
    scheduler has given up on it by then), as the pool ends one of its own workers."""

    def __init__(self):
        self._due: float | None = None
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def wrap(self, handler):
        def guarded(ctx):
            timeout = ctx.task.get("timeout") if isinstance(ctx.task, dict) else None
            if isinstance(timeout, int | float) and not isinstance(timeout, bool):
                self._due = time.monotonic() + timeout + TIMEOUT_GRACE
            try:
                return handler(ctx)
            finally:
                self._due = None
        return guarded

    def _watch(self) -> None:
        while True:
            time.sleep(0.25)  # a timer: how late past the grace the process ends
            due = self._due
            if due is not None and time.monotonic() > due:
                log.error("a task ran %.0f s past its timeout: ending this process",
                          TIMEOUT_GRACE)
                _end_descendants()
                os._exit(EXIT_TIMEOUT)


def _end_descendants() -> None:
    """Kill what the handlers started (they may have left their process group)."""
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.kill()
    except Exception:  # best effort on the way out
        pass


def _die_with_parent(parent: int) -> None:
    """A parent-death signal (SIGTERM: finish the task, then leave) on Linux; a thread
    watching the parent's pid elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(module: str, home, name: str, parent: int) -> int:
    """One worker process of the runner: serves the module's agents until stopped."""
    from .worker import Worker

    _die_with_parent(parent)
    agents = load(module)
    watchdog = Watchdog()
    worker = Worker({t: watchdog.wrap(a) for t, a in agents.items()}, home=home, name=name,
                    install_signals=False)

    def stop(*_):
        worker.stop()  # the task in hand finishes; then it leaves
        timer = threading.Timer(STOP_GRACE, lambda: (_end_descendants(), os._exit(1)))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()
    return 0


# -- the runner ------------------------------------------------------------------------------

@dataclass
class Process:
    slot: int
    proc: subprocess.Popen
    started: float
    kill_at: float | None = None


class Runner:
    def __init__(self, module: str, concurrency: int, home=None):
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) \
                or not 1 <= concurrency <= 1000:
            raise ValueError(f"concurrency must be a whole number in 1..1000, got {concurrency!r}")
        self.module = module
        self.concurrency = concurrency
        self.home = locate.find_home(home)
        self.types = sorted(load(module))  # fail here, once, if the module is broken
        self.processes: dict[int, Process] = {}  # pid -> process
        self.restart_due: dict[int, float] = {}  # slot -> monotonic time
        self.failures: dict[int, int] = {}  # slot -> crashes in a row
        self.spawned = 0
        self.stopping = False
        self.interrupts = 0

    def spawn(self, slot: int) -> None:
        self.spawned += 1
        name = f"agent-{slot}-{os.getpid()}-{self.spawned}"
        cmd = [sys.executable, "-m", "cortex.protocol.agents", self.module, "--home",
               str(self.home), "--serve", name, "--parent", str(os.getpid())]
        env = {**os.environ, "CORTEX_HOME": str(self.home)}
        # Its own session: a terminal's Ctrl-C reaches the runner only, which stops each
        # process in order; a process's group holds whatever its handlers start.
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.processes[proc.pid] = Process(slot, proc, time.monotonic())
        log.info("process %d started (pid %d)", slot, proc.pid)

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        self.stopping = True

    def reap(self) -> None:
        for pid, process in list(self.processes.items()):
            code = process.proc.poll()
            if code is None:
                continue
            del self.processes[pid]
            if self.stopping:
                continue
            ran = time.monotonic() - process.started
            if code in (0, EXIT_TIMEOUT):
                delay, self.failures[process.slot] = 0.0, 0
            else:
                fails = 1 if ran > STEADY else self.failures.get(process.slot, 0) + 1
                self.failures[process.slot] = fails
                delay = backoff.delay(fails, RESTART_BASE, RESTART_CAP)
            log.warning("process %d (pid %d) exited with %s after %.1f s; restarting in "
                        "%.1f s", process.slot, pid, code, ran, delay)
            self.restart_due[process.slot] = time.monotonic() + delay

    def stop_all(self) -> None:
        now = time.monotonic()
        if any(p.kill_at is None for p in self.processes.values()):
            log.info("stopping: each process finishes its task in hand (Ctrl-C again: now)")
        for process in self.processes.values():
            if process.kill_at is None:
                try:
                    os.kill(process.proc.pid, signal.SIGTERM)  # it finishes its task
                except ProcessLookupError:
                    pass
                process.kill_at = now + STOP_GRACE
            if self.interrupts > 1 or now >= process.kill_at:
                try:
                    os.killpg(process.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def run(self) -> int:
        wake_r = None
        if threading.current_thread() is threading.main_thread():
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_w, False)
            os.set_blocking(wake_r, False)
            signal.set_wakeup_fd(wake_w)  # a signal wakes the select below
            signal.signal(signal.SIGCHLD, lambda *_: None)
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        log.info("serving %s from %s on %d processes", ", ".join(self.types), self.module,
                 self.concurrency)
        try:
            for slot in range(self.concurrency):
                self.spawn(slot)
            while self.processes or not self.stopping:
                self.reap()
                if self.stopping:
                    self.stop_all()
                now = time.monotonic()
                for slot, due in list(self.restart_due.items()):
                    if self.stopping:
                        self.restart_due.clear()
                    elif now >= due:
                        del self.restart_due[slot]
                        self.spawn(slot)
                timeout = min([0.5, *(d - now for d in self.restart_due.values())])
                if wake_r is not None:
                    select.select([wake_r], [], [], max(0.0, timeout))
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    time.sleep(max(0.0, min(timeout, 0.1)))
        finally:
            self.stopping = True
            for process in self.processes.values():  # leaving on an error: leave no one
                try:
                    os.killpg(process.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                process.proc.wait()
            if wake_r is not None:
                signal.set_wakeup_fd(-1)
                os.close(wake_r)
                os.close(wake_w)
        log.info("stopped")
        return 0


def run(module_name: str, concurrency: int = 1, home=None) -> int:
    """Serve the agents of `module_name` on `concurrency` processes until SIGTERM/SIGINT;
    returns the exit status."""
    return Runner(module_name, concurrency, home).run()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cortex.protocol.agents",
                                     description="Serve the @agent functions of MODULE.")
    parser.add_argument("module", help="dotted module name (from the working directory) or "
                                       "a .py file")
    parser.add_argument("--concurrency", "-c", type=int, default=1,
                        help="worker processes (default 1)")
    parser.add_argument("--home", help="suite home (default: $CORTEX_HOME or ./.cortex)")
    parser.add_argument("--serve", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    level = os.environ.get("CORTEX_LOG_LEVEL", "INFO" if args.serve is None else "WARNING")
    who = f"agent {args.serve}" if args.serve else "agents"
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s {who}[%(process)d] %(message)s")
    if args.serve is not None:
        return serve(args.module, args.home, args.serve, args.parent or os.getppid())
    try:
        return run(args.module, args.concurrency, args.home)
    except (ImportError, ValueError, TypeError) as e:
        print(f"cannot serve {args.module}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run as `python -m`, this file is __main__: the user's module registers its agents in
    # the importable cortex.protocol.agents, so that one must do the work.
    from cortex.protocol import agents as _agents

    sys.exit(_agents.main())
