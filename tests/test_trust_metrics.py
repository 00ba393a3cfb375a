"""Metrics the owner alone can read: /metrics wants the bearer token from the owner's
run/metrics.token, closes connections that send nothing, serves a bounded number at
once, and shows the suite's gauges (queue depth, workers by state, budgets)."""

from __future__ import annotations

import socket
import stat
import urllib.error
import urllib.request

import pytest
from prometheus_client import parser

from cortex.protocol import Client
from cortex.services.events.metrics import MAX_CONNECTIONS, Metrics

from .conftest import wait_for


def scrape(url: str, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def test_metrics_want_the_token_and_bound_their_connections():
    server = Metrics().serve(0, "right")
    idle = []
    try:
        assert scrape(server.url, "right")[0] == 200
        assert scrape(server.url, None)[0] == 401
        assert scrape(server.url, "wrong")[0] == 401
        for _ in range(MAX_CONNECTIONS):  # connections that never send a request
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        wait_for(lambda: scrape_refused(server.port), 30, "a connection past the cap closed")
        assert server.refused >= 1
        for s in idle:  # each idle one is closed by the server once its time is up
            assert s.recv(1) == b""
        assert scrape(server.url, "right")[0] == 200  # served again
    finally:
        for s in idle:
            s.close()
        server()


def scrape_refused(port: int) -> bool:
    """A request on a new connection gets no answer at all: closed at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(b"GET /metrics HTTP/1.0\r\nAuthorization: Bearer right\r\n\r\n")
            return s.recv(64) == b""
        except ConnectionError:
            return True


def families(text: str) -> dict:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


@pytest.mark.processes
def test_the_live_endpoint_is_the_owners_and_shows_the_suite_gauges(shared_suite):
    home = shared_suite.home
    url = (home / "run" / "metrics.url").read_text().strip()
    token_file = home / "run" / "metrics.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert scrape(url, None)[0] == 401 and scrape(url, "0" * 64)[0] == 401
    with Client(home, timeout=30) as c:
        c.call("ledger", "ledger.set", {"scope": "type:trust-gauge", "limit": 5000})
        c.submit_and_wait("echo", "gauge", payload=1, timeout=60)

    def gauges():
        status, text = scrape(url, token)
        assert status == 200
        found = families(text)
        budgets = {(s.labels["scope"], s.labels["amount"]): s.value
                   for s in found["cortex_budget_tokens"].samples}
        workers = {(s.labels["type"], s.labels["state"]): s.value
                   for s in found["cortex_workers"].samples}
        queue = {s.labels["priority"]: s.value for s in found["cortex_queue_depth"].samples}
        if budgets.get(("type:trust-gauge", "limit")) == 5000 and \
                workers.get(("echo", "idle"), 0) >= 1 and set(queue) >= {"high", "low"}:
            return found
        return None
    found = wait_for(gauges, 60, "the suite's gauges in /metrics")
    assert found["cortex_tasks"].type == "counter"
    with Client(home, timeout=30) as c:  # cortex status still reads them over the bus
        assert "latency" in c.call("events", "events.metrics")
