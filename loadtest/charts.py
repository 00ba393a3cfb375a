"""PNG charts (optional extra "plot": matplotlib, imported only here, only when asked)."""

from __future__ import annotations

from pathlib import Path


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw(out: Path, run: dict) -> list[str]:
    """Charts from one run's raw series: per scenario a latency CDF and a timeline
    (completions/s and queue depth), and the sweep's curves. Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, result in run["scenarios"].items():
        series = result.get("_series") or {}
        if name == "sweep":
            files.append(_sweep(plt, out, result))
            continue
        records = series.get("records") or []
        if not records:
            continue
        files.append(_cdf(plt, out, name, records))
        files.append(_timeline(plt, out, name, records, series.get("timeline") or []))
    return [f for f in files if f]


def _cdf(plt, out, name, records):
    curves = {
        "submit (call -> ack)": [(r["t_ack"] - r["t_submit"]) * 1000 for r in records
                                 if r["t_ack"] and r["id"]],
        "coordination (submit -> start)": [(r["started"] - r["t_submit"]) * 1000
                                           for r in records if r["started"]],
        "end to end (submit -> result seen)": [(r["t_seen"] - r["t_submit"]) * 1000
                                               for r in records if r["t_seen"]],
    }
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, xs in curves.items():
        xs = sorted(x for x in xs if x > 0)
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log)")
    ax.set_ylabel("fraction of tasks")
    ax.set_title(f"{name}: latency distribution (CDF)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = out / f"{name}-latency.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def _timeline(plt, out, name, records, timeline):
    seen = sorted(r["t_seen"] for r in records if r["t_seen"])
    if not seen:
        return None
    start = min(r["t_submit"] for r in records if r["t_submit"])
    width = max(0.1, (seen[-1] - start) / 60)
    buckets: dict[int, int] = {}
    for t in seen:
        buckets[int((t - start) / width)] = buckets.get(int((t - start) / width), 0) + 1
    xs = [b * width for b in sorted(buckets)]
    ys = [buckets[b] / width for b in sorted(buckets)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, ys, color="tab:blue", label="results seen / s")
    ax.set_xlabel("seconds since the first submit")
    ax.set_ylabel("tasks / s", color="tab:blue")
    q = [(row["t"] - start, row["queue"]) for row in timeline if row.get("queue") is not None]
    if q:
        ax2 = ax.twinx()
        ax2.plot([a for a, _ in q], [b for _, b in q], color="tab:red", label="queue depth")
        ax2.set_ylabel("queued tasks", color="tab:red")
    ax.set_title(f"{name}: throughput and queue depth over time")
    ax.grid(True, alpha=0.3)
    path = out / f"{name}-timeline.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def _sweep(plt, out, result):
    points = result.get("points") or []
    if not points:
        return None
    agents = [p["agents"] for p in points]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    a1.plot(agents, [p["throughput"] for p in points], marker="o")
    a1.set_xlabel("agents")
    a1.set_ylabel("tasks / s")
    a1.set_title("throughput vs agents")
    for key, label in (("p50", "coord P50"), ("p95", "coord P95"), ("p99", "coord P99")):
        a2.plot(agents, [p["coordination_ms"][key] for p in points], marker="o", label=label)
    a2.plot(agents, [p["end_to_end_ms"]["p99"] for p in points], marker="x", linestyle="--",
            label="e2e P99")
    a2.set_xlabel("agents")
    a2.set_ylabel("ms")
    a2.set_yscale("log")
    a2.set_title("latency vs agents")
    a2.legend()
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    path = out / "sweep.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
