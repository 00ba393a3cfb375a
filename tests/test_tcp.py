"""A suite on tcp with CurveZMQ: peers on another host (a network namespace joined by a
veth pair, or 127.0.0.1 where namespaces cannot be made) join with listed keys; the
rest deliver nothing, and the suite keeps serving.

Every peer runs as its own process with a home of its own (its `cortex.toml` names the
suite's endpoints and its key file), as it would on another machine. The namespace
variant is heavy (it needs root and `ip`); the loopback one runs in the default tier.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cortex.protocol import Client
from cortex.services.control import Suite
from cortex.services.runtime import keys as store
from tests.conftest import SuiteRunner, short_home, wait_for

CORTEX = [sys.executable, "-m", "cortex.services.cli"]
HEARTBEAT = 0.5

# A peer on the other host: one JSON argument says what to do; one JSON line a result.
PEER = r"""
import json, os, sys, time
import zmq
from cortex.protocol import Client, Worker, errors, locate, wire
from cortex.protocol.peer import BusLink, keys_for

job = json.loads(sys.argv[1])
home = job["home"]

def say(**kw):
    print(json.dumps(kw), flush=True)

if job["mode"] == "client":
    try:
        with Client(home, connect_timeout=job.get("connect_timeout", 8)) as c:
            done = c.submit_and_wait("echo", "over tcp", payload={"text": job["text"]},
                                     timeout=60)
        say(ok=True, state=done["state"], result=done["result"])
    except errors.CortexError as e:
        say(ok=False, code=e.code, message=str(e))
elif job["mode"] == "worker":
    def handler(ctx):
        return {"echo": ctx.payload.get("text"), "by": os.getpid()}
    say(pid=os.getpid())
    Worker(job["type"], handler, home=home, name=job["name"]).run()
elif job["mode"] == "hello":
    # Say HELLO as the role asked for; then try to reach the scheduler anyway.
    ctx = zmq.Context.instance()
    endpoint = locate.endpoints(locate.find_home(home))["bus"]
    link = BusLink(ctx, endpoint, job["name"], job["role"], keys=keys_for(
        locate.find_home(home), endpoint), secret=job.get("secret"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not link.welcomed and link.refused is None:
        if link.socket.poll(200):
            link.receive()
        link.tick()
    link.send(wire.REQUEST, b"scheduler", b"c1", {"op": "scheduler.status"})
    answer, deadline = None, time.monotonic() + 10
    while answer is None and time.monotonic() < deadline:
        if link.socket.poll(200):
            msg = link.receive()  # WHO and the refused re-HELLO are taken by the link
            if msg is not None and msg.corr == b"c1":
                answer = msg.decoded()
    say(welcomed=link.welcomed, refused=link.refused, answer=answer)
    link.close()
elif job["mode"] == "linger":
    # A client that stays connected, and subscribed to live events: a call, then (after
    # a revocation) another, and what became of the subscription.
    from cortex.protocol.peer import HandshakeWatch, make_socket, use_keys
    with Client(home, connect_timeout=8, timeout=8) as c:
        c.call("broker", "broker.status")
        live = locate.endpoints(locate.find_home(home))["events_live"]
        keys = keys_for(locate.find_home(home), live)
        sub = make_socket(zmq.Context.instance(), zmq.SUB)
        use_keys(sub, keys)
        watch = HandshakeWatch(sub, live, keys)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(live)
        deadline = time.monotonic() + 30
        while not watch.succeeded and time.monotonic() < deadline:
            watch.read()
            time.sleep(0.05)
        say(ok=True, name=c.name, subscribed=watch.succeeded)
        sys.stdin.readline()
        try:
            c.call("broker", "broker.status")
            say(ok=True)
        except errors.CortexError as e:
            deadline = time.monotonic() + 30
            while "not admitted" not in (watch.read() or "") and time.monotonic() < deadline:
                time.sleep(0.05)
            say(ok=False, code=e.code, message=str(e), live=watch.read())
        watch.close()
        sub.close(linger=0)
"""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Link:
    """Where the suite listens and how to run a process on the other host."""

    def __init__(self, host: str, prefix: list[str]):
        self.host = host
        self.prefix = prefix

    def peer(self, job: dict, **popen) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
        return subprocess.Popen([*self.prefix, sys.executable, "-c", PEER, json.dumps(job)],
                                env=env, stdout=subprocess.PIPE, text=True, **popen)

    def run(self, job: dict, timeout: float = 120) -> dict:
        proc = self.peer(job)
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return json.loads(out.strip().splitlines()[-1])


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _netns_link():
    """Yields a Link to a fresh namespace joined to this one by a veth pair, or skips."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root: the loopback variant covers this host")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2): the loopback variant covers this host")
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"cx{tag}", f"cx{tag}a", f"cx{tag}b"
    net = f"10.{random.randrange(200, 250)}.{random.randrange(0, 255)}"
    try:
        _ip("netns", "add", ns)
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot make a network namespace here: {e}")
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"{net}.1/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{net}.2/30", "dev", there)
        _ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield Link(f"{net}.1", ["ip", "netns", "exec", ns])
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture(scope="module", params=["loopback", pytest.param("netns",
                                                                 marks=pytest.mark.heavy)])
def link(request):
    if request.param == "loopback":
        yield Link("127.0.0.1", [])
    else:
        yield from _netns_link()


def tcp_config(host: str, workers: int = 2, extra: str = "") -> str:
    ports = [free_port(host) for _ in range(3)]
    return (f'[suite]\nfsync = "off"\nheartbeat_interval = {HEARTBEAT}\n'
            f'[bus]\nbus = "tcp://{host}:{ports[0]}"\nevents_in = "tcp://{host}:{ports[1]}"\n'
            f'events_live = "tcp://{host}:{ports[2]}"\n{extra}'
            f'[pool.groups.default]\ncount = {workers}\n'
            '[dashboard]\nenabled = false\n')


class TcpSuite:
    def __init__(self, link: Link, suite: Suite, config: str):
        self.link = link
        self.suite = suite
        self.home = suite.home
        self.bus_section = config.split("[bus]\n")[1].split("[pool")[0]
        self.server = store.suite_keys(self.home).public.decode()
        self.homes: list[Path] = []

    def peer_home(self, key_file: Path | None) -> str:
        """A home for a peer on the other host: the suite's endpoints and a key file."""
        home = short_home("cxp")
        self.homes.append(home)
        extra = f'key_file = "{key_file}"\n' if key_file else ""
        (home / "cortex.toml").write_text(f"[bus]\n{self.bus_section}{extra}")
        return str(home)

    def key(self, name: str, roles=("client",), admit: bool = True,
            server: str | None = None) -> Path:
        path = short_home("cxk") / f"{name}.key"
        self.homes.append(path.parent)
        public = store.make_key_file(path, name, server or self.server, roles)
        if admit:
            store.add_key(self.home, name, public, roles)
        return path

    def status(self) -> dict:
        with Client(self.home, timeout=10) as c:
            return c.call("broker", "broker.status")


@pytest.fixture(scope="module")
def tcp_suite(link):
    runner = SuiteRunner()
    home = short_home()
    config = tcp_config(link.host)
    (home / "cortex.toml").write_text(config)
    store.make_suite_keys(home)
    suite = Suite(home)
    runner.suites.append((suite, set()))
    made = None
    try:
        suite.start(attached=True, timeout=120)
        runner.seen(suite)
        made = TcpSuite(link, suite, config)
        yield made
    finally:
        for peer_home in made.homes if made else []:
            shutil.rmtree(peer_home, ignore_errors=True)
        problems = runner.stop_all()
        assert not problems, "; ".join(problems)


def test_a_listed_client_completes_tasks_across_the_link(tcp_suite):
    home = tcp_suite.peer_home(tcp_suite.key("alice"))
    out = tcp_suite.link.run({"mode": "client", "home": home, "text": "from afar"})
    assert out == {"ok": True, "state": "completed", "result": {"text": "from afar"}}, out
    peers = {p["name"]: p for p in tcp_suite.status()["peers"]}
    assert all(p.get("key") == "suite" for n, p in peers.items() if n in ("scheduler", "pool"))


def test_a_listed_external_worker_completes_tasks_across_the_link(tcp_suite):
    home = tcp_suite.peer_home(tcp_suite.key("far-worker", roles=("worker",)))
    worker = tcp_suite.link.peer({"mode": "worker", "home": home, "type": "tcp_echo",
                                  "name": "far-worker-1"})
    try:
        pid = json.loads(worker.stdout.readline())["pid"]
        wait_for(lambda: any(p["name"] == "far-worker-1" and p.get("key") == "far-worker"
                             for p in tcp_suite.status()["peers"]), 60, "the worker's HELLO")
        with Client(tcp_suite.home, timeout=60) as c:
            done = [c.submit_and_wait("tcp_echo", payload={"text": f"t{i}"}, timeout=60)
                    for i in range(3)]
        assert [d["state"] for d in done] == ["completed"] * 3, done
        assert [d["result"] for d in done] == [{"echo": f"t{i}", "by": pid} for i in range(3)]
    finally:
        worker.terminate()
        worker.wait(timeout=30)


@pytest.mark.parametrize("case", ["plaintext", "unknown key", "wrong server key"])
def test_peers_without_an_admitted_key_deliver_nothing(tcp_suite, case):
    failed_before = tcp_suite.status()["connections"]["handshake_failed"]
    if case == "plaintext":
        home, cause = tcp_suite.peer_home(None), "requires CurveZMQ keys"
    elif case == "unknown key":
        home, cause = tcp_suite.peer_home(tcp_suite.key("stranger", admit=False)), \
            "not admitted"
    else:
        other = store.new_pair()[0]
        home, cause = tcp_suite.peer_home(tcp_suite.key("misled", server=other)), \
            "server key mismatch"
    out = tcp_suite.link.run({"mode": "client", "home": home, "text": "no",
                              "connect_timeout": 3})
    assert out["ok"] is False and out["code"] == "unavailable", out
    assert cause in out["message"], out
    # The broker's monitor saw the handshakes fail; the suite keeps serving.
    wait_for(lambda: tcp_suite.status()["connections"]["handshake_failed"] > failed_before,
             30, "the broker's monitor to count the failed handshake")
    with Client(tcp_suite.home, timeout=60) as c:
        assert c.submit_and_wait("echo", payload={"text": "still"}, timeout=60)["state"] \
            == "completed"


@pytest.mark.parametrize("role, name", [("worker", "client-as-worker"),
                                        ("service", "scheduler")])
def test_a_client_key_never_takes_another_role(tcp_suite, role, name):
    home = tcp_suite.peer_home(tcp_suite.key(f"only-client-{role}"))
    out = tcp_suite.link.run({"mode": "hello", "home": home, "role": role, "name": name})
    assert out["welcomed"] is False and f"may not take the {role} role" in out["refused"], out
    # Nothing it sends is routed: the broker answers that it must say HELLO first.
    assert out["answer"] is not None and out["answer"].get("code") == "unavailable", out
    names = [p["name"] for p in tcp_suite.status()["peers"]]
    assert name not in names or role == "service"  # the real scheduler keeps its name
    assert names.count("scheduler") == 1


@pytest.mark.heavy  # slow: real processes started, killed and restarted
def test_a_revoked_key_is_cut_off(tcp_suite):
    home = tcp_suite.peer_home(tcp_suite.key("carol"))
    peer = tcp_suite.link.peer({"mode": "linger", "home": home}, stdin=subprocess.PIPE)
    try:
        first = json.loads(peer.stdout.readline())
        assert first["ok"] is True and first["subscribed"] is True, first
        wait_for(lambda: any(p["name"] == first["name"] for p in tcp_suite.status()["peers"]),
                 30, "carol among the broker's peers")
        revoked_before = tcp_suite.status()["stats"]["revoked"]
        done = subprocess.run([*CORTEX, "--home", str(tcp_suite.home), "keys", "revoke",
                               "carol"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: tcp_suite.status()["stats"]["revoked"] > revoked_before, 30,
                 "the broker to cut carol off")
        assert first["name"] not in [p["name"] for p in tcp_suite.status()["peers"]]
        peer.stdin.write("again\n")
        peer.stdin.flush()
        second = json.loads(peer.stdout.readline())
        assert second["ok"] is False and "not admitted" in second["message"], second
        # Its live events subscription was cut too, and its reconnection refused.
        assert "not admitted" in (second["live"] or ""), second
    finally:
        peer.kill()
        peer.wait(timeout=30)


def test_status_shows_the_endpoints_encrypted(tcp_suite):
    done = subprocess.run([*CORTEX, "--home", str(tcp_suite.home), "status"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("endpoint")]
    assert len(lines) == 3, done.stdout + done.stderr
    assert all("tcp, encrypted (CurveZMQ" in line for line in lines), lines


# -- refusing plaintext ---------------------------------------------------------------------

def test_a_service_refuses_tcp_without_keys_in_one_line():
    home = short_home("cxr")
    try:
        (home / "cortex.toml").write_text(tcp_config("127.0.0.1"))
        for argv in ([sys.executable, "-m", "cortex.services.broker", "--home", str(home)],
                     [*CORTEX, "--home", str(home), "up"]):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            assert done.returncode == 8, (argv, done.stderr)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "without keys" in lines[0] \
                and "insecure_tcp = true" in lines[0], done.stderr
        assert not (home / "run" / "supervisord.pid").exists()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_insecure_tcp_starts_in_plaintext_and_says_so(suites):
    suite = suites.start(config=tcp_config("127.0.0.1", extra="insecure_tcp = true\n"))
    with Client(suite.home, timeout=60) as c:
        assert c.submit_and_wait("echo", payload={"text": "plain"}, timeout=60)["state"] \
            == "completed"
        assert c.call("broker", "broker.status")["security"]["insecure"] is True
    done = subprocess.run([*CORTEX, "--home", str(suite.home), "status"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.count("tcp, NOT ENCRYPTED (insecure_tcp") == 3, done.stdout
