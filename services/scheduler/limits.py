"""Provider limits as a feasibility dimension: a task that calls a model provider starts
only when the provider's requests and tokens per window, and its concurrent calls, allow
it (the sliding windows of ratelimit.py, one per `[providers.NAME]`).

Which tasks call a provider: an `llm` task (its payload's `provider`, else the only one
configured), and any task whose payload names a configured `provider` (an agent function
that calls `complete(ctx, ..., provider=...)` can take it as a parameter).

- `blocker()` at dispatch: None when the task fits (or calls no provider), else the
  waiting reason `rate_limit` with the limit that holds it, the seconds until it fits and
  when (`eta`). The task is held out of the queue until then (waiting.py), so the tasks
  of other providers, and other tasks of this one that fit, go ahead.
- `take()` counts the request the moment the task passes (before its tokens are
  reserved, so that tasks passing in the same turn are counted against each other).
- `release()` when the attempt ends: its slot frees and, with the tokens it used known,
  the rest of its reservation returns to the window; a task that never reached a worker
  is taken out again. Tasks held by the concurrency or token limit are looked at again
  at once; those held by the request count or a provider's pause wait their ETA, which
  is exact.
- `observe()` when an attempt ends: a 429 (a failure of category `rate_limited`, or a
  success that met 429s on the way: its result's `throttled`) shrinks the provider's
  allowance, and a failure's `retry_after` pauses the provider that long.

Every change goes to the scheduler's journal as `{"k": "rate", ...}` (the records of
ratelimit.py), and the windows are in its snapshot, so a restart keeps them.
"""

from __future__ import annotations

import math

from cortex.services.runtime.effects import Effects
from cortex.services.scheduler.clock import Now
from cortex.services.scheduler.ratelimit import RateLimits
from cortex.services.scheduler.tasks import Task
from cortex.services.scheduler.waiting import WaitingRoom

LLM = "llm"
RECHECK = 5.0  # seconds a task held by the concurrency limit waits at most between looks
NEVER_RECHECK = 60.0  # a task larger than a whole window (refused at admission since)
WOKEN_BY_RELEASE = frozenset({"concurrent", "tokens"})
MAX_RETRY_AFTER = 3600.0  # a provider's Retry-After beyond this is not believed


class ProviderLimits:
    def __init__(self, providers: dict | None, waiting: WaitingRoom):
        """`providers`: name -> settings.ProviderSettings (the `[providers]` section)."""
        self.providers = dict(providers or {})
        self.limits = RateLimits.from_settings(self.providers)
        self.waiting = waiting
        self.taken: dict[str, tuple[str, str]] = {}  # task id -> (provider, key)
        self.held: dict[str, dict[str, str]] = {}  # provider -> {task id: limit holding it}
        self.counted_at: dict[str, float] = {}  # task id -> when its request was counted

    # -- which provider ----------------------------------------------------------------------
    def provider_of(self, task) -> str | None:
        """The configured provider a task (or a submit request) calls, if any."""
        if not self.providers:
            return None
        payload = task.payload
        name = payload.get("provider") if isinstance(payload, dict) else None
        if isinstance(name, str):
            return name if name in self.providers else None
        if task.type == LLM and len(self.providers) == 1:
            return next(iter(self.providers))
        return None

    def refusal(self, request) -> tuple[str, str] | None:
        """(code, reason) when a submit could never fit its provider's window."""
        provider = self.provider_of(request)
        limit = self.providers[provider].tokens_per_window if provider else 0
        if limit and request.tokens > limit:
            return "rejected", (f"{request.tokens} tokens exceed provider {provider}'s "
                                f"{limit} tokens per {self.providers[provider].window:g} s")
        return None

    # -- dispatch ------------------------------------------------------------------------------
    def blocker(self, task: Task, now: float) -> tuple[str, dict] | None:
        """None if the task may call its provider now (`now`: wall clock), else
        ("rate_limit", detail)."""
        provider = self.provider_of(task)
        if provider is None or task.id in self.taken:
            return None  # no provider, or it holds its slot already (a reservation came back)
        verdict = self.limits.check(provider, task.tokens, now)
        waiting = self.held.setdefault(provider, {})
        if verdict is None:
            waiting.pop(task.id, None)
            return None
        waiting[task.id] = verdict.limit
        state = self.limits.status(now)[provider]
        wait = verdict.wait
        detail = {"check": verdict.limit, "provider": provider,
                  "wait_s": None if wait is None or math.isinf(wait) else round(wait, 3),
                  "eta": None if wait is None or math.isinf(wait) else now + wait,
                  "in_window": {"requests": state["requests"], "tokens": state["tokens"]},
                  "running": state["running"], "allowed": state["allowed"],
                  "factor": round(state["factor"], 4), "tokens": task.tokens}
        return "rate_limit", detail

    @staticmethod
    def retry_in(detail: dict) -> float:
        """Seconds until a held task is looked at again: when it fits, if that is known."""
        if detail.get("wait_s") is not None:
            return detail["wait_s"]
        return NEVER_RECHECK if detail.get("check") == "tokens" else RECHECK

    def take(self, fx: Effects, task: Task, now: float) -> None:
        """The task passed: count its request from now."""
        provider = self.provider_of(task)
        if provider is None or task.id in self.taken:
            return
        key = f"{task.id}/{task.attempt}"
        self.taken[task.id] = (provider, key)
        self.counted_at[task.id] = now
        self.held.get(provider, {}).pop(task.id, None)
        fx.records.append({"k": "rate", **self.limits.take(provider, key, task.tokens, now)})

    def release(self, fx: Effects, task: Task, now: Now, *, sent: bool,
                used: int | None = None) -> None:
        """The attempt is over (`sent`: it reached a worker; `used`: its tokens, None:
        unknown, keep the whole reservation counted) or never started (not `sent`)."""
        held = self.taken.pop(task.id, None)
        self.counted_at.pop(task.id, None)
        if held is None:
            return
        provider, key = held
        record = self.limits.give_back(provider, key, used, now.wall) if sent \
            else self.limits.untake(provider, key, now.wall)
        fx.records.append({"k": "rate", **record})
        waiting = self.held.get(provider, {})
        woken = [t for t, limit in waiting.items() if limit in WOKEN_BY_RELEASE]
        for task_id in woken:
            del waiting[task_id]
        self.waiting.retry_now(woken, now.mono)

    def counted(self, task: Task) -> dict:
        """For its task.dispatched event: the provider it calls and when its request was
        counted against the window (the moment the limit is judged by)."""
        if task.id not in self.taken:
            return {}
        return {"provider": {"name": self.taken[task.id][0],
                             "counted_at": self.counted_at.get(task.id)}}

    def forget(self, task: Task) -> None:
        """The task ended while held: it waits for no provider any more."""
        provider = self.provider_of(task)
        if provider is not None:
            self.held.get(provider, {}).pop(task.id, None)

    def observe(self, fx: Effects, task: Task, now: float) -> None:
        """An attempt ended: a 429 it met shrinks its provider's allowance."""
        provider = self.provider_of(task)
        if provider is None:
            return
        error, result = task.error or {}, task.result
        retry_after = None
        if error.get("category") == "rate_limited":
            value = error.get("retry_after")
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value) and 0 <= value <= MAX_RETRY_AFTER:
                retry_after = float(value)
        elif not (isinstance(result, dict) and isinstance(result.get("throttled"), int)
                  and result["throttled"] > 0 and result.get("provider") == provider):
            return
        fx.records.append({"k": "rate", **self.limits.throttled(provider, now, retry_after)})
        state = self.limits.status(now)[provider]
        fx.emit("provider.throttled", {"provider": provider, "retry_after": retry_after,
                                       "factor": state["factor"], "allowed": state["allowed"],
                                       "paused_for": round(state["paused_for"], 3)}, task.id)

    # -- recovery and status ---------------------------------------------------------------------
    def apply(self, record: dict) -> None:
        """Replay one `{"k": "rate"}` journal record."""
        self.limits.apply(record)
        key = str(record.get("key", ""))
        task_id = key.rsplit("/", 1)[0]
        if record["op"] == "take" and record["provider"] in self.limits.buckets:
            self.taken[task_id] = (record["provider"], key)
        elif record["op"] in ("give_back", "untake") and self.taken.get(task_id, (0, 0))[1] == key:
            del self.taken[task_id]

    def snapshot(self) -> dict:
        return self.limits.snapshot()

    def load_snapshot(self, data) -> None:
        self.limits.restore(data if isinstance(data, dict) else {})
        self.taken = {key.rsplit("/", 1)[0]: (name, key)
                      for name, bucket in self.limits.buckets.items() for key in bucket.running}

    def restored(self, fx: Effects, tasks: dict, now: Now) -> None:
        """After replay: a slot held for a task that ended (or was forgotten) is given back."""
        for task_id in list(self.taken):
            task = tasks.get(task_id)
            if task is None or task.final:
                provider, key = self.taken.pop(task_id)
                fx.records.append({"k": "rate", **self.limits.give_back(
                    provider, key, None if task is None else task.tokens_used, now.wall)})

    def status(self, now: float) -> dict:
        """Per provider: its window, what is allowed now, and how many tasks it holds."""
        out = self.limits.status(now)
        for name, row in out.items():
            row["waiting"] = len(self.held.get(name, {}))
        return out
