"""What one message hop costs between two processes, by transport: the bus's (a ZeroMQ
DEALER to a ROUTER on ipc, which the scheduler's direct line also used until it was
measured here) against a plain Unix socket (SOCK_SEQPACKET: one datagram per message,
no library thread in between: the direct line's transport now).

    python -m cortex.loadtest.transport --count 20000 --runs 3
    python -m cortex.loadtest.transport --window 10   # ten in flight, as under load

A client process sends a six-frame message (the protocol's envelope, `--size` bytes of
body) and waits for it to come back, `--count` times; the server process waits for it
(with epoll for the Unix socket, as a server of many peers would) and sends it back.
Reported per round trip, medians of `--runs`: the wall time, and the CPU time of each
process (all its threads, libzmq's I/O thread included: getrusage). Neither side does
anything else, so this is the floor each transport puts under a task's messages: a task
is six such messages on the direct line (`python -m cortex.loadtest.count`).
Measures, never asserts: run it on a quiet machine and compare the two rows.
"""

from __future__ import annotations

import argparse
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cortex.protocol.direct import Datagrams, pack, unpack

WARMUP = 200  # round trips before the clocks start
# What a window may hold: a Unix socket charges each datagram its size and ~1 KiB of
# kernel bookkeeping against a buffer of ~208 KiB by default.
IN_FLIGHT_BYTES = 150_000


def envelope(size: int) -> list[bytes]:
    return [b"CX2", b"\x01", b"scheduler", b"", b"corr-000001", b"x" * size]


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the two ends, per transport ----------------------------------------------------------
def serve_zmq(path: str, warm: int, count: int) -> float:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"ipc://{path}")
    print("ready", flush=True)
    for i in range(warm + count):
        if i == warm:
            start = own_cpu()
        sock.send_multipart(sock.recv_multipart())
    used = own_cpu() - start
    sock.close(linger=1000)
    ctx.term()
    return used


def client_zmq(path: str, warm: int, count: int, frames: list[bytes], window: int
               ) -> tuple[float, float]:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"ipc://{path}")
    for i in range(0, warm + count, window):
        if i == warm:
            start, began = own_cpu(), time.perf_counter()
        for _ in range(window):
            sock.send_multipart(frames)
        for _ in range(window):
            sock.recv_multipart()
    used, wall = own_cpu() - start, time.perf_counter() - began
    sock.close(linger=0)
    ctx.term()
    return used, wall


def serve_unix(path: str, warm: int, count: int) -> float:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen()
    print("ready", flush=True)
    conn, _ = listener.accept()
    conn.setblocking(False)
    poller = select.epoll()
    poller.register(conn.fileno(), select.EPOLLIN)
    datagrams = Datagrams()  # the line's own receiving and framing
    served, start = 0, None
    while served < warm + count:
        poller.poll()
        while served < warm + count:  # what the wake found, without waiting again
            datagram = datagrams.read(conn)
            if not datagram:
                break
            if served == warm:
                start = own_cpu()
            conn.sendall(pack(unpack(datagram)))
            served += 1
    used = own_cpu() - start
    poller.close()
    conn.close()
    listener.close()
    return used


def client_unix(path: str, warm: int, count: int, frames: list[bytes], window: int
                ) -> tuple[float, float]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    datagrams = Datagrams()
    for i in range(0, warm + count, window):
        if i == warm:
            start, began = own_cpu(), time.perf_counter()
        for _ in range(window):
            sock.send(pack(frames))
        for _ in range(window):
            unpack(datagrams.read(sock))
    used, wall = own_cpu() - start, time.perf_counter() - began
    sock.close()
    return used, wall


SERVERS = {"zmq": serve_zmq, "unix": serve_unix}
CLIENTS = {"zmq": client_zmq, "unix": client_unix}


def one_run(kind: str, count: int, size: int, window: int) -> dict:
    """Start the server process, run the client here, return per-round-trip figures."""
    warm = -(-WARMUP // window) * window  # whole windows
    with tempfile.TemporaryDirectory(prefix="cx-transport-") as folder:
        path = str(Path(folder) / "hop.sock")
        server = subprocess.Popen(
            [sys.executable, "-m", "cortex.loadtest.transport", "--serve", kind, path,
             str(warm), "--count", str(count)], stdout=subprocess.PIPE, text=True)
        try:
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {kind} server did not start")
            client_cpu, wall = CLIENTS[kind](path, warm, count, envelope(size), window)
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
    p.add_argument("--window", type=int, default=1,
                   help="messages in flight: sent together, then their answers read (a busy "
                        "server's wake finds several)")
    p.add_argument("--serve", nargs=3, metavar=("KIND", "PATH", "WARM"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.count < 1 or args.runs < 1 or not 0 <= args.size <= 1 << 16 \
            or not 1 <= args.window <= 100:
        p.error("--count and --runs must be at least 1, --size within 0..65536, --window "
                "within 1..100")
    if args.window * (args.size + 1024) > IN_FLIGHT_BYTES:
        p.error(f"--window x (--size + 1024) must stay within {IN_FLIGHT_BYTES} bytes: a "
                "window both ends send before reading must fit the socket's buffers")
    count = -(-args.count // args.window) * args.window  # whole windows
    if args.serve:
        kind, path, warm = args.serve
        print(f"{SERVERS[kind](path, int(warm), count):.6f}", flush=True)
        return 0
    kinds = ["zmq"]
    if sys.platform.startswith("linux"):
        kinds.append("unix")  # SOCK_SEQPACKET on AF_UNIX: Linux (and a few others) only
    rows = {kind: [] for kind in kinds}
    for _ in range(args.runs):  # alternated, so a drift of the machine hits both
        for kind in kinds:
            rows[kind].append(one_run(kind, count, args.size, args.window))
    print(f"{count} round trips x {args.runs} runs, {args.size}-byte bodies, "
          f"{args.window} in flight (medians, per round trip)\n")
    print("| transport | round trip | client CPU | server CPU |")
    print("| --- | --- | --- | --- |")
    for kind, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {kind} | {med['round_trip_us']:.1f} us | {med['client_cpu_us']:.1f} us "
              f"| {med['server_cpu_us']:.1f} us |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
