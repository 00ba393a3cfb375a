"""Reaching the suite of a home: its path, its settings, a client, every service's status."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from cortex.protocol import errors, locate
from cortex.protocol.client import Client
from cortex.services.runtime import settings as config

from .registry import CliError, Exit

BUS_TIMEOUT = 10.0  # seconds a command waits for a service's answer
PING_TIMEOUT = 2.0  # seconds `status` gives each service before calling it not alive
STATUS_OPS = {"broker": "broker.status", "events": "events.status", "ledger": "ledger.status",
              "scheduler": "scheduler.status", "pool": "pool.status"}


def home_of(args: argparse.Namespace) -> Path:
    return locate.find_home(getattr(args, "home", None))


def not_running(home: Path) -> CliError:
    return CliError(Exit.NOT_RUNNING,
                    f"no suite is running in {home} (start it with `cortex up`)")


def connect(args: argparse.Namespace, timeout: float = BUS_TIMEOUT) -> Client:
    """A client for the suite in the home, refusing at once when there is plainly none
    (no bus socket) instead of waiting out a timeout."""
    home = home_of(args)
    endpoint = locate.endpoints(home)["bus"]
    if endpoint.startswith("ipc://") and not Path(endpoint[len("ipc://"):]).exists():
        raise not_running(home)
    return Client(home, timeout=timeout)


def ask_all(home: Path, timeout: float = PING_TIMEOUT) -> dict[str, dict | None]:
    """Every service's status body (None for one that did not answer), asked in parallel:
    a down service costs one timeout, not one each."""
    answers: dict[str, dict | None] = dict.fromkeys(STATUS_OPS)

    def ask(service: str, op: str) -> None:
        try:
            with Client(home, timeout=timeout) as client:
                answers[service] = client.call(service, op, timeout=timeout)
        except errors.CortexError:
            answers[service] = None

    threads = [threading.Thread(target=ask, args=item, daemon=True)
               for item in STATUS_OPS.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5.0)
    return answers


def load_settings(home: Path) -> config.Settings:
    locate.endpoints(home)  # fails early (HomeError) when the socket paths are too long
    return config.load(home)
