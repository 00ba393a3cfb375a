"""The ETA at submit in closed form gives what the simulation gives (pure)."""

import random

import pytest

from cortex.services.scheduler.eta import start_after
from cortex.services.scheduler.feasibility import estimate_start


@pytest.mark.parametrize("seed", range(100))
def test_start_after_matches_the_simulation(seed):
    rng = random.Random(seed)
    workers = rng.randint(1, 30)
    duration = rng.choice([0.0, 0.001, 0.05, 1.0, rng.uniform(0, 5)])
    spread = rng.choice([0.0, duration / 2, duration, duration * 3, 10.0])
    free_at = [0.0 if rng.random() < 0.3 else rng.uniform(0, spread) for _ in range(workers)]
    for ahead in (0, 1, workers - 1, workers, workers + 1, rng.randint(0, 500),
                  rng.randint(0, 5000)):
        expected = estimate_start(0.0, ahead, duration, workers, free_at)
        assert start_after(free_at, ahead, duration) == pytest.approx(expected, abs=1e-9)


def test_round_by_round_when_workers_free_up_together():
    # Three workers free at 0, 0.1 and 0.2 s, tasks of 1 s: the 8th task ahead is in
    # round 2 (two full rounds of three), on the worker free at 0.2 s.
    assert start_after([0.2, 0.0, 0.1], 8, 1.0) == pytest.approx(2.2)
    assert start_after([0.0], 0, 1.0) == 0.0


def test_a_long_task_beside_short_ones():
    # One worker busy for 10 s, two free now, tasks of 1 s: the first 20 tasks ahead go
    # to the two free workers (10 rounds), then all three take turns.
    free_at = [10.0, 0.0, 0.0]
    assert start_after(free_at, 3, 1.0) == pytest.approx(1.0)
    assert start_after(free_at, 19, 1.0) == pytest.approx(9.0)
    assert start_after(free_at, 20, 1.0) == pytest.approx(10.0)
    assert start_after(free_at, 23, 1.0) == pytest.approx(11.0)
    assert start_after(free_at, 3000, 1.0) == pytest.approx(
        estimate_start(0.0, 3000, 1.0, 3, free_at))
