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
from cortex.services.runtime.durable import remove_temp_files
from cortex.services.runtime.effects import Effects
from cortex.services.runtime.journal import Journal, read_snapshot, write_snapshot

# Seconds a journaled service's events may wait to be batched with later ones (each is
# in the journal, so nothing is lost by waiting): at light load the event router then
# takes one batch per few tasks, not a few per task.
EVENT_LINGER = 0.01

PREVIOUS_SUFFIX = ".prev"  # the snapshot before the newest
BAD_SUFFIX = ".bad"  # an unreadable snapshot, set aside for the operator
HALTED_CHECK = 1.0  # seconds between looks at a halted service's journal


def _previous(path):
    return path.with_name(path.name + PREVIOUS_SUFFIX)


class JournalOwner:
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

    def write_snapshot(self) -> None:
        """Snapshot, keeping the one before (`NAME.prev`), then rotate the journal. The
        journal keeps what the previous snapshot needs, so either one can be lost."""
        if self.journal is None:
            return
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
        self.journal.rotate()
