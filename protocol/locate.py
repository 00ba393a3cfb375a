"""Where the suite lives: the home directory and the endpoints under it.

The CLI, the services and the client library all find the suite the same way:
an explicit home, else $CORTEX_HOME, else `.cortex` in the working directory.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

DEFAULT_HOME = ".cortex"
# sun_path holds 108 bytes on Linux, 104 on macOS and the BSDs, the final NUL included;
# libzmq fails on longer ipc paths.
IPC_PATH_MAX = 107 if sys.platform.startswith("linux") else 103


class HomeError(Exception):
    code = "bad_home"


def find_home(home: str | os.PathLike | None = None) -> Path:
    raw = home or os.environ.get("CORTEX_HOME") or DEFAULT_HOME
    return Path(raw).expanduser().absolute()


def ipc(path: Path) -> str:
    text = str(path)
    if len(text.encode()) > IPC_PATH_MAX:
        raise HomeError(
            f"socket path {text!r} is {len(text.encode())} bytes, above the {IPC_PATH_MAX}-byte "
            "ipc limit: choose a shorter --home or CORTEX_HOME")
    return f"ipc://{text}"


def secret_path(home: Path) -> Path:
    """The suite's secret (run/suite.secret, the owner's alone): the suite's own processes
    prove themselves with it. The client library and the Worker helper never read it."""
    return home / "run" / "suite.secret"


def suite_key_path(home: Path) -> Path:
    """The suite's CurveZMQ key pair (keys/suite.key, the owner's alone): the suite's
    listening sockets serve with it on tcp, and its own processes connect with it."""
    return home / "keys" / "suite.key"


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def _bus_table(home: Path) -> dict:
    cfg = home / "cortex.toml"
    if not cfg.exists():
        return {}
    try:
        with cfg.open("rb") as f:
            bus = tomllib.load(f).get("bus", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}  # the services report a bad config loudly; clients keep the defaults
    return bus if isinstance(bus, dict) else {}


def key_file(home: Path) -> Path | None:
    """The key file a client of this home connects with over tcp: $CORTEX_KEY_FILE, else
    `[bus] key_file` (relative to the home), else the suite's own key pair when this
    user can read it (the suite's machine), else None."""
    named = os.environ.get("CORTEX_KEY_FILE") or _bus_table(home).get("key_file")
    if isinstance(named, str) and named:
        path = Path(named).expanduser()
        return path if path.is_absolute() else home / path
    own = suite_key_path(home)
    return own if os.access(own, os.R_OK) else None


def direct_endpoint(bus: str) -> str | None:
    """The scheduler's direct line to local workers (`work.sock` beside an ipc bus's
    socket); None when the bus is not ipc (workers on other machines use the bus)."""
    path = ipc_path(bus)
    return None if path is None else ipc(path.with_name("work.sock"))


def ipc_path(endpoint: str) -> Path | None:
    """The socket file behind an ipc:// endpoint (None for any other transport)."""
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def endpoints(home: Path) -> dict[str, str]:
    """The bus, event fan-in and live event endpoints (tcp:// when configured)."""
    run = home / "run"
    result = {
        "bus": ipc(run / "bus.sock"),
        "events_in": ipc(run / "events-in.sock"),
        "events_live": ipc(run / "events.sock"),
    }
    bus = _bus_table(home)
    for key in result:
        if isinstance(bus.get(key), str) and bus[key]:
            result[key] = bus[key]
    return result
