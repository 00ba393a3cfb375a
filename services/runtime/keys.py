"""The suite's CurveZMQ keys: its own key pair, key files for peers, and the allow-list.

Under `<home>/keys/` (0700), every file the owner's alone (0600):

    suite.key      the suite's key pair: its tcp sockets serve with it, and its own
                   processes (and the owner's CLI on its machine) connect with it
    allowed.json   the admitted public keys: {"keys": {NAME: {"public", "roles",
                   "added", "revoked"}}}; a revoked key stays listed (when, by whom
                   is in the event log) and is refused
    <name>.key     key files made here for peers (copy one to the peer's machine)

A key file is TOML: name, public, secret, and server (the suite's public key). A key's
roles say what its peer may say it is at HELLO: "client", "worker", "service" (a
remote process of the suite, which still proves itself with the suite's secret), or
"service:NAME" (that service name only). The broker refuses any other role.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from cortex.protocol import locate
from cortex.protocol.peer import CurveKeys, KeyFileError, read_key_file
from cortex.services.runtime.durable import write_atomic

KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ROLES = ("client", "worker", "service")
SUITE = "suite"  # the name the suite's own key pair is admitted under (every role)
ALL_ROLES = frozenset(ROLES)


class KeyStoreError(Exception):
    """A key operation that cannot be done (the CLI prints it and exits non-zero)."""


class BadKeyInput(KeyStoreError):
    """A name, role or public key that is not one."""


def key_dir(home: Path) -> Path:
    return home / "keys"


def allowed_path(home: Path) -> Path:
    return key_dir(home) / "allowed.json"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name) or name == SUITE:
        raise BadKeyInput(f"a key name is 1-64 letters, digits, '_', '.' or '-' (not "
                        f"{SUITE!r}), got {name!r}")
    return name


def check_roles(roles) -> tuple[str, ...]:
    roles = tuple(dict.fromkeys(roles))
    if not roles:
        raise BadKeyInput("a key needs at least one role: client, worker, service or "
                        "service:NAME")
    for role in roles:
        base, _, service = role.partition(":")
        if base not in ROLES or (":" in role and (base != "service" or not service)):
            raise BadKeyInput(f"unknown role {role!r}: client, worker, service or "
                            "service:NAME")
    return roles


def check_public(public: str) -> str:
    public = public.strip()
    try:
        ok = len(public) == 40 and len(z85.decode(public)) == 32
    except (ValueError, KeyError):
        ok = False
    if not ok:
        raise BadKeyInput(f"not a CurveZMQ public key (40 Z85 characters): {public[:60]!r}")
    return public


def key_file_text(name: str, public: str, secret: str, server: str, roles=()) -> str:
    what = f" ({', '.join(roles)})" if roles else ""
    return (f"# Cortex CurveZMQ key file for {name!r}{what}. Secret: keep it 0600 and\n"
            "# copy it only over a channel you trust. Clients, the Worker helper and the\n"
            "# cortex CLI take it as key_file=, $CORTEX_KEY_FILE or [bus] key_file.\n"
            f'name = "{name}"\npublic = "{public}"\nsecret = "{secret}"\n'
            f'server = "{server}"   # the suite\'s public key\n')


def write_private(path: Path, text: str, replace: bool = False) -> None:
    """A new file, 0600 from its first byte (never readable by others, even briefly)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if replace:
        write_atomic(path, text.encode())
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyStoreError(f"{path} exists already: not replaced") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def new_pair() -> tuple[str, str]:
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def make_suite_keys(home: Path) -> CurveKeys:
    """The suite's key pair (made once; replacing it would orphan every key file)."""
    path = locate.suite_key_path(home)
    if path.exists():
        raise KeyStoreError(f"the suite's key pair exists already ({path})")
    public, secret = new_pair()
    write_private(path, key_file_text(SUITE, public, secret, public))
    return read_key_file(path)


def suite_keys(home: Path) -> CurveKeys:
    path = locate.suite_key_path(home)
    if not path.exists():
        raise KeyStoreError(f"the suite has no key pair: run `cortex keys make` ({path})")
    try:
        return read_key_file(path)
    except KeyFileError as e:
        raise KeyStoreError(str(e)) from None


def make_key_file(path: Path, name: str, server: str, roles=()) -> str:
    """A new key pair in a key file for a peer; returns its public half."""
    check_name(name)
    public, secret = new_pair()
    write_private(path, key_file_text(name, public, secret, check_public(server), roles))
    return public


# -- the allow-list -------------------------------------------------------------------------
def read_allowed(home: Path) -> dict[str, dict]:
    path = allowed_path(home)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise KeyStoreError(f"cannot read the allow-list {path}: {e}") from None
    keys = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(keys, dict):
        raise KeyStoreError(f"{path}: no \"keys\" table")
    return keys


def _write_allowed(home: Path, keys: dict[str, dict]) -> None:
    key_dir(home).mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(allowed_path(home),
                 json.dumps({"keys": keys}, indent=2, sort_keys=True).encode() + b"\n")


def add_key(home: Path, name: str, public: str, roles) -> dict:
    """Admit `public` under `name` with `roles` (re-adding a revoked name admits it anew)."""
    check_name(name)
    entry = {"public": check_public(public), "roles": list(check_roles(roles)),
             "added": time.time(), "revoked": None}
    keys = read_allowed(home)
    for other, spec in keys.items():
        if other != name and spec.get("public") == entry["public"] and not spec.get("revoked"):
            raise KeyStoreError(f"this public key is admitted already as {other!r}")
    if name in keys and not keys[name].get("revoked"):
        raise KeyStoreError(f"a key named {name!r} is admitted already (revoke it first)")
    keys[name] = entry
    _write_allowed(home, keys)
    return entry


def revoke_key(home: Path, name: str) -> dict:
    keys = read_allowed(home)
    entry = keys.get(name)
    if entry is None:
        raise KeyStoreError(f"no key named {name!r} (see `cortex keys list`)")
    if not entry.get("revoked"):
        entry["revoked"] = time.time()
        _write_allowed(home, keys)
    return entry


@dataclass(frozen=True)
class Admitted:
    name: str
    roles: frozenset[str]


class KeyStore:
    """What a listening process admits: the suite's key (every role) and the allow-list's
    live keys, re-read when the file changes. Read by the ZAP thread, refreshed by the
    process's own loop; the table is replaced whole, so a reader never sees half."""

    def __init__(self, home: Path):
        self.home = home
        self.keys = suite_keys(home)
        self._stamp: tuple | None = None
        self._lock = threading.Lock()
        self._revoked: set[str] = set()  # names no longer admitted, not yet taken
        self.by_public: dict[bytes, Admitted] = {}
        self.problem: str | None = None  # why the allow-list could not be read last
        self.refresh()

    def _file_stamp(self) -> tuple | None:
        try:
            info = allowed_path(self.home).stat()
        except FileNotFoundError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def refresh(self) -> None:
        """Re-read the allow-list if it changed (a stat when it did not)."""
        with self._lock:
            self._refresh()

    def take_revoked(self) -> set[str]:
        """The names no longer admitted since last asked (the allow-list re-read first)."""
        with self._lock:
            self._refresh()
            taken, self._revoked = self._revoked, set()
            return taken

    def _refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp and self.by_public:
            return
        try:
            entries = read_allowed(self.home)
        except KeyStoreError as e:
            self.problem = str(e)  # keep what was admitted: a torn edit is not a revocation
            return
        self._stamp, self.problem = stamp, None
        table = {z85.decode(self.keys.public): Admitted(SUITE, ALL_ROLES)}
        for name, spec in entries.items():
            if not isinstance(spec, dict) or spec.get("revoked"):
                continue
            try:
                public = z85.decode(check_public(str(spec.get("public", ""))))
                roles = frozenset(check_roles(spec.get("roles") or ()))
            except KeyStoreError:
                continue
            table[public] = Admitted(name, roles)
        before = {a.name for a in self.by_public.values()}
        self.by_public = table
        self._revoked |= before - {a.name for a in table.values()}

    def admit(self, public: bytes) -> Admitted | None:
        """The admitted key with this (raw, 32-byte) public key, or None: the allow-list
        as it is now, so a key revoked a moment ago is refused at once."""
        self.refresh()
        return self.by_public.get(public)

    def roles_of(self, name: str) -> frozenset[str]:
        for admitted in self.by_public.values():
            if admitted.name == name:
                return admitted.roles
        return frozenset()


def may_take(roles: frozenset[str], role: str, name: str) -> bool:
    """May a key with `roles` say HELLO as `role` under `name`?"""
    if role == "service":
        return "service" in roles or f"service:{name}" in roles
    return role in roles
