"""The scheduler process: owns the task table; admits, dispatches, retries, times out.

    python -m cortex.services.scheduler [--home DIR]

Decisions live in scheduling.SchedulerState; this module only moves messages.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

from cortex.protocol import wire
from cortex.protocol.wire import ProtocolError
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.loop import BusService
from cortex.services.scheduler.feasibility import (
    FIXED_MACHINE_ENV,
    MachineSampler,
    ResourceMonitor,
    fixed_sampler,
)
from cortex.services.scheduler.state import SchedulerState

SYNC_CORR = b"sync-peers"
MIN_TRAINING_GAP = 60.0  # seconds between automatic retrains


def _nice_child() -> None:  # in the training child, before exec
    os.nice(10)  # the services come first
    try:  # and better still: train only on CPU time nothing else wants
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with us


class Scheduler(BusService):
    name = "scheduler"
    snapshot_name = "tasks.json"

    def __init__(self, home=None):
        super().__init__(home)
        from cortex.services.scheduler.prediction import (
            Predictor,  # scikit-learn: loaded by the scheduler alone
        )

        self.predictor = Predictor.load(self.rt.home / "models")
        self.trainer: subprocess.Popen | None = None
        self.loader: tuple[threading.Thread, list, str] | None = None  # models being read
        self.next_training = 0.0
        self.state = SchedulerState(self.settings.scheduler, self.predictor,
                                    ResourceMonitor(self.machine_sampler()))
        self.open_journal()
        # Workers that were busy when we stopped tell us what they run (worker.sync).
        self.link.send(wire.REQUEST, wire.BROKER, SYNC_CORR, {"op": "broker.peers"})

    def machine_sampler(self):
        """psutil readings that tell the suite's own CPU apart from everyone else's (or
        fixed readings from CORTEX_FIXED_MACHINE, for tests on the real suite)."""
        fixed = os.environ.get(FIXED_MACHINE_ENV)
        if fixed:
            try:
                return fixed_sampler(fixed)
            except ValueError as e:
                raise SystemExit(f"scheduler: {e}") from None
        return MachineSampler(self.suite_pids)

    def suite_pids(self) -> list[int]:
        """The suite's own processes: the services (their lock files hold their pids),
        supervisord, the workers, and our training child."""
        pids = [os.getpid()]
        run = self.rt.home / "run"
        for path in [*run.glob("*.lock"), run / "supervisord.pid"]:
            try:
                pids.append(int(path.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        pids += [w.pid for w in self.state.workers.values() if w.pid > 0]
        if self.trainer is not None:
            pids.append(self.trainer.pid)
        return pids

    def snapshot(self) -> dict:
        return self.state.snapshot()

    def restore(self, snapshot, records) -> None:
        if snapshot:
            self.state.load_snapshot(snapshot)
        for record in records:
            try:
                self.state.apply(record)
            except (KeyError, TypeError, ValueError) as e:
                # Never crash on a bad record (a crash loop ends in FATAL): report, skip.
                self.log.error("skipping journal record %s: %r", record.get("lsn"), e)
        self.state.restore(time.time())

    def handle(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        state = self.state
        peer = msg.peer
        if msg.type in (wire.REPLY, wire.ERROR):
            if msg.corr.startswith(b"L"):
                state.ledger_reply(fx, msg.corr, msg.type == wire.REPLY, body, now)
            elif msg.corr == SYNC_CORR and msg.type == wire.REPLY:
                for p in body.get("peers", []):
                    if p.get("role") == "worker":
                        fx.notify(p["name"], {"op": "worker.sync"})
            elif msg.type == wire.ERROR and body.get("code") == "unavailable" \
                    and peer.decode(errors="replace") in state.workers:
                state.worker_gone(fx, peer.decode(), "unreachable", now)
            return
        op = body.get("op")
        name = peer.decode(errors="replace")
        if msg.type == wire.REQUEST:
            if op == "task.submit":
                body["_size"] = len(msg.body)  # the predictor's payload-size feature
                state.submit(fx, peer, msg.corr, body, now)
                if body.get("priority") == "critical":
                    state.dispatch(fx, now)
                    state.scale(fx, now)  # surge at once if no worker can take it
                self.maybe_retrain()
            elif op == "task.status":
                task = state.get(body)
                state.refresh_eta(task, now)
                fx.reply(peer, msg.corr, task.summary())
            elif op == "task.wait":
                state.wait(fx, peer, msg.corr, body, now)
            elif op == "task.cancel":
                state.cancel(fx, peer, msg.corr, body, now)
            elif op == "task.list":
                fx.reply(peer, msg.corr, state.list_tasks(body))
            elif op == "worker.list":
                fx.reply(peer, msg.corr, {"workers": [vars(w) | {"types": list(w.types)}
                                                      for w in state.workers.values()]})
            elif op == "task.finished":
                state.task_finished(fx, name, peer, msg.corr, body, now)
            elif op == "task.progress":
                task = state.get(body)
                state.task_progress(task.worker or "", body | {"attempt": task.attempt}, now)
                fx.reply(peer, msg.corr, task.summary())
            elif op == "model.status":
                fx.reply(peer, msg.corr, self.predictor.status())
            elif op == "model.train":
                started = self.train_from_log()
                fx.reply(peer, msg.corr, {"started": started, **self.predictor.status()})
            elif op == "scheduler.status":
                fx.reply(peer, msg.corr, state.status(now) | {
                    "uptime": now - self.rt.started, "bad_messages": self.bad_messages,
                    "events_unacked": self.events.unacked})
            else:
                raise ProtocolError("unknown_type", f"unknown operation {op!r}")
        elif msg.type == wire.NOTIFY:
            if op == "worker.ready":
                state.worker_ready(fx, name, body, now)
            elif op == "task.started":
                state.task_started(fx, name, body, now)
            elif op == "task.heartbeat":
                state.task_heartbeat(fx, name, body, now)
            elif op == "task.progress":
                state.task_progress(name, body, now)
            elif op == "task.rejected":
                state.task_rejected(fx, name, body, now)
            elif op == "worker.leaving":
                state.worker_leaving(name)
            elif op == "peer.lost" and body.get("role") == "worker":
                state.worker_gone(fx, str(body.get("name")), "lost (no heartbeat)", now,
                                  kill=True)
            elif op == "worker.exited":
                state.worker_gone(fx, str(body.get("name")), "exited", now)
        state.dispatch(fx, now)

    def maybe_retrain(self) -> None:
        every = self.settings.scheduler.retrain_every
        if every and self.predictor.completions_since_training() >= every \
                and time.monotonic() >= self.next_training:
            self.train_from_log()

    def train_from_log(self) -> bool:
        """Retrain from the event log's history in a child process (`cortex model train`):
        fitting in a thread of ours held the GIL for a third of the loop's time under load.
        The new models are swapped in when the child exits (on_tick)."""
        if self.trainer is not None or self.loader is not None:
            return False
        self.trainer = subprocess.Popen(
            [sys.executable, "-m", "cortex.services.scheduler.prediction", "train", "--home",
             str(self.rt.home)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, preexec_fn=_nice_child)
        self.next_training = time.monotonic() + MIN_TRAINING_GAP
        return True

    def check_trainer(self, fx: Effects) -> None:
        """When the training child is done, read its models in a thread (unpickling them
        took ~0.3 s, a stall of every dispatch when done here), then swap them in."""
        if self.loader is not None:
            thread, read, out = self.loader
            if thread.is_alive():
                return
            self.loader = None
            loaded = bool(read) and self.predictor.adopt(read[0])  # empty: reading failed
            fx.emit("model.trained" if loaded else "model.training_failed",
                    {"exit_code": 0, "report": out})
            return
        if self.trainer is None or self.trainer.poll() is None:
            return
        out = self.trainer.stdout.read().decode(errors="replace").strip()[-2000:]
        self.trainer.stdout.close()
        code, self.trainer = self.trainer.returncode, None
        if code != 0:
            fx.emit("model.training_failed", {"exit_code": code, "report": out})
            return
        read: list = []  # filled by the thread with the new predictor
        thread = threading.Thread(target=lambda: read.append(self.predictor.read_saved()),
                                  name="model-reader", daemon=True)
        self.loader = (thread, read, out)
        thread.start()

    def on_tick(self, fx: Effects, now: float) -> float:
        self.check_trainer(fx)
        timeout = self.state.tick(fx, now, self.settings.scheduler.task_heartbeat)
        self.state.dispatch(fx, now)
        self.state.scale(fx, now)
        if self.loader is not None or self.trainer is not None:
            timeout = min(timeout, 0.1)  # look for the models soon after they are ready
        return timeout


    def shutdown(self) -> None:
        if self.trainer is not None:  # never leave the training child behind
            self.trainer.kill()
            self.trainer.wait()
            self.trainer.stdout.close()
        super().shutdown()


def main(argv=None) -> None:
    from cortex.services.runtime.entry import serve

    serve("cortex-scheduler", __doc__, Scheduler, argv)
