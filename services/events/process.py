"""The event router process: fan-in, de-duplication, JSONL, live fan-out, queries.

    python -m cortex.services.events [--home DIR]

Publishers send EVENTS batches to the fan-in ROUTER (`run/events-in.sock`). Each new
event (by source, epoch, seq) is appended to the JSONL log; after the turn's flush the
router acknowledges, per publisher, the highest contiguous sequence now on disk, so a
publisher may forget it. Duplicates (re-sends) are dropped; gaps are counted. Then the
events go to the ring buffer (queries), the XPUB socket (live tails: topic = type), and
PostgreSQL when configured. If the events directory cannot be written, nothing is
acknowledged and publishers keep their events until writing works again.
"""

from __future__ import annotations

import collections
import fnmatch
import hmac
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import msgpack
import zmq

from cortex.protocol import wire
from cortex.protocol.peer import make_socket, recv_frames, send_frames
from cortex.services.events.history import parse_cursor, query_page
from cortex.services.events.metrics import BOUNDS, STAGES, Metrics
from cortex.services.runtime.connections import ConnectionGuard, default_cap, raise_fd_limit
from cortex.services.runtime.curve import Listeners
from cortex.services.runtime.durable import write_atomic
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.entry import serve
from cortex.services.runtime.eventlog import (
    EventLogError,
    EventLogWriter,
)
from cortex.services.runtime.loop import BusService, serves
from cortex.services.runtime.process import suite_secret

RETRY_WRITE = 1.0  # seconds between attempts to write to an unwritable events directory
# Group commit: the log is written and synced (then acknowledged) at most this often, or
# sooner when this many events wait; live subscribers get events at once regardless.
FLUSH_INTERVAL = 0.01
FLUSH_EVENTS = 5000
SENDER_LABELS_KEPT = 4096  # fan-in routing ids remembered (each publisher process has one)
QUERY_QUEUE = 8  # events.query reads waiting at most; more are refused (unavailable)


SUITE_POLL = 5.0  # seconds between asks for the suite's gauges (queue, workers, budgets)
SUITE_GAUGES = {"scheduler": b"gauges-scheduler", "ledger": b"gauges-ledger"}  # -> corr


def _counts(row) -> dict:
    """The plain numbers of a map (what a gauge can show), at most 64 of them."""
    if not isinstance(row, dict):
        return {}
    return {str(k)[:64]: v for k, v in list(row.items())[:64]
            if type(v) in (int, float) and math.isfinite(v)}


def lean(event: dict) -> dict:
    """The event as the ring keeps it and live subscribers get it: a task's result (up to
    half a MiB) stays in the log alone (read it with events.query), so 10,000 events in
    the ring stay a few MiB and a live view is never flooded."""
    data = event.get("data")
    if isinstance(data, dict) and data.get("result") is not None:
        return event | {"data": data | {"result": None, "result_in_log": True}}
    return event


class PagedRing:
    """The last `capacity` events, each at a position that only grows, so `events.recent`
    pages back through them (`before`: a position) with replies that fit one message."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._items: collections.deque[tuple[int, dict]] = collections.deque(maxlen=capacity)
        self.appended = 0  # the next position

    def __len__(self) -> int:
        return len(self._items)

    def extend(self, events: list[dict]) -> None:
        for event in events:
            self._items.append((self.appended, event))
            self.appended += 1

    def page(self, n: int, type_pattern: str | None = None, before: int | None = None,
             room: int = wire.MAX_MESSAGE_BYTES - 64 * 1024) -> dict:
        """Up to `n` of the newest events before position `before` (matching the glob),
        oldest first, in at most `room` bytes; `more` says whether older ones remain and
        `before` is where the next page starts."""
        chosen: list[dict] = []
        oldest = before if before is not None else self.appended
        more = False
        for position, event in reversed(self._items):
            if before is not None and position >= before:
                continue
            kind = event.get("type")
            if type_pattern is not None and not (
                    isinstance(kind, str) and fnmatch.fnmatchcase(kind, type_pattern)):
                continue
            room -= len(msgpack.packb(event, default=str))
            if len(chosen) >= n or room < 0:
                more = True
                break
            chosen.append(event)
            oldest = position
        chosen.reverse()
        return {"events": chosen, "more": more, "before": oldest}


class EventRouter(BusService):
    name = "events"

    def __init__(self, home=None):
        super().__init__(home)
        directory = self.rt.home / "events"
        self.writer = EventLogWriter(directory, self.settings.events.max_file_bytes,
                                     self.settings.suite.fsync)
        # The writer's tracker is the one record of what is written: it de-duplicates
        # re-sends and tells how far each stream may be acknowledged.
        self.tracker = self.writer.tracker
        self.ring = PagedRing(10_000)
        ctx = self.rt.ctx
        self.fan_in_endpoint = self.rt.endpoints["events_in"]
        self.live_endpoint = self.rt.endpoints["events_live"]
        for endpoint in (self.fan_in_endpoint, self.live_endpoint):
            self.rt.remove_socket(endpoint)
        # On tcp both listen with CurveZMQ, admitting the keys the allow-list holds.
        self.listeners = Listeners(ctx, self.rt.home, self.log)
        self.fan_in = make_socket(ctx, zmq.ROUTER)
        self.listeners.serve(self.fan_in, self.fan_in_endpoint)
        self.live = make_socket(ctx, zmq.XPUB)
        self.listeners.serve(self.live, self.live_endpoint, track=True)
        # Topics live subscribers hold (the XPUB passes each topic's first subscribe and
        # last unsubscribe, a departed subscriber's included): with none, events are
        # not packed for a fan-out that would drop them (a dashboard nobody watches).
        self.topics: set[bytes] = set()
        # Past a cap, connections are refused: running out of descriptors would abort us.
        raise_fd_limit()
        cap = self.settings.bus.max_connections or default_cap()
        self.guards = {"events_in": ConnectionGuard(self.fan_in, cap, "events-in")}
        if not self.listeners.tracks(self.live):  # a socket takes one monitor at a time
            self.guards["events_live"] = ConnectionGuard(self.live, cap, "events-live")
        self.fan_in.bind(self.fan_in_endpoint)
        self.live.bind(self.live_endpoint)
        self.poller.register(self.fan_in, zmq.POLLIN)
        self.poller.register(self.live, zmq.POLLIN)
        self.to_ack: dict[bytes, set[tuple[str, int]]] = {}  # publisher -> streams to ack
        self.unwritable: str | None = None
        self.next_write_retry = 0.0
        self.stats = {"received": 0, "written": 0, "duplicates": 0, "malformed": 0,
                      "unauthorized": 0}
        # publisher (a service by name, else "worker") -> {batches, events, acks}: what
        # events cost on the fan-in (`python -m cortex.loadtest.count`).
        self.fan_in_flows: dict[str, dict[str, int]] = {}
        self.sender_labels: dict[bytes, str] = {}  # fan-in routing id -> its label
        self.secret = suite_secret(self.rt.home).encode()
        self.sink = None
        if self.settings.events.postgres_url:
            from cortex.services.events.pgsink import (
                PgSink,  # only when configured: JSONL needs no database
            )
            # It follows the JSONL log from its saved position: the log is its backlog.
            self.sink = PgSink(self.settings.events.postgres_url, directory,
                               self.rt.home / "state" / "pg-position.json")
        self.own_seq = 0
        self.next_flush = 0.0
        # Streaming latency histograms and counters, fed every event; /metrics on localhost.
        self.metrics = Metrics()
        self.metrics.set_gauge("events_buffered", lambda: self.writer.buffered)
        self.metrics.set_gauge("event_gaps", lambda: self.tracker.gaps)
        self.metrics.set_gauge("postgres_lag", lambda: self.sink.lag() if self.sink else 0)
        self.metrics_server = None
        self.queries = ThreadPoolExecutor(1, thread_name_prefix="events-query")
        self.answers: list[tuple[bytes, bytes, Future]] = []  # queries being read
        self.next_suite_poll = 0.0
        port = self.settings.events.metrics_port
        if port >= 0:
            # Loopback with a bearer token rather than a unix socket: Prometheus scrapes
            # only TCP, and reads the token from a file (`credentials_file`): this one,
            # 0600 in the owner's run/, made anew at every start.
            token = os.urandom(32).hex()
            try:
                self.metrics_server = self.metrics.serve(port, token)
                write_atomic(self.rt.home / "run" / "metrics.token", token.encode())
                write_atomic(self.rt.home / "run" / "metrics.url",
                             self.metrics_server.url.encode())
            except OSError as e:
                self.log.error("metrics endpoint not started: %s", e)

    # -- fan-in ---------------------------------------------------------------------------
    def on_batch(self, parts: list) -> list[dict]:
        sender, rest = parts[0], parts[1:]
        try:
            msg = wire.parse(rest)
            if msg.type != wire.EVENTS:
                raise wire.ProtocolError("unknown_type", "fan-in takes EVENTS only")
            body = msg.decoded()
            secret = body.get("secret")
            if not isinstance(secret, str) or not hmac.compare_digest(secret.encode(),
                                                                      self.secret):
                self.stats["unauthorized"] += 1  # not one of the suite's own publishers
                return []
            events = body.get("events")
            if not isinstance(events, list):
                raise wire.ProtocolError("bad_request", "events must be a list")
        except wire.ProtocolError:
            self.stats["malformed"] += 1
            return []
        if events and isinstance(events[0], dict):
            self.count_batch(sender, events[0].get("source"), len(events))
        fresh = []
        for event in events:
            if not isinstance(event, dict):
                self.stats["malformed"] += 1
                continue
            source, epoch, seq = event.get("source"), event.get("epoch"), event.get("seq")
            if not isinstance(source, str) or type(epoch) is not int or type(seq) is not int:
                self.stats["malformed"] += 1
                continue
            self.to_ack.setdefault(sender, set()).add((source, epoch))
            if self.writer.seen(event):
                self.stats["duplicates"] += 1  # a re-send: acknowledged, not written again
                continue
            self.writer.append([event])
            self.stats["received"] += 1  # distinct events: each must reach the log once
            fresh.append(event)
        return fresh

    def count_batch(self, sender: bytes, source, events: int) -> None:
        label = self.sender_labels.get(sender)
        if label is None:
            label = source if source in wire.SERVICE_NAMES else "worker"
            if len(self.sender_labels) >= SENDER_LABELS_KEPT:
                self.sender_labels.clear()  # ids of gone publishers: relabelled on their next batch
            self.sender_labels[sender] = label
        flows = self.fan_in_flows.get(label)
        if flows is None:
            flows = self.fan_in_flows[label] = {"batches": 0, "events": 0, "acks": 0}
        flows["batches"] += 1
        flows["events"] += events

    def emit_own(self, type_: str, data: dict) -> dict:
        """The router's own events skip the fan-in but go everywhere else fresh events go:
        the log (buffered: an unwritable directory holds it until it can be written), the
        ring, live subscribers, metrics and PostgreSQL."""
        self.own_seq += 1
        event = {"id": f"events-router:{self.rt.epoch}:{self.own_seq}", "source": "events-router",
                 "epoch": self.rt.epoch, "seq": self.own_seq, "ts": time.time(), "type": type_,
                 "trace": None, "task": None, "worker": None, "data": data}
        self.writer.append([event])
        self.deliver([event])
        return event

    def deliver(self, events: list[dict]) -> None:
        """Everything but the log (and PostgreSQL, which copies the log): ring buffer, live
        fan-out, metrics. A task's result goes to the log alone (see `lean`)."""
        events = [lean(e) for e in events]
        self.ring.extend(events)
        self.metrics.observe_many(events)
        self.publish(events)

    def store(self, now: float) -> None:
        """Flush what the writer holds (group commit), then acknowledge it."""
        if self.unwritable and now < self.next_write_retry:
            return
        if not self.unwritable and now < self.next_flush and self.writer.buffered < FLUSH_EVENTS:
            return  # on_tick flushes when the interval is up
        self.next_flush = now + FLUSH_INTERVAL
        written_before = self.writer.events_written
        try:
            self.writer.flush()
        except EventLogError as e:
            if not self.unwritable:
                self.log.error("events directory unwritable, holding events: %s", e)
                self.unwritable = str(e)
                self.emit_own("events.unwritable", {"error": str(e)})
            self.next_write_retry = now + RETRY_WRITE
            return
        if self.unwritable:
            self.log.warning("events directory writable again")
            self.unwritable = None
            self.emit_own("events.writable", {})
            self.writer.flush()
        self.stats["written"] = self.writer.events_written
        if self.sink is not None:
            self.sink.written_to_log(self.writer.events_written - written_before)
        for sender, streams in self.to_ack.items():
            flows = self.fan_in_flows.get(self.sender_labels.get(sender, "worker"))
            if flows is not None:
                flows["acks"] += len(streams)
            for source, epoch in streams:
                try:
                    send_frames(self.fan_in, [sender, *wire.frames(wire.ACK, b"events", b"", {
                        "source": source, "epoch": epoch,
                        "upto": self.tracker.position(source, epoch)})])
                except zmq.Again:
                    pass  # the publisher re-sends; its duplicates are acknowledged then
        self.to_ack.clear()

    def publish(self, events: list[dict]) -> None:
        live = self.live
        if not self.topics:
            self.read_subscriptions()  # one may have come since we last looked
            if not self.topics:
                return
        for event in events:
            try:  # send_frames: pyzmq's send_multipart costs more than the packing
                send_frames(live, [str(event.get("type", "")).encode(), msgpack.packb(event)])
            except (zmq.Again, TypeError, ValueError):
                pass  # live views may miss events; the log does not

    # -- queries over the bus -------------------------------------------------------------
    @serves("events.recent")
    def recent(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        fx.reply(msg.peer, msg.corr, self.ring.page(body["n"], body["type"], body["before"]))

    @serves("events.status")
    def status(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        fx.reply(msg.peer, msg.corr, {
            **self.stats, "gaps": self.tracker.gaps, "buffered": self.writer.buffered,
            "unwritable": self.unwritable, "fan_in": self.fan_in_flows,
            "postgres": self.sink.stats() if self.sink else None,
            "metrics_url": self.metrics_server.url if self.metrics_server else None,
            "latency": self.metrics.latency(), "pid": os.getpid(),
            "started": self.rt.started, "bad_messages": self.bad_messages,
            "internal_errors": self.internal_errors,
            "connections": {name: g.status() for name, g in self.guards.items()}})

    @serves("events.metrics")
    def metrics_op(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        reply = self.metrics.summary()
        if body["buckets"]:  # the histograms themselves, as [index, count]
            reply["bounds"] = BOUNDS
            reply["buckets"] = [
                {"type": t, "priority": p, **{stage: [[i, n] for i, n in enumerate(
                    s.hists[stage].counts) if n] for stage in STAGES}}
                for (t, p), s in self.metrics.series.copy().items()]
        fx.reply(msg.peer, msg.corr, reply)

    @serves("events.query")
    def query(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        # Read on a thread (the loop keeps routing); on_tick replies when it is done.
        filters = {"task": body["task"], "type_pattern": body["type"],
                   "worker": body["worker"], "text": body["text"], "since": body["since"],
                   "until": body["until"]}
        if any(a[0] == msg.peer and a[1] == msg.corr for a in self.answers):
            return  # a client's re-send of a query still being read
        if len(self.answers) >= QUERY_QUEUE:
            raise wire.ProtocolError("unavailable", "too many events.query reads at once")
        after = parse_cursor(body["after"])
        self.answers.append((msg.peer, msg.corr, self.queries.submit(
            query_page, self.rt.home / "events", self.settings.events.postgres_url,
            filters, body["limit"], body["newest"], after)))

    def answer_queries(self, fx: Effects) -> float:
        """Reply to the events.query reads that are done; poll soon while any is not."""
        for item in [a for a in self.answers if a[2].done()]:
            self.answers.remove(item)
            peer, corr, future = item
            try:
                fx.reply(peer, corr, future.result())
            except Exception as e:  # noqa: BLE001 - PostgreSQL down, files unreadable
                fx.error(peer, corr, "unavailable", f"events.query failed: "
                                                    f"{type(e).__name__}: {str(e)[:300]}")
        return 0.02 if self.answers else 1.0

    # -- the suite's gauges: asked of the scheduler and the ledger now and then ---------
    def poll_suite(self, fx: Effects, mono: float) -> None:
        if self.metrics_server is None or mono < self.next_suite_poll:
            return
        self.next_suite_poll = mono + SUITE_POLL
        for service in SUITE_GAUGES:
            fx.sends.append((service.encode(), wire.REQUEST, SUITE_GAUGES[service],
                             {"op": f"{service}.status"}))

    def on_reply(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        """The scheduler's and the ledger's status, kept as gauges (checked: only the
        services asked, only numbers)."""
        if msg.type != wire.REPLY or msg.role != b"service" or \
                SUITE_GAUGES.get(msg.peer.decode(errors="replace")) != msg.corr:
            return
        if msg.peer == b"scheduler":
            queue = _counts(body.get("queue"))
            workers = body.get("workers")
            workers = {str(t)[:64]: _counts(row) for t, row in workers.items()} \
                if isinstance(workers, dict) else {}
            self.metrics.set_suite(queue=queue, workers=workers)
        else:
            rows = body.get("budgets")
            budgets = [{"scope": str(row["scope"])[:300], **_counts(row)}
                       for row in (rows if isinstance(rows, list) else [])
                       if isinstance(row, dict) and "scope" in row]
            self.metrics.set_suite(budgets=budgets)

    def on_tick(self, fx: Effects, now: float) -> float:
        self.listeners.cut_if_revoked()  # live subscribers of a revoked key: cut off
        mono = time.monotonic()
        self.poll_suite(fx, mono)
        queries = self.answer_queries(fx) if self.answers else 1.0
        if self.unwritable:
            self.store(mono)
            return min(RETRY_WRITE, queries)
        if self.writer.buffered or self.to_ack:
            if mono >= self.next_flush:
                self.store(mono)
            else:
                return min(self.next_flush - mono, queries)
        return queries

    def on_sockets(self, ready: dict, fx: Effects) -> None:
        if self.fan_in in ready:
            fresh: list[dict] = []
            for _ in range(1000):
                parts = recv_frames(self.fan_in)
                if parts is None:
                    break
                fresh.extend(self.on_batch(parts))
            self.store(time.monotonic())
            if fresh:
                self.deliver(fresh)
        if self.live in ready:
            self.read_subscriptions()

    def read_subscriptions(self) -> None:
        while (parts := recv_frames(self.live)) is not None:
            frame = parts[0]
            if frame[:1] == b"\x01":
                self.topics.add(frame[1:])
            elif frame[:1] == b"\x00":
                self.topics.discard(frame[1:])

    def shutdown(self) -> None:
        self.queries.shutdown(wait=False, cancel_futures=True)
        try:
            self.writer.flush()
        except EventLogError:
            self.log.error("could not write %d buffered events at exit: publishers resend them",
                           self.writer.buffered)
        self.writer.close()
        if self.sink is not None:
            self.sink.close(timeout=5.0)
        if self.metrics_server is not None:
            # Its thread is a daemon and the process exits right after: stopping it first
            # would only wait out its poll interval.
            (self.rt.home / "run" / "metrics.url").unlink(missing_ok=True)
            (self.rt.home / "run" / "metrics.token").unlink(missing_ok=True)
        self.listeners.stop()
        for guard in self.guards.values():
            guard.stop()
        self.fan_in.close(linger=0)
        self.live.close(linger=0)
        self.rt.remove_socket(self.fan_in_endpoint)
        self.rt.remove_socket(self.live_endpoint)
        super().shutdown()


def main(argv=None) -> None:
    serve("cortex-events", __doc__, EventRouter, argv)
