"""A viewer on the suite's dashboard during a load test: a headless Chromium keeping one
page open (Playwright, from the `test` extra, driving Debian's chromium; never a browser
Playwright downloads), and the dashboard scenario's with/without comparison."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psutil

CHROMIUM = "/usr/bin/chromium"  # Debian's; never a browser downloaded by Playwright
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
DASHBOARD_PAGES = ("fleet", "queue", "budgets", "latency", "events")


class DashboardPage:
    """A headless Chromium keeping one page of the suite's dashboard open while a run
    goes on (Playwright, the `test` extra, driving Debian's chromium), so a run with a
    viewer can be set beside one without. `report()` gives the browser's CPU and how
    far behind the events were when the page drew them."""

    def __init__(self, home: Path, page: str = "events"):
        if page not in DASHBOARD_PAGES:
            raise ValueError(f"no dashboard page {page!r}: one of {', '.join(DASHBOARD_PAGES)}")
        self.home = Path(home)
        self.name = page
        self.cpu0 = 0.0

    def __enter__(self):
        from playwright.sync_api import sync_playwright

        url_file = self.home / "run" / "dashboard.url"
        deadline = time.monotonic() + 30
        while not url_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no dashboard running for {self.home} (no {url_file})")
            time.sleep(0.1)  # the dashboard writes the file once it listens
        self._playwright = sync_playwright().start()
        try:
            self.browser = self._playwright.chromium.launch(executable_path=CHROMIUM,
                                                            args=CHROMIUM_FLAGS)
            self.page = self.browser.new_page(viewport={"width": 1400, "height": 900})
            self.page.goto(f"{url_file.read_text().strip()}#{self.name}")
            self.page.wait_for_selector("#connection.live", timeout=30_000)
        except BaseException:
            self._playwright.stop()
            raise
        self.cpu0 = self.browser_cpu()
        return self

    @staticmethod
    def browser_cpu() -> float:
        """CPU seconds of the Chromium processes we started (our descendants)."""
        total = 0.0
        for proc in psutil.Process().children(recursive=True):
            try:
                if "chrom" in proc.name():
                    t = proc.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                continue
        return total

    def report(self) -> dict:
        lag = self.page.evaluate("() => window.cortexDashboard.lagSummary()")
        return {"page": self.name, "browser_cpu_s": round(self.browser_cpu() - self.cpu0, 3),
                "event_to_screen_s": lag.get("drawn"), "event_to_page_s": lag.get("arrived")}

    def __exit__(self, *exc):
        try:
            self.browser.close()
        finally:
            self._playwright.stop()


def with_and_without(run_noop: Callable[[], dict], home: Path, page: str) -> dict:
    """Run noop with no dashboard page open, then with one: the second run's result with
    `dashboard` setting the two side by side (the dashboard's own CPU is its `cpu_s`)."""
    without = run_noop()
    with DashboardPage(home, page) as viewer:
        result = run_noop()
        seen = viewer.report()

    def cpu(run: dict) -> float | None:
        return (run.get("resources", {}).get("cpu_s") or {}).get("dashboard")

    result["dashboard"] = {
        "throughput_without_page": without["throughput"],
        "throughput_with_page": result["throughput"],
        "dashboard_cpu_s_without_page": cpu(without), "dashboard_cpu_s_with_page": cpu(result),
        "wall_s_without_page": without["wall_s"], "wall_s_with_page": result["wall_s"], **seen}
    return result
