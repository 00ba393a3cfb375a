"""Views that redraw in place on a terminal: a full-screen frame (`status --watch`) and a
one-line progress indicator (`task wait`). Off a terminal they fall back to plain lines,
so logs and pipes get text without escape sequences."""

from __future__ import annotations

import shutil
import sys

from .render import escape, escape_block, write

ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"
CURSOR_OFF, CURSOR_ON = "\x1b[?25l", "\x1b[?25h"
HOME, CLEAR_LINE_END, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Screen:
    """A frame redrawn in place on the alternate screen (the terminal is restored on exit,
    as `top` does); off a terminal, each frame is printed after a blank line."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.live = is_terminal(self.stream)
        self.frames = 0

    def __enter__(self):
        if self.live:
            write(ALT_SCREEN_ON + CURSOR_OFF)
        return self

    def __exit__(self, *exc):
        if self.live:
            write(CURSOR_ON + ALT_SCREEN_OFF)

    def draw(self, frame: str) -> None:
        safe = escape_block(frame)
        self.frames += 1
        if not self.live:
            write(("\n" if self.frames > 1 else "") + safe + "\n")
            return
        size = shutil.get_terminal_size()
        lines = [line[: max(1, size.columns - 1)] for line in safe.splitlines()]
        lines = lines[: max(1, size.lines - 1)]
        write(HOME + "".join(line + CLEAR_LINE_END + "\n" for line in lines) + CLEAR_BELOW)


class ProgressLine:
    """One status line on stderr, rewritten in place while something runs; nothing at all
    when stderr is not a terminal."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = is_terminal(self.stream)
        self.shown = False

    def show(self, text: str) -> None:
        if not self.live:
            return
        width = shutil.get_terminal_size().columns - 1
        write("\r" + escape(text)[: max(1, width)] + CLEAR_LINE_END, err=True)
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            write("\r" + CLEAR_LINE_END, err=True)
            self.shown = False
