"""The report: medians over runs, targets from docs/targets.md, report.json and report.md."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import psutil

SCHEMA = "cortex.loadtest/1"

# (scenario, key path, op, threshold, unit, what, peers from docs/targets.md)
TARGETS = [
    ("latency", "latency_ms.coordination.p50", "<=", 0.6, "ms",
     "submit -> handler start P50, one agent, durable",
     "Celery 1.05, Ray 0.87, Dramatiq 1.3, bare broker 0.10"),
    ("latency", "latency_ms.coordination.p99", "<=", 5.0, "ms",
     "submit -> handler start P99, one agent, durable", ""),
    ("rate", "latency_ms.coordination.p99", "<=", 10.0, "ms",
     "submit -> handler start P99 at the offered rate", ""),
    ("noop", "throughput", ">=", 5000.0, "tasks/s", "no-op throughput, closed loop",
     "Celery 800, Dramatiq 2150, Ray 1600, RQ 670, bare broker 11000"),
    ("noop", "latency_ms.coordination.p99", "<=", 50.0, "ms",
     "submit -> handler start P99 at saturation", "peers 90-160, bare broker 23"),
    ("onetype", "noop_phase.throughput", ">=", 5000.0, "tasks/s",
     "no-op throughput, one type after 0.1 s sleeps", "Dramatiq 2067 (same workload)"),
    ("onetype", "waiting.tasks", "==", 0, "", "tasks held for cpu, memory or tokens", ""),
    ("noop", "events.per_s", ">=", 10000.0, "events/s",
     "events into JSONL (at the load reached)", ""),
    ("utilization", "utilization.overall", ">=", 0.97, "",
     "worker utilisation, sleep tasks", "Celery/Dramatiq 0.92, Ray 0.96, bare 0.99"),
    ("priority", "priority.critical_wait_ms.p95", "<=", 20.0, "ms",
     "critical wait P95 under a low-priority flood", "Celery 22, Dramatiq 56, Ray 1800"),
    ("mixed", "completion_rate", ">", 0.90, "", "task completion (incl. intended failures)",
     ""),
    ("mixed", "tokens.error_pct", "abs<=", 1.0, "%", "token accounting error", ""),
    ("mixed", "prediction.duration_within_25pct", ">=", 0.80, "",
     "model-predicted durations within ±25 % (measurement phase)", ""),
    ("mixed", "prediction.tokens_within_25pct", ">=", 0.80, "",
     "model-predicted tokens within ±25 % (measurement phase)", ""),
    ("mixed", "routing.accuracy", ">=", 0.945, "",
     "auto tasks run as the type they were written for", "the replaced router 0.945"),
    ("mixed", "llm.max_in_any_window", "<=", 5, "requests",
     "llm requests let through in any 2 s window (provider limit 5)", ""),
    ("events", "events.per_s", ">=", 10000.0, "events/s",
     "events sustained into JSONL (and PostgreSQL when configured), acknowledged", ""),
    ("*", "tasks.lost", "==", 0, "", "tasks lost", ""),
    ("*", "tasks.duplicated", "==", 0, "", "tasks completed twice", ""),
    ("*", "zombies", "==", 0, "", "zombies", ""),
    ("*", "tokens.over_allocated_samples", "==", 0, "", "ledger over-allocated (samples)", ""),
    ("*", "events.missing", "==", 0, "", "events received but not in JSONL", ""),
    ("*", "resources.suite_peak_rss_mb", "<", 600.0, "MB", "whole suite RSS (sum)",
     "Celery 975, Dramatiq 690, Ray 2300, bare 440"),
]
IDLE_TARGET = 0.01  # fraction of one core


def get(tree, path: str):
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def met(value, op: str, threshold) -> bool | None:
    if value is None:
        return None
    if op == ">=":
        return value >= threshold
    if op == ">":
        return value > threshold
    if op == "<=":
        return value <= threshold
    if op == "<":
        return value < threshold
    if op == "==":
        return value == threshold
    if op == "abs<=":
        return abs(value) <= threshold
    raise ValueError(op)


def median_tree(items: list):
    """Element-wise median of results of the same shape (numbers: median; dicts and lists:
    recursively; anything else: the first run's value)."""
    items = [i for i in items if i is not None]
    if not items:
        return None
    first = items[0]
    if all(isinstance(i, int | float) and not isinstance(i, bool) for i in items):
        m = statistics.median(items)
        return round(m, 5) if isinstance(m, float) else m
    if isinstance(first, dict):
        keys = [k for k in first if not k.startswith("_")]
        return {k: median_tree([i.get(k) for i in items if isinstance(i, dict)]) for k in keys}
    if isinstance(first, list) and all(isinstance(i, list) and len(i) == len(first)
                                       for i in items) and first and isinstance(first[0], dict):
        return [median_tree([i[n] for i in items]) for n in range(len(first))]
    return first


def strip(tree):
    if isinstance(tree, dict):
        return {k: strip(v) for k, v in tree.items() if not k.startswith("_")}
    if isinstance(tree, list):
        return [strip(v) for v in tree]
    return tree


def evaluate(scenarios: dict, idle: dict | None) -> list[dict]:
    rows = []
    for scen, path, op, threshold, unit, what, peers in TARGETS:
        names = [scen] if scen != "*" else [n for n in scenarios if n != "sweep"]
        for name in names:
            if name not in scenarios:
                continue
            value = get(scenarios[name], path)
            if value is None:
                continue
            rows.append({"scenario": name, "metric": path, "what": what, "op": op,
                         "target": threshold, "unit": unit, "value": value,
                         "met": met(value, op, threshold), "peers": peers})
    if "sweep" in scenarios:
        for key in ("tasks.lost", "tasks.duplicated", "zombies"):
            value = get(scenarios["sweep"], key)
            if value is not None:
                rows.append({"scenario": "sweep", "metric": key, "what": key, "op": "==",
                             "target": 0, "unit": "", "value": value, "met": value == 0,
                             "peers": ""})
    if idle:
        value = get(idle, "after.fraction_of_core")
        rows.append({"scenario": "idle", "metric": "idle_cpu.after.fraction_of_core",
                     "what": "suite CPU with nothing to do (fraction of one core)",
                     "op": "<", "target": IDLE_TARGET, "unit": "", "value": value,
                     "met": met(value, "<", IDLE_TARGET), "peers": ""})
    return rows


def build(args, runs: list[dict], notes: list[str]) -> dict:
    names = list(runs[0]["scenarios"]) if runs else []
    scenarios = {n: median_tree([r["scenarios"][n] for r in runs]) for n in names}
    idle = median_tree([r["idle_cpu"] for r in runs])
    return {
        "schema": SCHEMA,
        "created": __import__("time").time(),
        "host": {"cpus": psutil.cpu_count(), "memory_mb": round(
            psutil.virtual_memory().total / 2**20), "python": platform.python_version(),
            "platform": platform.platform()},
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "runs": len(runs),
        "scenarios": scenarios,
        "idle_cpu": idle,
        "targets": evaluate(scenarios, idle),
        "dashboard_page": median_tree([r["dashboard_page"] for r in runs])
        if runs and all(r.get("dashboard_page") for r in runs) else None,
        "per_run": [strip(r) for r in runs],
        "leftovers": [r.get("leftovers", []) for r in runs],
        "notes": notes,
    }


def _fmt(v, digits=2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.4f}"
    return str(v)


def _lat_table(lat: dict) -> list[str]:
    out = ["| latency (ms) | count | P50 | P95 | P99 | max |", "|---|---|---|---|---|---|"]
    for key in ("submit", "coordination", "coordination_idle", "queue_wait", "end_to_end"):
        s = lat.get(key) or {}
        out.append(f"| {key} | {s.get('count', 0)} | {_fmt(s.get('p50'))} | "
                   f"{_fmt(s.get('p95'))} | {_fmt(s.get('p99'))} | {_fmt(s.get('max'))} |")
    return out


def markdown(report: dict, charts: list[str]) -> str:
    r = report
    lines = [f"# Cortex load test ({r['runs']} run{'s' if r['runs'] != 1 else ''}, "
             "medians)", "",
             f"Host: {r['host']['cpus']} CPUs, {r['host']['memory_mb']} MB, Python "
             f"{r['host']['python']}. Config: agents {r['config'].get('agents')}, workers "
             f"{r['config'].get('workers')}, tasks {r['config'].get('tasks')}, fsync "
             f"{r['config'].get('fsync')}, seed {r['config'].get('seed')}.", ""]
    by_scen: dict[str, list] = {}
    for t in r["targets"]:
        by_scen.setdefault(t["scenario"], []).append(t)
    met_n = sum(1 for t in r["targets"] if t["met"])
    lines += [f"**Targets met: {met_n} of {len(r['targets'])}.**", ""]
    page = r.get("dashboard_page")
    if page:
        lines += [f"A headless page of the dashboard (`{page.get('page')}`) was open during "
                  f"every scenario: browser CPU {_fmt(page.get('browser_cpu_s'))} s; events "
                  f"on screen after P50 {_fmt(get(page, 'event_to_screen_s.p50'), 3)} s, "
                  f"P95 {_fmt(get(page, 'event_to_screen_s.p95'), 3)} s.", ""]
    for name, s in r["scenarios"].items():
        lines += [f"## {name}", ""]
        if name != "sweep":
            tasks = s.get("tasks", {})
            lines += [f"{s.get('agents')} agents ({s.get('agent_processes')} agent processes), "
                      f"{s.get('workers')} workers; wall {_fmt(s.get('wall_s'))} s; "
                      f"throughput **{_fmt(s.get('throughput'))} tasks/s**; completion "
                      f"{_fmt(s.get('completion_rate'), 4)}; utilisation "
                      f"{_fmt(get(s, 'utilization.overall'), 3)} (steady "
                      f"{_fmt(get(s, 'utilization.steady'), 3)}).", "",
                      "Tasks: " + ", ".join(f"{k} {v}" for k, v in tasks.items()), "",
                      *_lat_table(s.get("latency_ms", {})), ""]
            if s.get("failures"):
                lines += ["Failures by category: " + ", ".join(
                    f"{k} {v}" for k, v in s["failures"].items()), ""]
            if s.get("rejections"):
                lines += ["Submit errors: " + ", ".join(
                    f"{k} {v}" for k, v in s["rejections"].items()), ""]
            ev, tok, res = s.get("events", {}), s.get("tokens", {}), s.get("resources", {})
            lines += [f"Events: received {ev.get('received')}, JSONL lines "
                      f"{ev.get('jsonl_lines')} ({_fmt(ev.get('per_s'))}/s), missing "
                      f"{ev.get('missing')}, gaps {ev.get('gaps')}. Tokens: reported "
                      f"{tok.get('reported')}, ledger committed {tok.get('ledger_committed')}"
                      f", error {_fmt(tok.get('error_pct'))} %. Zombies {s.get('zombies')} "
                      f"(transient {s.get('zombies_transient')}).", "",
                      "CPU s: " + ", ".join(f"{k} {_fmt(v)}" for k, v in
                                            (res.get("cpu_s") or {}).items())
                      + f"; harness {_fmt(res.get('harness_cpu_s'))}. Peak RSS MB: "
                      + ", ".join(f"{k} {_fmt(v)}" for k, v in
                                  (res.get("peak_rss_mb") or {}).items())
                      + f", workers (sum) {_fmt(res.get('workers_peak_rss_mb'))}, suite "
                        f"{_fmt(res.get('suite_peak_rss_mb'))}.", ""]
            if res.get("cpu_ms_per_task"):
                lines += ["CPU ms per task: " + ", ".join(
                    f"{k} {_fmt(v)}" for k, v in res["cpu_ms_per_task"].items()) + ".", ""]
            board_cpu = (res.get("cpu_s") or {}).get("dashboard")
            if board_cpu is not None and s.get("wall_s"):
                lines += [f"Dashboard CPU: {_fmt(board_cpu)} s over the run "
                          f"({_fmt(100 * board_cpu / s['wall_s'], 1)} % of one core).", ""]
            viewer = s.get("dashboard")
            if viewer:
                lines += [f"noop throughput without a dashboard page open "
                          f"**{_fmt(viewer.get('throughput_without_page'))} tasks/s**, with a "
                          f"headless `{viewer.get('page')}` page open "
                          f"**{_fmt(viewer.get('throughput_with_page'))} tasks/s**; dashboard "
                          f"CPU {_fmt(viewer.get('dashboard_cpu_s_without_page'))} s / "
                          f"{_fmt(viewer.get('dashboard_cpu_s_with_page'))} s, browser CPU "
                          f"{_fmt(viewer.get('browser_cpu_s'))} s; events on screen after "
                          f"P50 {_fmt(get(viewer, 'event_to_screen_s.p50'), 3)} s, P95 "
                          f"{_fmt(get(viewer, 'event_to_screen_s.p95'), 3)} s.", ""]
            waiting = s.get("waiting") or {}
            lines += [f"Tasks that waited: {waiting.get('tasks', 0)}" + "".join(
                f"; {reason} {row['tasks']} ({row['events']} waiting events)"
                for reason, row in (waiting.get("by_reason") or {}).items()) + ".", ""]
            for key in ("priority", "rate", "chaos", "phases", "model_training",
                        "prediction", "prediction_training_phase", "noop_phase", "llm",
                        "routing"):
                if s.get(key):
                    lines += [f"{key}: `{json.dumps(s[key])}`", ""]
        else:
            lines += ["| agents | procs | tasks | tasks/s | coord P50 | coord P95 | coord P99 "
                      "| e2e P99 | submit P99 | lost | dup |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for p in s.get("points", []):
                c, e, sm = p["coordination_ms"], p["end_to_end_ms"], p["submit_ms"]
                lines.append(f"| {p['agents']} | {p['agent_processes']} | {p['tasks']} | "
                             f"{_fmt(p['throughput'])} | {_fmt(c['p50'])} | {_fmt(c['p95'])} | "
                             f"{_fmt(c['p99'])} | {_fmt(e['p99'])} | {_fmt(sm['p99'])} | "
                             f"{p['lost']} | {p['duplicated']} |")
            lines.append("")
        rows = by_scen.get(name, [])
        if rows:
            lines += ["| target | metric | value | target | met | peers (docs/targets.md) |",
                      "|---|---|---|---|---|---|"]
            for t in rows:
                mark = "met" if t["met"] else ("not met" if t["met"] is False else "n/a")
                lines.append(f"| {t['what']} | `{t['metric']}` | {_fmt(t['value'])} "
                             f"{t['unit']} | {t['op']} {t['target']} {t['unit']} | **{mark}** "
                             f"| {t['peers']} |")
            lines.append("")
    idle = r.get("idle_cpu") or {}
    lines += ["## idle", "",
              f"Suite CPU over {get(idle, 'before.seconds')} s quiet: before the load "
              f"{_fmt(get(idle, 'before.fraction_of_core'), 4)}, after it "
              f"{_fmt(get(idle, 'after.fraction_of_core'), 4)} of one core (target < "
              f"{IDLE_TARGET}).{_models_waited(idle.get('after') or {})}", ""]
    for t in by_scen.get("idle", []):
        lines += [f"Idle target: **{'met' if t['met'] else 'not met'}**.", ""]
    if any(r.get("leftovers") or []):
        lines += [f"Leftover processes after stop: {r['leftovers']}", ""]
    if charts:
        lines += ["## charts", ""] + [f"![{Path(c).stem}]({Path(c).name})" for c in charts] + [""]
    for note in r.get("notes", []):
        lines += [f"> {note}", ""]
    return "\n".join(lines)


def _models_waited(after: dict) -> str:
    """What the probe after the load waited for first, said beside its figure."""
    waited = after.get("models_s") or 0
    if after.get("models_busy"):
        return f" A model training was still running after {_fmt(waited, 1)} s: it is in it."
    if waited >= 1:
        return (f" It began once the model training the load made due had ended "
                f"({_fmt(waited, 1)} s after the load).")
    return ""


def write(out: Path, report: dict, charts: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report, charts))
