"""Sequence bookkeeping of the event stream: which (source, epoch, seq) were seen.

One tracker per events directory: the event log's writer owns it, updates it with what
it has written, checkpoints it beside each closed file (`.pos`) and rebuilds it at start
from the newest checkpoint plus the files after it. The event router asks the writer, so
the files are replayed once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from cortex.services.runtime.eventread import Counters, iter_file, list_event_files


@dataclass(slots=True)
class _Stream:
    pos: int = 0  # highest seq with every seq 1..pos seen (or given up on)
    top: int = 0  # highest seq seen
    extra: set[int] = field(default_factory=set)  # seen seqs above pos + 1


class SeqTracker:
    """Per (source, epoch) sequence bookkeeping: de-duplication and gap detection.

    ``observe`` returns "duplicate" for a seq already seen, "gap" for a new seq that
    reveals missing seqs below it, and "new" otherwise (including a late seq that fills
    a hole). ``gaps`` is the number of seqs currently known to be missing (it drops when
    a late seq fills a hole); ``duplicates`` counts duplicates seen.

    Memory is bounded: a stream keeps at most `max_pending` out-of-order seqs; beyond
    that the lowest hole is given up on (stays counted in ``gaps``, and a seq from it
    arriving later is then reported as a duplicate).
    """

    def __init__(
        self, positions: dict[tuple[str, int], int] | None = None, max_pending: int = 4096
    ) -> None:
        self._streams: dict[tuple[str, int], _Stream] = {}
        self.max_pending = max_pending
        self.gaps = 0
        self.duplicates = 0
        for key, pos in (positions or {}).items():
            self._streams[key] = _Stream(pos=pos, top=pos)

    @classmethod
    def recover(cls, directory: str | os.PathLike, max_pending: int = 4096) -> SeqTracker:
        """Tracker holding everything already in the JSONL files of `directory`."""
        return recover_tracker(Path(directory), max_pending)

    def observe(self, source: str, epoch: int, seq: int) -> str:
        key = (source, epoch)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream()
        if seq <= st.pos or seq in st.extra:
            self.duplicates += 1
            return "duplicate"
        if seq > st.top:
            missing = seq - st.top - 1
            self.gaps += missing
            st.top = seq
            result = "gap" if missing else "new"
        else:
            self.gaps -= 1  # a late arrival filling a known hole
            result = "new"
        if seq == st.pos + 1:
            st.pos = seq
            self._absorb(st)
        else:
            st.extra.add(seq)
            if len(st.extra) > self.max_pending:
                # Give up on the lowest hole so memory stays bounded.
                st.pos = min(st.extra)
                st.extra.discard(st.pos)
                self._absorb(st)
        return result

    @staticmethod
    def _absorb(st: _Stream) -> None:
        while st.extra and st.pos + 1 in st.extra:
            st.extra.discard(st.pos + 1)
            st.pos += 1

    def seen(self, source: str, epoch: int, seq: int) -> bool:
        st = self._streams.get((source, epoch))
        return st is not None and (seq <= st.pos or seq in st.extra)

    def position(self, source: str, epoch: int) -> int:
        """Highest contiguous seq of (source, epoch); 0 if never seen."""
        st = self._streams.get((source, epoch))
        return st.pos if st else 0

    def positions(self) -> dict[tuple[str, int], int]:
        return {k: st.pos for k, st in self._streams.items()}

    # Checkpoint form used by the writer's .pos files.
    def _dump(self) -> dict:
        return {
            "gaps": self.gaps,
            "streams": [
                [s, e, st.pos, st.top, sorted(st.extra)] for (s, e), st in self._streams.items()
            ],
        }

    @classmethod
    def _load(cls, doc: dict, max_pending: int) -> SeqTracker:
        t = cls(max_pending=max_pending)
        t.gaps = int(doc["gaps"])
        for s, e, pos, top, extra in doc["streams"]:
            t._streams[(str(s), int(e))] = _Stream(int(pos), int(top), {int(x) for x in extra})
        return t


def event_key(ev: Any) -> tuple[str, int, int] | None:
    if not isinstance(ev, dict):
        return None
    s, e, q = ev.get("source"), ev.get("epoch"), ev.get("seq")
    if isinstance(s, str) and type(e) is int and type(q) is int:
        return s, e, q
    return None


def recover_tracker(directory: Path, max_pending: int) -> SeqTracker:
    files = list_event_files(directory)
    tracker = SeqTracker(max_pending=max_pending)
    start = 0
    # The newest closed file with a valid checkpoint covers itself and everything before.
    for i in range(len(files) - 1, -1, -1):
        try:
            doc = orjson.loads((files[i].parent / (files[i].name + ".pos")).read_bytes())
            if doc.get("file") != files[i].name:
                continue
            tracker = SeqTracker._load(doc, max_pending)
            start = i + 1
            break
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    for path in files[start:]:
        for ev in iter_file(path, 0, None, Counters()):
            key = event_key(ev)
            if key is not None:
                tracker.observe(*key)
    return tracker
