"""The `cortex` command: set up a home, run the suite, and look inside it.

    cortex [--home DIR] COMMAND [ARGS]          (`cortex COMMAND --help` for each)

Each command is a function registered with `@command` in the module of its group
(lifecycle, status, logs, tasks, events, fleet, model, demo, dashboard), and its
docstring is its help. Commands talk to the suite only through the client library,
`cortex.services.control` (supervisord) and the event-log readers; all rendering lives
in this package, never in the services.

The home is `--home`, else $CORTEX_HOME, else `./.cortex`. Output is plain aligned text
with every value escaped for the terminal; `--json` (where output is data) prints JSON
instead: one document, or one object a line for event streams (`tail`, `events query`,
`task trace`). The exit codes are the same for every command (`registry.Exit`).
"""

from __future__ import annotations

import os
import sys

from cortex.protocol import errors, locate
from cortex.services.control import SuiteError
from cortex.services.runtime import settings as config
from cortex.services.runtime.eventlog import EventLogError
from cortex.services.runtime.process import private_umask

# Importing a command module registers its commands.
from . import (  # noqa: F401
    dashboard,
    demo,
    events,
    fleet,
    keys,
    lifecycle,
    logs,
    model,
    route,
    status,
    tasks,
    worker,
)
from .registry import EXIT_BY_CODE, CliError, Command, Exit, build_parser
from .render import emit, escape


def main(argv: list[str] | None = None) -> int:
    """Parse, run one command, and turn every expected failure into one line + exit code."""
    private_umask()  # anything a command writes under the home is the owner's alone
    parser = build_parser((__doc__ or "").split("\n\n")[0])
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else Exit.USAGE
    cmd: Command | None = getattr(args, "_command", None)
    if cmd is None:
        parser.print_help()
        return Exit.USAGE
    try:
        return int(cmd.func(args) or Exit.OK)
    except CliError as e:
        fail(str(e))
        return e.exit
    except errors.CortexError as e:
        hint = " (see `cortex status`)" if e.code in ("timeout", "unavailable") else ""
        fail(f"{e} [{e.code}]{hint}")
        return EXIT_BY_CODE.get(e.code, Exit.UNAVAILABLE)
    except SuiteError as e:
        fail(str(e))
        return Exit.NOT_RUNNING if "not running" in str(e) else Exit.UNAVAILABLE
    except (config.ConfigError, locate.HomeError) as e:
        fail(str(e))
        return Exit.CONFIG
    except EventLogError as e:
        fail(f"event log: {e}")
        return Exit.FAILED
    except KeyboardInterrupt:
        fail("interrupted")
        return Exit.INTERRUPTED
    except BrokenPipeError:
        # `cortex tail | head`: the reader left; be quiet about it.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return Exit.OK
    except OSError as e:
        fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        return Exit.FAILED


def fail(message: str) -> None:
    """The one line a failure gets, on stderr, made safe (it may quote what we were sent)."""
    emit(f"cortex: {escape(message)}", err=True)


if __name__ == "__main__":
    sys.exit(main())
