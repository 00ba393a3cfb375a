"""The key store, key files and the ZAP answers, without a suite."""

from __future__ import annotations

import os
import stat

import pytest
import zmq
from zmq.utils import z85

from cortex.protocol.peer import KeyFileError, keys_for, read_key_file
from cortex.services.runtime import keys as store
from cortex.services.runtime.curve import ZapHandler
from cortex.services.runtime.settings import ConfigError, load

TCP = '[bus]\nbus = "tcp://127.0.0.1:5555"\n'


def test_tcp_without_keys_is_refused_unless_insecure_tcp_says_so(tmp_path):
    (tmp_path / "cortex.toml").write_text(TCP)
    with pytest.raises(ConfigError, match="without keys.*cortex keys make.*insecure_tcp = true"):
        load(tmp_path)
    (tmp_path / "cortex.toml").write_text(TCP + "insecure_tcp = true\n")
    assert load(tmp_path).bus.insecure_tcp is True
    (tmp_path / "cortex.toml").write_text(TCP + 'insecure_tcp = "yes"\n')
    with pytest.raises(ConfigError, match="insecure_tcp: expected true or false"):
        load(tmp_path)
    (tmp_path / "cortex.toml").write_text(TCP)
    store.make_suite_keys(tmp_path)
    assert load(tmp_path).bus.insecure_tcp is False


def test_key_files_are_the_owners_alone_and_refused_otherwise(tmp_path):
    suite = store.make_suite_keys(tmp_path)
    path = tmp_path / "keys" / "alice.key"
    public = store.make_key_file(path, "alice", suite.public.decode(), ["worker"])
    for made in (path, tmp_path / "keys" / "suite.key"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o600
    keys = read_key_file(path)
    assert keys.public.decode() == public and keys.server == suite.public
    assert keys.name == "alice"
    with pytest.raises(store.KeyStoreError, match="exists already"):
        store.make_key_file(path, "alice", suite.public.decode())
    with pytest.raises(store.KeyStoreError, match="exists already"):
        store.make_suite_keys(tmp_path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        read_key_file(path)
    # ipc needs no keys; tcp takes the file named, or the suite's own on its machine.
    assert keys_for(tmp_path, "ipc:///x") is None
    assert keys_for(tmp_path, "tcp://h:1").public == suite.public


@pytest.mark.parametrize("name, roles, public, error", [
    ("suite", ["client"], None, "not 'suite'"),
    ("a b", ["client"], None, "a key name"),
    ("ok", [], None, "at least one role"),
    ("ok", ["admin"], None, "unknown role"),
    ("ok", ["worker:x"], None, "unknown role"),
    ("ok", ["client"], "short", "not a CurveZMQ public key"),
])
def test_bad_names_roles_and_keys_are_refused(tmp_path, name, roles, public, error):
    store.make_suite_keys(tmp_path)
    with pytest.raises(store.BadKeyInput, match=error):
        store.add_key(tmp_path, name, public or store.new_pair()[0], roles)


def test_the_store_follows_the_allow_list_and_reports_revocations(tmp_path):
    suite = store.make_suite_keys(tmp_path)
    alice, bob = store.new_pair()[0], store.new_pair()[0]
    store.add_key(tmp_path, "alice", alice, ["client"])
    keys = store.KeyStore(tmp_path)
    assert keys.admit(z85.decode(suite.public)).roles == store.ALL_ROLES
    assert keys.admit(z85.decode(alice)) == store.Admitted("alice", frozenset({"client"}))
    assert keys.admit(z85.decode(bob)) is None
    store.add_key(tmp_path, "bob", bob, ["worker", "service:pool"])
    assert keys.admit(z85.decode(bob)).name == "bob"  # added: admitted at its handshake
    assert keys.take_revoked() == set()
    store.revoke_key(tmp_path, "alice")
    assert keys.take_revoked() == {"alice"}
    assert keys.take_revoked() == set()
    assert keys.admit(z85.decode(alice)) is None
    with pytest.raises(store.KeyStoreError, match="admitted already"):
        store.add_key(tmp_path, "bob", store.new_pair()[0], ["client"])
    # A torn allow-list is not a revocation: what was admitted stays admitted.
    store.allowed_path(tmp_path).write_text("{not json")
    assert keys.take_revoked() == set() and keys.problem
    assert keys.admit(z85.decode(bob)).name == "bob"


@pytest.mark.parametrize("roles, role, name, allowed", [
    ({"client"}, "client", "c", True),
    ({"client"}, "worker", "w", False),
    ({"client"}, "service", "scheduler", False),
    ({"worker"}, "worker", "w", True),
    ({"service:pool"}, "service", "pool", True),
    ({"service:pool"}, "service", "scheduler", False),
    ({"service"}, "service", "scheduler", True),
])
def test_a_key_takes_only_its_roles(roles, role, name, allowed):
    assert store.may_take(frozenset(roles), role, name) is allowed


def test_the_zap_handler_admits_listed_keys_only(tmp_path):
    store.make_suite_keys(tmp_path)
    alice = store.new_pair()[0]
    store.add_key(tmp_path, "alice", alice, ["client"])
    ctx = zmq.Context()
    zap = ZapHandler(ctx, store.KeyStore(tmp_path))
    try:
        def ask(mechanism, *credentials, domain=b"cortex"):
            return zap.answer([b"1.0", b"7", domain, b"10.0.0.2", b"", mechanism,
                               *credentials])[2:5]
        assert ask(b"CURVE", z85.decode(alice)) == [b"200", b"OK", b"alice"]
        assert ask(b"CURVE", z85.decode(store.new_pair()[0]))[0] == b"400"
        assert ask(b"NULL")[0] == b"400"
        assert ask(b"CURVE", z85.decode(alice), domain=b"other")[0] == b"400"
        assert zap.status() == {"admitted": 1, "refused": {"mechanism": 2, "unknown_key": 1}}
    finally:
        zap.stop()
        ctx.term()
