"""The scheduler process: owns the task table; admits, dispatches, retries, times out.

    python -m cortex.services.scheduler [--home DIR]

Decisions live in state.SchedulerState (pure); this module moves messages, reads the
clocks and the machine, and runs the training child (trainer.py).
"""

from __future__ import annotations

import os
import time

from cortex.protocol import wire
from cortex.protocol.wire import ProtocolError
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.loop import BusService
from cortex.services.scheduler.clock import Now
from cortex.services.scheduler.feasibility import ResourceMonitor
from cortex.services.scheduler.machine import FIXED_MACHINE_ENV, MachineSampler, fixed_sampler
from cortex.services.scheduler.state import SchedulerState
from cortex.services.scheduler.trainer import Trainer

SYNC_CORR = b"sync-peers"


class Scheduler(BusService):
    name = "scheduler"
    snapshot_name = "tasks.json"

    def __init__(self, home=None):
        super().__init__(home)
        from cortex.services.scheduler.prediction.predictor import (
            Predictor,  # scikit-learn: loaded by the scheduler alone
        )

        self.predictor = Predictor.load(self.rt.home / "models")
        self.trainer = Trainer(self.rt.home, self.predictor)
        self.state = SchedulerState(self.settings.scheduler, predictor=self.predictor,
                                    monitor=ResourceMonitor(self.machine_sampler()))
        self.open_journal()
        # Workers that were busy when we stopped tell us what they run (worker.sync).
        self.link.send(wire.REQUEST, wire.BROKER, SYNC_CORR, {"op": "broker.peers"})

    @staticmethod
    def now(wall: float | None = None) -> Now:
        """Both clocks (the loop hands over the wall clock it read for the turn)."""
        return Now(time.time() if wall is None else wall, time.monotonic())

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
        if self.trainer.child is not None:
            pids.append(self.trainer.child.pid)
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
        self.state.restore(self.now())

    def handle(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        now = self.now(wall)
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
        if msg.type == wire.REQUEST:
            self.request(fx, op, peer, msg, body, now)
        elif msg.type == wire.NOTIFY:
            self.notice(fx, op, peer.decode(errors="replace"), body, now)
        state.dispatch(fx, now)

    def request(self, fx: Effects, op, peer: bytes, msg: wire.Message, body: dict,
                now: Now) -> None:
        state = self.state
        if op == "task.submit":
            body["_size"] = len(msg.body)  # the predictor's payload-size feature
            state.submit(fx, peer, msg.corr, body, now)
            if body.get("priority") == "critical":
                state.dispatch(fx, now)
                state.scale(fx, now)  # surge at once if no worker can take it
            self.trainer.maybe_auto(self.settings.scheduler.retrain_every, now.mono)
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
            fx.reply(peer, msg.corr, {"workers": state.worker_rows(now)})
        elif op == "task.finished":
            state.task_finished(fx, peer.decode(errors="replace"), peer, msg.corr, body, now)
        elif op == "task.progress":
            fx.reply(peer, msg.corr, state.progress_request(fx, body, now).summary())
        elif op == "model.status":
            fx.reply(peer, msg.corr, self.predictor.status() | self.trainer.status())
        elif op == "model.train":
            self.trainer.request(fx, peer, msg.corr, now.mono)
        elif op == "scheduler.status":
            fx.reply(peer, msg.corr, state.status(now) | {
                "uptime": now.wall - self.rt.started, "bad_messages": self.bad_messages,
                "pid": os.getpid(), "events_unacked": self.events.unacked})
        else:
            raise ProtocolError("unknown_type", f"unknown operation {op!r}")

    def notice(self, fx: Effects, op, name: str, body: dict, now: Now) -> None:
        state = self.state
        if op == "worker.ready":
            state.worker_ready(fx, name, body, now)
        elif op == "task.started":
            state.task_started(fx, name, body, now)
        elif op == "task.heartbeat":
            state.task_heartbeat(fx, name, body, now)
        elif op == "task.progress":
            state.task_progress(fx, name, body, now)
        elif op == "task.rejected":
            state.task_rejected(fx, name, body, now)
        elif op == "worker.leaving":
            state.worker_leaving(fx, name, body, now)
        elif op == "peer.lost" and body.get("role") == "worker":
            state.worker_gone(fx, str(body.get("name")), "lost (no heartbeat)", now, kill=True)
        elif op == "worker.exited":
            state.worker_gone(fx, str(body.get("name")), "exited", now)

    def on_tick(self, fx: Effects, wall: float) -> float:
        now = self.now(wall)
        self.trainer.poll(fx, now.mono)
        timeout = self.state.tick(fx, now, self.settings.scheduler.task_heartbeat)
        self.state.dispatch(fx, now)
        self.state.scale(fx, now)
        if self.trainer.busy:
            timeout = min(timeout, 0.1)  # look at the training child's output soon
        return timeout

    def shutdown(self) -> None:
        self.trainer.stop()
        super().shutdown()


def main(argv=None) -> None:
    from cortex.services.runtime.entry import serve

    serve("cortex-scheduler", __doc__, Scheduler, argv)
