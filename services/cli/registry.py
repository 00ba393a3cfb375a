"""The command registry: named exit codes, `@command`, and the argparse tree built from it.

A command is one function registered with `@command("group name", arg(...), ...)`; its
docstring is its help (the first line is its summary in `cortex --help`). Usage errors
are one line, with a "did you mean ..." when a command or option is close to a known one.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from importlib import metadata

from .render import escape


class Exit(IntEnum):
    """What a `cortex` command's exit status means (the same for every command)."""

    OK = 0
    FAILED = 1  # a task failed / was cancelled / died; the demo's accounting did not match
    USAGE = 2  # bad arguments, an unknown command or option
    NOT_RUNNING = 3  # no suite running in the home
    TIMEOUT = 4  # the task did not end within --timeout
    NOT_FOUND = 5  # no such task (or log)
    REFUSED = 6  # the suite refused the request (admission, budget, a training not started)
    UNAVAILABLE = 7  # a service is not running or did not answer; the dashboard is not up
    CONFIG = 8  # bad configuration or home directory
    CONFLICT = 9  # the thing exists already / the task already ended
    INTERRUPTED = 130  # Ctrl-C (except where Ctrl-C is the normal way out: tail, --watch)


EXIT_HELP = "\n".join(f"  {e.value:>3}  {e.name.lower()}" for e in Exit)

# Error codes from the suite -> exit codes (anything else: UNAVAILABLE).
EXIT_BY_CODE = {
    "bad_request": Exit.USAGE, "too_large": Exit.USAGE, "unknown_type": Exit.USAGE,
    "bad_protocol": Exit.USAGE, "not_found": Exit.NOT_FOUND, "queue_full": Exit.REFUSED,
    "rejected": Exit.REFUSED, "budget_exceeded": Exit.REFUSED, "unauthorized": Exit.REFUSED,
    "timeout": Exit.UNAVAILABLE, "unavailable": Exit.UNAVAILABLE, "conflict": Exit.CONFLICT,
}


class CliError(Exception):
    """A failure the user is told about in one line, with its exit code."""

    def __init__(self, exit_code: Exit, message: str):
        super().__init__(message)
        self.exit = exit_code


@dataclass
class Command:
    path: tuple[str, ...]
    func: Callable[[argparse.Namespace], int | None]
    arguments: list[tuple[tuple, dict]] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return (self.func.__doc__ or "").strip().splitlines()[0]


COMMANDS: dict[tuple[str, ...], Command] = {}
GROUPS = {  # help of command groups that are not commands themselves
    ("task",): "Tasks: create, list, show, wait for, cancel, trace.",
    ("events",): "The event history: query it.",
    ("model",): "The prediction models: status, train.",
    ("keys",): "CurveZMQ keys for a suite on tcp: make, list, add, revoke.",
}


def arg(*flags, **options) -> tuple[tuple, dict]:
    return flags, options


def command(name: str, *arguments: tuple[tuple, dict]):
    """Register `func` as `cortex <name>`; its docstring is the help."""

    def register(func):
        path = tuple(name.split())
        COMMANDS[path] = Command(path, func, list(arguments))
        return func

    return register


JSON = arg("--json", action="store_true", help="print JSON instead of text")


def version() -> str:
    try:
        return metadata.version("cortex-agents")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


# -- the parser ------------------------------------------------------------------------


INVALID_CHOICE = re.compile(r"argument (?P<arg>[^:]+): invalid choice: '(?P<given>[^']*)'")
UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<given>.*)$")


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, with a suggestion when the word
    is close to a known command or option, and exits with Exit.USAGE."""

    def error(self, message: str):
        choice = INVALID_CHOICE.search(message)
        commands = next((a for a in self._actions
                         if isinstance(a, argparse._SubParsersAction)), None)
        if choice and commands is not None and choice["arg"] == commands.metavar:
            hint = self.suggestion(message) or f"; the commands: {', '.join(commands.choices)}"
            message = f"unknown command '{choice['given']}'{hint}"
        else:
            message += self.suggestion(message)
        self.exit(Exit.USAGE, f"{self.prog}: {escape(message)} (see {self.prog} --help)\n")

    def suggestion(self, message: str) -> str:
        choice = INVALID_CHOICE.search(message)
        if choice:
            for action in self._actions:
                names = {"/".join(action.option_strings), action.metavar, action.dest}
                if choice["arg"] in names and action.choices:
                    return did_you_mean(choice["given"], [str(c) for c in action.choices])
            return ""
        unknown = UNRECOGNIZED.search(message)
        if unknown:
            # argparse reports leftovers from the top parser: look through every command's
            # options for the one meant.
            given = unknown["given"].split()[0].split("=")[0]
            return did_you_mean(given, sorted(_option_strings(self)))
        return ""


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def did_you_mean(given: str, known: list[str]) -> str:
    close = difflib.get_close_matches(given, known, n=2, cutoff=0.7)
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


def _home_option(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--home", metavar="DIR", default=default,
                        help="the suite's home (default: $CORTEX_HOME, else ./.cortex)")


def build_parser(description: str) -> Parser:
    top = Parser(prog="cortex", description=description,
                 formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="exit codes (every command):\n" + EXIT_HELP)
    top.add_argument("--version", action="version", version=f"cortex {version()}")
    _home_option(top, None)
    subparsers: dict[tuple[str, ...], argparse._SubParsersAction] = {}
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): top}

    def parser_for(path: tuple[str, ...]) -> argparse.ArgumentParser:
        if path in parsers:
            return parsers[path]
        parent = parser_for(path[:-1])
        if path[:-1] not in subparsers:
            subparsers[path[:-1]] = parent.add_subparsers(
                title="commands", metavar="COMMAND", dest="_".join(("cmd", *path[:-1])),
                parser_class=Parser, required=path[:-1] == () or path[:-1] not in COMMANDS)
        cmd = COMMANDS.get(path)
        doc = inspect.cleandoc(cmd.func.__doc__ or "") if cmd else GROUPS.get(path, " ".join(path))
        parser = subparsers[path[:-1]].add_parser(
            path[-1], help=doc.splitlines()[0], description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        # Leaves take --home too (after the command); SUPPRESS keeps the top one's value.
        _home_option(parser, argparse.SUPPRESS)
        parsers[path] = parser
        return parser

    for path in sorted(COMMANDS):
        parser = parser_for(path)
        cmd = COMMANDS[path]
        for flags, options in cmd.arguments:
            parser.add_argument(*flags, **options)
        parser.set_defaults(_command=cmd)
    return top
