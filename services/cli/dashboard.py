"""`cortex dashboard`: where the web dashboard is (and `--open` it in a browser).

The dashboard writes its full URL, token included, to <home>/run/dashboard.url (owner
only) while it runs; this command reads that file and nothing else.
"""

from __future__ import annotations

import socket
import webbrowser
from urllib.parse import urlsplit

from .reach import home_of
from .registry import CliError, Exit, arg, command
from .render import emit

CONNECT_TIMEOUT = 2.0


def answers(url: str) -> bool:
    """Does something accept connections where the URL points (a stale file after a
    crash points nowhere)?"""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port),
                                      timeout=CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


@command("dashboard",
         arg("--open", action="store_true", help="open it in the default web browser"))
def cmd_dashboard(args):
    """Print the web dashboard's URL (with its access token: keep it to yourself).

    Exit 7 when the dashboard is not running: switched off in cortex.toml, or the suite
    is down (`cortex status` tells which). --open also opens it in a browser ($BROWSER
    chooses which).
    """
    home = home_of(args)
    path = home / "run" / "dashboard.url"
    not_up = (f"the dashboard is not running in {home}: it is switched off in cortex.toml, "
              "or the suite is down (see `cortex status`)")
    try:
        url = path.read_text().strip()
    except FileNotFoundError:
        raise CliError(Exit.UNAVAILABLE, not_up) from None
    if not url.startswith(("http://", "https://")) or any(c.isspace() for c in url):
        raise CliError(Exit.UNAVAILABLE, f"{path} does not hold a URL")
    if not answers(url):
        raise CliError(Exit.UNAVAILABLE, f"{not_up} ({path} is left from an earlier run)")
    emit(url)
    if args.open and not webbrowser.open(url):
        raise CliError(Exit.UNAVAILABLE, "no web browser to open it with (set $BROWSER); "
                                         "the URL is above")
    return Exit.OK
