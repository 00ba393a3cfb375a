"""What the PostgreSQL copy of the events looks like: the schema, its migrations, and the
rows made from events (sanitised: PostgreSQL refuses values JSONL takes).

NUL in text, ``\\u0000`` in jsonb and out-of-range numbers fail a whole batch
(docs/pitfalls.md, "PostgreSQL"): `sanitize` fixes them before batching.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

# ---------------------------------------------------------------------------- schema

# Append-only: a released migration is never edited, only followed by a new one.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE IF NOT EXISTS cortex_events (
                id     text PRIMARY KEY,
                source text,
                epoch  bigint,
                seq    bigint,
                ts     timestamptz,
                type   text,
                trace  text,
                task   text,
                worker text,
                data   jsonb NOT NULL DEFAULT '{}'::jsonb
            )""",
            "CREATE INDEX IF NOT EXISTS cortex_events_ts ON cortex_events (ts)",
            "CREATE INDEX IF NOT EXISTS cortex_events_type_ts ON cortex_events (type, ts)",
            "CREATE INDEX IF NOT EXISTS cortex_events_task_ts ON cortex_events (task, ts)"
            " WHERE task IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS cortex_events_worker_ts ON cortex_events (worker, ts)"
            " WHERE worker IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS cortex_events_trace ON cortex_events (trace)"
            " WHERE trace IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS cortex_events_source_seq"
            " ON cortex_events (source, epoch, seq)",
        ],
    ),
]
_MIGRATION_LOCK = 0x636F_7274_6578  # "cortex": serialises concurrent migrators
_TEXT_FIELDS = ("id", "source", "type", "trace", "task", "worker")


def apply_migrations(conn: psycopg.Connection) -> int:
    """Bring the schema to the newest version; return it. Safe to run twice or concurrently."""
    with conn.transaction():
        # Taken before anything else so two sinks starting together apply each step once.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS cortex_schema_version ("
            " version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM cortex_schema_version").fetchone()
        current = row[0] if row else 0
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            for stmt in statements:
                conn.execute(stmt)
            conn.execute("INSERT INTO cortex_schema_version (version) VALUES (%s)", (version,))
            current = version
    return current


# ---------------------------------------------------------------------------- sanitising

_BIGINT_MIN, _BIGINT_MAX = -(2**63), 2**63 - 1
# timestamptz range Python can also represent: years 1..9999.
_TS_MIN, _TS_MAX = -62_135_596_800.0, 253_402_300_799.0
_REPLACEMENT = "\ufffd"


def _clean_str(s: str) -> str:
    # NUL becomes U+FFFD (the Unicode replacement character) rather than the literal
    # text "\\u0000": unambiguous, and the exact value is still in the JSONL record.
    if "\x00" in s:
        s = s.replace("\x00", _REPLACEMENT)
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates cannot be sent as UTF-8
            # UTF-16 round trip: joins valid pairs, turns lone halves into U+FFFD.
            s = s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return s


def _clean_json(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, int):
        return value if _BIGINT_MIN <= value <= _BIGINT_MAX else str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if depth > 100:  # jsonb and the server's stack have depth limits; keep it as text
        return _clean_str(orjson.dumps(value, default=str).decode()[:10_000])
    if isinstance(value, dict):
        return {_clean_str(str(k)): _clean_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean_json(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return _clean_str(bytes(value).decode("utf-8", "replace"))
    return _clean_str(str(value))


def sanitize(event: dict) -> dict:
    """An event-shaped copy of `event` that PostgreSQL accepts.

    * text fields: ``None`` stays ``None``, anything else becomes ``str``; NUL -> U+FFFD,
      lone surrogates -> U+FFFD;
    * ``epoch``/``seq``: ints within bigint, else ``None``;
    * ``ts``: a finite unix time within years 1..9999, else ``None``;
    * ``data`` (any depth): NUL -> U+FFFD in strings and keys, ints beyond bigint ->
      decimal strings, NaN/±inf -> "NaN"/"Infinity"/"-Infinity", bytes -> text, other
      objects -> ``str()``; a non-dict ``data`` is wrapped as ``{"value": data}``.

    Keys outside the event shape are dropped (the JSONL record keeps them).
    """
    out: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        v = event.get(name)
        out[name] = None if v is None else _clean_str(v if isinstance(v, str) else str(v))
    for name in ("epoch", "seq"):
        v = event.get(name)
        ok = isinstance(v, int) and not isinstance(v, bool) and _BIGINT_MIN <= v <= _BIGINT_MAX
        out[name] = v if ok else None
    ts = event.get("ts")
    ok = isinstance(ts, int | float) and not isinstance(ts, bool) and _TS_MIN <= ts <= _TS_MAX
    out["ts"] = float(ts) if ok else None
    data = event.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        data = {"value": data}
    out["data"] = _clean_json(data)
    return out


def _jsonb_dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def row(clean: dict) -> tuple:
    if not clean["id"]:
        raise ValueError("event has no id")
    ts = clean["ts"]
    when = None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)
    return (
        clean["id"], clean["source"], clean["epoch"], clean["seq"], when, clean["type"],
        clean["trace"], clean["task"], clean["worker"], Jsonb(clean["data"], dumps=_jsonb_dumps),
    )  # fmt: skip
