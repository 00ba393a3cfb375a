"""`cortex keys`: the CurveZMQ keys of a suite on tcp (make, list, add, revoke).

Keys live under `<home>/keys/` (the owner's alone; see `runtime/keys.py`). The suite's
processes re-read the allow-list when it changes: an added key is admitted at its next
handshake, a revoked one is cut off within a heartbeat interval.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cortex.protocol import locate
from cortex.services.runtime import keys as store
from cortex.services.runtime.process import prepare_home

from .reach import home_of
from .registry import JSON, CliError, Exit, arg, command
from .render import emit, emit_json, local_stamp, table

ROLE = arg("--role", action="append", metavar="ROLE", dest="roles",
           help="what the key may be: client (default), worker, service or service:NAME "
                "(repeat for several)")


def _fail(e: store.KeyStoreError) -> CliError:
    return CliError(Exit.USAGE if isinstance(e, store.BadKeyInput) else Exit.CONFLICT, str(e))


@command("keys make",
         arg("name", nargs="?", help="the peer's name (none: the suite's own key pair)"),
         ROLE,
         arg("--out", metavar="FILE", help="where to write the key file "
             "(default: <home>/keys/NAME.key)"),
         arg("--server", metavar="PUBLIC", help="the suite's public key, when making a key "
             "file on another machine (it is then not admitted here: run `cortex keys add` "
             "on the suite's machine with the public key printed)"))
def cmd_keys_make(args):
    """Make the suite's key pair, or a key file for a client, worker or host.

    `cortex keys make` makes the suite's pair (once). `cortex keys make NAME --role worker`
    writes a key file (0600) for a peer and admits its public key with those roles; copy
    the file to the peer's machine over a channel you trust. With --server, it makes the
    file on the peer's machine and prints the public half to admit on the suite's."""
    home = home_of(args)
    if args.name is None:
        if args.roles or args.out or args.server:
            raise CliError(Exit.USAGE, "the suite's own key pair takes no --role, --out or "
                           "--server: give a NAME to make a peer's key file")
        prepare_home(home)
        try:
            keys = store.make_suite_keys(home)
        except store.KeyStoreError as e:
            raise _fail(e) from None
        emit(f"made the suite's key pair: {locate.suite_key_path(home)}")
        emit(f"public key (give it to peers as their server key): {keys.public.decode()}")
        return Exit.OK
    roles = args.roles or ["client"]
    try:
        store.check_name(args.name)
        store.check_roles(roles)
        server = args.server or store.suite_keys(home).public.decode()
        out = Path(args.out).expanduser() if args.out else store.key_dir(home) / f"{args.name}.key"
        if not args.server:
            prepare_home(home)
        public = store.make_key_file(out, args.name, server, roles)
        if not args.server:
            store.add_key(home, args.name, public, roles)
    except store.KeyStoreError as e:
        raise _fail(e) from None
    emit(f"wrote {out} (0600): copy it to the peer's machine over a channel you trust")
    emit(f"public key: {public}")
    if args.server:
        emit(f"admit it on the suite's machine: cortex keys add {args.name} {public} "
             + " ".join(f"--role {r}" for r in roles))
    else:
        emit(f"admitted {args.name!r} as {', '.join(roles)}")
    return Exit.OK


@command("keys add", arg("name", help="a name for the key"),
         arg("public", help="the peer's public key (40 Z85 characters)"), ROLE)
def cmd_keys_add(args):
    """Admit a public key made elsewhere (`cortex keys make NAME --server ...` there)."""
    home = home_of(args)
    roles = args.roles or ["client"]
    try:
        store.suite_keys(home)  # admitting keys means nothing before the suite has its own
        prepare_home(home)
        store.add_key(home, args.name, args.public, roles)
    except store.KeyStoreError as e:
        raise _fail(e) from None
    emit(f"admitted {args.name!r} as {', '.join(roles)}")
    return Exit.OK


@command("keys revoke", arg("name", help="the key's name (see `cortex keys list`)"))
def cmd_keys_revoke(args):
    """Revoke a key: its peer is cut off within a heartbeat interval, and refused after."""
    try:
        store.revoke_key(home_of(args), args.name)
    except store.KeyStoreError as e:
        raise CliError(Exit.NOT_FOUND if "no key named" in str(e) else Exit.CONFIG,
                       str(e)) from None
    emit(f"revoked {args.name!r}")
    return Exit.OK


@command("keys list", JSON)
def cmd_keys_list(args: argparse.Namespace):
    """The suite's public key and every admitted (or revoked) key with its roles."""
    home = home_of(args)
    try:
        suite = store.suite_keys(home).public.decode()
    except store.KeyStoreError:
        suite = None
    try:
        entries = store.read_allowed(home)
    except store.KeyStoreError as e:
        raise CliError(Exit.CONFIG, str(e)) from None
    if args.json:
        emit_json({"suite": suite, "keys": entries})
        return Exit.OK
    emit(f"suite public key: {suite or '(none: run `cortex keys make`)'}")
    rows = [[name, ",".join(e.get("roles", [])), e.get("public"),
             local_stamp(e["added"]) if e.get("added") else None,
             local_stamp(e["revoked"]) if e.get("revoked") else None]
            for name, e in sorted(entries.items())]
    if rows:
        emit(table(["NAME", "ROLES", "PUBLIC KEY", "ADDED", "REVOKED"], rows))
    else:
        emit("no peer keys admitted (cortex keys make NAME --role ...)")
    return Exit.OK
