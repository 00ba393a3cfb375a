"""The dashboard on a live suite, without a browser: the token, the cookie, POST-only
actions, the WebSocket stream, and the event router's operations it relies on."""

from __future__ import annotations

import asyncio
import json
import stat
import urllib.error
import urllib.request

import aiohttp
import psutil
import pytest

from cortex.protocol import Client, NotFound

from .conftest import wait_for

HEAVY_TIMEOUT = 60


def dashboard_url(suite) -> str:
    return (suite.home / "run" / "dashboard.url").read_text().strip()


def split(url: str) -> tuple[str, str]:
    base, _, token = url.partition("/?token=")
    return base, token


def get(url: str, headers: dict | None = None, method: str = "GET"):
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_url_file_is_private_and_holds_a_fresh_token(shared_suite):
    path = shared_suite.home / "run" / "dashboard.url"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    base, token = split(dashboard_url(shared_suite))
    assert base.startswith("http://127.0.0.1:") and len(token) >= 40


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/api/snapshot", "/ws",
                                  "/api/events", "/api/task/t1"])
def test_every_request_without_the_token_is_refused(shared_suite, path):
    base, token = split(dashboard_url(shared_suite))
    assert get(base + path)[0] == 403
    assert get(base + path + "?token=" + token[:-1] + "x")[0] == 403
    assert get(base + path, {"Cookie": "cortex-dashboard=" + token})[0] == 403  # other port


def test_another_host_name_is_refused_even_with_the_token(shared_suite):
    url = dashboard_url(shared_suite)
    port = split(url)[0].rsplit(":", 1)[1]
    status, _, body = get(url, {"Host": f"attacker.example:{port}"})
    assert status == 403 and b"token" in body


def test_opening_the_url_sets_a_strict_cookie_that_serves_the_page(shared_suite):
    url = dashboard_url(shared_suite)
    base, token = split(url)
    status, headers, body = get(url)
    assert status == 200 and b'src="/static/app.js"' in body
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["Referrer-Policy"] == "no-referrer"
    jar = cookie.split(";", 1)[0]
    status, headers, body = get(base + "/static/app.js", {"Cookie": jar})
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert get(base + "/static/../process.py", {"Cookie": jar})[0] in (403, 404)


def test_cancel_is_a_post_that_needs_the_token_header(shared_suite):
    url = dashboard_url(shared_suite)
    base, token = split(url)
    jar = get(url)[1]["Set-Cookie"].split(";", 1)[0]
    with Client(shared_suite.home, timeout=20) as client:
        task = client.submit("sleep", "long", payload={"seconds": 60})
        cancel = f"{base}/api/task/{task['id']}/cancel"
        assert get(cancel, {"Cookie": jar}, "POST")[0] == 403  # a cookie alone is not enough
        assert get(cancel + "?token=" + token, {}, "POST")[0] == 403  # nor a query string
        assert client.status(task["id"])["state"] != "cancelled"
        status, _, body = get(cancel, {"X-Cortex-Token": token}, "POST")
        assert status == 200 and json.loads(body)["task"]["state"] == "cancelled"
        assert client.wait(task["id"], timeout=20)["state"] == "cancelled"
        again = get(cancel, {"X-Cortex-Token": token}, "POST")
        assert again[0] == 200 and json.loads(again[2])["task"]["state"] == "cancelled"
    assert get(f"{base}/api/task/nosuchtask/cancel", {"X-Cortex-Token": token}, "POST")[0] \
        == 404


def test_task_api_gives_status_trace_and_the_traceback(shared_suite):
    base, token = split(dashboard_url(shared_suite))
    with Client(shared_suite.home, timeout=20) as client:
        task = client.submit("fail", "boom", payload={"message": "kaput"}, retries=0)
        client.wait(task["id"], timeout=20)
    # The trace is read from the log, which may be a moment behind the live stream.
    reply = wait_for(lambda: (r := json.loads(get(f"{base}/api/task/{task['id']}", {
        "X-Cortex-Token": token})[2])) and "task.failed" in [
        e["type"] for e in r["trace"]["events"]] and r, 20, "the failure in the log")
    assert reply["task"]["state"] == "failed"
    assert "Traceback" in reply["task"]["error"]["traceback"]
    assert "RuntimeError: kaput" in reply["task"]["error"]["traceback"]
    types = [e["type"] for e in reply["trace"]["events"]]
    assert types[0] == "task.created" and "task.failed" in types
    assert get(f"{base}/api/task/nosuchtask", {"X-Cortex-Token": token})[0] == 404
    assert get(f"{base}/api/task/{'x' * 65}", {"X-Cortex-Token": token})[0] == 400


def test_events_query_filters_newest_first_and_pages(shared_suite):
    with Client(shared_suite.home, timeout=30) as client:
        ids = [client.submit("echo", f"query {i}", payload={"i": i})["id"] for i in range(5)]
        for task_id in ids:
            client.wait(task_id, timeout=20)
        one = wait_for(lambda: [e for e in client.call("events", "events.query", {
            "task": ids[0]})["events"] if e["type"] == "task.completed"], 20, "the log")
        assert one[0]["task"] == ids[0]
        reply = client.call("events", "events.query", {"type": "task.comp*", "newest": True,
                                                       "limit": 3})
        assert reply["source"] == "jsonl" and reply["more"] is True
        newest = reply["events"]
        assert [e["type"] for e in newest] == ["task.completed"] * 3
        assert [e["ts"] for e in newest] == sorted((e["ts"] for e in newest), reverse=True)
        older = client.call("events", "events.query", {
            "type": "task.comp*", "newest": True, "limit": 3, "until": newest[-1]["ts"]})
        assert older["events"] and all(e["ts"] < newest[-1]["ts"] for e in older["events"])
        worker = newest[0]["worker"]
        assert all(e["worker"] == worker for e in client.call("events", "events.query", {
            "worker": worker})["events"])
        text = client.call("events", "events.query", {"text": "QUERY 3"})["events"]
        assert {e["task"] for e in text} == {ids[3]}
        since = client.call("events", "events.query", {"since": newest[0]["ts"]})["events"]
        assert all(e["ts"] >= newest[0]["ts"] for e in since)
        for bad in ({"limit": 0}, {"type": 5}, {"since": "yesterday"}):
            with pytest.raises(Exception) as refused:
                client.call("events", "events.query", bad)
            assert refused.value.code == "bad_request"


def test_events_metrics_gives_the_histograms_on_request(shared_suite):
    with Client(shared_suite.home, timeout=20) as client:
        client.wait(client.submit("echo", "one")["id"], timeout=20)
        plain = client.call("events", "events.metrics")
        assert "buckets" not in plain
        reply = wait_for(lambda: (r := client.call("events", "events.metrics", {
            "buckets": True})) and any(b["total"] for b in r["buckets"]) and r, 10, "a bucket")
    assert len(reply["bounds"]) > 50
    row = next(b for b in reply["buckets"] if b["type"] == "echo")
    assert all(0 <= i <= len(reply["bounds"]) and n > 0 for i, n in row["total"])


def test_every_service_reports_its_pid(shared_suite):
    pids = {p["name"]: p["pid"] for p in shared_suite.processes()}
    with Client(shared_suite.home, timeout=10) as client:
        for service, op in (("broker", "broker.status"), ("events", "events.status"),
                            ("ledger", "ledger.status"), ("scheduler", "scheduler.status"),
                            ("pool", "pool.status")):
            assert client.call(service, op)["pid"] == pids[service]
        with pytest.raises(NotFound):
            client.status("nosuchtask")


def test_websocket_sends_a_snapshot_then_only_what_the_filter_lets_through(shared_suite):
    url = dashboard_url(shared_suite)
    base, token = split(url)

    def live(snapshot: dict) -> int:  # a worker killed by an earlier test's cancel is
        # lost, then exited, and its replacement starting: not yet four, for a moment
        return len([w for w in snapshot["fleet"].values()
                    if w["state"] not in ("exited", "lost")])

    async def run() -> tuple[dict, list[dict], str]:
        async with aiohttp.ClientSession() as session:
            ws_url = base.replace("http://", "ws://") + "/ws?token=" + token
            deadline = asyncio.get_running_loop().time() + HEAVY_TIMEOUT
            while True:  # each connection's first message is a snapshot of that moment
                async with session.ws_connect(ws_url, origin=base) as ws:
                    snapshot = await ws.receive_json(timeout=HEAVY_TIMEOUT)
                    if live(snapshot) == 4 or asyncio.get_running_loop().time() > deadline:
                        break
                await asyncio.sleep(0.2)  # polling the fleet with a deadline
            async with session.ws_connect(ws_url, origin=base) as ws:
                await ws.receive_json(timeout=HEAVY_TIMEOUT)  # its own snapshot
                await ws.send_json({"t": "filter", "filter": {"type": "task.completed"}})
                await ws.send_json({"t": "filter", "filter": {"nonsense": 1}})
                with Client(shared_suite.home, timeout=20) as client:
                    task = client.submit("echo", "through the socket")
                seen: list[dict] = []

                def after_reset() -> list[dict]:  # the messages under the new filter
                    resets = [i for i, m in enumerate(seen)
                              if m["t"] == "events" and m.get("reset")]
                    return seen[resets[0]:] if resets else []

                while not any(e.get("task") == task["id"] for m in after_reset()
                              if m["t"] == "events" for e in m["events"]):
                    seen.append(await ws.receive_json(timeout=HEAVY_TIMEOUT))
                return snapshot, seen, task["id"]

    snapshot, seen, task_id = asyncio.run(run())
    assert snapshot["t"] == "snapshot"
    assert live(snapshot) == 4
    assert {"queue", "budgets", "services", "latency", "resources"} <= set(snapshot)
    assert any(m["t"] == "error" and m["code"] == "bad_request" for m in seen)
    # What was pushed before the server took the filter came under the old one: the
    # filter's answer (a reset) marks where the new one begins.
    since = next(i for i, m in enumerate(seen) if m["t"] == "events" and m.get("reset"))
    events = [e for m in seen[since:] if m["t"] == "events" for e in m["events"]]
    assert any(e.get("task") == task_id for e in events)
    assert events and all(e["type"] == "task.completed" for e in events)


def test_a_websocket_from_another_origin_is_refused(shared_suite):
    base, token = split(dashboard_url(shared_suite))

    async def run() -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(base.replace("http://", "ws://") + "/ws?token="
                                              + token, origin="http://evil.example"):
                    return 101
            except aiohttp.WSServerHandshakeError as e:
                return e.status

    assert asyncio.run(run()) == 403


def test_url_file_goes_at_stop(suites):
    suite = suites.start(workers=1, dashboard=True)
    path = suite.home / "run" / "dashboard.url"
    assert path.exists()
    suite.stop()
    assert not path.exists()


def test_switched_off_the_dashboard_exits_at_once_and_nothing_listens(suites):
    suite = suites.start(workers=1, extra='[events]\nmetrics_port = -1\n'
                                          '[dashboard]\nenabled = false\n')
    # supervisord does not start it; started by hand, it exits at once.
    never = {x["name"]: x for x in suite.processes()}["dashboard"]
    assert never["statename"] == "STOPPED" and not never["start"], never
    suite.rpc().supervisor.startProcess("dashboard")
    info = wait_for(lambda: (p := {x["name"]: x for x in suite.processes()}["dashboard"])
                    ["statename"] == "EXITED" and p, 30, "the dashboard to exit")
    assert info["exitstatus"] == 0
    assert not (suite.home / "run" / "dashboard.url").exists()
    listening = []
    for pid in suite.pids():
        try:
            listening += [c for c in psutil.Process(pid).net_connections("inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    assert listening == []
    # Not restarted: supervisord still holds it as exited, with the same stop time.
    again = {x["name"]: x for x in suite.processes()}["dashboard"]
    assert again["statename"] == "EXITED" and again["stop"] == info["stop"]
