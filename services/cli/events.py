"""Events: `cortex tail` (live), `cortex events query` (history), `cortex task trace`."""

from __future__ import annotations

import fnmatch
import heapq
import queue
import threading

from cortex.protocol import errors
from cortex.protocol.client import Client
from cortex.services.runtime.eventlog import read_events
from cortex.services.runtime.eventread import time_order

from .argtypes import non_negative_int, positive_int, when
from .reach import connect, home_of, load_settings
from .registry import JSON, CliError, Exit, arg, command
from .render import emit, emit_json_line, event_line, human_duration, short, stamp

FEED_CAPACITY = 10_000  # live events held for a slow terminal before some are dropped


def split_pattern(pattern: str | None) -> tuple[str, str | None]:
    """(prefix to subscribe to, glob to filter with): `task.` is a prefix, `task.*` or
    `*.failed` a glob."""
    if not pattern:
        return "", None
    cut = min((i for i, c in enumerate(pattern) if c in "*?["), default=None)
    return (pattern, None) if cut is None else (pattern[:cut], pattern)


def show_event(event: dict, as_json: bool, full_time: bool = False) -> None:
    if as_json:
        emit_json_line(event)
    else:
        emit(event_line(event, full_time=full_time))


class LiveFeed:
    """Live events from `Client.subscribe`, read on a thread of their own so that the
    subscription opens before the router's buffer is read (`--last`) and the reader can
    be interrupted. The thread is a daemon blocked in the subscription: it ends with the
    command's process."""

    def __init__(self, home, prefix: str):
        self.events: queue.Queue = queue.Queue(FEED_CAPACITY)
        self.dropped = 0
        self.error: errors.CortexError | None = None
        self.closing = False
        self.subscribed = threading.Event()
        self.thread = threading.Thread(target=self._pump, args=(home, prefix),
                                       name="tail-feed", daemon=True)
        self.thread.start()

    def _pump(self, home, prefix: str) -> None:
        try:
            client = Client(home)  # its own: a Client is not shared between threads
            stream = client.subscribe(prefix)
        except errors.CortexError as e:
            self.error = e
            return
        finally:
            # The generator opens its subscription on its first next(), which follows at
            # once without blocking: an event can fall between the router's buffer and the
            # live stream only in that moment (and zmq's own subscription delay).
            self.subscribed.set()
        try:
            for event in stream:
                if self.closing:
                    return
                try:
                    self.events.put_nowait(event)
                except queue.Full:
                    self.dropped += 1
        finally:
            stream.close()
            client.close()

    def close(self) -> None:
        """Let the thread end at the next event (in a command's process, exiting does)."""
        self.closing = True

    def next(self, timeout: float) -> dict | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None


@command("tail",
         arg("--type", metavar="PATTERN",
             help="only these types: a prefix (task.) or a glob (task.*, *.failed)"),
         arg("--last", type=non_negative_int, default=0, metavar="N",
             help="first print the N most recent events (from the router's buffer)"),
         arg("--count", type=positive_int, metavar="N", help="stop after N live events"),
         JSON)
def cmd_tail(args):
    """Follow events live, one readable line each (--json: one JSON object a line).

    --type takes a prefix (`task.`) or a glob (`task.*`, `*.failed`). --last N first
    prints the N most recent events the router holds; the live ones follow without
    repeating them. Ctrl-C stops it (exit 0).
    """
    home = home_of(args)
    prefix, glob = split_pattern(args.type)
    client = connect(args)  # refuses at once when no suite is running
    shown = 0
    feed = None
    try:
        feed = LiveFeed(home, prefix)
        feed.subscribed.wait(10.0)
        if feed.error is not None:
            raise feed.error
        repeats: set = set()
        if args.last:
            body = {"n": args.last}
            if args.type:
                body["type"] = glob or f"{prefix}*"
            recent: list = []
            while len(recent) < args.last:  # pages back: a reply holds what fits a message
                page = client.call("events", "events.recent",
                                   body | {"n": args.last - len(recent)})
                recent = page["events"] + recent
                if not page.get("more") or not page["events"]:
                    break
                body["before"] = page["before"]
            for event in recent:
                show_event(event, args.json)
            repeats = {e.get("id") for e in recent}
        if not args.json:
            emit(f"# following events in {home} (Ctrl-C to stop)", err=True)
        reported = 0
        while not (args.count and shown >= args.count):
            event = feed.next(0.5)
            if feed.dropped > reported:
                emit(f"# {feed.dropped - reported} events dropped: the output is slower "
                     "than the suite", err=True)
                reported = feed.dropped
            if event is None:
                continue
            if event.get("id") in repeats:
                repeats.discard(event.get("id"))  # already shown from the buffer
                continue
            if glob and not fnmatch.fnmatchcase(str(event.get("type", "")), glob):
                continue
            show_event(event, args.json)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
        if feed is not None:
            feed.close()
    return Exit.OK


@command("events query",
         arg("--type", metavar="PATTERN", help="type glob, e.g. task.* or ledger.refused"),
         arg("--task", metavar="ID", help="events of this task"),
         arg("--worker", metavar="W", help="events of this worker"),
         arg("--since", type=when, metavar="T",
             help="from this time: unix, ISO 8601, or N[smhd] ago (e.g. 15m)"),
         arg("--until", type=when, metavar="T", help="before this time (same forms)"),
         arg("--text", metavar="S", help="case-insensitive text anywhere in the event"),
         arg("--limit", type=positive_int, default=1000, metavar="N",
             help="at most N events (default 1000)"),
         arg("--newest", action="store_true",
             help="the newest N events, newest first (default: the oldest N, in time order)"),
         arg("--from", dest="source", choices=("auto", "postgres", "jsonl"), default="auto",
             help="where to read: PostgreSQL when configured (auto), or JSONL"),
         JSON)
def cmd_events_query(args):
    """Search the event history: PostgreSQL when [events] postgres_url is set, else JSONL.

    Filters combine (all must match). Output is one line per event (--json: one JSON
    object a line), the oldest first, or with --newest the newest first. A note on stderr
    gives the count and says when --limit cut the answer short.
    """
    home = home_of(args)
    settings = load_settings(home)
    url = settings.events.postgres_url
    if args.source == "postgres" and not url:
        raise CliError(Exit.CONFIG, "no [events] postgres_url configured in cortex.toml")
    filters = {"since": args.since, "until": args.until, "task": args.task,
               "type_pattern": args.type, "worker": args.worker, "text": args.text}
    stats: dict = {}
    if url and args.source != "jsonl":
        events = query_postgres(url, filters, args.limit + 1, args.newest)
    else:
        # Files hold events in arrival order, which is not quite time order (sources
        # interleave): the exact oldest or newest N need the whole matching stream.
        pick = heapq.nlargest if args.newest else heapq.nsmallest
        events = pick(args.limit + 1, read_events(home / "events", **filters, stats=stats),
                      key=time_order)
    truncated = len(events) > args.limit
    events = events[: args.limit]
    for event in events:
        show_event(event, args.json, full_time=True)
    note = f"# {len(events)} events"
    if truncated:
        note += (f" (truncated at --limit {args.limit}: more match; narrow the filters, "
                 f"raise --limit{'' if args.newest else ' or see the newest with --newest'})")
    if stats.get("corrupt") or stats.get("torn"):
        note += f"; skipped {stats.get('corrupt', 0)} corrupt and {stats.get('torn', 0)} torn lines"
    emit(note, err=True)
    return Exit.OK


def query_postgres(url: str, filters: dict, limit: int, newest: bool) -> list[dict]:
    from cortex.services.runtime.pgevents import (
        query_events,  # psycopg only when PostgreSQL is configured
    )

    try:
        return query_events(url, **filters, limit=limit, newest_first=newest)
    except Exception as e:  # psycopg's errors: the database is down or refuses us
        raise CliError(Exit.UNAVAILABLE, f"PostgreSQL query failed ({type(e).__name__}: "
                                         f"{short(str(e), 200)}); --from jsonl reads "
                                         "the files instead") from e


@command("task trace", arg("id", metavar="ID"), JSON)
def cmd_task_trace(args):
    """The whole story of one task from the event log, in time order, one line per event.

    Each line: the time since the first event, the source, the event type and its key
    data (why it waited, which worker, tokens, retries, the outcome). Read from the JSONL
    files under <home>/events/, so it works with the suite stopped too.
    """
    home = home_of(args)
    events = sorted(read_events(home / "events", task=args.id),
                    key=lambda e: (e.get("ts") or 0, e.get("source") or "", e.get("seq") or 0))
    if not events:
        raise CliError(Exit.NOT_FOUND, f"no events for task {args.id} in {home / 'events'}")
    if args.json:
        for event in events:
            emit_json_line(event)
        return Exit.OK
    base = events[0].get("ts") or 0.0
    created = next((e for e in events if e.get("type") == "task.created"), None)
    head = f"task {short(args.id, 80)}"
    if created:
        d = created.get("data") or {}
        head += (f" ({short(d.get('type'), 40)}, {short(d.get('priority'), 10)}, "
                 f"{short(d.get('description', ''), 60)})")
    emit(f"{head}: {len(events)} events from {stamp(base, millis=True)} over "
         f"{human_duration((events[-1].get('ts') or base) - base)}")
    for event in events:
        emit(event_line(event, base))
    return Exit.OK
