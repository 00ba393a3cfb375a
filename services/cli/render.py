"""Rendering: safe text, tables, human units, event lines, and writing output.

Text output is for terminals, and what it shows (descriptions, ids, messages, results,
log lines) comes from anyone who can submit a task. So every value is escaped before it
is shown: control characters (C0, DEL, C1 such as CSI and NEL) and the bidirectional
overrides become visible `\\xNN` / `\\uNNNN`, and `emit` escapes once more whatever a
renderer missed, keeping only its own newlines and tabs. JSON output is exact data (JSON
escapes control characters itself).

Each output line (or block) is written with one `write` and flushed: `print` writes the
text and the newline separately when the stream is unbuffered (PYTHONUNBUFFERED=1), and
parallel commands sharing a pipe then interleave mid-line.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import sys
from collections.abc import Iterable

# C0 controls, DEL, C1 controls (CSI 0x9b, NEL 0x85...), the bidirectional marks,
# embeddings, overrides and isolates, and the Unicode line/paragraph separators.
_CONTROLS = "\x00-\x1f\x7f-\x9f"
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029"
UNSAFE = re.compile(f"[{_CONTROLS}{_BIDI}]")
UNSAFE_IN_BLOCK = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")  # keeps \t and \n
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text) -> str:
    """One value as one safe line: every control and bidi character made visible."""
    return UNSAFE.sub(_escaped, str(text))


def escape_block(text: str) -> str:
    """Lines of text made safe, keeping their newlines and tabs."""
    return UNSAFE_IN_BLOCK.sub(_escaped, text)


# -- writing ---------------------------------------------------------------------------


def emit(text: str = "", *, err: bool = False) -> None:
    """Write text and its newline in one piece, made safe for a terminal."""
    write(escape_block(text) + "\n", err=err)


def write(text: str, *, err: bool = False) -> None:
    """Write exactly `text` (already safe, or terminal control of our own), flushed."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text)
    stream.flush()


def emit_json(value) -> None:
    write(json.dumps(value, indent=2, default=str) + "\n")


def emit_json_line(value) -> None:
    write(json.dumps(value, default=str, separators=(",", ":")) + "\n")


# -- human units -----------------------------------------------------------------------


def human_duration(secs) -> str:
    if not isinstance(secs, int | float) or isinstance(secs, bool) or not math.isfinite(secs):
        return "-"
    secs = max(0.0, float(secs))
    if secs == 0:
        return "0s"
    if secs < 1:
        return f"{secs * 1000:.0f}ms" if secs >= 0.001 else f"{secs * 1e6:.0f}us"
    if secs < 60:
        return f"{secs:.1f}s"
    if secs < 3600:
        return f"{int(secs // 60)}m{int(secs % 60):02d}s"
    if secs < 86400:
        return f"{int(secs // 3600)}h{int(secs % 3600 // 60):02d}m"
    return f"{int(secs // 86400)}d{int(secs % 86400 // 3600):02d}h"


def _moment(ts) -> dt.datetime | None:
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        return None
    try:
        return dt.datetime.fromtimestamp(ts)
    except (OverflowError, OSError, ValueError):
        return None


def stamp(ts, millis: bool = False) -> str:
    """A unix time as local ISO 8601: 2025-01-31T14:05:09 (what --since accepts back)."""
    moment = _moment(ts)
    if moment is None:
        return "-"
    return moment.isoformat(timespec="milliseconds" if millis else "seconds")


def local_stamp(value) -> str:
    """A unix time or an ISO 8601 string (UTC or any offset) as local ISO 8601."""
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            return escape(value)
        value = moment.timestamp()
    return stamp(value)


def clock(ts) -> str:
    """A unix time as the local time of day, to the millisecond: 14:05:09.123."""
    moment = _moment(ts)
    return "-" if moment is None else moment.time().isoformat(timespec="milliseconds")


def number(n) -> str:
    if n is None:
        return "-"
    if isinstance(n, bool):
        return "yes" if n else "no"
    if isinstance(n, int):
        return f"{n:,}"
    if isinstance(n, float):
        if not math.isfinite(n):
            return str(n)
        return f"{n:,.0f}" if abs(n) >= 100 else f"{n:.3g}"
    return escape(n)


def mib(value) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:,.0f} MiB"


def percent(fraction) -> str:
    return "-" if not isinstance(fraction, int | float) else f"{100 * fraction:.0f}%"


def short(value, width: int = 60) -> str:
    """A value (text or anything JSON-able) on one safe line, cut at `width`."""
    text = value if isinstance(value, str) else json.dumps(value, default=str,
                                                           separators=(",", ":"))
    text = escape(text)
    return text if len(text) <= width else text[: width - 1] + "…"


# -- tables ----------------------------------------------------------------------------

_NUMERIC = re.compile(r"^[-+]?\d[\d,]*(\.\d+)?( ?(%|[KMG]iB|us|ms|s))?$")


def table(headers: list[str], rows: Iterable[Iterable]) -> str:
    """Aligned columns of safe cells; numbers right-aligned, None shown as '-'."""
    cells = [["-" if v is None else escape(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    for row in cells:
        lines.append("  ".join(v.rjust(w) if _NUMERIC.match(v) else v.ljust(w)
                               for v, w in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def fields(rows: list[tuple[str, object]]) -> str:
    """`key  value` lines (a record shown vertically), values made safe."""
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {'-' if v is None else escape(v)}" for k, v in rows)


# -- events ----------------------------------------------------------------------------

TIME_KEYS = frozenset({"eta", "at", "started_at", "finished_at", "now", "next_reset",
                       "deadline", "window_start", "created", "ts"})
DURATION_KEYS = frozenset({"waited", "after", "timeout", "silent_for", "duration", "queued",
                           "seconds", "elapsed", "uptime", "grace", "eta_s"})
NOISE_KEYS = frozenset({"lsn", "op"})  # bookkeeping, not what a reader of the line wants


def value_text(key: str, value) -> str:
    """One data value for a human: times local, durations in units, floats rounded."""
    if isinstance(value, float) and not isinstance(value, bool):
        if key in TIME_KEYS and value > 1e9:
            return clock(value)
        if key in DURATION_KEYS or key.endswith("_s"):
            return human_duration(value)
        return number(value)
    if isinstance(value, str):
        text = short(value, 50)
        return json.dumps(text, ensure_ascii=False) if " " in text else text
    if isinstance(value, int | bool) or value is None:
        return str(value)
    return _cut(_nested(key, value), 60)


def _nested(key: str, value) -> str:
    """A dict or list inside event data, its numbers shown as `value_text` shows them."""
    if isinstance(value, dict):
        return "{" + " ".join(f"{escape(k)}={_nested(str(k), v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_nested(key, v) for v in value) + "]"
    return value_text(key, value)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def key_data(data, width: int = 120, known: dict | None = None) -> str:
    """An event's data as `k=v` pairs, the readable part of one line; keys whose value
    `known` already shows (the event's task and worker) are left out."""
    if not isinstance(data, dict):
        return short(data, width)
    parts = []
    known = known or {}
    for key, value in data.items():
        if value is None or value == "" or value == {} or key in NOISE_KEYS:
            continue
        if value in known.values() and key in ("task", "task_id", "worker"):
            continue
        parts.append(f"{escape(key)}={value_text(str(key), value)}")
    return _cut(" ".join(parts), width)


def event_line(event: dict, base: float | None = None, full_time: bool = False) -> str:
    """One safe line: time (or offset from `base`), source, type, task, worker, data."""
    ts = event.get("ts")
    if base is not None and isinstance(ts, int | float):
        when_text = f"{'+' + human_duration(ts - base):>9}"
    else:
        when_text = stamp(ts, millis=True) if full_time else clock(ts)
    who = []
    if event.get("task") and base is None:
        who.append(escape(event["task"]))
    if event.get("worker"):
        who.append(f"worker={escape(event['worker'])}")
    known = {"task": event.get("task"), "worker": event.get("worker")}
    rest = " ".join([*who, key_data(event.get("data"), known=known)]).strip()
    return (f"{when_text}  {escape(event.get('source', '-')):<10} "
            f"{escape(event.get('type')):<22} {rest}")
