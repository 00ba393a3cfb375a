"""Synthetic agent work with a known shape: what the mixed scenario runs and what the
predictor's tests train on. Each task's resource use is a known function of its type and
description words (plus noise), so prediction accuracy can be measured against truth."""

from __future__ import annotations

import random

TARGETS = ("duration", "tokens", "memory_mb", "cpu_s")

# Per type: base duration (s), tokens, memory growth (MB), cpu (cores while it runs).
SYNTHETIC_TYPES = {
    "research": (40.0, 6000.0, 400.0, 0.30),
    "codegen": (25.0, 4000.0, 600.0, 0.60),
    "review": (12.0, 2500.0, 250.0, 0.25),
    "chat": (3.0, 800.0, 120.0, 0.10),
    "etl": (60.0, 300.0, 1500.0, 0.90),
    "embed": (6.0, 1200.0, 800.0, 0.70),
}
# Per keyword: multipliers for duration, tokens.
SYNTHETIC_KEYWORDS = {
    "summarize": (1.5, 1.8),
    "refactor": (2.0, 1.5),
    "translate": (1.3, 2.2),
    "analyze": (1.7, 1.4),
    "list": (0.7, 0.6),
}
_FILLER = (  # topic words; never a keyword
    "the", "quarterly", "report", "for", "customer", "data", "pipeline", "module", "tests",
    "api", "docs", "logs", "service", "billing", "search", "index", "dashboard", "metrics",
    "config", "schema", "release", "notes", "backend", "frontend", "user", "feedback",
    "ticket", "incident", "security", "audit", "cache", "queue",
)
_PRIORITY_WEIGHTS = (("critical", 0.05), ("high", 0.2), ("medium", 0.5), ("low", 0.25))


def synthetic_truth(task_type: str, description: str) -> dict[str, float]:
    """Noise-free resource use of a synthetic task (a known function of type and text).

    Duration and tokens scale with the base of the type, a multiplier per keyword present
    (``SYNTHETIC_KEYWORDS``) and the description's word count; memory grows slowly with
    the word count; CPU seconds are the duration times the type's cores, 1.2x when
    refactoring (capped at 1 core).
    """
    base_d, base_t, base_m, base_c = SYNTHETIC_TYPES.get(task_type, (10.0, 1000.0, 200.0, 0.5))
    words = description.lower().split()
    dur_mult = tok_mult = 1.0
    for w in set(words):
        if w in SYNTHETIC_KEYWORDS:
            dur_mult *= SYNTHETIC_KEYWORDS[w][0]
            tok_mult *= SYNTHETIC_KEYWORDS[w][1]
    n = len(words)
    duration = base_d * dur_mult * (1 + n / 20)
    return {
        "duration": duration,
        "tokens": base_t * tok_mult * (1 + n / 15),
        "memory_mb": base_m * (1 + n / 100),
        "cpu_s": duration * min(1.0, base_c * (1.2 if "refactor" in words else 1.0)),
    }


def synthetic_workload(n: int, seed: int = 0, noise: float = 0.10) -> list[dict]:
    """``n`` synthetic completed tasks: training-row dicts whose target values are
    ``synthetic_truth`` times independent uniform noise in ``[1 - noise, 1 + noise]``
    (deterministic for a seed)."""
    rng = random.Random(seed)
    types = sorted(SYNTHETIC_TYPES)
    keywords = [*sorted(SYNTHETIC_KEYWORDS), None]
    priorities, weights = zip(*_PRIORITY_WEIGHTS, strict=True)
    rows = []
    for _ in range(n):
        task_type = rng.choice(types)
        keyword = rng.choice(keywords)
        filler = [rng.choice(_FILLER) for _ in range(rng.randint(3, 40))]
        description = " ".join([keyword, *filler] if keyword else filler)
        truth = synthetic_truth(task_type, description)
        row = {"type": task_type, "priority": rng.choices(priorities, weights)[0],
               "description": description,
               "payload_size": int(2 ** rng.uniform(6, 20))}
        for t in TARGETS:
            row[t] = truth[t] * rng.uniform(1 - noise, 1 + noise)
        rows.append(row)
    return rows
