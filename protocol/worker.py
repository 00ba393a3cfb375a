"""The `Worker` helper: a process that takes tasks of one type from the scheduler.

    from cortex.protocol import Worker

    def summarize(ctx):                    # ctx: TaskContext
        ctx.use_tokens(1200)               # raises BudgetExceeded before crossing the reservation
        ctx.progress(0.5, "half way")
        return {"summary": ctx.payload["text"][:100]}

    Worker("summarize", summarize).run()   # until SIGTERM / stop()

On another machine, with the suite on tcp: `Worker(..., home=..., key_file=...)` (or
$CORTEX_KEY_FILE, or `[bus] key_file` in that home's cortex.toml): see docs/tcp.md.

The pool's own workers are this same class. The handler runs on the thread that
called `run()`, with no hand-off to another thread (two wake-ups a task fewer); a handler
that runs longer than a moment has the bus kept meanwhile by a keeper thread: heartbeats
to the broker, task heartbeats to the scheduler, progress, cancels, recalls, token
requests. The keeper looks every 50 ms while tasks run and sleeps after a second
without one. On the scheduler's machine a worker takes the scheduler's direct line
(direct.py) once offered, and its messages to and from the scheduler go there instead
of through the broker. Messages to and from the scheduler (ops, all NOTIFY unless
marked REQUEST):
    worker.ready {type, pid, done, direct} worker -> scheduler  idle and able to take a task
                                                                (`direct`: can take the line)
    worker.direct {token}                 scheduler -> worker   (over the bus) HELLO on the
                                                                line with this token
    worker.leaving {}                     worker -> scheduler   stop dispatching to me
    worker.sync {}                        scheduler -> worker   (after its restart) your state?
    task.run {task, prefetch}             scheduler -> worker   run this task (attempt included;
                                                                `prefetch`: once the one in
                                                                hand ends)
    task.rejected {id, attempt, reason}   worker -> scheduler   could not take it (stopping)
    task.recall {id, attempt}             scheduler -> worker   give a prefetched task back
    task.recalled {id, attempt, recalled} worker -> scheduler   given back, or it had started
    task.started {id, attempt, at}        worker -> scheduler   (if still running 20-70 ms on)
    task.heartbeat {id, attempt, ...}     worker -> scheduler   while the handler runs
    task.cancel {id, attempt}             scheduler -> worker
    task.finished REQUEST {id, attempt, ok, result|error, tokens_used, timings, fold}
                                          worker -> scheduler   re-sent until acknowledged;
                                                                the reply may carry our next
                                                                prefetched task (`run`)
"""

from __future__ import annotations

import logging
import math
import os
import queue
import signal
import threading
import time
from collections import deque

import msgpack
import zmq

from . import locate, wire
from .calls import Call, Request, Session
from .direct import SchedulerLine
from .handling import BudgetExceeded, Cancelled, TaskMemory, run_task
from .peer import BusLink, has_message, keys_for, make_socket, poll_ms, send_frames, unique_name
from .vocabulary import PRIORITY_RANK

log = logging.getLogger(__name__)

TASK_HEARTBEAT = 5.0  # seconds between task heartbeats while a handler runs
EXTEND_TIMEOUT = 5.0  # a handler waits this long for more tokens
UNTIL_ACKNOWLEDGED = math.inf  # a task.finished is re-sent until the scheduler has it
STARTED_DELAY = 0.02  # a handler still running after this is reported as started
TRUSTED_ROLES = (b"service", b"broker")
TRUSTED_SENDERS = (b"scheduler", b"ledger", b"broker")
READ_WAITING_MAX = 64  # messages read at a task's end before a held task starts
MAX_HELD = 4  # prefetched tasks a worker keeps (the scheduler sends one at a time)
# The keeper thread looks this often, while tasks run, whether a handler has run longer
# than STARTED_DELAY (then it keeps the bus until the handler returns); after PARK_AFTER
# with no handler running it sleeps until the next task starts. Short: each look is a
# wake-up (~0.1 ms of CPU), and twenty workers looking for a second after their last task
# were most of an idle suite's CPU then; a task after a pause pays one wake-up instead.
KEEPER_LOOK = 0.05
PARK_AFTER = 0.2


class TaskContext:
    """What a handler sees of its task, and how it reports back."""

    def __init__(self, worker: Worker, task: dict):
        self._worker = worker
        self.task = task
        self.id: str = task["id"]
        self.attempt: int = task["attempt"]
        self.type: str = task["type"]
        self.description: str = task.get("description", "")
        self.priority: str = task.get("priority", "medium")
        self.payload = task.get("payload")
        self.reserved: int = int(task.get("tokens", 0))
        self.tokens_used = 0
        self.cancelled = threading.Event()
        self.started_at: float | None = None  # set as its handler begins
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._extensions = 0

    def progress(self, fraction: float, message: str = "") -> None:
        self._worker._post("progress", {"fraction": float(fraction), "message": str(message)})

    def use_tokens(self, amount: int, *, extend: bool = True) -> None:
        """Count `amount` tokens about to be used. If that would cross the reservation,
        ask the ledger for more first; refused (or extend=False): raise BudgetExceeded."""
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ValueError("token amount must be a non-negative int")
        over = self.tokens_used + amount - self.reserved
        if over > 0 and not (extend and self._extend(over)):
            raise BudgetExceeded(
                f"using {amount} tokens would exceed the reservation of {self.reserved} "
                f"({self.tokens_used} used)", details={"reserved": self.reserved,
                                                       "used": self.tokens_used})
        self.tokens_used += amount
        self._worker._post("tokens", {"used": self.tokens_used})

    def report_tokens(self, used_total: int) -> None:
        """Report use that already happened (no enforcement: it is committed anyway)."""
        self.tokens_used = max(self.tokens_used, int(used_total))
        self._worker._post("tokens", {"used": self.tokens_used})

    def _extend(self, amount: int) -> bool:
        self._extensions += 1  # numbered, so a re-sent request is never granted twice
        self._worker._post("extend", {"amount": amount, "seq": self._extensions})
        try:
            granted, total = self._replies.get(timeout=EXTEND_TIMEOUT)
        except queue.Empty:
            return False
        if granted:
            self.reserved = total
        return granted

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled(f"task {self.id} was cancelled")


class Worker:
    """Takes tasks of `task_type` and runs `handler(ctx)` on each, one at a time."""

    def __init__(self, task_type: str | dict, handler=None, *, home=None, name: str | None = None,
                 endpoint: str | None = None, heartbeat: float = TASK_HEARTBEAT,
                 max_tasks: int | None = None, max_rss_mb: float | None = None,
                 idle_exit: float | None = None, install_signals: bool = True,
                 key_file: str | None = None):
        # One type and its handler, or {type: handler} for a worker that takes several.
        self.handlers = dict(task_type) if isinstance(task_type, dict) else {task_type: handler}
        if not self.handlers or not all(callable(h) for h in self.handlers.values()):
            raise ValueError("every task type needs a callable handler")
        self.task_type = next(iter(self.handlers))
        self.heartbeat = heartbeat
        self.max_tasks = max_tasks
        self.max_rss_mb = max_rss_mb
        self.idle_exit = idle_exit  # an extra (surge) worker leaves after this long idle
        self._idle_since = time.monotonic()
        self.name = name or unique_name(f"w-{task_type}")[:wire.MAX_NAME_BYTES]
        home = locate.find_home(home)
        self._ctx = zmq.Context.instance()
        endpoint = endpoint or locate.endpoints(home)["bus"]
        # On tcp: CurveZMQ with `key_file`, else $CORTEX_KEY_FILE or [bus] key_file.
        self._link = BusLink(self._ctx, endpoint, self.name, "worker",
                             keys=keys_for(home, endpoint, key_file))
        self._inbox_addr = f"inproc://worker-{id(self)}"
        self._inbox = make_socket(self._ctx, zmq.PAIR)
        self._inbox.bind(self._inbox_addr)
        self._outbox = make_socket(self._ctx, zmq.PAIR)  # what a running handler reports
        self._outbox.connect(self._inbox_addr)
        self._outbox_lock = threading.Lock()
        self._posts_sent = self._posts_read = 0  # a handler's reports, sent and read
        self._current: TaskContext | None = None
        self._pending: TaskContext | None = None  # started, its handler not yet called
        # The handler runs on the thread that runs the bus loop, which hands the bus to
        # the keeper thread while it does (`_bus`: held by whichever of the two serves
        # it). A short handler never wakes the keeper: it looks every KEEPER_LOOK while
        # tasks run and takes the bus only from a handler that has run a while (or asked
        # the ledger for tokens), so heartbeats, task heartbeats, cancels and recalls go
        # on however long a handler takes.
        self._bus = threading.Lock()
        self._handler_since: float | None = None  # monotonic start of the running handler
        self._keeper_cond = threading.Condition()
        self._begun = 0  # handlers begun: the keeper sleeps only when none began a while
        self._keeper_parked = False
        self._keeper_serving = False
        self._keeper_urgent = False
        self._closing = False
        self._memory = TaskMemory()
        # The loop's thread waits on the bus alone: a handler's posts come while it runs
        # the handler, and are read as it returns. The keeper, serving the bus while a
        # handler runs, waits on the posts too. (Each socket a wait watches costs system
        # calls on every wait: libzmq asks each one, before and after it blocks.)
        self._poller = zmq.Poller()
        self._poller.register(self._link.socket, zmq.POLLIN)
        self._keeper_poller = zmq.Poller()
        self._keeper_poller.register(self._link.socket, zmq.POLLIN)
        self._keeper_poller.register(self._inbox, zmq.POLLIN)
        # The scheduler's direct line (direct.py), on this machine only: an ipc bus.
        self._line = SchedulerLine(endpoint, self.name,
                                   (self._poller, self._keeper_poller))
        self._announced_leaving = False
        # Prefetched tasks, to start when the current one ends (the highest priority
        # first), and the last ones started (a recall asks whether one of them started).
        self._held: list[TaskContext] = []
        self._started_ids: deque[tuple[str, int]] = deque(maxlen=16)
        self._started_due: float | None = None  # when to tell the scheduler of a long task
        # Requests to the scheduler and ledger run on the client core's call machine
        # (re-sends, backoff, deadlines); `_on_settled` says what each answer is for.
        self._session = Session(home)
        self._session.heard()  # a worker is part of the suite: never give up on it early
        self._on_settled: dict[bytes, object] = {}  # corr -> callback(call)
        self._stopping = False
        self._ready_due: float | None = 0.0  # when to (re)send worker.ready; None: not needed
        self._ready_slack = 0.0  # how much later it may go, to ride on a heartbeat's wake
        self.done = 0
        self._keeper = threading.Thread(target=self._keep_bus, name="bus-keeper", daemon=True)
        if install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())

    # -- the handler, and the keeper of the bus while it runs --------------------------------
    def _post(self, kind: str, data: dict) -> None:
        """What a running handler reports (progress, tokens, a request for more): read by
        whichever thread serves the bus; a request for tokens wakes the keeper at once."""
        with self._outbox_lock:
            self._posts_sent += 1  # before: a reader that sees the post also sees it counted
            self._outbox.send(msgpack.packb((kind, data)))
        if kind == "extend" and self._handler_since is not None:
            with self._keeper_cond:
                self._keeper_urgent = True
                self._keeper_cond.notify()

    def _run_pending(self) -> None:
        """Run the started task's handler here, the keeper minding the bus if it runs
        long; then report its end."""
        ctx, self._pending = self._pending, None
        self._begun += 1
        self._handler_since = time.monotonic()
        with self._keeper_cond:
            if self._keeper_parked:
                self._keeper_cond.notify()
        self._bus.release()
        try:
            outcome = run_task(self.handlers.get(ctx.type), ctx, self._memory)
        finally:
            self._handler_since = None
            if self._keeper_serving:  # it polls the bus: end its wait now
                self._post("release", {})
            self._bus.acquire()
        self._read_posts()  # what the handler posted last comes before its end
        self._on_handler("done", outcome)

    def _read_posts(self) -> None:
        # Most handlers post nothing: counted as they are sent, so that costs no look at
        # the socket (asking is a system call or two). Read under `_bus`, by either thread.
        while self._posts_read < self._posts_sent and has_message(self._inbox):
            self._posts_read += 1
            self._on_handler(*msgpack.unpackb(self._inbox.recv(), raw=False))

    def _keep_bus(self) -> None:
        begun, idle_since = -1, time.monotonic()
        while True:
            with self._keeper_cond:
                if self._closing:
                    return
                if self._begun != begun:  # tasks ran since the last look: stay awake
                    begun, idle_since = self._begun, time.monotonic()
                elif self._handler_since is None and time.monotonic() - idle_since > PARK_AFTER:
                    self._keeper_parked = True  # the next task to begin wakes us
                    while self._handler_since is None and not self._closing:
                        self._keeper_cond.wait()
                    self._keeper_parked = False
                    continue
                if not self._keeper_urgent:
                    self._keeper_cond.wait(KEEPER_LOOK)
                urgent, self._keeper_urgent = self._keeper_urgent, False
            since = self._handler_since
            if since is not None and (urgent or time.monotonic() - since >= STARTED_DELAY):
                self._serve_during(since)

    def _serve_during(self, since: float) -> None:
        """Serve the bus until the handler that began at `since` returns."""
        with self._bus:
            self._keeper_serving = True
            try:
                while self._handler_since == since and not self._closing:
                    self._serve_once(time.monotonic(), self._keeper_poller)
            except Exception:  # the loop's own thread meets it again, and stops
                log.exception("the bus keeper stopped serving")
            finally:
                self._keeper_serving = False

    # -- the bus loop ---------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the task in hand, then leave (safe from a signal handler)."""
        self._stopping = True

    def _send(self, op: str, body: dict, type_=wire.NOTIFY, corr: bytes = b"") -> None:
        body = {"op": op, **body}
        if not self._line.send(type_, corr, body):
            self._link.send(type_, b"scheduler", corr, body)

    def _ask(self, request: Request, on_settled) -> None:
        """Start a call; `on_settled(call)` runs when it is answered or gives up."""
        call = self._session.start(request)
        self._on_settled[call.corr] = on_settled
        self._send_due(call, time.monotonic())

    def _send_due(self, call: Call, now: float) -> None:
        frames = call.frames_due(now)
        if frames is not None and not self._line.send_frames(frames):
            send_frames(self._link.socket, frames, block=True)

    def _tend_calls(self, now: float) -> float:
        """Send what is due, give up what is overdue; seconds until a call needs us."""
        wait = 3600.0
        for call in list(self._session.calls.values()):
            self._session.on_clock(call)
            if call.done:
                self._settle(call)
                continue
            self._send_due(call, now)
            wait = min(wait, call.wakeup(now))
        return wait

    def _settle(self, call: Call) -> None:
        self._session.forget(call)
        self._on_settled.pop(call.corr)(call)

    def _reporting(self) -> bool:
        """A task.finished not yet acknowledged."""
        return any(c.op == "task.finished" for c in self._session.calls.values())

    def _finish_settled(self, call: Call) -> None:
        if call.error is not None:  # not `unavailable`: a copy would get the same answer
            log.warning("the scheduler refused a task.finished: %s", call.error)
        elif isinstance(call.value, dict) and "run" in call.value:
            self._run(call.value["run"], prefetch=True)  # our next task, on the reply

    def _ready(self) -> None:
        self._send("worker.ready", self._line.asking(
            {"types": list(self.handlers), "pid": os.getpid(), "done": self.done}))
        # Repeated while idle: it re-registers us after a scheduler restart and tells the
        # scheduler a task.run lost on the way never arrived.
        self._idle_ready_due()

    def _idle_ready_due(self) -> None:
        """The next idle worker.ready, sent on the first wake after it is due: the
        broker's heartbeat wakes us (every interval, or its spacing for a quiet peer), so
        an idle worker wakes once per beat rather than also for its ready. At most one
        task heartbeat late, so it still comes well within the silence (3 task
        heartbeats) the scheduler allows."""
        self._ready_due = time.monotonic() + self.heartbeat
        self._ready_slack = min(self._link.spacing, self.heartbeat)

    def _on_bus(self, msg: wire.Message) -> None:
        # Orders and answers come from the suite's own services (the broker stamps the
        # role; only the suite's processes can be a "service"), never from another peer.
        if msg.role not in TRUSTED_ROLES or msg.peer not in TRUSTED_SENDERS:
            self._link.dropped += 1
            return
        if msg.type in (wire.REPLY, wire.ERROR):
            call = self._session.on_message(msg)
            if call is not None:
                if call.done:
                    self._settle(call)
                return  # else paused after `unavailable`: _tend_calls sends it again
            if msg.type == wire.ERROR and self._current is None:
                self._ready_due = time.monotonic() + 0.5  # our ready may have been lost
                self._ready_slack = 0.0
            return
        if msg.type != wire.NOTIFY:
            return
        try:
            body = msg.decoded()
        except wire.ProtocolError:
            self._link.dropped += 1
            return
        op = body.get("op")
        if op == "task.run":
            self._run(body.get("task"), body.get("prefetch") is True)
        elif op == "task.cancel":
            ctx = self._current
            if ctx is not None and ctx.id == body.get("id"):
                ctx.cancelled.set()
            self._held = [c for c in self._held if c.id != body.get("id")]  # never starts
        elif op == "task.recall":
            self._recall(body.get("id"), body.get("attempt"))
        elif op == "worker.direct":
            self._line.take(body.get("token"))
        elif op == "worker.sync":
            self._line.drop()  # a restarted scheduler knows no line: answer on the bus
            if self._current is None:
                self._ready()
            else:
                self._task_beat()
            self._give_back("sync")  # the restarted scheduler queues them again

    def _run(self, task, prefetch: bool) -> None:
        """A task.run order (or one riding on a task.finished reply: a prefetch)."""
        task = task if isinstance(task, dict) else {}
        if self._stopping:
            self._hand_back(task.get("id"), task.get("attempt"), "stopping")
        elif self._current is None:
            self._start(TaskContext(self, task))
        elif prefetch and len(self._held) < MAX_HELD:
            self._held.append(TaskContext(self, task))
        else:
            self._hand_back(task.get("id"), task.get("attempt"), "busy")

    def _start(self, ctx: TaskContext) -> None:
        self._link.working()
        self._current = ctx
        self._started_ids.append((ctx.id, ctx.attempt))
        self._ready_due = None
        # Told only if the handler still runs a moment later: a short task's start
        # rides on its task.finished (started_at), saving two hops per task.
        self._started_due = time.monotonic() + STARTED_DELAY
        self._next_task_beat = time.monotonic() + self.heartbeat
        self._pending = ctx  # the loop calls its handler once this message is handled

    def _hand_back(self, task_id, attempt, reason: str) -> None:
        self._send("task.rejected", {"id": task_id, "attempt": attempt, "reason": reason})

    def _give_back(self, reason: str) -> None:
        """Every prefetched task goes back unstarted (we stop, or the scheduler restarted)."""
        held, self._held = self._held, []
        for ctx in held:
            self._hand_back(ctx.id, ctx.attempt, reason)

    def _recall(self, task_id, attempt) -> None:
        """Give a prefetched task back if it has not started; say which."""
        ctx = next((c for c in self._held if c.id == task_id and c.attempt == attempt), None)
        if ctx is not None:
            self._held.remove(ctx)
        started = ctx is None and (task_id, attempt) in self._started_ids
        self._send("task.recalled", {"id": task_id, "attempt": attempt,
                                     "recalled": not started})

    def _next_held(self) -> TaskContext | None:
        """The highest-priority prefetched task, the first sent among equals."""
        if not self._held:
            return None
        ctx = min(self._held, key=lambda c: PRIORITY_RANK.get(c.priority, len(PRIORITY_RANK)))
        self._held.remove(ctx)
        return ctx

    def _task_beat(self) -> None:
        ctx = self._current
        self._send("task.heartbeat", self._line.asking(
            {"id": ctx.id, "attempt": ctx.attempt, "types": list(self.handlers),
             "tokens_used": ctx.tokens_used, "pid": os.getpid()}))
        self._next_task_beat = time.monotonic() + self.heartbeat

    def _on_handler(self, kind: str, data: dict) -> None:
        ctx = self._current
        if ctx is None:
            return
        if kind == "progress":
            self._send("task.progress", {"id": ctx.id, "attempt": ctx.attempt, **data})
        elif kind == "extend":
            # Numbered (seq), so a copy re-sent while the ledger restarts is never granted
            # twice; answered before the handler stops waiting for it.
            body = {"task": ctx.id, "attempt": ctx.attempt, "amount": data["amount"],
                    "seq": data["seq"]}
            if ctx.task.get("lease"):  # carved from a lease: the ledger may not know yet
                body.update(lease=ctx.task["lease"], carved=int(ctx.task.get("tokens", 0)))

            def extended(call: Call, ctx: TaskContext = ctx) -> None:
                reply = call.value if call.error is None else {}
                ctx._replies.put((bool(reply.get("granted")), int(reply.get("reserved", 0))))

            self._ask(Request("ledger", "ledger.extend", body, timeout=EXTEND_TIMEOUT - 0.5),
                      extended)
        elif kind == "done":
            # What came while the handler ran is read before the next task is chosen: a
            # recall of a held task (or of one whose order came meanwhile) would else
            # find it started, and the task that outranks it would wait for that one's
            # end too. A short handler leaves the bus unread until it returns.
            self._read_waiting()
            self.done += 1
            self._current = None
            self._started_due = None
            self._ask(Request("scheduler", "task.finished", self._line.asking(
                {"id": ctx.id, "attempt": ctx.attempt, "fold": True, **data}),
                timeout=UNTIL_ACKNOWLEDGED), self._finish_settled)
            if self._should_leave():
                self._give_back("stopping")
            elif self._held:
                self._start(self._next_held())  # at once: the scheduler learns it from
                # our finish, and refills our slot
            else:
                # The scheduler counts a finish as ready; idle heartbeats resume after.
                self._idle_ready_due()

    def _read_waiting(self) -> None:
        """Handle what the scheduler's line and the bus already hold, without waiting."""
        for _ in range(READ_WAITING_MAX):
            if self._line.pending():
                msg = self._line.receive()
            elif has_message(self._link.socket):
                msg = self._link.receive()
            else:
                return
            if msg is not None:
                self._on_bus(msg)

    def _should_leave(self) -> bool:
        if self._stopping:
            return True
        if self.max_tasks and self.done >= self.max_tasks:
            self._stopping = True
        elif self.max_rss_mb:
            import psutil
            if psutil.Process().memory_info().rss / 2**20 > self.max_rss_mb:
                self._stopping = True
        if self._stopping:
            self._send("worker.leaving", {"reason": "recycle"})
        return self._stopping

    def run(self) -> int:
        """Serve until stopped; returns the number of tasks done."""
        self._bus.acquire()
        self._keeper.start()
        try:
            while True:
                now = time.monotonic()
                self._announce_leaving()
                if self._stopping and self._current is None and not self._reporting():
                    break
                if self._current is not None:
                    self._idle_since = now
                elif self.idle_exit and now - self._idle_since > self.idle_exit:
                    self._stopping = True  # retire: announced as leaving on the next turn
                    continue
                self._serve_once(now)
                if self._pending is not None:
                    self._run_pending()
        finally:
            with self._keeper_cond:
                self._closing = True
                self._keeper_cond.notify()
            self._bus.release()
            self._keeper.join(timeout=5)
            self._line.drop()
            self._link.close()
            self._inbox.close(linger=0)
            self._outbox.close(linger=0)
        return self.done

    def _announce_leaving(self) -> None:
        if self._stopping and not self._announced_leaving:
            self._send("worker.leaving", {"reason": "stopping"})
            self._give_back("stopping")
            self._announced_leaving = True

    def _serve_once(self, now: float, poller: zmq.Poller | None = None) -> None:
        """One turn of the bus: what is due (ready, beats, a task's start and heartbeat,
        calls), then a wait for the bus (and, for the keeper, a handler's report) and what
        it brings. Run by the loop's thread, or by the keeper while a handler runs there."""
        if self._ready_due is not None and now >= self._ready_due and not self._stopping:
            self._ready()
        timeout = self._link.tick(now)
        ctx = self._current
        if ctx is not None:
            self._announce_leaving()  # a stop during a long task gives the held ones back
            if now >= self._next_task_beat:
                self._task_beat()
            timeout = min(timeout, self._next_task_beat - now)
            due = self._started_due
            if due is not None and now >= due:
                if ctx.started_at is None:  # its handler has not begun yet: look again
                    self._started_due = now + STARTED_DELAY
                else:
                    self._send("task.started", {"id": ctx.id, "attempt": ctx.attempt,
                                                "at": ctx.started_at})
                    self._started_due = None
            if self._started_due is not None:
                timeout = min(timeout, self._started_due - now)
        timeout = min(timeout, self._tend_calls(now))
        if self._ready_due is not None:
            timeout = min(timeout, max(0.0, self._ready_due - now + self._ready_slack))
        if self._stopping:
            timeout = min(timeout, 0.2)
        if self._pending is not None:
            timeout = 0.0  # a task waits to start: only what is already here
        for sock, _ in (poller or self._poller).poll(poll_ms(timeout)):
            if sock is self._inbox:
                self._read_posts()
            else:  # the bus, or the scheduler's direct line
                msg = self._link.receive() if sock is self._link.socket else \
                    self._line.receive()
                if msg is not None:
                    self._on_bus(msg)
