"""The events page under 1,000 events a second for 30 s: at most 1,000 rows in the DOM,
a JS heap that stays bounded (read through the Chrome DevTools protocol), and a page
still live at the end. The dashboard's CPU over the run is printed, not asserted."""

from __future__ import annotations

import json
import threading
import time

import psutil
import pytest
import zmq

from cortex.protocol import Client, locate
from cortex.protocol.publisher import EventPublisher

from .test_dashboard_browser import CHROMIUM, CHROMIUM_FLAGS, DEADLINE_MS

pytestmark = pytest.mark.heavy

RATE = 1000  # events per second
SECONDS = 30.0
ROWS_CAP = 1000


def publish(home, rate: float, seconds: float, sent: list[str]) -> None:
    """Emit `rate` events a second for `seconds` through the event router's own fan-in,
    as a service would, and keep re-sending until the router has acknowledged them."""
    ctx = zmq.Context()
    # The fan-in takes only the suite's own publishers: the test runs as the suite's owner.
    secret = locate.secret_path(home).read_text().strip()
    publisher = EventPublisher(ctx, locate.endpoints(home)["events_in"], "stress",
                               time.time_ns(), secret=secret)
    began = time.monotonic()
    emitted = 0
    try:
        while True:
            elapsed = time.monotonic() - began
            if emitted >= int(seconds * rate) and not publisher.unacked:
                return
            due = min(int(elapsed * rate), int(seconds * rate)) - emitted
            for _ in range(max(0, due)):
                emitted += 1
                event = publisher.emit("stress.tick", {"n": emitted, "text": "x" * 40})
                sent.append(event["id"])
            publisher.flush()
            # Pacing the generator (and reading acknowledgements), not waiting for a state.
            if publisher.socket.poll(5):
                publisher.on_message()
            publisher.tick(time.monotonic())
            if elapsed > seconds + 60:
                raise AssertionError(f"{publisher.unacked} events never acknowledged")
    finally:
        publisher.close()
        ctx.term()


def heap_mb(cdp) -> float:
    cdp.send("HeapProfiler.collectGarbage")
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    return metrics["JSHeapUsedSize"] / 2**20


def sample(page, cdp, began: float) -> tuple[float, int, int, float]:
    """(seconds into the run, rows in the DOM, events the page holds, JS heap MB)."""
    rows = page.eval_on_selector_all("#events .ev-window .ev", "rs => rs.length")
    held = page.evaluate("() => window.cortexDashboard.eventsHeld()")
    return round(time.monotonic() - began, 1), rows, held, round(heap_mb(cdp), 2)


def test_events_page_stays_bounded_at_1000_events_a_second(suites, tmp_path):
    from playwright.sync_api import sync_playwright

    suite = suites.start(workers=2, dashboard=True)
    url = (suite.home / "run" / "dashboard.url").read_text().strip()
    dashboard = psutil.Process({p["name"]: p for p in suite.processes()}["dashboard"]["pid"])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "#events")
            page.wait_for_selector("#connection.live", timeout=DEADLINE_MS)
            cdp = page.context.new_cdp_session(page)
            cdp.send("Performance.enable")
            sent: list[str] = []
            cpu0 = sum(dashboard.cpu_times()[:2])
            generator = threading.Thread(target=publish, args=(suite.home, RATE, SECONDS, sent))
            generator.start()
            samples = []
            began = time.monotonic()
            while generator.is_alive() and time.monotonic() - began < SECONDS:
                samples.append(sample(page, cdp, began))
                generator.join(2.0)  # a sample every ~2 s while the run lasts
            generator.join(SECONDS + 90)
            cpu = sum(dashboard.cpu_times()[:2]) - cpu0
            last = sent[-1]
            page.wait_for_selector(f"#events .ev[data-id='{last}']", timeout=DEADLINE_MS)
            samples.append(sample(page, cdp, began))
            lag = page.evaluate("() => window.cortexDashboard.lagSummary()")
            page.screenshot(path=tmp_path / "stress.png")
        finally:
            browser.close()
    report = {"events": len(sent), "dashboard_cpu_s": round(cpu, 2), "samples": samples,
              "lag": lag}
    (tmp_path / "stress.json").write_text(json.dumps(report))
    print(f"\nstress: {json.dumps(report)}")
    assert len(sent) == int(RATE * SECONDS)
    assert max(rows for _, rows, _, _ in samples) <= ROWS_CAP
    assert max(held for _, _, held, _ in samples) <= ROWS_CAP
    assert samples[-1][2] == ROWS_CAP  # full, and no more
    heaps = [heap for _, _, _, heap in samples]
    settled = heaps[len(heaps) // 3]  # once the page holds its thousand rows
    assert heaps[-1] < 2 * settled + 5, f"JS heap grew: {heaps}"
    with Client(suite.home) as client:
        status = client.call("events", "events.status")
    assert status["received"] >= len(sent)
