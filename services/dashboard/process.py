"""The dashboard process: the whole suite on a web page, live.

    python -m cortex.services.dashboard [--home DIR]

An aiohttp server on 127.0.0.1 (`[dashboard] port`, 0: any free port) serving the
static page (HTML, CSS and plain JavaScript modules shipped in `static/`) and a
WebSocket stream of what changed, at most every `FLUSH_INTERVAL`. It is a client of the
suite like any other: it follows the live events on the router's XPUB socket (a
subscriber that may drop under load and catches up with the next poll, never a
blocker) and asks the services for their status over the bus once per
`[dashboard] refresh`. It reads no other service's files.

Dormant when unwatched: from its start until the first page or request, and after
`DORMANT_AFTER` seconds with no page open and no request, it unsubscribes from the live
events (a task then costs it nothing) and keeps only its idle status polls; the next page
or API request wakes it, and it catches its board up (a status poll and the router's
recent events) before it answers. `/api/status` says which it is, without waking it.

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

import zmq
from aiohttp import WSMsgType, web

from cortex.protocol import errors, locate
from cortex.protocol.client import AsyncClient
from cortex.protocol.peer import unique_name
from cortex.services.dashboard.live import (
    DORMANT_AFTER,
    SUB_HWM,
    LiveFeed,
    dormant_after_from,
)
from cortex.services.dashboard.pages import Page, encode, error_response, json_response
from cortex.services.dashboard.paging import all_pages, recent_events
from cortex.services.dashboard.sampler import ProcessSampler
from cortex.services.dashboard.state import (
    PAGE_EVENTS,
    RECENT_EVENTS,
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
UNWATCHED = ("/api/status",)  # requests that neither wake the dashboard nor keep it awake
RECENT_TIMEOUT = 10.0  # seconds for one page of the router's recent events
CALL_TIMEOUT = 2.0
TRACE_EVENTS = 5000  # events of one task the task page shows at most
TOKEN_HEADER = "X-Cortex-Token"
STATIC = resources.files("cortex.services.dashboard") / "static"

log = logging.getLogger("cortex.dashboard")


class Dashboard:
    def __init__(self, home: Path, settings, dormant_after: float = DORMANT_AFTER):
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
        self.feed = LiveFeed(home, self.on_live)
        self.dormant_after = dormant_after
        self.last_seen = time.monotonic()  # the last request (or open page) seen
        self.waking: asyncio.Future | None = None  # the catch-up under way
        self.held: list[dict] | None = None  # live events come while catching up
        self.wakes = 0

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
        if request.path not in UNWATCHED:
            self.last_seen = time.monotonic()
            if not self.feed.subscribed or self.waking is not None:
                waking = self.wake()
                if request.path.startswith(("/api/", "/ws")):  # the page itself need not wait
                    await asyncio.shield(waking)  # the answer starts from a board caught up
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

    async def api_status(self, request: web.Request) -> web.Response:
        """The dashboard's own state; asking does not wake it."""
        return json_response({
            "pid": os.getpid(), **self.board.feed(), "subscribed": self.feed.subscribed,
            "dormant_after": self.dormant_after,
            "unwatched_for": round(time.monotonic() - self.last_seen, 3),
            "pages": len(self.pages), "wakes": self.wakes,
            "events": self.board.counts["events"], "undecodable": self.feed.dropped,
            "now": time.time()})

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
            self.last_seen = time.monotonic()  # watched until now
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
    def on_live(self, event: dict, mono: float) -> None:
        if self.held is not None:  # catching up: applied once the board is rebuilt
            if len(self.held) < SUB_HWM:
                self.held.append(event)
            return
        self.board.on_event(event, mono)
        if not self.pages:
            return  # a page opening starts from the board's snapshot
        self.fresh.append(event)
        if len(self.fresh) > 4 * PAGE_EVENTS:
            del self.fresh[:-PAGE_EVENTS]  # more than a page shows before the flush

    async def ask(self, service: str, op: str, body: dict | None = None):
        try:
            return await self.call(service, op, body)
        except errors.CortexError:
            return None

    async def poll_budgets(self) -> None:
        reply = await self.ask("ledger", "ledger.status")
        self.board.budgets.merge_poll(reply.get("budgets") if reply else None)

    async def ask_status(self) -> dict:
        """Every service's status, the workers, the queue and the latency histograms."""
        names = list(STATUS_OPS)
        replies = await asyncio.gather(
            *(self.ask(name, STATUS_OPS[name]) for name in names),
            self.ask("scheduler", "worker.list"),
            self.ask("scheduler", "task.list", {"state": "queued", "limit": 500}),
            self.ask_metrics())
        workers, queued, metrics = replies[len(names):]
        return {"status": dict(zip(names, replies[:len(names)], strict=True)),
                "workers": workers, "queued": queued, "metrics": metrics}

    def ask_metrics(self):
        """The router's counts and latency histograms (None when unanswered)."""
        return self.ask("events", "events.metrics", {"buckets": True})

    def note_pids(self, poll: dict) -> None:
        pool = poll["status"]["pool"]
        if pool:
            self.worker_pids = {w["pid"] for w in pool.get("workers", [])
                                if isinstance(w.get("pid"), int)}

    async def poll(self) -> None:
        board = self.board
        asked, now = time.monotonic(), time.time()
        replies = await self.ask_status()
        board.merge_poll(replies, asked, time.monotonic(), now)
        self.note_pids(replies)
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

    # -- dormant while no one watches ---------------------------------------------------
    async def dormancy_loop(self) -> None:
        while not self.stopping.is_set():
            mono = time.monotonic()
            if self.pages or self.waking is not None:
                self.last_seen = mono  # watched right now
            left = self.last_seen + self.dormant_after - mono
            if left <= 0:
                if self.feed.subscribed:
                    self.go_dormant()
                left = self.dormant_after
            # A timer, not a wait for a state: a request only pushes the deadline on.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), left)

    def go_dormant(self) -> None:
        self.feed.unsubscribe()
        self.board.go_dormant(time.time())
        self.fresh = []
        log.info("no page or request for %g s: live events off until one comes",
                 self.dormant_after)

    def wake(self) -> asyncio.Future:
        """Subscribe again and catch the board up (once, however many ask)."""
        if self.waking is None:
            self.waking = asyncio.ensure_future(self.catch_up())
        return self.waking

    async def catch_up(self) -> None:
        began = time.monotonic()
        held: list[dict] = []
        self.held = held
        recent = None
        rebuilding = False
        try:
            self.feed.subscribe()  # first: an event from now on comes live or is recent
            asked, wall = time.monotonic(), time.time()
            # At once: the sooner the ring is read, the fewer live events come before it.
            poll, recent = await asyncio.gather(self.ask_status(), self.recent_events())
            if poll["metrics"] is None:  # its counts would wait for the next poll: ask again
                poll["metrics"] = await self.ask_metrics()
            self.held, rebuilding = None, True
            self.board.rebuild(poll, recent, held, asked, wall, time.monotonic())
            self.note_pids(poll)
        except Exception:  # noqa: BLE001 - a bad reply must not leave the feed held
            log.exception("catching up after a dormant spell failed")
            self.held = None
            for event in [] if rebuilding else held:
                self.board.on_event(event, time.monotonic())
            self.board.dormant_since = None  # live again; the polls correct the rest
        finally:
            self.held = None
            self.waking = None
        self.wakes += 1
        self.watched.set()
        log.info("woken: live events on, board caught up in %.3f s (%s recent events)",
                 time.monotonic() - began, "no" if recent is None else len(recent))

    async def recent_events(self) -> list[dict] | None:
        """The router's newest events, as many as the board keeps, oldest first (None:
        the router did not answer)."""
        async def ask(body: dict) -> dict:
            return await self.call("events", "events.recent", body, timeout=RECENT_TIMEOUT)
        try:
            return await recent_events(ask, RECENT_EVENTS)
        except errors.CortexError as e:
            log.warning("the event router's recent events: %s", e)
            return None

    # -- start and stop ----------------------------------------------------------------
    async def serve(self) -> None:
        app = web.Application(middlewares=[self.guard], client_max_size=64 * 1024)
        app.add_routes([
            web.get("/", self.index), web.get("/static/{name}", self.static),
            web.get("/ws", self.stream), web.get("/api/events", self.api_events),
            web.get("/api/snapshot", self.api_snapshot),
            web.get("/api/status", self.api_status),
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
        self.feed.open(ctx)
        # Nobody has looked yet: dormant from the start, so a suite whose dashboard is
        # never opened pays nothing for it; the first page or request catches it up.
        self.last_seen = time.monotonic() - self.dormant_after
        tasks = [asyncio.ensure_future(self.poll_loop()),
                 asyncio.ensure_future(self.flush_loop()),
                 asyncio.ensure_future(self.dormancy_loop())]
        write_atomic(self.url_file, (url + "\n").encode())
        log.info("dashboard at http://127.0.0.1:%d/ (token in %s)", self.port, self.url_file)
        try:
            await self.stopping.wait()
        finally:
            self.url_file.unlink(missing_ok=True)
            for task in [*tasks, self.waking]:
                if task is not None:
                    task.cancel()
            self.feed.close()
            for page in list(self.pages):
                await page.ws.close()
            await runner.cleanup()
            await self.client.close()
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
        dormant_after = dormant_after_from(os.environ)
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
        asyncio.run(Dashboard(home, settings, dormant_after).serve())
    finally:
        if memory is not None:
            memory.mark()
        lock.close()
