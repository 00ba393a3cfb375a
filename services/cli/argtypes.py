"""Argument types: each turns one command-line word into a checked value, or fails with
one line ("argument --x: <why>") through argparse."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from pathlib import Path

from cortex.protocol.vocabulary import window_seconds

MAX_INT = (1 << 63) - 1
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= MAX_INT:
        raise argparse.ArgumentTypeError(f"{text} must be an integer from 0 to 2**63-1")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def json_value(text: str):
    """JSON text, or @FILE to read it from a file."""
    source = text
    if text.startswith("@"):
        try:
            source = Path(text[1:]).read_text()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {e.strerror}") from None
    try:
        return json.loads(source)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None


def deadline(text: str) -> float:
    """A unix time, or +SECONDS from now."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a unix time nor +SECONDS") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a unix time or +SECONDS")
    return time.time() + value if text.strip().startswith("+") else value


def when(text: str) -> float:
    """A unix time, an ISO 8601 date/time (local unless it says otherwise), or a time
    before now: 30s, 15m, 2h, 1d (a leading minus is allowed: --since=-15m)."""
    raw = text.strip()
    if raw[-1:] in DURATION_UNITS:
        try:
            ago = float(raw[:-1].removeprefix("-"))
        except ValueError:
            pass
        else:
            if math.isfinite(ago) and ago >= 0:
                return time.time() - ago * DURATION_UNITS[raw[-1]]
    try:
        value = float(raw)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a unix time, an ISO date/time or N[smhd] ago") from None
    return moment.timestamp()


def limit_value(text: str) -> int | None:
    if text.lower() in ("none", "unlimited"):
        return None
    return non_negative_int(text)


def window_value(text: str) -> str | None:
    """A budget window as the ledger reads it (one parser for config, CLI and ledger)."""
    window = None if text.lower() in ("", "none", "never") else text
    try:
        window_seconds(window)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return window


def name(text: str) -> str:
    """A non-empty word without control characters (a task type, an agent, a service)."""
    if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a name")
    return text
