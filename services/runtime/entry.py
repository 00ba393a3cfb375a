"""The one entry point of every service process (`python -m cortex.services.NAME`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from cortex.services.runtime.settings import ConfigError


class Service(Protocol):
    def run(self) -> None: ...


def serve(prog: str, description: str | None, service: Callable[[str | None], Service],
          argv: Sequence[str] | None = None) -> None:
    """Read `--home` from the command line, build the service for it and run it until it
    is told to stop."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="suite home (default: $CORTEX_HOME or ./.cortex)")
    home = parser.parse_args(argv).home
    try:
        service(home).run()
    except ConfigError as e:
        # Restarting cannot fix a configuration: say what is wrong, exit with its code.
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(ConfigError.exit_code) from None
    exit_now(0)


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown. A service has closed its journal, files
    and sockets when `run()` returns; what is left is a garbage collection of every
    module it imported (over a second for the scheduler's scikit-learn), which would
    hold up each step of supervisord's one-at-a-time stop of the suite."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
