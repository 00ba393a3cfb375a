"""Provider limits on a live suite (issue 17, test 2): while 100 agents submit `llm` tasks
to a provider allowed N requests per 2-second window, the scheduler never lets more than
N of them through in any window, the ones it holds wait `rate_limit` with an ETA, and
another provider's tasks, submitted behind them, are not held: they all end while the
limited provider still has work waiting."""

from __future__ import annotations

import threading

import pytest

from cortex.loadtest.openai_server import OpenAIServer
from cortex.protocol import Client
from tests.conftest import jsonl_events_of, suite_config, wait_for

WINDOW = 2.0
PER_WINDOW = 8
AGENTS = 100
OTHERS = 12


def config(server: OpenAIServer) -> str:
    return suite_config(1, ("echo",),
                        tables='[ledger.budgets."type:llm"]\nlimit = 10000000\n', extra=f"""
[pool.groups.llm]
count = 4
types = ["llm"]
[providers.limited]
base_url = "{server.base_url}"
model = "limited;n=3"
api_key_env = "H11_RATE_KEY"
requests_per_window = {PER_WINDOW}
window = {WINDOW}
[providers.free]
base_url = "{server.base_url}"
model = "free;n=3"
api_key_env = "H11_RATE_KEY"
""")


def most_in_any_window(times: list[float]) -> int:
    """The largest count of times in any half-open window (t - WINDOW, t]."""
    times = sorted(times)
    return max((sum(1 for s in times[:i + 1] if s > t - WINDOW) for i, t in enumerate(times)),
               default=0)


@pytest.mark.heavy
def test_a_provider_limit_is_never_exceeded_and_holds_no_other_provider(suites, monkeypatch):
    monkeypatch.setenv("H11_RATE_KEY", "sk-rate-test-0000")
    with OpenAIServer(api_key="sk-rate-test-0000") as server:
        suite = suites.start(config(server))
        home = suite.home
        limited: list[str] = []
        lock = threading.Lock()
        failures: list[BaseException] = []

        def an_agent(n: int) -> None:  # each agent its own connection, as separate agents
            try:
                with Client(home, name=f"agent-{n}") as client:
                    task = client.submit("llm", f"summarise note {n}", tokens=60, retries=0,
                                         payload={"provider": "limited"})
                with lock:
                    limited.append(task["id"])
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                failures.append(e)

        threads = [threading.Thread(target=an_agent, args=(n,)) for n in range(AGENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not failures and len(limited) == AGENTS

        with Client(home) as client:
            # Behind a full backlog of the limited provider, the free one's tasks go at once.
            wait_for(lambda: client.status(limited[-1])["waiting"] == "rate_limit"
                     or client.status(limited[-1])["state"] != "queued", 60,
                     "the limited provider to hold its backlog")
            others = [client.submit("llm", f"translate line {n}", tokens=60, retries=0,
                                    payload={"provider": "free"})["id"] for n in range(OTHERS)]
            for task_id in others:
                assert client.wait(task_id, timeout=120)["state"] == "completed"
            still_waiting = [t for t in limited if client.status(t)["state"] == "queued"]
            assert still_waiting, "the free provider's tasks ended while the backlog waited"
            held = client.status(still_waiting[-1])
            assert held["waiting"] == "rate_limit"
            assert held["waiting_detail"]["provider"] == "limited"
            assert held["eta"] is not None

            for task_id in limited:
                assert client.wait(task_id, timeout=300)["state"] == "completed"
            status = client.call("scheduler", "scheduler.status")
            assert status["providers"]["limited"]["allowed"]["requests"] == PER_WINDOW

        def counted_dispatches():
            # A task's dispatch reaches the log a few ms after it (events travel in batches).
            counted = {e["task"]: e["data"]["provider"] for e in jsonl_events_of(home)
                       if e["type"] == "task.dispatched" and e["data"].get("provider")}
            return counted if set(limited) <= set(counted) else None

        counted = wait_for(counted_dispatches, 30, "every limited task's dispatch logged")
        events = jsonl_events_of(home)
        limited_times = [counted[t]["counted_at"] for t in limited]
        assert all(counted[t]["name"] == "limited" for t in limited)
        worst = most_in_any_window(limited_times)
        print(f"\nprovider limit: {AGENTS} tasks, at most {worst} requests in any "
              f"{WINDOW:g} s window (limit {PER_WINDOW}); spread over "
              f"{max(limited_times) - min(limited_times):.1f} s")
        # Never passed; reached, or one short of it: whether the last slot of a window is
        # used is a matter of timing (a loaded machine's tick comes a little late).
        assert PER_WINDOW - 1 <= worst <= PER_WINDOW
        # Server side too: every limited request reached it once, none failed.
        assert len(server.of_model("limited")) == AGENTS
        # The free provider's tasks were never held by the limit, and all were counted
        # before the limited provider's last request.
        waited = {e["task"] for e in events if e["type"] == "task.waiting"
                  and e["data"].get("reason") == "rate_limit"}
        assert waited.isdisjoint(others) and len(waited) >= AGENTS - PER_WINDOW
        assert max(counted[t]["counted_at"] for t in others) < max(limited_times)
