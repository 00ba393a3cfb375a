"""What one message hop costs between two processes, by transport: the one the
scheduler's direct line uses (a ZeroMQ DEALER to a ROUTER on ipc) against a plain Unix
socket (SOCK_SEQPACKET: one datagram per message, no library thread in between).

    python -m cortex.loadtest.transport --count 20000 --runs 3

A client process sends a six-frame message (the protocol's envelope, `--size` bytes of
body) and waits for it to come back, `--count` times; the server process waits for it
(with epoll for the Unix socket, as a server of many peers would) and sends it back.
Reported per round trip, medians of `--runs`: the wall time, and the CPU time of each
process (all its threads, libzmq's I/O thread included: getrusage). Neither side does
anything else, so this is the floor each transport puts under a task's messages: a task
is five or six such messages on the direct line (`python -m cortex.loadtest.count`).
Measures, never asserts: run it on a quiet machine and compare the two rows.
"""

from __future__ import annotations

import argparse
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 200  # round trips before the clocks start
HEADER = struct.Struct("<I")  # a frame's length, before it, in a Unix socket datagram


def envelope(size: int) -> list[bytes]:
    return [b"CX2", b"\x01", b"scheduler", b"", b"corr-000001", b"x" * size]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pack(frames: list[bytes]) -> bytes:
    return b"".join(HEADER.pack(len(f)) + f for f in frames)


def unpack(datagram: bytes) -> list[bytes]:
    frames, at = [], 0
    while at < len(datagram):
        (n,) = HEADER.unpack_from(datagram, at)
        frames.append(datagram[at + 4:at + 4 + n])
        at += 4 + n
    return frames


# -- the two ends, per transport ----------------------------------------------------------
def serve_zmq(path: str, count: int) -> float:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"ipc://{path}")
    print("ready", flush=True)
    for i in range(WARMUP + count):
        if i == WARMUP:
            start = cpu_seconds()
        sock.send_multipart(sock.recv_multipart())
    used = cpu_seconds() - start
    sock.close(linger=1000)
    ctx.term()
    return used


def client_zmq(path: str, count: int, frames: list[bytes]) -> tuple[float, float]:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"ipc://{path}")
    for i in range(WARMUP + count):
        if i == WARMUP:
            start, began = cpu_seconds(), time.perf_counter()
        sock.send_multipart(frames)
        sock.recv_multipart()
    used, wall = cpu_seconds() - start, time.perf_counter() - began
    sock.close(linger=0)
    ctx.term()
    return used, wall


def serve_unix(path: str, count: int) -> float:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen()
    print("ready", flush=True)
    conn, _ = listener.accept()
    poller = select.epoll()
    poller.register(conn.fileno(), select.EPOLLIN)
    for i in range(WARMUP + count):
        if i == WARMUP:
            start = cpu_seconds()
        poller.poll()
        conn.send(pack(unpack(conn.recv(1 << 20))))
    used = cpu_seconds() - start
    poller.close()
    conn.close()
    listener.close()
    return used


def client_unix(path: str, count: int, frames: list[bytes]) -> tuple[float, float]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    for i in range(WARMUP + count):
        if i == WARMUP:
            start, began = cpu_seconds(), time.perf_counter()
        sock.send(pack(frames))
        unpack(sock.recv(1 << 20))
    used, wall = cpu_seconds() - start, time.perf_counter() - began
    sock.close()
    return used, wall


SERVERS = {"zmq": serve_zmq, "unix": serve_unix}
CLIENTS = {"zmq": client_zmq, "unix": client_unix}


def one_run(kind: str, count: int, size: int) -> dict:
    """Start the server process, run the client here, return per-round-trip figures."""
    with tempfile.TemporaryDirectory(prefix="cx-transport-") as folder:
        path = str(Path(folder) / "hop.sock")
        server = subprocess.Popen(
            [sys.executable, "-m", "cortex.loadtest.transport", "--serve", kind, path,
             "--count", str(count)], stdout=subprocess.PIPE, text=True)
        try:
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {kind} server did not start")
            client_cpu, wall = CLIENTS[kind](path, count, envelope(size))
            out, _ = server.communicate(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
            server.wait()
    if server.returncode != 0:
        raise RuntimeError(f"the {kind} server exited with {server.returncode}")
    return {"round_trip_us": wall / count * 1e6, "client_cpu_us": client_cpu / count * 1e6,
            "server_cpu_us": float(out.split()[-1]) / count * 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cortex.loadtest.transport", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=20000, help="round trips per run")
    p.add_argument("--runs", type=int, default=3, help="runs per transport (medians shown)")
    p.add_argument("--size", type=int, default=120, help="body bytes per message")
    p.add_argument("--serve", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.count < 1 or args.runs < 1 or not 0 <= args.size <= 1 << 19:
        p.error("--count and --runs must be at least 1, --size within 0..524288")
    if args.serve:
        kind, path = args.serve
        print(f"{SERVERS[kind](path, args.count):.6f}", flush=True)
        return 0
    kinds = ["zmq"]
    if sys.platform.startswith("linux"):
        kinds.append("unix")  # SOCK_SEQPACKET on AF_UNIX: Linux (and a few others) only
    rows = {kind: [] for kind in kinds}
    for _ in range(args.runs):  # alternated, so a drift of the machine hits both
        for kind in kinds:
            rows[kind].append(one_run(kind, args.count, args.size))
    print(f"{args.count} round trips x {args.runs} runs, {args.size}-byte bodies "
          f"(medians, per round trip)\n")
    print("| transport | round trip | client CPU | server CPU |")
    print("| --- | --- | --- | --- |")
    for kind, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {kind} | {med['round_trip_us']:.1f} us | {med['client_cpu_us']:.1f} us "
              f"| {med['server_cpu_us']:.1f} us |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
