"""The dashboard's series over time: machine resources and latency percentiles, each
kept to its last minutes whatever the poll rate. Pure, like the rest of its state."""

from __future__ import annotations

import math
from collections import deque

SERIES_POINTS = 600  # one point a second (a page open): the last ten minutes
SERIES_SECONDS = 600.0  # and no older, whatever the poll rate (idle: a point per 10 s)
LATENCY_WINDOW = 5  # polls whose histogram deltas make one latency point
MAX_LATENCY_SERIES = 64
STAGES = ("queue", "run", "total")


# -- resources over time -----------------------------------------------------------------

def keep_recent(points: deque, ts: float, seconds: float = SERIES_SECONDS) -> None:
    """Drop the points older than `seconds` before `ts` (oldest first), so a series is
    its last minutes at any poll rate, not `maxlen` polls (100 minutes when idle)."""
    while points and points[0]["ts"] < ts - seconds:
        points.popleft()


class Resources:
    """The suite's CPU (cores), memory (MB) and tokens per second, a point a poll."""

    def __init__(self, points: int = SERIES_POINTS):
        self.points: deque[dict] = deque(maxlen=points)
        self._tokens: tuple[float, float] | None = None  # ts, committed tokens

    def add(self, ts: float, cores: float, rss_mb: float, committed: float | None) -> dict:
        """Add a sample (committed: the global budget's running total); returns it."""
        tokens = 0.0
        if committed is not None:
            if self._tokens is not None and ts > self._tokens[0]:
                tokens = max(0.0, committed - self._tokens[1]) / (ts - self._tokens[0])
            self._tokens = (ts, committed)
        point = {"ts": ts, "cpu": round(cores, 3), "rss_mb": round(rss_mb, 1),
                 "tokens": round(tokens, 1), "committed": committed}
        self.points.append(point)
        keep_recent(self.points, ts)
        return point

    def view(self) -> list[dict]:
        return list(self.points)


# -- latency over time -------------------------------------------------------------------

def percentile(counts: dict[int, int], bounds: list[float], q: float) -> float | None:
    """The q-quantile of a histogram given as {bucket index: count}, bucket i holding
    bounds[i-1] < v <= bounds[i]; interpolated geometrically inside the bucket."""
    total = sum(counts.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for i in sorted(counts):
        n = counts[i]
        if seen + n >= rank:
            frac = (rank - seen) / n
            if i == 0:
                return bounds[0] * frac
            if i >= len(bounds):
                return bounds[-1]
            low, high = bounds[i - 1], bounds[i]
            return low * (high / low) ** frac
        seen += n
    return bounds[-1]


class Latency:
    """P50/P95/P99 per stage, per task type and priority and overall, over time.

    The event router's histograms are cumulative; each poll's difference from the
    previous one is what happened in between, and a point sums the last
    `LATENCY_WINDOW` differences, so the chart moves with the load rather than with
    the whole history."""

    def __init__(self, window: int = LATENCY_WINDOW, points: int = SERIES_POINTS):
        self.window = window
        self.points = points
        self.previous: dict[tuple, dict[str, dict[int, int]]] = {}
        self.deltas: deque[dict] = deque(maxlen=window)
        self.series: dict[str, deque] = {}
        self.summary: list[dict] = []

    def add(self, ts: float, reply: dict) -> dict | None:
        """Feed an `events.metrics` reply with buckets; returns the new point."""
        bounds = reply.get("bounds")
        rows = reply.get("buckets")
        if not isinstance(bounds, list) or not isinstance(rows, list):
            return None
        self.summary = [r for r in reply.get("latency") or [] if isinstance(r, dict)]
        delta: dict[tuple, dict[str, dict[int, int]]] = {}
        current: dict[tuple, dict[str, dict[int, int]]] = {}
        for row in rows:
            key = (row.get("type"), row.get("priority"))
            now_counts = {stage: {int(i): int(n) for i, n in row.get(stage) or []}
                          for stage in STAGES}
            current[key] = now_counts
            before = self.previous.get(key, {})
            delta[key] = {stage: {i: n - before.get(stage, {}).get(i, 0)
                                  for i, n in counts.items()
                                  if n > before.get(stage, {}).get(i, 0)}
                          for stage, counts in now_counts.items()}
        first = not self.previous
        self.previous = current
        if first:
            return None  # the first reply is the whole history, not a moment of it
        self.deltas.append(delta)
        point: dict = {"ts": ts, "series": {}}
        merged: dict[str, dict] = {}
        for key in {k for d in self.deltas for k in d}:
            label = f"{key[0]}/{key[1]}"
            sums = {stage: {} for stage in STAGES}
            for d in self.deltas:
                for stage, counts in d.get(key, {}).items():
                    for i, n in counts.items():
                        sums[stage][i] = sums[stage].get(i, 0) + n
                        merged.setdefault(stage, {})
                        merged[stage][i] = merged[stage].get(i, 0) + n
            point["series"][label] = self._stats(sums, bounds)
        point["series"]["all"] = self._stats(merged, bounds)
        for label, stats in point["series"].items():
            if label not in self.series and len(self.series) >= MAX_LATENCY_SERIES:
                continue
            series = self.series.setdefault(label, deque(maxlen=self.points))
            series.append({"ts": ts, **stats})
            keep_recent(series, ts)
        return point

    @staticmethod
    def _stats(sums: dict, bounds: list) -> dict:
        out = {}
        for stage in STAGES:
            counts = sums.get(stage) or {}
            out[stage] = {"n": sum(counts.values()), **{
                name: percentile(counts, bounds, q)
                for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}}
        return out

    def view(self) -> dict:
        return {"series": {k: list(v) for k, v in self.series.items()},
                "summary": self.summary}


# -- the whole board ---------------------------------------------------------------------
