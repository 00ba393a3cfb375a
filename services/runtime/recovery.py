"""A bus service's journal over its life: opened and replayed over the newest good
snapshot, snapshotted (the one before kept), and halted on damage until repaired.

`JournalOwner` is the part of `BusService` (loop.py) that owns these; it relies on the
service's runtime (`rt`, `settings`, `log`, `name`), its event publisher (`events`) and
its state hooks (`snapshot`, `restore`, `emit`, `settle_syncs`).
"""

from __future__ import annotations

import os
import sys
import time

from cortex.protocol import wire
from cortex.services.runtime.durable import fsync_dir, remove_temp_files, write_atomic
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.forked import ForkedWrite
from cortex.services.runtime.journal import (
    Journal,
    read_snapshot,
    snapshot_bytes,
    write_snapshot,
)

# Seconds a journaled service's events may wait to be batched with later ones (each is
# in the journal, so nothing is lost by waiting): at light load the event router then
# takes one batch per few tasks, not a few per task.
EVENT_LINGER = 0.01

PREVIOUS_SUFFIX = ".prev"  # the snapshot before the newest
BAD_SUFFIX = ".bad"  # an unreadable snapshot, set aside for the operator
HALTED_CHECK = 1.0  # seconds between looks at a halted service's journal
# A snapshot takes at most ~5 % of the loop's time: the next one waits 20 times as long
# as this one took in the loop, and at least [suite] snapshot_interval.
SNAPSHOT_SHARE = 20
SNAPSHOT_SLACK = 1.0  # seconds a due snapshot may wait for the loop's next wake
FORKED_LOOK = 0.02  # seconds between looks at a snapshot's child while it writes


def _previous(path):
    return path.with_name(path.name + PREVIOUS_SUFFIX)


class JournalOwner:
    # Whether the periodic snapshot is written by a forked child (forked.py): for a
    # service whose snapshot is large (the scheduler's task table) and that reaps no
    # children of its own with waitpid(-1) (the pool does).
    FORKED_SNAPSHOTS = False

    def open_journal(self) -> None:
        """The newest good snapshot + the journal. A bad snapshot is set aside and the
        previous one used (the journal reaches back to it); damaged journal records halt
        the service (`halt()`); nothing here raises on bad content."""
        path = self.rt.home / "state" / self.snapshot_name
        remove_temp_files(path.parent, path.name)  # what a writer killed mid-write left
        snap, why = read_snapshot(path)
        used = "loaded"
        if snap is None:
            if why:
                self.log.error("snapshot %s unreadable (%s): set aside as %s, recovering "
                               "from the previous snapshot and the journal", path, why,
                               path.name + BAD_SUFFIX)
                self._set_aside(path)
            snap, why_prev = read_snapshot(_previous(path))
            used = "previous" if snap is not None else "absent"
            if why_prev:
                self.log.error("previous snapshot unreadable too (%s)", why_prev)
        self.journal = Journal(self.rt.home / "wal" / f"{self.name}.wal",
                               self.settings.suite.fsync)
        self.events.linger = EVENT_LINGER
        after = (snap or {}).get("journal_lsn", 0)
        records, report = self.journal.replay(after_lsn=after)
        if report.damage and self.halt_on_damage:
            self.halt(report)
            return
        if report.damage:  # only events were journaled: say what is gone, carry on
            self.log.error("journal: damaged records skipped %s", report.corrupt)
            self.emit(f"{self.name}.journal_damaged", {"corrupt": report.corrupt,
                                                       "damage": report.damage[:10]})
        if report.torn_tail or report.corrupt:  # nothing lost: what the snapshot covers
            self.log.warning("journal: torn tail cut off %s; bad records the snapshot "
                             "covers %s", report.tail, report.corrupt)
            self.emit(f"{self.name}.journal_damaged", {"torn_tail": report.tail,
                                                       "corrupt": report.corrupt})
        if report.first_lsn is not None and report.first_lsn > after + 1:
            # Both snapshots lost and the journal no longer reaches back: say what is gone.
            missing = {"from_lsn": after + 1, "to_lsn": report.first_lsn - 1,
                       "snapshot": used}
            self.log.critical("journal records %d..%d are lost (no usable snapshot covers "
                              "them): recovering what is left", after + 1,
                              report.first_lsn - 1)
            self.emit(f"{self.name}.journal_damaged", {"history_missing": missing,
                                                       "corrupt": []})
        # Events not acknowledged before the crash go out again under their own ids.
        unsent = [e for e in (snap or {}).get("unacked_events", []) if isinstance(e, dict)]
        unsent += [r["event"] for r in records if r.get("k") == "event"]
        self.events.requeue(unsent)
        self.restore(snap, [r for r in records if r.get("k") != "event"])
        self.log.info("recovered: snapshot %s, %d journal records replayed, %d events to "
                      "re-send", used, len(records), len(unsent))
        self.write_snapshot()

    def _set_aside(self, path) -> None:
        try:
            os.replace(path, path.with_name(path.name + BAD_SUFFIX))
        except OSError as e:
            self.log.error("cannot set %s aside: %s", path, e)

    def halt(self, report) -> None:
        """Damaged records in the journal: serve nothing that depends on the state (a
        status request is answered with the damage), leave the files as they are, say
        what, where and what to do, and restart once the journal has been repaired.
        Never exit meanwhile: supervisord would retry into FATAL."""
        first = report.damage[0]
        repair = (f"{sys.executable} -m cortex.services.runtime.journal repair "
                  f"--home {self.rt.home} {self.name}")
        self.halted = {
            "reason": "journal damaged", "file": first["file"], "offset": first["offset"],
            "after_lsn": first["after_lsn"], "records": len(report.damage),
            "damage": report.damage[:10], "repair": repair,
            "message": (f"{self.name} halted: {len(report.damage)} damaged record(s) in its "
                        f"journal, the first in {first['file']} at offset {first['offset']} "
                        f"({first['why']}, after lsn {first['after_lsn']}); what they hold "
                        f"would be lost. Look at them, then run: {repair}")}
        self.log.critical("%s\n  damaged line shows: %s", self.halted["message"],
                          first["shows"][:200])
        self.emit(f"{self.name}.journal_damaged", {
            "halted": True, "corrupt": report.corrupt, **{
                k: v for k, v in self.halted.items() if k != "message"}})
        self.stop_snapshots()
        self.journal.close()  # the repair must be able to take it
        self.journal = None
        self.events.linger = 0.0  # events are journaled no more
        self._journal_seen = self._journal_signature()

    def _journal_signature(self) -> tuple:
        wal = self.rt.home / "wal" / f"{self.name}.wal"
        found = []
        for path in (wal, wal.with_name(wal.name + ".prev")):
            try:
                st = path.stat()
                found.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                found.append(None)
        return tuple(found)

    def halted_tick(self) -> float:
        """While halted: once the journal changed (repaired), stop so supervisord starts
        us again on the repaired journal."""
        if self._journal_signature() != self._journal_seen:
            self.log.warning("journal changed while halted: restarting to recover")
            self.rt.stopping = True
        return HALTED_CHECK

    def halted_answer(self, fx: Effects, msg: wire.Message) -> None:
        """Requests while halted: the service's status says why; anything else is refused."""
        if msg.type != wire.REQUEST:
            return
        try:
            op = msg.decoded().get("op")
        except wire.ProtocolError:
            op = None
        if op == f"{self.name}.status":
            fx.reply(msg.peer, msg.corr, {"halted": self.halted, "pid": os.getpid(),
                                          "started": self.rt.started})
        else:
            fx.error(msg.peer, msg.corr, "unavailable", self.halted["message"][:500])

    def snapshot_tick(self, now: float) -> float:
        """The periodic snapshot: when due and something changed since the last; returns
        seconds until the next look."""
        # Every turn of every journaled service passes here: the ledger and the pool
        # (no forked snapshots) look at nothing more.
        if self.FORKED_SNAPSHOTS and self._forked().running:
            self._take_forked(block=False)
            if self.forked.running:
                return FORKED_LOOK
        if now >= self.next_snapshot:
            took = 0.0
            if self.journal.last_lsn != self.snapshot_lsn or self.events.unacked:
                began = time.monotonic()
                if not self._fork_snapshot():
                    self.write_snapshot()
                took = time.monotonic() - began
            self.next_snapshot = time.monotonic() + max(
                self.settings.suite.snapshot_interval, SNAPSHOT_SHARE * took)
        return self.next_snapshot - now + SNAPSHOT_SLACK

    def stop_snapshots(self) -> bool:
        """A snapshot's child still writing is killed and reaped (we stop, halt, or
        write one here); whether there was one (the journal was rotated for it)."""
        forked = getattr(self, "forked", None)
        if forked is None or not forked.running:
            return False
        forked.cancel()
        return True

    def _forked(self) -> ForkedWrite:
        forked = getattr(self, "forked", None)
        if forked is None:
            forked = self.forked = ForkedWrite(self.rt.home / "state" / self.snapshot_name)
        return forked

    def _fork_snapshot(self) -> bool:
        """Start a child writing the snapshot as of now; False: write it in place (not
        this service's way, no newest snapshot to keep as the previous one, or no fork).

        The journal is rotated as the child starts, at the snapshot's position, as
        write_snapshot rotates once it is written: the newest snapshot and the journal
        rebuild the state at every step. Until the child's snapshot is in place, the one
        before the newest can no longer stand in for it (its records went with the
        rotation)."""
        if not self.FORKED_SNAPSHOTS:
            return False
        forked = self._forked()
        if not forked.target.exists():
            return False
        self.settle_syncs()  # the syncer must not sync the segment being closed
        self.journal.rotate()
        lsn = self.journal.last_lsn  # the state holds every record up to it

        def produce() -> bytes:  # in the child, on its copy of the state
            data = self.snapshot()
            data["journal_lsn"] = lsn
            data["unacked_events"] = self.events.unacked_events()
            data["written_at"] = time.time()
            return snapshot_bytes(data)

        try:
            forked.start(produce, tag=lsn)
        except OSError as e:
            self.log.warning("cannot fork to write the snapshot (%s): writing it here", e)
            self.write_snapshot(rotate=False)  # rotated already
        return True

    def _take_forked(self, block: bool) -> None:
        """Put a finished child's snapshot in place, the newest becoming the previous.
        A failed child's is written here instead (the journal was rotated already)."""
        found = self._forked().poll(block)
        if found is None:
            return
        tmp, lsn = found
        if tmp is None:
            self.log.error("the child writing the snapshot failed: writing it here")
            self.write_snapshot(rotate=False)
            return
        path = self._forked().target
        try:
            had_newest = path.exists()
            if had_newest:
                os.replace(path, _previous(path))
            os.replace(tmp, path)
            if not had_newest:  # lost meanwhile: this one is both
                write_atomic(_previous(path), path.read_bytes())
            fsync_dir(path.parent)
        except OSError as e:
            self.log.error("cannot put the snapshot in place (%s): writing it here", e)
            self.write_snapshot(rotate=False)
            return
        self.snapshot_lsn = lsn

    def write_snapshot(self, rotate: bool = True) -> None:
        """Snapshot, keeping the one before (`NAME.prev`), then rotate the journal. The
        journal keeps what the previous snapshot needs, so either one can be lost.
        `rotate=False`: it was rotated when a forked snapshot began (which this one
        replaces), and the previous snapshot needs what is left of it."""
        if self.journal is None:
            return
        if self.stop_snapshots():  # in place of a child's: rotated when it began
            rotate = False
        self.settle_syncs()
        self.journal.commit()
        data = self.snapshot()
        data["journal_lsn"] = self.journal.last_lsn  # "lsn" may be the state's own
        self.snapshot_lsn = self.journal.last_lsn
        data["unacked_events"] = self.events.unacked_events()
        data["written_at"] = time.time()
        path = self.rt.home / "state" / self.snapshot_name
        if path.exists():
            os.replace(path, _previous(path))
            write_snapshot(path, data)
        else:
            # No newest one to keep (first snapshot, or it was lost): this one is both.
            write_snapshot(path, data)
            write_snapshot(_previous(path), data)
        if rotate:
            self.journal.rotate()
