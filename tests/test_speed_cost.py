"""The scheduler's per-task shortcuts give the answers of the long way round."""

from __future__ import annotations

import random
from dataclasses import asdict, fields

from cortex.services.scheduler.prediction.predictor import Prediction
from cortex.services.scheduler.queue import TaskQueue
from cortex.services.scheduler.tasks import PRIORITIES, State, Task


def test_the_queue_is_empty_exactly_when_its_counts_are_all_zero():
    rng = random.Random(7)
    queue = TaskQueue(aging=None)
    tasks = []
    for step in range(2000):
        move = rng.random()
        if move < 0.45 or not tasks:
            task = Task(id=f"t{step}", type=rng.choice(("a", "b", "c")), description="",
                        priority=rng.choice(PRIORITIES), tokens=0, timeout=1.0, retries=0,
                        agent="a", key=f"k{step}", times={"created": float(step)})
            tasks.append(task)
            queue.push(task)
        elif move < 0.7:
            task = queue.pop_for([rng.choice(("a", "b", "c"))], float(step))
            if task is not None:
                task.state = State.DISPATCHED
        elif move < 0.85:
            queue.discard(rng.choice(tasks))
        else:  # left the queue behind its back (cancelled): dropped lazily
            rng.choice(tasks).state = State.CANCELLED
        counted = any(any(counts) for counts in queue.counts.values())
        assert queue.empty() is (not counted), step


def test_a_prediction_as_a_dict_is_all_its_fields():
    prediction = Prediction(1.5, 200.0, 64.0, 0.25, "model")
    assert prediction.as_dict() == asdict(prediction)
    assert set(prediction.as_dict()) == {f.name for f in fields(Prediction)}
