"""The scheduler process: owns the task table; admits, dispatches, retries, times out.

    python -m cortex.services.scheduler [--home DIR]

Decisions live in state.SchedulerState (pure); this module moves messages, reads the
clocks and the machine, and runs the training child (trainer.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cortex.protocol import wire
from cortex.protocol.catalogue import SUBMIT_BATCH, check_reply
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.loop import BusService, serves
from cortex.services.scheduler.classify_rows import MODEL_FILE as ROUTER_FILE
from cortex.services.scheduler.classify_rows import RoutingError
from cortex.services.scheduler.clock import Now
from cortex.services.scheduler.feasibility import ResourceMonitor
from cortex.services.scheduler.machine import FIXED_MACHINE_ENV, MachineSampler, fixed_sampler
from cortex.services.scheduler.prediction.predictor import Predictor
from cortex.services.scheduler.prefetch import fold_prefetches
from cortex.services.scheduler.routing import Routing
from cortex.services.scheduler.state import SchedulerState
from cortex.services.scheduler.trainer import Trainer

SYNC_CORR = b"sync-peers"
BUDGETS_CORR = b"budgets"  # our copy of the ledger's budgets (admission.py)
BUDGETS_REFRESH = 2.0  # seconds between asks
LINE_SWEEP = 10.0  # seconds between looks for clients gone silent on the direct line


def load_router(model_dir: Path):
    """The saved router (classify.load); scikit-learn is loaded only once there is one."""
    path = Path(model_dir) / ROUTER_FILE
    if not path.exists():
        raise RoutingError("no_model", f"no routing model at {path}")
    from cortex.services.scheduler.classify import load

    return load(model_dir)


class Scheduler(BusService):
    name = "scheduler"
    snapshot_name = "tasks.json"
    FORKED_SNAPSHOTS = True  # up to `retention` finished tasks: 25-120 ms in the loop

    def __init__(self, home=None):
        super().__init__(home)
        # Training runs in a child that reads the event log: no completions kept here.
        self.predictor = Predictor.load(self.rt.home / "models", history_limit=0)
        self.trainer = Trainer(self.rt.home, self.predictor)
        self.routing = Routing(self.rt.home, self.settings.routing, load_router)
        self.state = SchedulerState(self.settings.scheduler, predictor=self.predictor,
                                    monitor=ResourceMonitor(self.machine_sampler()),
                                    providers=self.settings.providers, routing=self.routing)
        types = {t for g in self.settings.groups for t in g.types}
        self.state.admission.know_types(
            types | set(self.settings.types.external),
            lambda task_type: bool(self.state.registry.serving(task_type)),
            self.settings.types.grace, time.monotonic())
        self.state.admission.know_budgets(self.settings.ledger.budgets)
        self.next_budgets = 0.0
        self.next_line_sweep = 0.0
        self.submitted_seen = 0  # tasks submitted at the last tick (a lull has none)
        self.finishes: dict[bytes, bytes] = {}  # worker -> its task.finished this turn
        # type -> why its workers do not come (their group crash-loops), until one is ready
        self.crashing: dict[str, dict] = {}
        self.open_journal()
        self.open_direct_line()  # local workers' run orders and finishes skip the broker
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
        pids += [t.child.pid for t in (self.trainer, self.routing.trainer)
                 if t.child is not None]
        return pids

    def snapshot(self) -> dict:
        return self.state.snapshot()

    def flush(self, fx: Effects) -> None:
        self.state.flush_ledger(fx, time.monotonic())  # the turn's ledger orders, batched
        fx.sends = fold_prefetches(fx.sends, self.finishes)
        self.finishes = {}
        super().flush(fx)

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

    # -- replies to our own requests (the ledger's, the broker's) ----------------------------
    def on_reply(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        now = self.now(wall)
        # Only the ledger itself (a proven service) answers our ledger orders; any other
        # peer's "reply" on one of their correlation ids is ignored.
        if msg.corr.startswith(b"L") and msg.peer == b"ledger" and msg.role == b"service":
            self.state.ledger_reply(fx, msg.corr, msg.type == wire.REPLY, body, now)
        elif msg.corr == BUDGETS_CORR and msg.type == wire.REPLY and msg.peer == b"ledger" \
                and msg.role == b"service" and isinstance(body.get("budgets"), list):
            self.state.admission.know_budgets(body["budgets"])
        elif msg.corr == SYNC_CORR and msg.type == wire.REPLY and msg.peer == wire.BROKER:
            for p in check_reply("broker.peers", body)["peers"]:
                if p["role"] == "worker":
                    fx.notify(p["name"], {"op": "worker.sync"})

    # -- agents and operators (bodies already checked against the catalogue) ---------------
    @serves("task.submit")
    def submit(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        now = self.now(wall)
        body["_size"] = len(msg.body)  # the predictor's payload-size feature
        self.state.submit(fx, msg.peer, msg.corr, body, now)
        if body["priority"] == "critical":
            self.state.dispatch(fx, now)
            self.state.scale(fx, now)  # surge at once if no worker can take it
            self.end_turn = True  # its dispatch is sent now, not behind the turn's rest

    @serves("task.submit_many")
    def submit_many(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        now = self.now(wall)
        items: list[dict | wire.ProtocolError] = []
        critical = False
        for index, raw in enumerate(body["tasks"]):
            try:
                item = SUBMIT_BATCH.item("tasks", index, raw)
            except wire.ProtocolError as e:
                items.append(e)
                continue
            item["_size"] = len(wire.encode_body(raw))  # as a submit of its own would be
            critical = critical or item["priority"] == "critical"
            items.append(item)
        self.state.submit_many(fx, msg.peer, msg.corr, items, now)
        if critical:
            self.state.dispatch(fx, now)
            self.state.scale(fx, now)  # surge at once if no worker can take it
            self.end_turn = True

    @serves("task.status")
    def status_of(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        now = self.now(wall)
        task = self.state.get(body)
        self.state.refresh_eta(task, now)
        summary = task.summary()
        if task.waiting == "worker" and task.type in self.crashing:  # no worker is coming
            summary["waiting_detail"] = self.crashing[task.type]
        fx.reply(msg.peer, msg.corr, summary)

    @serves("task.wait")
    def wait(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        self.state.wait(fx, msg.peer, msg.corr, body, self.now(wall))

    @serves("task.cancel")
    def cancel(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        now = self.now(wall)
        self.state.cancel(fx, msg.peer, msg.corr, body, now)

    @serves("task.list")
    def list_tasks(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        fx.reply(msg.peer, msg.corr, self.state.list_tasks(body))

    @serves("worker.list")
    def worker_list(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        fx.reply(msg.peer, msg.corr, {"workers": self.state.worker_rows(self.now(wall))})

    @serves("task.progress")
    def progress_request(self, fx: Effects, msg: wire.Message, body: dict, wall: float
                         ) -> None:
        task = self.state.progress_request(fx, body, self.now(wall))
        fx.reply(msg.peer, msg.corr, task.summary())

    @serves("model.status")
    def model_status(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        fx.reply(msg.peer, msg.corr, self.predictor.status() | self.trainer.status() | {
            "routing": self.routing.status()})

    @serves("route.explain")
    def route_explain(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        try:
            fx.reply(msg.peer, msg.corr, self.routing.explain(body["description"],
                                                              body["words"]))
        except RoutingError as e:
            fx.error(msg.peer, msg.corr, "unavailable", str(e))

    @serves("line.open")
    def line_open(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        """A client of this machine asks for the direct line (runtime/direct.py): its
        token goes back over the bus, to the name the broker bound."""
        if self.direct is None:
            # Not `unavailable`, which a client pauses on and asks again for seconds:
            # there is none to wait for (a tcp bus, or no epoll and SEQPACKET here).
            fx.error(msg.peer, msg.corr, "no_line", "this scheduler has no direct line "
                     "(a tcp bus, or a system without epoll or SEQPACKET sockets)")
        else:
            token = self.direct.peers.token_for(msg.peer, "client", self.now(wall).mono)
            fx.reply(msg.peer, msg.corr, {"token": token})

    @serves("model.train")
    def model_train(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        self.trainer.request(fx, msg.peer, msg.corr, self.now(wall).mono)

    @serves("scheduler.status")
    def status(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        now = self.now(wall)
        fx.reply(msg.peer, msg.corr, self.state.status(now) | {
            "uptime": now.wall - self.rt.started, "bad_messages": self.bad_messages,
            "internal_errors": self.internal_errors, "pid": os.getpid(),
            "events_unacked": self.events.unacked, "ledger_orders": self.state.ledger_orders(),
            "direct_line": self.direct.status() if self.direct is not None else None})

    # -- workers -------------------------------------------------------------------------------
    @serves("task.finished")
    def finished(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        now = self.now(wall)
        self.state.task_finished(fx, msg.peer.decode(), msg.peer, msg.corr, body, now)
        if body["fold"]:  # its next prefetch may ride on our reply
            self.finishes[msg.peer] = msg.corr
        self.can_take_line(msg.peer, body)
        self.offer_line(fx, msg.peer, now)
        self.critical_may_start(fx, now)

    @serves("worker.ready", wire.NOTIFY)
    def ready(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        for task_type in body["types"]:  # a worker of that type started after all
            self.crashing.pop(task_type, None)
        self.can_take_line(msg.peer, body)
        self.state.orders_left_at = self.orders_left(time.monotonic())
        self.from_worker(self.state.worker_ready, fx, msg, body, wall)

    @serves("task.started", wire.NOTIFY)
    def started(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        self.from_worker(self.state.task_started, fx, msg, body, wall)

    @serves("task.heartbeat", wire.NOTIFY)
    def heartbeat(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        self.can_take_line(msg.peer, body)
        self.from_worker(self.state.task_heartbeat, fx, msg, body, wall)

    @serves("task.progress", wire.NOTIFY)
    def progress(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        self.from_worker(self.state.task_progress, fx, msg, body, wall)

    @serves("task.rejected", wire.NOTIFY)
    def rejected(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        self.from_worker(self.state.task_rejected, fx, msg, body, wall)

    @serves("task.recalled", wire.NOTIFY)
    def recalled(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        self.from_worker(self.state.task_recalled, fx, msg, body, wall)

    @serves("worker.leaving", wire.NOTIFY)
    def leaving(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        self.from_worker(self.state.worker_leaving, fx, msg, body, wall)

    def from_worker(self, report, fx: Effects, msg: wire.Message, body: dict, wall: float
                    ) -> None:
        now = self.now(wall)
        report(fx, msg.peer.decode(), body, now)
        if self.state.registry.get(msg.peer.decode()) is None:  # gone (left, or refused)
            self.forget_line(msg.peer)
        else:
            self.offer_line(fx, msg.peer, now)
        self.critical_may_start(fx, now)

    # -- the direct line (runtime/direct.py) -------------------------------------------------
    def can_take_line(self, name: bytes, body: dict) -> None:
        if self.direct is not None and body["direct"]:
            self.direct.peers.capable.add(name)

    def offer_line(self, fx: Effects, name: bytes, now: Now) -> None:
        """A worker that can take the line and is not on it gets a token (over the bus,
        which delivers it to the name's holder alone)."""
        if self.direct is not None:
            token = self.direct.peers.offer(name, now.mono)
            if token is not None:
                fx.notify(name.decode(), {"op": "worker.direct", "token": token})

    def forget_line(self, name: bytes) -> None:
        if self.direct is not None:
            self.direct.peers.forget(name)

    def critical_may_start(self, fx: Effects, now: Now) -> None:
        """A worker's report may have freed it: a queued critical task is dispatched now,
        and the turn ends so that its order goes out at once, not behind the turn's rest
        (only when one was: ending every turn while one waits would handle one message a
        turn)."""
        waiting = self.state.queue.critical_waiting()
        if waiting:
            self.state.dispatch(fx, now)
            if self.state.queue.critical_waiting() < waiting:
                self.end_turn = True

    LANES = 3

    def rank(self, msg: wire.Message) -> int:
        """Of the messages read together: a submit that may hold a critical task first (a
        cheap look at the raw body: a false positive only moves it up), then the
        workers' reports (a freed worker takes the best queued task sooner), then the
        rest (clients' submits, waits and queries; other services)."""
        if msg.type == wire.REQUEST and b"critical" in msg.body:
            return 0
        return 1 if msg.role == b"worker" else 2

    # -- other services ------------------------------------------------------------------------
    @serves("peer.lost", wire.NOTIFY)
    def peer_lost(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        if body["role"] == "worker":
            now = self.now(wall)
            self.forget_line(body["name"].encode())
            self.state.worker_gone(fx, body["name"], "lost (no heartbeat)", now, kill=True)

    @serves("ledger.budgets", wire.NOTIFY)
    def ledger_budgets(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        """A budget was set: admission knows it before any submit that follows."""
        if isinstance(body["budgets"], list):
            self.state.admission.know_budgets(body["budgets"])

    @serves("worker.exited", wire.NOTIFY)
    def worker_exited(self, fx: Effects, msg: wire.Message, body: dict, wall: float) -> None:
        now = self.now(wall)
        if body["crashing"]:
            for task_type in body["types"]:
                self.crashing[task_type] = {"crash_looping": body["group"] or body["name"],
                                            "last_error": body["crashing"]}
        self.forget_line(body["name"].encode())
        self.state.worker_gone(fx, body["name"], "exited", now)

    def after_turn(self, fx: Effects, wall: float) -> None:
        """One dispatch for all the turn's messages (submits, finishes, workers come and
        gone): cheaper than one per message, it sees the turn's priorities together, and a
        failure in it cannot take back an admitted submit's journal record."""
        self.state.dispatch(fx, self.now(wall))

    def on_tick(self, fx: Effects, wall: float) -> float:
        now = self.now(wall)
        if now.mono >= self.next_line_sweep and self.direct is not None:
            self.direct.end_idle(now.mono)
            self.next_line_sweep = now.mono + LINE_SWEEP
        if now.mono >= self.next_budgets:
            fx.sends.append((b"ledger", wire.REQUEST, BUDGETS_CORR, {"op": "ledger.status"}))
            self.next_budgets = now.mono + BUDGETS_REFRESH
        self.trainer.poll(fx, now.mono)
        self.routing.trainer.poll(fx, now.mono)
        self.state.orders_left_at = self.orders_left(now.mono)
        timeout = self.state.tick(fx, now, self.settings.scheduler.task_heartbeat)
        self.state.dispatch(fx, now)
        self.state.scale(fx, now)
        # Automatic trainings wait for a lull: nothing queued for workers, and nothing
        # submitted since the last look (an open-loop load whose tasks each find a free
        # worker leaves the queue empty, yet a training's child would take its CPU).
        submitted = self.state.counters["submitted"]
        busy = submitted != self.submitted_seen or not self.state.queue.empty()
        self.submitted_seen = submitted
        self.trainer.maybe_auto(self.settings.scheduler.retrain_every, now.mono, busy)
        self.routing.maybe_train(now.mono, busy)
        if self.trainer.busy or self.routing.trainer.busy:
            timeout = min(timeout, 0.1)  # look at the training child's output soon
        return timeout

    def shutdown(self) -> None:
        self.trainer.stop()
        self.routing.trainer.stop()
        if self.state.leases.held and self.halted is None:  # idle leases go back (leases.py)
            fx = Effects()
            self.state.leases.return_all(fx, self.state.ledger, time.monotonic())
            self.flush(fx)
        super().shutdown()


def main(argv=None) -> None:
    from cortex.services.runtime.entry import serve

    serve("cortex-scheduler", __doc__, Scheduler, argv)
