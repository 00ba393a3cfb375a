"""Provider limits: requests and tokens per window, and concurrent requests, per provider.

Pure state with an injected clock (`now`, in seconds: wall-clock time when the state is
journaled, so it means the same after a restart). Each provider's limits come from its
`[providers.NAME]` settings (0: no limit on that dimension).

Requests and tokens are counted over a sliding window, a log of what was taken in the
last `window` seconds, rather than a refilling bucket: a bucket that starts full lets
through up to twice its rate in one window, a sliding window never more than the limit
in any `window` seconds, which is what providers enforce.

    limits = RateLimits({"openai": Limits(requests=500, tokens=200_000, concurrent=8)})
    wait = limits.fits("openai", 1200, now)      # None: go; else seconds to wait
    limits.take("openai", "task-id/1", 1200, now)
    limits.give_back("openai", "task-id/1", 900, now)  # 300 unused tokens come back
    limits.throttled("openai", now, retry_after=2.0)   # the provider said 429

A 429 shrinks the provider's allowance (halves it, never below 1/16 of it and one
request) and pauses it for the provider's Retry-After; each window without another 429
gives back a quarter of the limit (additive increase, multiplicative decrease, as TCP
does). A dimension with no configured limit learns one from a 429: what went through
in the window before it, shrunk the same way, and forgotten once fully recovered.

Every change is a method call whose arguments are its journal record: `take`,
`give_back`, `untake` and `throttled` return that record, and `apply(record)` replays it,
so a journal replayed over a `snapshot()` rebuilds the same state.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

SHRINK = 0.5  # a 429 multiplies the allowance by this
FLOOR = 1 / 16  # the allowance never shrinks below this share of the limit
RECOVER = 0.25  # share of the limit given back per window without a 429
EPSILON = 1e-6  # added to waits so that a wait, once waited, is enough despite rounding


@dataclass(frozen=True)
class Limits:
    requests: int = 0  # per window; 0: no limit
    tokens: int = 0  # per window; 0: no limit
    concurrent: int = 0  # requests in flight at once; 0: no limit
    window: float = 60.0  # seconds

    def __post_init__(self):
        for name in ("requests", "tokens", "concurrent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if not (isinstance(self.window, int | float) and math.isfinite(self.window)
                and self.window > 0):
            raise ValueError(f"window must be a positive number of seconds, got {self.window!r}")

    @classmethod
    def from_settings(cls, provider) -> Limits:
        """From a `[providers.NAME]` section (settings.ProviderSettings)."""
        return cls(provider.requests_per_window, provider.tokens_per_window,
                   provider.concurrent, float(provider.window))


@dataclass(frozen=True)
class Verdict:
    """Why a request does not fit yet. `wait` is in seconds; None when only a running
    request giving back its slot can make room; math.inf when it never will (it asks
    for more tokens than a whole window allows: refuse it at admission)."""
    limit: str  # "paused" | "requests" | "tokens" | "concurrent"
    wait: float | None


@dataclass
class _Entry:
    at: float
    key: str
    tokens: int


@dataclass
class ProviderBucket:
    limits: Limits
    entries: deque = field(default_factory=deque)  # _Entry per request, oldest first
    by_key: dict = field(default_factory=dict)  # key -> _Entry still in the window
    token_sum: int = 0  # tokens of the entries in the window
    running: dict = field(default_factory=dict)  # key -> tokens taken, until given back
    factor: float = 1.0  # share of the limits allowed now (1: all)
    changed: float = 0.0  # when `factor` last moved: recovery counts windows from here
    learned: dict = field(default_factory=dict)  # "requests"/"tokens" -> limit from a 429
    paused_until: float = 0.0
    last: float = -math.inf  # latest time seen: entries stay in time order

    # -- the clock ---------------------------------------------------------------------
    def _advance(self, now: float) -> float:
        now = max(now, self.last)  # a clock stepping back never reorders the log
        self.last = now
        window = self.limits.window
        while self.entries and self.entries[0].at + window <= now:
            old = self.entries.popleft()
            self.token_sum -= old.tokens
            if self.by_key.get(old.key) is old:
                del self.by_key[old.key]
        if self.factor < 1.0:
            steps = int((now - self.changed) // window)
            if steps > 0:
                self.factor = min(1.0, self.factor + RECOVER * steps)
                self.changed += steps * window
                if self.factor >= 1.0:
                    self.learned.clear()
        return now

    def _factor_at(self, moment: float) -> float:
        """The allowance share at `moment`, counting the recovery steps until then."""
        if self.factor >= 1.0:
            return 1.0
        steps = max(0, int((moment - self.changed) // self.limits.window))
        return min(1.0, self.factor + RECOVER * steps)

    def _allowed(self, dimension: str, factor: float) -> float:
        """The limit in force at `factor` (math.inf: none): a learned limit ends once
        fully recovered, a configured one stays."""
        configured = getattr(self.limits, dimension)
        base = configured or self.learned.get(dimension, 0)
        if not base or (factor >= 1.0 and not configured):
            return math.inf
        return base if factor >= 1.0 else max(1, math.floor(base * factor))

    # -- the verdict ----------------------------------------------------------------------
    def check(self, tokens: int, now: float) -> Verdict | None:
        now = self._advance(now)
        if self.limits.tokens and tokens > self.limits.tokens:
            return Verdict("tokens", math.inf)
        blocked = []
        if self.paused_until > now:
            blocked.append(Verdict("paused", self.paused_until - now + EPSILON))
        for dimension, demand, used in (("requests", 1, len(self.entries)),
                                        ("tokens", tokens, self.token_sum)):
            if used + demand > self._allowed(dimension, self.factor):
                blocked.append(Verdict(dimension, self._wait(dimension, demand, now)))
        if blocked:
            return max(blocked, key=lambda v: v.wait)
        if self.limits.concurrent and len(self.running) >= self.limits.concurrent:
            return Verdict("concurrent", None)
        return None

    def _wait(self, dimension: str, demand: int, now: float) -> float:
        """Seconds until `demand` more fits in `dimension` if nothing else is taken: the
        first moment, among entries leaving the window and recovery steps, when it does."""
        window = self.limits.window
        sizes = [1 if dimension == "requests" else e.tokens for e in self.entries]
        expiries = [e.at + window for e in self.entries]  # oldest first, as the log
        moments = {now, *expiries}
        if self.factor < 1.0:
            steps = math.ceil((1.0 - self.factor) / RECOVER)
            moments.update(self.changed + k * window for k in range(1, steps + 1))
        used, gone = sum(sizes), 0
        for moment in sorted(m for m in moments if m >= now):
            while gone < len(expiries) and expiries[gone] <= moment:
                used -= sizes[gone]
                gone += 1
            if used + demand <= self._allowed(dimension, self._factor_at(moment)):
                return moment - now + EPSILON
        return math.inf

    # -- changes ------------------------------------------------------------------------
    def take(self, key: str, tokens: int, now: float) -> None:
        now = self._advance(now)
        if key in self.running:
            return  # the same request again (a replayed record): taken once
        entry = _Entry(now, key, tokens)
        self.entries.append(entry)
        self.by_key[key] = entry
        self.token_sum += tokens
        self.running[key] = tokens

    def give_back(self, key: str, used: int | None, now: float) -> None:
        self._advance(now)
        if self.running.pop(key, None) is None:
            return
        entry = self.by_key.get(key)
        if entry is not None and used is not None:
            # What was not used returns to the window; an overrun counts in full.
            self.token_sum += used - entry.tokens
            entry.tokens = used

    def untake(self, key: str, now: float) -> None:
        """A request taken but never sent: it leaves the window and frees its slot."""
        self._advance(now)
        self.running.pop(key, None)
        entry = self.by_key.pop(key, None)
        if entry is not None:
            self.entries.remove(entry)  # rare (a refused reservation, a cancel): O(n) is fine
            self.token_sum -= entry.tokens

    def throttled(self, now: float, retry_after: float | None) -> None:
        now = self._advance(now)
        observed = {"requests": len(self.entries), "tokens": self.token_sum}
        for dimension in ("requests", "tokens"):
            if not getattr(self.limits, dimension) and dimension not in self.learned \
                    and observed[dimension] > 0:
                self.learned[dimension] = observed[dimension]  # what went through
        self.factor = max(FLOOR, self.factor * SHRINK)
        self.changed = now
        if retry_after:
            self.paused_until = max(self.paused_until, now + retry_after)

    # -- snapshots ----------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"entries": [[e.at, e.key, e.tokens] for e in self.entries],
                "running": dict(self.running), "factor": self.factor, "changed": self.changed,
                "learned": dict(self.learned), "paused_until": self.paused_until,
                "last": self.last if math.isfinite(self.last) else None}

    @classmethod
    def restore(cls, limits: Limits, data: dict) -> ProviderBucket:
        bucket = cls(limits)
        for at, key, tokens in data.get("entries", []):
            entry = _Entry(float(at), str(key), int(tokens))
            bucket.entries.append(entry)
            bucket.by_key[entry.key] = entry
            bucket.token_sum += entry.tokens
        bucket.running = {str(k): int(v) for k, v in data.get("running", {}).items()}
        bucket.factor = min(1.0, max(FLOOR, float(data.get("factor", 1.0))))
        bucket.changed = float(data.get("changed", 0.0))
        bucket.learned = {k: int(v) for k, v in data.get("learned", {}).items()
                          if k in ("requests", "tokens") and int(v) > 0}
        bucket.paused_until = float(data.get("paused_until", 0.0))
        last = data.get("last")
        bucket.last = float(last) if last is not None else -math.inf
        return bucket


def _tokens(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"tokens must be a whole number >= 0, got {value!r}")
    return value


class RateLimits:
    """The limits of every configured provider; a provider with none is never held."""

    def __init__(self, limits: dict[str, Limits] | None = None):
        self.buckets: dict[str, ProviderBucket] = {}
        self.configure(limits or {})

    def configure(self, limits: dict[str, Limits]) -> None:
        """Adopt new settings; a provider still configured keeps what it has taken."""
        buckets = {}
        for name, lim in limits.items():
            old = self.buckets.get(name)
            buckets[name] = ProviderBucket.restore(lim, old.snapshot()) if old else \
                ProviderBucket(lim)
        self.buckets = buckets

    @classmethod
    def from_settings(cls, providers: dict) -> RateLimits:
        return cls({name: Limits.from_settings(p) for name, p in providers.items()})

    def check(self, provider: str, tokens: int, now: float) -> Verdict | None:
        """None if a request of `tokens` may start now; else why not and how long."""
        bucket = self.buckets.get(provider)
        return None if bucket is None else bucket.check(_tokens(tokens), now)

    def fits(self, provider: str, tokens: int, now: float) -> float | None:
        """None: it fits now. Else the seconds to wait (math.inf: never; 0.0 when only the
        concurrency limit holds it: it fits when a running request gives back its slot)."""
        verdict = self.check(provider, tokens, now)
        if verdict is None:
            return None
        return 0.0 if verdict.wait is None else verdict.wait

    def take(self, provider: str, key: str, tokens: int, now: float) -> dict:
        """Count a request of `tokens` starting now, under `key` (e.g. task id/attempt)."""
        bucket = self.buckets.get(provider)
        if bucket is not None:
            bucket.take(str(key), _tokens(tokens), now)
        return {"op": "take", "provider": provider, "key": key, "tokens": tokens, "now": now}

    def give_back(self, provider: str, key: str, used: int | None, now: float) -> dict:
        """A request ended: its concurrency slot frees and, with `used` known, the tokens
        it did not use return to the window (None: keep the whole reservation counted)."""
        bucket = self.buckets.get(provider)
        if bucket is not None:
            bucket.give_back(str(key), None if used is None else _tokens(used), now)
        return {"op": "give_back", "provider": provider, "key": key, "used": used, "now": now}

    def untake(self, provider: str, key: str, now: float) -> dict:
        """A request taken under `key` was never sent (its task did not start after all):
        as if it had never been taken."""
        bucket = self.buckets.get(provider)
        if bucket is not None:
            bucket.untake(str(key), now)
        return {"op": "untake", "provider": provider, "key": key, "now": now}

    def throttled(self, provider: str, now: float, retry_after: float | None = None) -> dict:
        """The provider answered 429: shrink its allowance, pause it for `retry_after`."""
        if retry_after is not None and not (isinstance(retry_after, int | float)
                                            and math.isfinite(retry_after) and retry_after >= 0):
            raise ValueError(f"retry_after must be seconds >= 0, got {retry_after!r}")
        bucket = self.buckets.get(provider)
        if bucket is not None:
            bucket.throttled(now, retry_after)
        return {"op": "throttled", "provider": provider, "retry_after": retry_after, "now": now}

    def apply(self, record: dict) -> None:
        """Replay a record returned by take / give_back / untake / throttled."""
        op = record.get("op")
        if op == "take":
            self.take(record["provider"], record["key"], record["tokens"], record["now"])
        elif op == "give_back":
            self.give_back(record["provider"], record["key"], record["used"], record["now"])
        elif op == "untake":
            self.untake(record["provider"], record["key"], record["now"])
        elif op == "throttled":
            self.throttled(record["provider"], record["now"], record.get("retry_after"))
        else:
            raise ValueError(f"not a rate-limit record: {record!r}")

    def status(self, now: float) -> dict:
        """Per provider: what the window holds and what is allowed now (for status views)."""
        out = {}
        for name, bucket in self.buckets.items():
            bucket._advance(now)
            allowed = {d: bucket._allowed(d, bucket.factor) for d in ("requests", "tokens")}
            out[name] = {"requests": len(bucket.entries), "tokens": bucket.token_sum,
                         "running": len(bucket.running), "factor": bucket.factor,
                         "allowed": {d: (None if math.isinf(v) else v)
                                     for d, v in allowed.items()},
                         "paused_for": max(0.0, bucket.paused_until - now)}
        return out

    def snapshot(self) -> dict:
        return {name: bucket.snapshot() for name, bucket in self.buckets.items()}

    def restore(self, data: dict) -> None:
        """Load a snapshot over the configured providers (others in it are dropped)."""
        for name, state in (data or {}).items():
            bucket = self.buckets.get(name)
            if bucket is not None and isinstance(state, dict):
                self.buckets[name] = ProviderBucket.restore(bucket.limits, state)
