"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against a
live suite. Every wait polls the page with a deadline; every test leaves a screenshot in
its temporary directory."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from cortex.protocol import Client

from .conftest import wait_for

pytestmark = pytest.mark.heavy

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
DEADLINE_MS = 30_000  # generous: the machine is shared


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, errors


def url_of(suite) -> str:
    return (suite.home / "run" / "dashboard.url").read_text().strip()


def open_page(page, suite, name: str):
    page.goto(f"{url_of(suite)}#{name}")
    page.wait_for_selector("#connection.live", timeout=DEADLINE_MS)
    return page


def test_fleet_shows_one_tile_per_worker(shared_suite, page, tmp_path):
    open_page(page, shared_suite, "fleet")
    with Client(shared_suite.home) as client:
        workers = {w["name"] for w in client.call("pool", "pool.status")["workers"]}
    page.wait_for_function(
        "names => names.every(n => document.querySelector(`.tile[data-worker='${n}']`))",
        arg=sorted(workers), timeout=DEADLINE_MS)
    shown = page.eval_on_selector_all(".tile:not(.exited)", "ts => ts.map(t => t.dataset.worker)")
    assert sorted(shown) == sorted(workers)
    services = page.eval_on_selector_all("tr[data-service]", "rs => rs.map(r => r.dataset.service)")
    assert services == ["broker", "events", "ledger", "scheduler", "pool"]
    page.wait_for_function("() => document.querySelectorAll('.chart polyline[points*=\",\"]')"
                           ".length >= 2", timeout=DEADLINE_MS)  # CPU and memory have points
    page.screenshot(path=tmp_path / "fleet.png", full_page=True)


def test_a_submitted_task_turns_busy_then_completes_on_screen(shared_suite, page, tmp_path):
    open_page(page, shared_suite, "fleet")
    with Client(shared_suite.home) as client:
        task = client.submit("sleep", "watch me", payload={"seconds": 3})
        busy = f".tile.busy[data-task='{task['id']}']"
        page.wait_for_selector(busy, timeout=DEADLINE_MS)
        assert "running" in page.inner_text(busy)
        page.screenshot(path=tmp_path / "busy.png", full_page=True)
        worker = page.get_attribute(busy, "data-worker")
        page.wait_for_selector(f".tile.idle[data-worker='{worker}'][data-task='']",
                               timeout=DEADLINE_MS)
        assert client.wait(task["id"], timeout=20)["state"] == "completed"
    page.goto(f"{url_of(shared_suite)}#events")
    page.fill("input[name=task]", task["id"])
    row = page.wait_for_selector("#events .ev[data-type='task.completed']",
                                 timeout=DEADLINE_MS)
    assert task["id"] in row.inner_text()
    page.screenshot(path=tmp_path / "completed.png", full_page=True)


def test_queue_shows_a_waiting_task_with_its_reason_and_eta(shared_suite, page, tmp_path):
    open_page(page, shared_suite, "queue")
    with Client(shared_suite.home) as client:
        workers = len(client.call("pool", "pool.status")["workers"])
        # Every worker busy and holding its next (prefetched) task, all of the waiting
        # task's priority: so it queues (a higher one would recall a prefetched task).
        hogs = [client.submit("sleep", "hog", priority="high", payload={"seconds": 30})["id"]
                for _ in range(2 * workers)]
        wait_for(lambda: sorted(client.status(h)["state"] for h in hogs)
                 == ["dispatched"] * workers + ["running"] * workers, 30,
                 "every worker busy, with its next task")
        waiting = client.submit("sleep", "the one that waits", priority="high",
                                payload={"seconds": 0.1})
        try:
            row = page.wait_for_selector(f"tr[data-task='{waiting['id']}']",
                                         timeout=DEADLINE_MS)
            assert "worker" in row.query_selector(".waiting").inner_text()
            page.wait_for_function(
                "id => /^in |due/.test(document.querySelector("
                "`tr[data-task='${id}'] .eta`).textContent)", arg=waiting["id"],
                timeout=DEADLINE_MS)
            assert "high" in page.inner_text("#queue")
            page.screenshot(path=tmp_path / "queue.png", full_page=True)
        finally:
            for task_id in [*hogs, waiting["id"]]:
                client.cancel(task_id)
        page.wait_for_selector(f"tr[data-task='{waiting['id']}']", state="detached",
                               timeout=DEADLINE_MS)


def test_budgets_show_a_scope_limit_and_use_after_a_commit(shared_suite, page, tmp_path):
    with Client(shared_suite.home) as client:
        client.call("ledger", "ledger.set", {"scope": "type:simulated_agent", "limit": 50_000})
        open_page(page, shared_suite, "budgets")
        card = "[data-scope='type:simulated_agent']"
        page.wait_for_selector(card, timeout=DEADLINE_MS)
        assert page.inner_text(f"{card} .limit") == "50,000"
        before = int(page.inner_text(f"{card} .committed-n").replace(",", ""))
        task = client.submit("simulated_agent", "spend", tokens=1000,
                             payload={"seconds": 0.1, "tokens": 700})
        assert client.wait(task["id"], timeout=30)["tokens_used"] == 700
    page.wait_for_function(
        "([sel, n]) => document.querySelector(sel + ' .committed-n').textContent"
        " .replace(/,/g, '') == n", arg=[card, str(before + 700)], timeout=DEADLINE_MS)
    assert float(page.get_attribute(f"{card} .gauge", "aria-valuenow")) >= before + 700
    page.screenshot(path=tmp_path / "budgets.png", full_page=True)


def test_latency_page_draws_its_series(shared_suite, page, tmp_path):
    open_page(page, shared_suite, "latency")
    with Client(shared_suite.home) as client:
        for i in range(30):
            client.wait(client.submit("echo", f"latency {i}")["id"], timeout=20)
    page.wait_for_selector("#latency select option[value='echo/medium']", state="attached",
                           timeout=DEADLINE_MS)
    page.select_option("#latency select", "echo/medium")
    # Three charts (submit → start, start → end, end to end), each with P50/P95/P99.
    page.wait_for_function(
        "() => document.querySelectorAll('#latency polyline[points*=\",\"]').length >= 9",
        timeout=DEADLINE_MS)
    page.wait_for_function("() => document.querySelector('table.latency').textContent"
                           ".includes('echo')", timeout=DEADLINE_MS)
    page.screenshot(path=tmp_path / "latency.png", full_page=True)


def test_a_filtered_event_view_shows_only_matching_events(shared_suite, page, tmp_path):
    open_page(page, shared_suite, "events")
    page.fill("input[name=type]", "task.comp*")
    page.wait_for_function("() => document.querySelector('#events .status').textContent"
                           ".includes('type=task.comp*')", timeout=DEADLINE_MS)
    with Client(shared_suite.home) as client:
        ids = [client.submit("echo", f"filtered {i}")["id"] for i in range(5)]
        for task_id in ids:
            client.wait(task_id, timeout=20)
    page.wait_for_function(
        "ids => ids.every(id => [...document.querySelectorAll('#events .ev-window .ev')]"
        ".some(r => r.textContent.includes(id)))", arg=ids, timeout=DEADLINE_MS)
    types = page.eval_on_selector_all("#events .ev-window .ev", "rs => rs.map(r => r.dataset.type)")
    assert types and set(types) == {"task.completed"}
    page.screenshot(path=tmp_path / "events-filtered.png", full_page=True)
    page.fill("input[name=type]", "")
    page.fill("input[name=text]", "filtered 3")
    page.wait_for_function(
        "id => { const rows = [...document.querySelectorAll('#events .ev-window .ev')];"
        " return rows.length && rows.every(r => r.textContent.includes(id)); }",
        arg=ids[3], timeout=DEADLINE_MS)
    # Older ones from the event log, on request.
    page.click("text=Load older events")
    page.wait_for_function("() => document.querySelector('#events button.older').textContent"
                           ".match(/more from|No older/)", timeout=DEADLINE_MS)


def test_task_page_shows_trace_progress_traceback_and_cancels(shared_suite, page, tmp_path):
    with Client(shared_suite.home) as client:
        slow = client.submit("simulated_agent", "slow steps", tokens=100,
                             payload={"seconds": 8, "steps": 8, "tokens": 80})
        open_page(page, shared_suite, f"task/{slow['id']}")
        page.wait_for_function("() => document.querySelector('#task-progress span')"
                               ".textContent.includes('step')", timeout=DEADLINE_MS)
        assert page.inner_text("#task-state") in ("running", "dispatched")
        page.screenshot(path=tmp_path / "task-progress.png", full_page=True)
        page.wait_for_selector("#task-state:text('completed')", timeout=DEADLINE_MS)
        page.wait_for_selector("#task-result", timeout=DEADLINE_MS)
        page.wait_for_selector("table.trace tr[data-type='task.completed']",
                               timeout=DEADLINE_MS)
        types = page.eval_on_selector_all("table.trace tbody tr",
                                          "rs => rs.map(r => r.dataset.type)")
        assert types[0] == "task.created" and "task.dispatched" in types

        failed = client.submit("fail", "fails", retries=0, payload={"message": "on purpose"})
        client.wait(failed["id"], timeout=20)
        page.goto(f"{url_of(shared_suite)}#task/{failed['id']}")
        traceback = page.wait_for_selector("#task-error pre.traceback", timeout=DEADLINE_MS)
        assert "Traceback" in traceback.inner_text()
        assert "RuntimeError: on purpose" in traceback.inner_text()
        page.screenshot(path=tmp_path / "task-failed.png", full_page=True)

        long = client.submit("sleep", "to be cancelled", payload={"seconds": 60})
        page.goto(f"{url_of(shared_suite)}#task/{long['id']}")
        page.click("#cancel", timeout=DEADLINE_MS)
        page.wait_for_selector("#task-state:text('cancelled')", timeout=DEADLINE_MS)
        assert client.wait(long["id"], timeout=20)["state"] == "cancelled"
        page.screenshot(path=tmp_path / "task-cancelled.png", full_page=True)


def test_a_page_without_the_token_is_refused(shared_suite, page, tmp_path):
    base = url_of(shared_suite).split("/?", 1)[0]
    response = page.goto(base + "/#fleet")
    assert response.status == 403
    assert "needs its token" in page.inner_text("body")
    page.screenshot(path=tmp_path / "refused.png")


def test_events_reach_the_screen_quickly(shared_suite, page, tmp_path):
    """Measures (does not assert) an event's age when the page has drawn it."""
    open_page(page, shared_suite, "events")
    page.evaluate("() => window.cortexDashboard.reset()")
    with Client(shared_suite.home) as client:
        ids = [client.submit("echo", f"lag {i}")["id"] for i in range(200)]
        for task_id in ids:
            client.wait(task_id, timeout=30)
    page.wait_for_function(
        "id => [...document.querySelectorAll('#events .ev-window .ev')].some(r =>"
        " r.dataset.type === 'task.completed' && r.textContent.includes(id))",
        arg=ids[-1], timeout=DEADLINE_MS)
    lag = page.evaluate("() => window.cortexDashboard.lagSummary()")
    (tmp_path / "lag.json").write_text(json.dumps(lag))
    print(f"\nevent to screen: {lag}")
    # Each task's events arrived and were drawn: both counts cover them (how the two
    # counts differ by one or two is not what this test measures).
    assert lag["drawn"]["n"] >= len(ids) and lag["arrived"]["n"] >= len(ids)
    page.screenshot(path=tmp_path / "events.png", full_page=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_switched_off_nothing_answers_on_its_port(suites, page, tmp_path):
    port = free_port()
    suite = suites.start(workers=1, extra=f"[dashboard]\nenabled = false\nport = {port}\n")
    suite.rpc().supervisor.startProcess("dashboard")  # supervisord leaves it unstarted
    wait_for(lambda: {p["name"]: p for p in suite.processes()}["dashboard"]["statename"]
             == "EXITED", 30, "the dashboard to exit")
    with pytest.raises(Exception, match="ERR_CONNECTION_REFUSED"):
        page.goto(f"http://127.0.0.1:{port}/")
    from playwright.sync_api import Error as PlaywrightError

    try:  # a record of the refusal only: Chromium cannot always capture its error page
        page.screenshot(path=tmp_path / "switched-off.png")
    except PlaywrightError:
        pass
    assert not (suite.home / "run" / "dashboard.url").exists()


def test_a_page_opened_on_a_dormant_dashboard_shows_what_ran_meanwhile(suites, page,
                                                                       monkeypatch, tmp_path):
    monkeypatch.setenv("CORTEX_DASHBOARD_DORMANT_AFTER", "1")
    suite = suites.start(workers=2, dashboard=True)
    base, _, token = url_of(suite).partition("/?token=")

    def dormant() -> bool:
        request = urllib.request.Request(base + "/api/status",
                                         headers={"X-Cortex-Token": token})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["dormant"]

    wait_for(dormant, 60, "the dashboard to go dormant")
    with Client(suite.home) as client:
        done = [client.submit("echo", f"while asleep {i}")["id"] for i in range(5)]
        for task_id in done:
            client.wait(task_id, timeout=30)
        busy = client.submit("sleep", "busy while asleep", payload={"seconds": 60})["id"]
        wait_for(lambda: client.status(busy)["state"] == "running", 30, "the task to run")
        assert dormant()
        try:
            open_page(page, suite, "fleet")
            page.wait_for_selector(f".tile.busy[data-task='{busy}']", timeout=DEADLINE_MS)
            page.goto(f"{url_of(suite)}#events")
            page.fill("input[name=task]", done[-1])
            # The rows shown before the filter stay until the server's filtered answer
            # replaces them: wait for that, with the task's completion among them.
            page.wait_for_function(
                "id => { const rows = [...document.querySelectorAll('#events .ev-window .ev')];"
                " return rows.some(r => r.dataset.type === 'task.completed')"
                " && rows.every(r => r.textContent.includes(id)); }",
                arg=done[-1], timeout=DEADLINE_MS)
            page.screenshot(path=tmp_path / "woken.png", full_page=True)
        finally:
            client.cancel(busy)
