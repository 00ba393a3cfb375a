"""The scheduler's two clocks, read by the process and passed in (no state module reads one).

- `wall`: unix time, for what people read (a task's `times`, its ETA), for the deadlines
  clients give, and for task ids.
- `mono`: monotonic seconds, for every duration: timeouts, silence, ETAs, admission,
  retry backoff, the dispatch grace, aging. A wall clock set a day ahead or back changes
  no decision.

A live task's moments on the monotonic clock (`Marks`) are kept beside its wall `times`,
in memory only: they mean nothing to another boot, so after a restart they start at the
recovery.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Now:
    wall: float  # unix time
    mono: float  # monotonic seconds

    def __add__(self, seconds: float) -> Now:
        """Both clocks `seconds` later (time passing, as tests simulate it)."""
        return Now(self.wall + seconds, self.mono + seconds)


@dataclass(slots=True)
class Marks:
    """A live task's moments on the monotonic clock."""

    created: float  # submitted (or recovered): its age in the queue counts from here
    dispatched: float | None = None  # its current attempt was sent to a worker
    heard: float | None = None  # its worker last said it runs it (started, heartbeat)
    recovered: bool = False  # in flight at a restart: `dispatched` is the recovery

    def queued_for(self) -> float | None:
        """Seconds from submission to the current attempt's dispatch, when both are known."""
        if self.dispatched is None or self.recovered:
            return None
        return max(0.0, self.dispatched - self.created)
