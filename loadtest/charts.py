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
    (completions/s, queue depth, waiting reasons), and the sweep's curves. Returns the
    files."""
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
        files.append(_timeline(plt, out, name, records, series.get("timeline") or [],
                               series.get("waiting") or []))
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


def _buckets(times, start: float, width: float, count: int) -> list[int]:
    """How many of `times` fall in each of `count` buckets from `start`; empty ones are 0."""
    out = [0] * count
    for t in times:
        i = int((t - start) / width)
        if 0 <= i < count:
            out[i] += 1
    return out


def _timeline(plt, out, name, records, timeline, waiting=()):
    """Results per second (every bucket drawn, empty ones as zero, so a stall shows), the
    queue depth, and below on the same time axis why tasks waited (task.waiting events per
    second, by reason)."""
    seen = sorted(r["t_seen"] for r in records if r["t_seen"])
    if not seen:
        return None
    start = min(r["t_submit"] for r in records if r["t_submit"])
    span = max(seen[-1] - start, 1e-3)
    width = max(0.05, span / 120)
    count = int(span / width) + 1
    xs = [i * width for i in range(count)]
    fig, (ax, low) = plt.subplots(2, 1, figsize=(9, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.4]})
    rate = [n / width for n in _buckets(seen, start, width, count)]
    ax.step(xs, rate, where="post", color="tab:blue", label="results seen / s")
    ax.set_ylabel("tasks / s", color="tab:blue")
    ax.set_ylim(bottom=0)
    q = [(row["t"] - start, row["queue"]) for row in timeline if row.get("queue") is not None]
    if q:
        ax2 = ax.twinx()
        ax2.plot([a for a, _ in q], [b for _, b in q], color="tab:red", label="queued tasks")
        ax2.set_ylabel("queued tasks", color="tab:red")
        ax2.set_ylim(bottom=0)
    ax.set_title(f"{name}: throughput, queue depth and waiting reasons over time")
    ax.grid(True, alpha=0.3)
    reasons = sorted({reason for _, reason in waiting})
    bottom = [0.0] * count
    for reason in reasons:
        per_s = [n / width for n in _buckets([t for t, r in waiting if r == reason], start,
                                             width, count)]
        low.bar(xs, per_s, width=width, bottom=bottom, align="edge", label=reason)
        bottom = [a + b for a, b in zip(bottom, per_s, strict=True)]
    if reasons:
        low.legend(loc="upper right", fontsize="small", title="waiting for")
    else:
        low.text(0.5, 0.5, "no task.waiting event (cpu, memory, tokens)",
                 transform=low.transAxes, ha="center", va="center", color="gray")
    low.set_ylabel("waits / s")
    low.set_xlabel("seconds since the first submit")
    low.grid(True, alpha=0.3)
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
