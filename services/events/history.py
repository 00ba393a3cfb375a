"""`events.query`: pages of the event history, in order, each fitting one bus message.

Events are ordered by (ts, id), oldest first or, with `newest`, newest first. A page
holds at most `limit` events and at most what fits one message; its `cursor` is the key
of its last event, and the next page (asked with `after` = that cursor) holds the events
past it in the same order, so pages never repeat or skip an event. `more` says whether
more may match.

PostgreSQL (when configured) pages with a keyset condition. The JSONL files are in
arrival order, which is not quite time order (a publisher re-sends what the router did
not acknowledge), so a page is read as a whole window of time starting at the cursor,
widened until it holds more than a page: every event outside it lies beyond the page.
Runs on a thread of the event router; a read that passes QUERY_SECONDS stops, and its
page says `partial` (events may be missing from it: narrow the filters).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterator

import msgpack

from cortex.protocol import wire
from cortex.services.runtime.eventlog import read_events
from cortex.services.runtime.eventread import time_order

QUERY_SECONDS = 10.0  # a query reading the history stops after this long (partial)
# Seconds of history a JSONL page reads first past its cursor, then more, so a page of
# recent (or early) events never reads the whole history.
WINDOWS = (60.0, 900.0, 3600.0, 6 * 3600.0, 86400.0, 7 * 86400.0, None)
ROOM = wire.MAX_MESSAGE_BYTES - 64 * 1024  # for the events of one reply


key = time_order  # (ts, id)


def cursor_of(event: dict) -> str:
    ts, event_id = key(event)
    return f"{ts!r}/{event_id}"


def parse_cursor(text: str | None) -> tuple[float, str] | None:
    """The key a cursor names; a malformed cursor is `bad_request`."""
    if text is None:
        return None
    ts, sep, event_id = text.partition("/")
    try:
        value = float(ts)
    except ValueError:
        value = math.nan
    if not sep or not math.isfinite(value):
        raise wire.ProtocolError("bad_request", "field 'after' is not a cursor of "
                                                "events.query (pass back `cursor`)")
    return value, event_id


def query_page(directory, postgres_url: str, filters: dict, limit: int, newest: bool,
               after: tuple[float, str] | None = None, seconds: float = QUERY_SECONDS,
               ) -> dict:
    """One page: {events, more, cursor, source} (and partial when the read stopped at
    its time bound). `filters`: since, until, task, type_pattern, worker, text."""
    stop_at = time.monotonic() + seconds
    if postgres_url:
        from cortex.services.runtime.pgevents import query_events

        found = query_events(postgres_url, **filters, limit=limit + 1, newest_first=newest,
                             after=after, timeout=seconds)
        return _page(found, limit, after, "postgres", cut=False)
    found, cut = _jsonl(directory, filters, limit, newest, after, stop_at)
    return _page(found, limit, after, "jsonl", cut)


def _page(found: list[dict], limit: int, after, source: str, cut: bool) -> dict:
    """The first `limit` of `found` (already in order) that fit one message."""
    events, room = [], ROOM
    for event in found[:limit]:
        room -= len(msgpack.packb(event, default=str))
        if room < 0 and events:
            break
        events.append(event)
    more = cut or len(found) > len(events)
    cursor = cursor_of(events[-1]) if events else (
        None if after is None else f"{after[0]!r}/{after[1]}")
    page = {"events": events, "more": more, "cursor": cursor, "source": source}
    return page | {"partial": True} if cut else page


class _Deadline:
    """Passes events on until the time is up, then notes that it cut the read."""

    def __init__(self, stop_at: float):
        self.stop_at = stop_at
        self.cut = False

    def __call__(self, events: Iterator[dict]) -> Iterator[dict]:
        for event in events:
            yield event
            if time.monotonic() > self.stop_at:
                self.cut = True
                return


def _jsonl(directory, filters: dict, limit: int, newest: bool, after, stop_at: float,
           ) -> tuple[list[dict], bool]:
    """The first limit + 1 events past `after` in order, from the JSONL files; and
    whether the time bound cut the read."""
    since, until = filters.get("since"), filters.get("until")
    deadline = _Deadline(stop_at)
    if newest:
        anchor = until if until is not None else time.time() + 1.0
        if after is not None:  # up to and including the cursor's ts: `until` excludes
            anchor = min(anchor, math.nextafter(after[0], math.inf))
        beyond = (lambda e: key(e) < after) if after is not None else None
    else:
        anchor = max(after[0], since) if after is not None and since is not None else \
            after[0] if after is not None else since
        if anchor is None:  # the first match in file order: no event much older follows
            first = next(read_events(directory, **filters, limit=1), None)
            if first is None:
                return [], False
            anchor = key(first)[0]
        beyond = (lambda e: key(e) > after) if after is not None else None
    for span in WINDOWS:
        if newest:
            lo = None if span is None else anchor - span
            if since is not None and (lo is None or lo <= since):
                lo, span = since, None
            window = filters | {"since": lo, "until": anchor}
        else:
            hi = None if span is None else anchor + span
            if until is not None and (hi is None or hi >= until):
                hi, span = until, None
            lo = since if after is None else anchor  # no cursor: all before the anchor
            window = filters | {"since": lo, "until": hi}
        events = deadline(read_events(directory, **window))
        if beyond is not None:
            events = filter(beyond, events)
        pick = heapq.nlargest if newest else heapq.nsmallest
        found = pick(limit + 1, events, key=key)
        if len(found) > limit or span is None or deadline.cut:
            return found, deadline.cut
    return found, deadline.cut
