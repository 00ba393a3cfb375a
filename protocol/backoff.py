"""The one retry delay of Cortex: exponential, capped, with jitter.

Used wherever something is tried again (a client re-sending to a restarting service, a
task's retry, a worker restarted after a crash, a database reconnect), so a crowd of
peers that failed together does not retry together.
"""

from __future__ import annotations

import random


def delay(attempt: int, base: float, cap: float, jitter: float = 0.2,
          rng: random.Random | None = None) -> float:
    """Seconds to wait before try number `attempt` + 1 (attempt 1 waits about `base`):
    base x 2^(attempt-1), at most `cap`, spread by +-`jitter` (a fraction), never
    below zero."""
    if attempt < 1 or base < 0 or cap < 0 or not 0 <= jitter < 1:
        raise ValueError("attempt >= 1, base and cap >= 0, 0 <= jitter < 1")
    exact = min(cap, base * 2 ** min(attempt - 1, 62))
    spread = (rng or random).uniform(1 - jitter, 1 + jitter) if jitter else 1.0
    return max(0.0, exact * spread)


class Backoff:
    """Successive delays for one thing being retried; `reset()` after a success."""

    def __init__(self, base: float, cap: float, jitter: float = 0.2):
        self.base, self.cap, self.jitter = base, cap, jitter
        self.attempt = 0

    def next(self) -> float:
        self.attempt += 1
        return delay(self.attempt, self.base, self.cap, self.jitter)

    def reset(self) -> None:
        self.attempt = 0
