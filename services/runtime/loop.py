"""The loop every bus service runs: one poller, one turn at a time.

A turn: read what is waiting (bounded), let the service decide (filling an Effects),
write the turn's journal records with one commit, then send replies and publish events.
Journal first, then acknowledge. Timeouts come from the next deadline, never a sleep.

Every REQUEST and NOTIFY is checked against the operation catalogue before a handler
sees it: the operation must be one this service serves, the sender's role (stamped by
the broker) one it allows, every field of its type and range. A service marks its
handlers with `@serves(op)`; at start every catalogued operation must have one. A
handler that raises anyway is answered `internal` (a REQUEST) or counted (a NOTIFY),
its effects are dropped, an event carries the traceback, and the service runs on. What a
handler wants journaled or emitted must encode as JSON: checked before the turn commits.

Events are journaled in the same commit as the state change they report, and stay in
the snapshot until the event router has acknowledged them: a service killed before its
events reached the router re-sends them, under their original ids, after its restart.
The journal's life (opened over the newest good snapshot, snapshotted, halted on
damage) is recovery.py's.
"""

from __future__ import annotations

import math
import time
import traceback

import zmq

from cortex.protocol import locate, wire
from cortex.protocol.catalogue import Catalogue
from cortex.protocol.peer import BusLink, has_message, own_keys, poll_ms, recv_frames
from cortex.protocol.publisher import EventPublisher
from cortex.services.runtime.direct import DirectLine
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.inbox import Inbox
from cortex.services.runtime.journal import Journal, JournalError
from cortex.services.runtime.lineage import linux_calls
from cortex.services.runtime.process import ServiceRuntime, suite_secret
from cortex.services.runtime.recovery import JournalOwner
from cortex.services.runtime.syncer import STALL, HeldSends, Syncer

# A turn also ends after a share of the heartbeat interval: the broker declares a service
# lost after a few silent intervals, and a burst of costly requests (events.recent of
# 10,000 events is ~10 ms each) would otherwise hold every reply and heartbeat past it.
TURN_SHARE = 0.25
# And a turn lasts at most this long: its replies and sends wait for its end (one journal
# sync for all), so under a steady stream of messages the turn's length is every
# acknowledgement's and every dispatch's latency; a sync (~0.2-1 ms) is cheap beside it.
TURN_MAX_S = 0.05
# A service with lanes also looks at the bus this often during a turn: an urgent message
# (a critical submit, a worker's report) that arrives meanwhile is then handled next,
# not after everything read before it. An empty look is one non-blocking receive.
LOOK_EVERY_S = 0.002
# Idle, a service's wakes are the broker's heartbeat (every interval), its tick and its
# snapshot timer. A tick this far off is nothing urgent ("look again in a second") and a
# snapshot is periodic: each may wait a little longer, so that it runs on the turn the
# heartbeat wakes us for anyway (on_tick and the snapshot check run on every turn).
SOFT_TICK = 1.0
TICK_SLACK = 0.25


def serves(op: str, type_: bytes = wire.REQUEST):
    """Mark a service method as the handler of a catalogued operation:
    `handler(self, fx, msg, body, now)` with `body` already checked."""

    def mark(fn):
        fn.serves = (type_, op)
        return fn

    return mark


class BusService(JournalOwner):
    # Damaged journal records halt the service (its state would lose what they held);
    # a service that journals only its events may carry on instead.
    halt_on_damage = True
    direct: DirectLine | None = None  # the scheduler's line to local workers
    name = "service"
    snapshot_name: str | None = None  # file under state/ for stateful services

    def __init__(self, home=None):
        self.rt = ServiceRuntime(self.name, home)
        self.settings = self.rt.settings
        self.log = self.rt.log
        ctx = self.rt.ctx
        secret = suite_secret(self.rt.home)
        bus, events_in = self.rt.endpoints["bus"], self.rt.endpoints["events_in"]
        self.link = BusLink(ctx, bus, self.name, "service",
                            interval=self.settings.suite.heartbeat_interval, secret=secret,
                            keys=own_keys(self.rt.home, bus))
        self.events = EventPublisher(ctx, events_in, self.name, self.rt.epoch, secret=secret,
                                     keys=own_keys(self.rt.home, events_in))
        self.turn_limit = min(TURN_MAX_S, TURN_SHARE * self.settings.suite.heartbeat_interval)
        self.end_turn = False  # a handler asks for the turn to end now (urgent work)
        self.inbox = Inbox(self.rank, self.LANES)  # read from the bus, not yet handled
        self.catalogue, self.handlers = self._handler_table()
        self.poller = zmq.Poller()
        self.poller.register(self.link.socket, zmq.POLLIN)
        self.poller.register(self.events.socket, zmq.POLLIN)
        self.poller.register(self.rt.wake_r.fileno(), zmq.POLLIN)
        self.journal: Journal | None = None
        # fsync = "group": the journal syncs in a thread while replies wait (syncer.py).
        self.syncer: Syncer | None = None
        self.held = HeldSends()
        self.stall_ended = 0.0  # when the last sync in the loop that stalled it ended
        self._written = False  # journal records written since the last sync was asked
        self.pending_events: list = []  # emitted outside a turn's Effects
        self.next_snapshot = time.monotonic() + self.settings.suite.snapshot_interval
        self.bad_messages = 0
        self.internal_errors = 0
        self.snapshot_lsn = -1  # journal position the last snapshot covered
        self.halted: dict | None = None  # journal damage: what, where, what to do
        self._journal_seen: tuple = ()

    def open_direct_line(self) -> None:
        """Take local workers' messages on a line of our own (direct.py), when the bus
        is ipc (its workers are then on this machine)."""
        endpoint = locate.direct_endpoint(self.rt.endpoints["bus"])
        if endpoint is None:
            return
        if not linux_calls():  # epoll, and SEQPACKET on AF_UNIX: everything takes the bus
            return
        self.rt.remove_socket(endpoint)  # left by a killed predecessor (we hold the lock)
        try:
            self.direct = DirectLine(endpoint, self.log)
        except OSError as e:
            self.log.warning("no direct line (%s): workers and clients use the bus", e)
            return
        self.poller.register(self.direct.fd, zmq.POLLIN)

    def send(self, type_: bytes, peer: bytes, corr: bytes, body) -> None:
        """To a peer: over the direct line when it is on it, else over the bus."""
        if self.direct is None or not self.direct.send(type_, peer, corr, body):
            self.link.send(type_, peer, corr, body)

    def _handler_table(self):
        """(catalogue, {(type, op): handler}) from the methods marked with @serves."""
        handlers = {}
        for attr in dir(type(self)):
            fn = getattr(type(self), attr, None)
            key = getattr(fn, "serves", None)
            if key is not None:
                handlers[key] = getattr(self, attr)
        if not handlers:
            return None, {}
        catalogue = Catalogue(self.name)
        missing = set(catalogue.ops) - set(handlers)
        extra = set(handlers) - set(catalogue.ops)
        if missing or extra:
            raise RuntimeError(f"{self.name}: operations without a handler "
                               f"{sorted(op for _, op in missing)}, handlers without an "
                               f"operation {sorted(op for _, op in extra)}")
        return catalogue, handlers

    # -- hooks for the service ------------------------------------------------------------
    def handle(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        """Messages no @serves handler took (a service without a table)."""
        raise wire.ProtocolError("unknown_type", f"{self.name} serves no operations")

    def on_reply(self, fx: Effects, msg: wire.Message, body: dict, now: float) -> None:
        """A REPLY or ERROR to a request of ours (match it by correlation id)."""

    def on_tick(self, fx: Effects, now: float) -> float:
        return 1.0

    def on_sockets(self, ready: dict, fx: Effects) -> None:
        """Serve the service's own sockets (those it registered with self.poller)."""

    def snapshot(self) -> dict:
        return {}

    def restore(self, snapshot: dict | None, records: list[dict]) -> None:
        pass

    def emit(self, type_: str, data: dict, task: str | None = None,
             worker: str | None = None) -> None:
        """Emit an event outside a turn; it is journaled with the next flush."""
        self.pending_events.append((type_, data, task, worker))

    # -- the loop -------------------------------------------------------------------------
    def _decode(self, fx: Effects, msg: wire.Message, now: float) -> None:
        if self.halted is not None:
            self.halted_answer(fx, msg)
            return
        mark = fx.mark()
        op = None
        try:
            body = msg.decoded()
            if self.catalogue is None:
                self.handle(fx, msg, body, now)
            elif msg.type in (wire.REPLY, wire.ERROR):
                self.on_reply(fx, msg, body, now)
            else:
                operation, checked = self.catalogue.check(
                    msg.type, body, msg.role.decode(errors="replace"),
                    msg.peer.decode(errors="replace"))
                op = operation.name
                self.handlers[(msg.type, op)](fx, msg, checked, now)
            fx.check_encodable(mark)
        except wire.ProtocolError as e:
            fx.rollback(mark)
            self.bad_messages += 1
            if msg.type == wire.REQUEST:
                fx.error(msg.peer, msg.corr, e.code, e.message)
        except Exception as e:  # a handler's bug must not end the service
            fx.rollback(mark)
            self.internal_errors += 1
            trace = traceback.format_exc()
            self.log.error("%s %s from %s failed: %s", msg.type.decode(), op,
                           msg.peer.decode(errors="replace"), trace)
            if msg.type == wire.REQUEST:
                fx.error(msg.peer, msg.corr, "internal",
                         f"{self.name} failed on {op}: {type(e).__name__}")
            fx.emit(f"{self.name}.internal_error", {
                "op": op, "type": msg.type.decode(), "peer": msg.peer.decode(errors="replace"),
                "error": f"{type(e).__name__}: {e}"[:500], "traceback": trace[-4000:]})

    def after_turn(self, fx: Effects, now: float) -> None:
        """Work done once per turn after its messages (the scheduler dispatches here):
        a failure in it cannot take back what the turn's messages did."""

    def _after_turn(self, fx: Effects) -> None:
        if self.halted is not None:
            return
        mark = fx.mark()
        try:
            self.after_turn(fx, time.time())
            fx.check_encodable(mark)
        except Exception as e:  # a bug here must not end the service either
            # Each change in memory made its journal record as it was made, so what the
            # work did before it failed is kept (the journal still describes memory);
            # only a part that cannot be encoded is dropped.
            try:
                fx.check_encodable(mark)
            except TypeError:
                fx.rollback(mark)
            self.internal_errors += 1
            trace = traceback.format_exc()
            self.log.error("%s: the work after a turn failed: %s", self.name, trace)
            fx.emit(f"{self.name}.internal_error", {
                "op": None, "type": "after_turn", "peer": None,
                "error": f"{type(e).__name__}: {e}"[:500], "traceback": trace[-4000:]})

    def flush(self, fx: Effects) -> None:
        if self.pending_events:
            fx.events.extend(self.pending_events)
            self.pending_events = []
        events = [self.events.emit(type_, data, task=task, worker=worker)
                  for type_, data, task, worker in fx.events]
        acks = [send for send in fx.sends if send[1] in (wire.REPLY, wire.ERROR)]
        orders = [send for send in fx.sends if send[1] not in (wire.REPLY, wire.ERROR)]
        if (fx.records or events) and self.journal is not None:
            for record in fx.records:
                self.journal.append(record)
            for event in events:
                self.journal.append({"k": "event", "event": event})
            # Written first (a killed process loses nothing written). Orders to workers
            # and services go out before the fdatasync, so the sync is off the dispatch
            # path; replies (acknowledgements) only after it. A power cut between the two
            # may re-run a dispatched task whose submit was never acknowledged: at least
            # once, and recorded once.
            self._commit(sync=False)
            self._written = True
        held = self.held
        if held:
            self.send_synced()  # what a finished sync covers goes before anything new
        for send in orders:
            if held and held.holds(send[0]):  # never before a reply held for its peer
                held.hold(held.last_generation, send)
            else:
                self.send(send[1], send[0], send[2], send[3])
        if acks and self.journal is not None:
            if self.journal.fsync == "group" and (held or self._busy()):
                # A sync that ended since the release above still has its replies held:
                # these go behind them.
                generation = self._sync_generation() or held.last_generation
                if generation:
                    for send in acks:
                        held.hold(generation, send)
                    acks = []
            else:
                # Nothing else to do (or another policy): sync here. Handing an idle
                # loop's sync to the thread only adds wake-ups to each reply's latency.
                began = time.monotonic()
                self._commit(sync=True)
                self._written = False
                ended = time.monotonic()
                if ended - began > STALL:
                    self.stall_ended = ended
        for peer, type_, corr, body in acks:
            self.send(type_, peer, corr, body)
        self.events.flush()

    def _busy(self) -> bool:
        """Is more work waiting (read, or on the bus)? Then the loop should not stop for
        a sync."""
        return bool(self.inbox) or has_message(self.link.socket) or (
            self.direct is not None and self.direct.has_message())

    def _sync_generation(self) -> int:
        """The sync that replies sent now must wait for: a new one if records were
        written since the last was asked, else the one under way (its records may be
        what they report), else none."""
        if self.syncer is None:
            self.syncer = Syncer(self.name)
            self.poller.register(self.syncer.wake_fd, zmq.POLLIN)
        if self._written:
            self._written = False
            return self.syncer.ask(self.journal.fileno())
        return self.syncer.in_flight

    def orders_left(self, now: float) -> float:
        """Since when (monotonic) what we sent has been leaving: `now` while a journal
        sync holds replies back for longer than STALL, else when the last such
        stall ended. A peer cannot answer what has not reached it: its silence, or its
        saying it has nothing, counts from then."""
        syncer = self.syncer
        if syncer is None:
            return self.stall_ended
        began = syncer.began
        if began is not None and now - began > STALL:
            return now
        return max(self.stall_ended, syncer.stall_ended)

    def send_synced(self) -> None:
        """Send the held replies (and what waits behind them) whose sync has ended."""
        syncer = self.syncer
        if syncer is None:
            return
        if syncer.error is not None:
            self.log.critical("journal sync failed (%s): exiting without acknowledging",
                              syncer.error)
            raise SystemExit(70)
        for peer, type_, corr, body in self.held.release(syncer.synced):
            self.send(type_, peer, corr, body)

    def settle_syncs(self) -> None:
        """Wait for the sync under way and send what it held (before the journal file
        is rotated or closed). A failed sync exits, as in send_synced."""
        if self.syncer is None:
            return
        try:
            self.syncer.drain()
        except OSError:
            pass  # send_synced says it and exits
        self.send_synced()

    def _commit(self, sync: bool) -> None:
        try:
            self.journal.commit(sync=sync)
        except JournalError:
            # Cannot make the turn durable, so acknowledge none of it: exit and let
            # supervisord restart us from the journal; clients re-send.
            self.log.critical("journal commit failed: exiting without acknowledging",
                              exc_info=True)
            raise SystemExit(70) from None

    def run(self) -> None:
        self.log.info("%s serving %s", self.name, self.rt.home)
        try:
            while not self.rt.stopping:
                timeout = self.do_due(time.monotonic())
                fx = Effects()
                ready = dict(self.poller.poll(0 if self.inbox else poll_ms(timeout)))
                if self.rt.wake_r.fileno() in ready:
                    self.rt.drain_wakeups()
                if self.syncer is not None and self.syncer.wake_fd in ready:
                    self.syncer.clear_wake()
                    self.send_synced()
                if self.events.socket in ready:
                    self.events.on_message()
                self.on_sockets(ready, fx)
                if self.link.socket in ready or self.inbox or (
                        self.direct is not None and self.direct.fd in ready):
                    if self.read_turn(fx, ready):
                        self._after_turn(fx)
                    self.flush(fx)
        finally:
            self.shutdown()

    def do_due(self, now: float) -> float:
        """What is due before the loop waits (the service's tick, heartbeats, held events,
        a snapshot); returns how long it may wait."""
        fx = Effects()
        tick = self.halted_tick() if self.halted is not None else \
            self.on_tick(fx, time.time())
        if tick >= SOFT_TICK:
            tick += TICK_SLACK
        if fx.sends or fx.records or fx.events or self.pending_events:
            self.flush(fx)
        # After the flush: events it held are due within the linger.
        timeout = min(self.link.tick(now), self.events.tick(now), tick)
        if self.journal is not None:
            timeout = min(timeout, self.snapshot_tick(now))
        return timeout

    def read_turn(self, fx: Effects, ready: dict | None = None) -> int:
        """Read what waits on the bus into the inbox (bounded), then handle it, urgent
        messages first, until the inbox is empty or the turn's time is up (the rest waits
        in the inbox for the next turn); returns how many messages were handled
        (heartbeats and other control traffic not counted, so a turn of beats alone asks
        for no work after it). A handler that sets `end_turn` (the scheduler admitting a
        critical task) ends the turn after its message, so its work is flushed without
        waiting behind the rest. `ready`: the poll's finds (see _fill_inbox)."""
        now_wall = time.time()
        turn_ends = time.monotonic() + self.turn_limit
        handled = 0
        self.end_turn = False
        look_every = LOOK_EVERY_S if self.LANES > 1 else math.inf
        next_look = time.monotonic() + look_every
        while self._fill_inbox(ready):
            ready = None
            while self.inbox:
                self._decode(fx, self.inbox.take(), now_wall)
                handled += 1
                now = time.monotonic()
                if self.end_turn or now > turn_ends:
                    return handled
                if now > next_look:
                    self._fill_inbox()
                    next_look = now + look_every
        return handled

    def _fill_inbox(self, polled: dict | None = None) -> bool:
        """Read what waits on the bus into the inbox, as far as it holds; whether the
        inbox has anything. Refilled once it is empty (and, with lanes, every
        LOOK_EVERY_S of a turn): an empty socket costs a system call to find out, once per
        batch rather than once per message. The turn's first fill skips a socket the
        poll has just seen empty (not in `polled`): at light load, one failed receive
        fewer; what comes meanwhile is read by the next fill. A later fill asks each
        socket first: one of the two is mostly empty (the bus, once the direct line
        carries the tasks), and a receive that finds nothing costs pyzmq an exception
        (~5 us, against ~2 for asking)."""
        if polled is None:
            bus = has_message(self.link.socket)
            direct = self.direct is not None and self.direct.has_message()
        else:
            bus = self.link.socket in polled
            direct = self.direct is not None and self.direct.fd in polled
        while (bus or direct) and not self.inbox.full():  # the two in turn
            if bus:
                parts = recv_frames(self.link.socket)
                if parts is None:
                    bus = False
                else:
                    msg = self.link.accept(parts)  # None: control traffic
                    if msg is not None:
                        self.inbox.put(msg)
            if direct:
                msg = self.direct.receive(time.monotonic())  # None: none; False: handled
                if msg is None:
                    direct = False
                elif msg:
                    self.inbox.put(msg)
        return bool(self.inbox)

    LANES = 1  # the inbox's lanes: a message's rank is the lane it is handled in

    def rank(self, msg: wire.Message) -> int:
        """The lane of a message read with others: 0 is handled first (the scheduler:
        critical submits, then its workers' reports). Called once per message as it is
        read: keep it cheap."""
        return 0

    def shutdown(self) -> None:
        try:
            if self.journal is not None:
                self.write_snapshot()
                self.journal.close()
        finally:
            if self.syncer is not None:
                self.syncer.close()
            if self.direct is not None:
                self.direct.close()
                self.rt.remove_socket(self.direct.endpoint)
            self.events.flush(force=True)
            self.link.close()
            self.events.close()
            self.rt.close()
            self.log.info("%s stopped", self.name)
