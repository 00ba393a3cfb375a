"""The configuration of a suite the load test starts for itself: its pool, its handlers,
and its bus (ipc by default, tcp with CurveZMQ on request)."""

from __future__ import annotations

import socket

SYNTHETIC_HANDLER = "cortex.services.pool.handlers:simulated_agent"


def tcp_bus() -> str:
    """A [bus] section on free tcp ports of 127.0.0.1 (the suite serves them with CurveZMQ
    once it has its key pair)."""
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    names = ("bus", "events_in", "events_live")
    return "[bus]\n" + "".join(f'{n} = "tcp://127.0.0.1:{p}"\n'
                               for n, p in zip(names, ports, strict=True))


def own_config(workers: int, fsync: str, extra_types=(), postgres_url: str = "",
               more_handlers: dict | None = None, sections: str = "", bus: str = "") -> str:
    """`more_handlers`: type -> handler, served by the default group too; `sections`:
    further TOML tables (their own pool groups, providers, routing); `bus`: a [bus] table."""
    more_handlers = more_handlers or {}
    types = ["echo", "sleep", "simulated_agent", "fail", *extra_types, *more_handlers]
    handlers = "".join(f'{t} = "{SYNTHETIC_HANDLER}"\n' for t in extra_types) + "".join(
        f'{t} = "{h}"\n' for t, h in more_handlers.items())
    return (
        "# written by cortex.loadtest\n"
        f'[suite]\nfsync = "{fsync}"\n'
        # The priority scenario floods one type with ~2,000 tasks: above the default 500.
        "[scheduler]\nmax_queue_per_type = 100000\n"
        f"[pool.groups.default]\ncount = {workers}\n"
        f"types = [{', '.join(repr(t).replace(chr(39), chr(34)) for t in types)}]\n"
        + (f"[handlers]\n{handlers}" if handlers else "")
        + (f'[events]\npostgres_url = "{postgres_url}"\n' if postgres_url else "")
        + sections + bus)
