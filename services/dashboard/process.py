"""The dashboard process: the whole suite on a web page, live.

    python -m cortex.services.dashboard [--home DIR]

An aiohttp server on 127.0.0.1 (`[dashboard] port`, 0: any free port) serving the
static page (HTML, CSS and plain JavaScript modules shipped in `static/`) and a
WebSocket stream of what changed, at most every `FLUSH_INTERVAL`. It is a client of the
suite like any other: it follows the live events on the router's XPUB socket (a
subscriber that may drop under load and catches up with the next poll, never a
blocker) and asks the services for their status over the bus once per
`[dashboard] refresh`. It reads no other service's files.

Private by default: a random token per start, written with the URL to
`<home>/run/dashboard.url` (0600, removed at stop). Every request without it is refused
(403); the page's own requests carry it in a cookie set when the URL is opened, and an
action (cancel) is a POST that must carry it in the `X-Cortex-Token` header, which
another site's form cannot send. With `[dashboard] enabled = false` it exits 0 at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import sys
import time
from importlib import resources
from pathlib import Path

import msgpack
import orjson
import psutil
import zmq
from aiohttp import WSMsgType, web

from cortex.protocol import errors, locate
from cortex.protocol.client import AsyncClient
from cortex.protocol.peer import keys_for, make_socket, recv_frames, unique_name, use_keys
from cortex.services.dashboard.state import (
    PAGE_EVENTS,
    BadInput,
    Board,
    EventFilter,
    token_ok,
)
from cortex.services.runtime import memtrace
from cortex.services.runtime.durable import write_atomic
from cortex.services.runtime.process import join_generation, prepare_home
from cortex.services.runtime.settings import ConfigError
from cortex.services.runtime.settings import load as load_settings

SERVICES = ("broker", "events", "ledger", "scheduler", "pool")
STATUS_OPS = {"broker": "broker.status", "events": "events.status",
              "ledger": "ledger.status", "scheduler": "scheduler.status",
              "pool": "pool.status"}
FLUSH_INTERVAL = 0.1  # seconds: what changed reaches the pages this often
# Seconds between flushes while no page is open (a page opening ends the wait): they
# only drop what changed, and a page starts from a snapshot.
IDLE_FLUSH_INTERVAL = 10.0
# Seconds between status polls while no page is open: every poll wakes every service, and
# no one is looking. A page opening or a snapshot asked for polls at once.
IDLE_POLL_INTERVAL = 30.0
BUDGET_REFRESH = 0.25  # seconds between ledger polls while ledger events come in
SUB_HWM = 20_000  # live events queued for us at most; past it the router drops ours
DRAIN_BATCH = 5000  # live events read per wake-up before others get a turn
OUTBOX = 30  # messages queued for one page; a page further behind gets a fresh snapshot
CALL_TIMEOUT = 2.0
TRACE_EVENTS = 5000  # events of one task the task page shows at most
TOKEN_HEADER = "X-Cortex-Token"
STATIC = resources.files("cortex.services.dashboard") / "static"
HTTP_CODES = {"not_found": 404, "bad_request": 400, "conflict": 409, "unavailable": 503,
              "timeout": 504}

log = logging.getLogger("cortex.dashboard")


def encode(value) -> str:
    """JSON text for a page; events may hold what JSON has no word for (bytes, huge ints)."""
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:
        return json.dumps(value, default=str)


def json_response(value, status: int = 200) -> web.Response:
    return web.Response(text=encode(value), status=status, content_type="application/json")


def error_response(code: str, message: str) -> web.Response:
    return json_response({"code": code, "message": message}, HTTP_CODES.get(code, 500))


class Page:
    """One open page: its WebSocket, its filter, and a bounded queue of messages."""

    def __init__(self, ws: web.WebSocketResponse):
        self.ws = ws
        self.filter = EventFilter()
        self.task: str | None = None
        self.outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX)
        self.behind = False  # dropped updates: it gets a whole snapshot next
        self.wake = asyncio.Event()

    def push(self, text: str) -> None:
        if self.behind:
            return
        try:
            self.outbox.put_nowait(text)
        except asyncio.QueueFull:
            self.behind = True  # a slow page never holds the others up
            while not self.outbox.empty():
                self.outbox.get_nowait()
        self.wake.set()


class ProcessSampler:
    """CPU (cores) and memory of the suite's processes, from the pids the services
    reported over the bus (and our own)."""

    def __init__(self):
        self.procs: dict[int, psutil.Process] = {}
        self.last: dict[int, float] = {}
        self.at: float | None = None

    def sample(self, pids: set[int], now: float) -> tuple[float, float]:
        cpu_used = rss = 0.0
        current: dict[int, float] = {}
        for pid in pids:
            try:
                proc = self.procs.get(pid) or self.procs.setdefault(pid, psutil.Process(pid))
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss += proc.memory_info().rss / 2**20
            except psutil.Error:
                self.procs.pop(pid, None)
                continue
            current[pid] = times.user + times.system
            if pid in self.last:
                cpu_used += max(0.0, current[pid] - self.last[pid])
        span = now - self.at if self.at is not None else 0.0
        self.last, self.at = current, now
        for pid in set(self.procs) - set(current):
            del self.procs[pid]
        return (cpu_used / span if span > 0 else 0.0), rss


async def all_pages(query, body: dict, most: int) -> dict:
    """events.query's pages joined, up to `most` events: a page holds what fits one
    message, and one task's events (its results) can pass that."""
    trace = await query({**body, "limit": most})
    while trace.get("more") and len(trace["events"]) < most:
        page = await query({**body, "after": trace["cursor"],
                            "limit": most - len(trace["events"])})
        trace = {**page, "events": trace["events"] + page["events"]}
    return trace


class Dashboard:
    def __init__(self, home: Path, settings):
        self.home = home
        self.settings = settings.dashboard
        self.token = secrets.token_urlsafe(32)
        self.board = Board(SERVICES)
        self.pages: set[Page] = set()
        self.fresh: list[dict] = []  # events since the last flush
        self.url_file = home / "run" / "dashboard.url"
        self.port = 0
        self.stopping = asyncio.Event()
        self.watched = asyncio.Event()  # a page opened or a snapshot was asked for: poll now
        self.page_opened = asyncio.Event()  # ends the flush loop's idle wait
        self.client: AsyncClient | None = None
        self.sampler = ProcessSampler()
        self.worker_pids: set[int] = set()
        self.dropped = 0  # live events that could not be decoded

    # -- HTTP --------------------------------------------------------------------------
    def cookie_name(self) -> str:
        # Cookies do not tell ports apart: one name per dashboard on this host.
        return f"cortex-dashboard-{self.port}"

    def host_ok(self, request: web.Request) -> bool:
        """Only our own address: a page from another site that got a name of its own to
        point at 127.0.0.1 (DNS rebinding) is not let in."""
        return request.host in (f"127.0.0.1:{self.port}", f"localhost:{self.port}")

    @web.middleware
    async def guard(self, request: web.Request, handler):
        if request.method == "POST":
            given = request.headers.get(TOKEN_HEADER)  # never the cookie alone
        else:
            given = (request.query.get("token") or request.headers.get(TOKEN_HEADER)
                     or request.cookies.get(self.cookie_name()))
        if not self.host_ok(request) or not token_ok(self.token, given):
            return web.Response(status=403, text=(
                "403 Forbidden: this dashboard needs its token. Open the URL that "
                "`cortex dashboard` prints.\n"), headers=self.headers())
        response = await handler(request)
        if not response.prepared:
            response.headers.update(self.headers())
            if request.path == "/" and request.query.get("token"):
                response.set_cookie(self.cookie_name(), self.token, httponly=True,
                                    samesite="Strict", path="/")
        return response

    def headers(self) -> dict:
        return {"Content-Security-Policy": (
                    "default-src 'self'; img-src 'self' data:; "
                    f"connect-src 'self' ws://127.0.0.1:{self.port} ws://localhost:{self.port}; "
                    "frame-ancestors 'none'"),
                "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-store"}

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / "index.html").read_bytes(),
                            content_type="text/html", charset="utf-8")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kinds = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        kind = kinds.get(Path(name).suffix)
        if kind is None or "/" in name or name.startswith("."):
            raise web.HTTPNotFound()
        path = STATIC / name
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes(), content_type=kind, charset="utf-8")

    async def call(self, service: str, op: str, body: dict | None = None,
                   timeout: float = CALL_TIMEOUT):
        return await self.client.call(service, op, body, timeout=timeout)

    async def api_events(self, request: web.Request) -> web.Response:
        """Older events from the log (and PostgreSQL when configured), newest first."""
        q = request.query
        try:
            flt = EventFilter.from_dict({k: q.get(k) for k in ("type", "task", "worker", "text")
                                         if q.get(k)})
            body = {"newest": q.get("newest", "1") != "0",
                    "limit": max(1, min(int(q.get("limit", "200")), PAGE_EVENTS))}
            for key in ("since", "until"):
                if q.get(key):
                    body[key] = float(q[key])
        except (BadInput, ValueError) as e:
            return error_response("bad_request", str(e))
        body.update(flt.as_dict())
        try:
            reply = await self.call("events", "events.query", body, timeout=20.0)
        except errors.CortexError as e:
            return error_response(e.code, str(e))
        return json_response(reply)

    def task_id(self, request: web.Request) -> str:
        task = request.match_info["task"]
        if not (0 < len(task) <= 64 and task.isascii() and task.isprintable()):
            raise BadInput("a task id is 1 to 64 printable characters")
        return task

    async def task_events(self, task_id: str) -> dict:
        async def query(body: dict) -> dict:
            return await self.call("events", "events.query", body, timeout=20.0)
        return await all_pages(query, {"task": task_id}, TRACE_EVENTS)

    async def api_task(self, request: web.Request) -> web.Response:
        """One task's story: its status, its reservation and every event about it."""
        try:
            task_id = self.task_id(request)
        except BadInput as e:
            return error_response(e.code, str(e))
        task = reservation = None
        trace: dict = {"events": [], "truncated": False}
        calls = await asyncio.gather(
            self.call("scheduler", "task.status", {"id": task_id}),
            self.call("ledger", "ledger.task", {"task": task_id}),
            self.task_events(task_id), return_exceptions=True)
        status, ledger, events = calls
        if isinstance(status, errors.CortexError) and status.code != "not_found":
            return error_response(status.code, str(status))
        if isinstance(status, dict):
            task = status
        if isinstance(ledger, dict):
            reservation = ledger.get("reservation")
        if isinstance(events, dict):
            trace = events
        if task is None and not trace["events"]:
            return error_response("not_found", f"no task {task_id} (nor any event of it)")
        if task is not None and task.get("trimmed"):  # the scheduler let go: the log has it
            ended = [e for e in trace["events"] if e.get("type") == "task.completed"]
            if ended:
                task = {**task, "result": ended[-1].get("data", {}).get("result")}
        return json_response({"task": task, "reservation": reservation, "trace": trace,
                              "now": time.time()})

    async def api_cancel(self, request: web.Request) -> web.Response:
        try:
            task_id = self.task_id(request)
            task = await self.call("scheduler", "task.cancel", {"id": task_id})
        except BadInput as e:
            return error_response(e.code, str(e))
        except errors.CortexError as e:
            return error_response(e.code, str(e))
        log.info("task %s cancelled from the dashboard", task_id)
        return json_response({"task": task})

    async def api_snapshot(self, request: web.Request) -> web.Response:
        self.watched.set()
        return json_response(self.board.snapshot() | {"now": time.time()})

    # -- the live stream to pages ------------------------------------------------------
    def snapshot_text(self, page: Page) -> str:
        return encode({"t": "snapshot", "now": time.time(), **self.board.snapshot(),
                       "events": self.board.matching(page.filter),
                       "filter": page.filter.as_dict()})

    async def stream(self, request: web.Request) -> web.WebSocketResponse:
        origin = request.headers.get("Origin")
        if origin not in (None, f"http://127.0.0.1:{self.port}", f"http://localhost:{self.port}"):
            return web.Response(status=403, text="403 Forbidden: not from this dashboard\n")
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=64 * 1024)
        await ws.prepare(request)
        page = Page(ws)
        self.pages.add(page)
        self.watched.set()
        self.page_opened.set()
        sender = asyncio.ensure_future(self.send_loop(page))
        page.push(self.snapshot_text(page))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self.on_page_message(page, msg.data)
        finally:
            self.pages.discard(page)
            sender.cancel()
        return ws

    def on_page_message(self, page: Page, text: str) -> None:
        try:
            body = json.loads(text)
            if not isinstance(body, dict):
                raise BadInput("a message is a JSON object")
            if body.get("t") == "filter":
                page.filter = EventFilter.from_dict(body.get("filter") or {})
                page.push(encode({"t": "events", "reset": True,
                                  "events": self.board.matching(page.filter),
                                  "filter": page.filter.as_dict()}))
            elif body.get("t") == "task":
                task = body.get("id")
                if task is not None and not (isinstance(task, str) and 0 < len(task) <= 64):
                    raise BadInput("a task id is a string of 1 to 64 characters")
                page.task = task
            else:
                raise BadInput(f"unknown message {str(body.get('t'))[:40]!r}")
        except (ValueError, BadInput) as e:
            page.push(encode({"t": "error", "code": "bad_request", "message": str(e)}))

    async def send_loop(self, page: Page) -> None:
        while True:
            await page.wake.wait()
            page.wake.clear()
            if page.behind:
                page.behind = False
                await page.ws.send_str(self.snapshot_text(page))
            while not page.outbox.empty():
                await page.ws.send_str(page.outbox.get_nowait())

    async def flush_loop(self) -> None:
        next_budget_poll = 0.0
        while not self.stopping.is_set():
            # The pace of updates, not a wait for a state; with no page open there is
            # no one to update, only the changes to drop, so the dashboard stays quiet
            # until a page opens.
            if self.pages:
                await asyncio.sleep(FLUSH_INTERVAL)
            else:
                self.page_opened.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.page_opened.wait(), IDLE_FLUSH_INTERVAL)
            mono = time.monotonic()
            if self.board.budgets.stale and mono >= next_budget_poll:
                next_budget_poll = mono + BUDGET_REFRESH
                asyncio.ensure_future(self.poll_budgets())
            self.flush()

    def flush(self) -> None:
        fresh, self.fresh = self.fresh, []
        changes = self.board.take_changes(time.monotonic())
        if not self.pages:
            return
        shared = encode({"t": "update", "now": time.time(), **changes}) if changes else None
        for page in list(self.pages):
            if shared is not None:
                page.push(shared)
            if not fresh:
                continue
            matched = [e for e in fresh if page.filter.matches(e)] if not \
                page.filter.empty else fresh
            task = [e for e in fresh if e.get("task") == page.task] if page.task else []
            if matched or task:
                page.push(encode({"t": "events", "events": matched[-PAGE_EVENTS:],
                                  "skipped": max(0, len(matched) - PAGE_EVENTS),
                                  "task_events": task[-PAGE_EVENTS:]}))

    # -- what the suite says -------------------------------------------------------------
    def listen(self, ctx: zmq.Context) -> zmq.Socket:
        """Subscribe to every live event; the socket's fd wakes the asyncio loop."""
        sub = make_socket(ctx, zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, SUB_HWM)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        endpoint = locate.endpoints(self.home)["events_live"]
        use_keys(sub, keys_for(self.home, endpoint))  # CurveZMQ on tcp
        sub.connect(endpoint)
        loop = asyncio.get_running_loop()
        loop.add_reader(sub.getsockopt(zmq.FD), self.drain, sub)
        loop.call_soon(self.drain, sub)
        return sub

    def drain(self, sub: zmq.Socket) -> None:
        # The fd is edge-triggered: read everything there is, or come back for the rest.
        mono = time.monotonic()
        for _ in range(DRAIN_BATCH):
            parts = recv_frames(sub)
            if parts is None:
                return
            try:
                event = msgpack.unpackb(parts[-1], raw=False, strict_map_key=False)
            except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                    msgpack.StackError):
                self.dropped += 1
                continue
            if not isinstance(event, dict):
                self.dropped += 1
                continue
            self.board.on_event(event, mono)
            if not self.pages:
                continue  # a page opening starts from the board's snapshot
            self.fresh.append(event)
            if len(self.fresh) > 4 * PAGE_EVENTS:
                del self.fresh[:-PAGE_EVENTS]  # more than a page shows before the flush
        asyncio.get_running_loop().call_soon(self.drain, sub)

    async def ask(self, service: str, op: str, body: dict | None = None):
        try:
            return await self.call(service, op, body)
        except errors.CortexError:
            return None

    async def poll_budgets(self) -> None:
        reply = await self.ask("ledger", "ledger.status")
        self.board.budgets.merge_poll(reply.get("budgets") if reply else None)

    async def poll(self) -> None:
        board = self.board
        asked, now = time.monotonic(), time.time()
        names = list(STATUS_OPS)
        replies = await asyncio.gather(
            *(self.ask(name, STATUS_OPS[name]) for name in names),
            self.ask("scheduler", "worker.list"),
            self.ask("scheduler", "task.list", {"state": "queued", "limit": 500}),
            self.ask("events", "events.metrics", {"buckets": True}))
        status = dict(zip(names, replies[:len(names)], strict=True))
        workers, queued, metrics = replies[len(names):]
        for name in names:
            board.services.merge_poll(name, status[name], now)
        pool = status["pool"]
        board.fleet.merge_poll(workers.get("workers") if workers else None,
                               pool.get("workers") if pool else None, asked, time.monotonic(),
                               now)
        if pool:
            self.worker_pids = {w["pid"] for w in pool.get("workers", [])
                                if isinstance(w.get("pid"), int)}
        board.queue.merge_poll(queued.get("tasks") if queued else None, status["scheduler"],
                               metrics)
        ledger = status["ledger"]
        board.budgets.merge_poll(ledger.get("budgets") if ledger else None)
        if metrics:
            point = board.latency.add(now, metrics)
            if point is not None:
                board.pending["latency_point"] = point
            board.pending["latency_summary"] = board.latency.summary
        pids = {row["pid"] for row in board.services.rows.values() if row["pid"]}
        cores, rss = self.sampler.sample(pids | self.worker_pids | {os.getpid()},
                                         time.monotonic())
        committed = next((b.get("committed") for b in board.budgets.rows
                          if b.get("scope") == "global"), None)
        board.pending["resources"] = board.resources.add(now, cores, rss, committed)

    async def poll_loop(self) -> None:
        while not self.stopping.is_set():
            began = time.monotonic()
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - a bad reply must not end the dashboard
                log.exception("status poll failed")
            interval = self.settings.refresh if self.pages else IDLE_POLL_INTERVAL
            left = interval - (time.monotonic() - began)
            self.watched.clear()
            wake = asyncio.ensure_future(self.watched.wait())
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait((wake, stop), timeout=max(0.05, left),
                               return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            stop.cancel()

    # -- start and stop ----------------------------------------------------------------
    async def serve(self) -> None:
        app = web.Application(middlewares=[self.guard], client_max_size=64 * 1024)
        app.add_routes([
            web.get("/", self.index), web.get("/static/{name}", self.static),
            web.get("/ws", self.stream), web.get("/api/events", self.api_events),
            web.get("/api/snapshot", self.api_snapshot),
            web.get("/api/task/{task}", self.api_task),
            web.post("/api/task/{task}/cancel", self.api_cancel)])
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        site = await self.bind(runner)
        if site is None:
            await runner.cleanup()
            return
        self.port = site._server.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{self.port}/?token={self.token}"
        self.client = AsyncClient(self.home, name=unique_name("dashboard"),
                                  timeout=CALL_TIMEOUT)
        ctx = zmq.Context()
        sub = self.listen(ctx)
        tasks = [asyncio.ensure_future(self.poll_loop()),
                 asyncio.ensure_future(self.flush_loop())]
        write_atomic(self.url_file, (url + "\n").encode())
        log.info("dashboard at http://127.0.0.1:%d/ (token in %s)", self.port, self.url_file)
        try:
            await self.stopping.wait()
        finally:
            self.url_file.unlink(missing_ok=True)
            for task in tasks:
                task.cancel()
            loop.remove_reader(sub.getsockopt(zmq.FD))
            sub.close(linger=0)
            for page in list(self.pages):
                await page.ws.close()
            await runner.cleanup()
            self.client.close()
            ctx.term()
            log.info("dashboard stopped")

    async def bind(self, runner: web.AppRunner) -> web.TCPSite | None:
        """Listen on 127.0.0.1; a fixed port that is taken is tried again every few
        seconds (exiting would only have supervisord start us again at once)."""
        while not self.stopping.is_set():
            site = web.TCPSite(runner, "127.0.0.1", self.settings.port, reuse_address=True)
            try:
                await site.start()
                return site
            except OSError as e:
                log.error("cannot listen on 127.0.0.1:%d (%s); trying again in 5 s",
                          self.settings.port, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 5.0)
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="cortex-dashboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="suite home (default: $CORTEX_HOME or ./.cortex)")
    home = locate.find_home(parser.parse_args(argv).home)
    logging.basicConfig(level=os.environ.get("CORTEX_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s dashboard[%(process)d] %(levelname)s %(message)s")
    try:
        settings = load_settings(home)
    except ConfigError as e:
        print(f"dashboard: {e}", file=sys.stderr, flush=True)
        raise SystemExit(ConfigError.exit_code) from None
    if not settings.dashboard.enabled:
        log.info("switched off in %s ([dashboard] enabled = false)", home / "cortex.toml")
        return
    prepare_home(home)
    join_generation(home, "dashboard")  # it dies with its supervisord
    lock = open(home / "run" / "dashboard.lock", "a+")  # noqa: SIM115 - held while we run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"dashboard: another dashboard is running for {home}") from None
    memory = memtrace.from_environment(log)  # None unless CORTEX_TRACEMALLOC
    try:
        asyncio.run(Dashboard(home, settings).serve())
    finally:
        if memory is not None:
            memory.mark()
        lock.close()
