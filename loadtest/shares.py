"""The mixed scenario's two extra shares, when the suite is the load test's own:

- `llm`: tasks of the `llm` handler against the OpenAI-compatible server
  (openai_server.py, started by the load test on 127.0.0.1), through a provider limited
  to LLM_LIMIT requests per LLM_WINDOW seconds and LLM_CONCURRENT calls at once. Reported:
  how many completed, how many waited `rate_limit`, the most requests the scheduler let
  through in any window (from the `task.dispatched` events: when each was counted)
  against the limit, and what the server saw.
- `auto`: tasks of type `auto`, described in plain words (routing_data.py's held-out
  descriptions), whose type the scheduler chooses with a router trained from the other
  descriptions (the `[routing] examples` file written here). Reported: routing accuracy
  (the type they ran as against the one they were written for), fallbacks and refusals.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import orjson

from . import harness
from .agents import Job
from .routing_data import TYPES, labelled_descriptions, split

LLM_SHARE = 0.08
AUTO_SHARE = 0.10
PROVIDER = "loadtest"
LLM_LIMIT = 5  # requests per window: below the share's rate, so the limit binds
LLM_WINDOW = 2.0  # seconds
LLM_CONCURRENT = 4
LLM_WORKERS = 4
ROUTING_ROWS, ROUTING_TRAIN, ROUTING_SEED = 600, 500, 7
ROUTER_WAIT_S = 120.0
EXAMPLES_FILE = "routing-examples.jsonl"


def suite_config(home: Path, base_url: str) -> tuple[dict, str]:
    """(handlers, further sections) of the load test's own suite for both shares; writes
    the examples the router is trained from into the home."""
    train, _ = split(labelled_descriptions(ROUTING_ROWS, ROUTING_SEED), ROUTING_TRAIN)
    (home / EXAMPLES_FILE).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in train))
    handlers = {t: "cortex.services.pool.handlers:echo" for t in TYPES}
    sections = (f'[routing]\nexamples = "{EXAMPLES_FILE}"\nmin_confidence = 0.5\n'
                f"[pool.groups.llm]\ncount = {LLM_WORKERS}\ntypes = [\"llm\"]\n"
                f'[providers.{PROVIDER}]\nbase_url = "{base_url}"\nmodel = "lt;n=20"\n'
                f"requests_per_window = {LLM_LIMIT}\nwindow = {LLM_WINDOW}\n"
                f"concurrent = {LLM_CONCURRENT}\n")
    return handlers, sections


def jobs(tasks: int, rng: random.Random, kinds: set[str]) -> list[Job]:
    """The llm and auto jobs for a mixed run of `tasks` (none the suite cannot run)."""
    out = []
    if "llm" in kinds:
        for i in range(max(1, round(tasks * LLM_SHARE))):
            out.append(Job("llm", f"answer question {i} in a few words", tokens=300,
                           payload={"provider": PROVIDER,
                                    "model": f"lt;n={rng.randint(5, 40)};delay=0.002"},
                           retries=0, tag="llm"))
    if set(TYPES) <= kinds:
        _, held_out = split(labelled_descriptions(ROUTING_ROWS, ROUTING_SEED), ROUTING_TRAIN)
        for i in range(max(1, round(tasks * AUTO_SHARE))):
            row = held_out[i % len(held_out)]
            out.append(Job("auto", row["description"], retries=0, tag=f"auto:{row['type']}"))
    return out


def wait_for_router(client, timeout: float = ROUTER_WAIT_S) -> dict:
    """Until the scheduler's router is trained (from the examples, at its start)."""
    deadline = time.monotonic() + timeout
    routing: dict = {}
    while time.monotonic() < deadline:
        routing = (client.call("scheduler", "model.status", timeout=10) or {}).get(
            "routing") or {}
        if routing.get("trained"):
            break
        time.sleep(0.5)  # polling the scheduler's state with a deadline
    return routing


def report(records: list[dict], home: Path, offsets: dict, server=None,
           router: dict | None = None) -> dict:
    """The shares' figures: provider limits (llm) and routing accuracy (auto)."""
    out: dict = {}
    llm = [r for r in records if r["tag"] == "llm"]
    if llm:
        out["llm"] = _llm_figures(llm, home, offsets, server)
    auto = [r for r in records if r["tag"].startswith("auto:")]
    if auto:
        ran = [r for r in auto if r.get("ran_as")]
        right = sum(1 for r in ran if r["ran_as"] == r["tag"].split(":", 1)[1])
        outcomes: dict[str, int] = {}
        for r in auto:
            outcome = (r.get("routing") or {}).get("outcome") or (
                "refused" if r["code"] == "rejected" else r["code"] or "unknown")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        held = (router or {}).get("held_out") or {}
        out["routing"] = {"tasks": len(auto), "routed": len(ran),
                          "accuracy": round(right / len(auto), 4),
                          "accuracy_of_routed": round(right / len(ran), 4) if ran else None,
                          "outcomes": outcomes, "router_held_out_accuracy": held.get("accuracy"),
                          "router_rows": (router or {}).get("rows"),
                          "route_ms": (router or {}).get("route_ms")}
    return out


def _llm_figures(llm: list[dict], home: Path, offsets: dict, server) -> dict:
    ids = {r["id"] for r in llm if r["id"]}
    counted, waited = [], set()
    for line in harness.new_event_lines(home, offsets):
        if b'"task.dispatched"' not in line and b'"rate_limit"' not in line:
            continue
        event = harness.parse_event(line)
        if event is None or event.get("task") not in ids:
            continue
        data = event.get("data") or {}
        if event.get("type") == "task.dispatched" and isinstance(data.get("provider"), dict):
            counted.append(data["provider"].get("counted_at"))
        elif event.get("type") == "task.waiting" and data.get("reason") == "rate_limit":
            waited.add(event["task"])
    times = sorted(t for t in counted if isinstance(t, int | float))
    most = max((sum(1 for s in times[:i + 1] if s > t - LLM_WINDOW)
                for i, t in enumerate(times)), default=0)
    done = [r for r in llm if r["state"] == "completed"]
    e2e = [(r["t_seen"] - r["t_submit"]) * 1000 for r in done if r["t_seen"]]
    figures = {"tasks": len(llm), "completed": len(done),
               "limit": {"requests_per_window": LLM_LIMIT, "window_s": LLM_WINDOW,
                         "concurrent": LLM_CONCURRENT},
               "requests_counted": len(times), "max_in_any_window": most,
               "within_limit": most <= LLM_LIMIT, "waited_rate_limit": len(waited),
               "span_s": round(times[-1] - times[0], 3) if times else None,
               "tokens_used": sum(r["tokens_used"] or 0 for r in done),
               "end_to_end_ms": harness.summarize(e2e)}
    if server is not None:
        with server.lock:
            seen = [r for r in server.requests if str(r["body"].get("model", "")).startswith(
                "lt;")]
        figures["server_requests"] = len(seen)
    return figures
