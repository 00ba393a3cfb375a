"""Tests for cortex.services.scheduler.queue: priority, deadline, age, aging, per-agent fairness,
re-queued tasks, lazy removal and the counters, with an injected clock; and a property
test of random push/pop/discard sequences against a model."""

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.services.scheduler.queue import TaskQueue
from cortex.services.scheduler.tasks import PRIORITIES, State, Task

_ids = itertools.count()


def make(priority="medium", agent="a", created=0.0, deadline=None, task_type="t"):
    return Task(id=f"t{next(_ids)}", type=task_type, description="", priority=priority,
                tokens=0, timeout=60, retries=0, agent=agent, key=f"k{next(_ids)}",
                deadline=deadline, times={"created": created}, waiting="worker")


class Clock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


def drain(queue, types=("t",)):
    out = []
    while (task := queue.pop_for(types)) is not None:
        task.waiting = "reserving"  # what the scheduler does with a popped task
        out.append(task)
    return out


def no_aging():
    return TaskQueue(aging=None, clock=Clock(0.0))


# -- priority, deadline, age ----------------------------------------------------------------
def test_strict_priority_whatever_the_push_order():
    q = no_aging()
    for i, p in enumerate(["low", "medium", "critical", "high", "low", "critical"]):
        q.push(make(p, created=float(i)))
    assert [t.priority for t in drain(q)] == ["critical", "critical", "high", "medium",
                                              "low", "low"]


def test_earliest_deadline_first_then_no_deadline_within_a_priority():
    q = no_aging()
    late, none, soon = make(deadline=500.0, created=1), make(created=0), make(deadline=100.0,
                                                                                created=2)
    for t in (late, none, soon):
        q.push(t)
    assert drain(q) == [soon, late, none]


def test_deadline_does_not_beat_priority():
    q = no_aging()
    low = make("low", deadline=1.0)
    high = make("high")
    q.push(low)
    q.push(high)
    assert drain(q) == [high, low]


def test_oldest_first_within_priority_and_deadline_whatever_the_push_order():
    q = no_aging()
    tasks = [make(created=c) for c in (5.0, 1.0, 3.0)]
    for t in tasks:
        q.push(t)
    assert [t.times["created"] for t in drain(q)] == [1.0, 3.0, 5.0]


def test_across_types_priority_then_deadline_then_age():
    q = no_aging()
    a = make(created=2, task_type="x")
    b = make(created=1, task_type="y")
    c = make("high", created=9, task_type="y")
    d = make(created=3, deadline=50.0, task_type="x")
    for t in (a, b, c, d):
        q.push(t)
    assert drain(q, ("x", "y")) == [c, d, b, a]
    assert q.pop_for(("z",)) is None


def test_pop_for_only_returns_the_types_asked_for():
    q = no_aging()
    x, y = make("critical", task_type="x"), make("low", task_type="y")
    q.push(x)
    q.push(y)
    assert q.pop_for(["y"]) is y
    assert q.pop_for(["y"]) is None
    assert q.pop_for(["x", "y"]) is x


# -- aging --------------------------------------------------------------------------------
def test_aging_lifts_a_waiting_low_task_one_level_per_interval():
    clock = Clock(0.0)
    q = TaskQueue(aging=30.0, clock=clock)
    low = make("low", created=0.0)
    q.push(low)
    clock.now = 29.0
    for i in range(3):
        q.push(make("medium", created=20.0 + i))
    assert q.pop_for(["t"]).priority == "medium"  # waited 29 s: still low
    clock.now = 30.0  # one interval: competes as medium, and it waited longest
    assert q.pop_for(["t"]) is low


def test_aging_reaches_high_after_two_intervals_under_a_steady_high_load():
    clock = Clock(0.0)
    q = TaskQueue(aging=10.0, clock=clock)
    low = make("low", created=0.0)
    q.push(low)
    popped = []
    for step in range(40):  # one high task arrives and one task leaves every second
        clock.now = float(step)
        q.push(make("high", created=clock.now))
        task = q.pop_for(["t"])
        task.waiting = "reserving"
        popped.append((clock.now, task))
    when = [now for now, task in popped if task is low]
    assert when == [20.0]  # high after 2 x 10 s; not before


def test_aging_never_lifts_above_high_critical_stays_first():
    clock = Clock(0.0)
    q = TaskQueue(aging=1.0, clock=clock)
    q.push(make("low", created=0.0))
    crit = make("critical", created=999.0)
    q.push(crit)
    clock.now = 1000.0
    assert q.pop_for(["t"]) is crit


def test_aging_keeps_fairness_within_the_level():
    """An agent's old flood, aged, must not jump another agent's newer tasks of the same
    priority: aging lifts the level, the level still goes round robin."""
    clock = Clock(0.0)
    q = TaskQueue(aging=10.0, clock=clock)
    for i in range(100):
        q.push(make("low", agent="A", created=i * 0.01))
    clock.now = 50.0
    b = [make("low", agent="B", created=50.0) for _ in range(5)]
    for t in b:
        q.push(t)
    firsts = drain(q)[:10]
    assert {t.id for t in b} <= {t.id for t in firsts}


def test_no_aging_when_disabled():
    clock = Clock(0.0)
    q = TaskQueue(aging=None, clock=clock)
    low = make("low", created=0.0)
    q.push(low)
    q.push(make("medium", created=1e6))
    clock.now = 1e7
    assert q.pop_for(["t"]).priority == "medium"


def test_pop_for_now_overrides_the_clock():
    q = TaskQueue(aging=10.0, clock=Clock(0.0))
    low = make("low", created=0.0)
    q.push(low)
    q.push(make("medium", created=5.0))
    assert q.pop_for(["t"], now=10.0) is low


# -- per-agent fairness ----------------------------------------------------------------------
def test_flooding_agent_does_not_delay_another_agents_tasks_beyond_a_fair_share():
    q = no_aging()
    for i in range(1000):
        q.push(make(agent="A", created=i * 0.001))
    bs = [make(agent="B", created=2.0 + i) for i in range(10)]
    for t in bs:
        q.push(t)
    first = [q.pop_for(["t"]) for _ in range(20)]
    assert {t.id for t in bs} <= {t.id for t in first}
    assert [t.agent for t in first] == ["A", "B"] * 10


def test_round_robin_between_three_agents():
    q = no_aging()
    for agent in "ABC":
        for i in range(3):
            q.push(make(agent=agent, created=float(i)))
    assert "".join(t.agent for t in drain(q)) == "ABCABCABC"


def test_late_agent_joins_the_current_round():
    q = no_aging()
    for i in range(10):
        q.push(make(agent="A", created=float(i)))
    for _ in range(5):
        q.pop_for(["t"])
    c = make(agent="C", created=100.0)
    q.push(c)
    assert q.pop_for(["t"]) is c  # A was served this round; C's turn comes first


def test_agent_that_empties_and_returns_gets_no_second_turn_in_a_round():
    q = no_aging()
    a1 = make(agent="A", created=0.0)
    b1, b2 = make(agent="B", created=1.0), make(agent="B", created=2.0)
    for t in (a1, b1, b2):
        q.push(t)
    assert q.pop_for(["t"]) is a1  # A empties
    a2 = make(agent="A", created=0.5)
    q.push(a2)
    assert q.pop_for(["t"]) is b1  # B's turn in this round, though a2 is older
    assert q.pop_for(["t"]) is a2


def test_within_a_round_earliest_deadline_agent_first():
    q = no_aging()
    a = make(agent="A", created=0.0)
    b = make(agent="B", created=5.0, deadline=100.0)
    q.push(a)
    q.push(b)
    assert drain(q) == [b, a]


# -- re-queued tasks -------------------------------------------------------------------------
def test_front_push_goes_before_others_of_its_agent_and_level():
    q = no_aging()
    others = [make(agent="A", created=float(i)) for i in range(3)]
    b = make(agent="B", created=0.5)
    for t in (*others, b):
        q.push(t)
    retried = make(agent="A", created=50.0)
    q.push(retried, front=True)
    assert q.pop_for(["t"]) is retried
    assert q.pop_for(["t"]) is others[0]


def test_front_push_does_not_beat_a_higher_priority():
    q = no_aging()
    high = make("high")
    q.push(high)
    retried = make("low")
    q.push(retried, front=True)
    assert drain(q) == [high, retried]


def test_popped_task_pushed_back_front_comes_out_again():
    q = no_aging()
    t1, t2 = make(created=0), make(created=1)
    q.push(t1)
    q.push(t2)
    got = q.pop_for(["t"])
    assert got is t1
    got.waiting = "reserving"
    got.waiting = "worker"  # token wait over
    q.push(got, front=True)
    assert q.depth("t") == 2
    assert drain(q) == [t1, t2]


# -- lazy removal and counters ---------------------------------------------------------------
def test_cancelled_and_moved_entries_are_skipped():
    q = no_aging()
    cancelled, moved, kept = make(created=0), make(created=1), make(created=2)
    for t in (cancelled, moved, kept):
        q.push(t)
    cancelled.state = State.CANCELLED
    q.discard(cancelled)
    moved.state = State.DISPATCHED  # moved on without a discard
    assert q.pop_for(["t"]) is kept
    assert q.pop_for(["t"]) is None
    assert q.depth("t") == 0


def test_age_counts_from_the_since_it_was_pushed_with_not_its_wall_time():
    """The scheduler pushes with its monotonic clock: a task's wall `created` (here a
    day in the future, as after a wall clock jump) plays no part in its order or aging."""
    q = TaskQueue(aging=10.0)
    jumped = make("low", created=86_400.0)
    plain = make("medium", created=0.0)
    q.push(jumped, since=100.0)
    q.push(plain, since=105.0)
    assert q.pop_for(["t"], now=109.0) is plain  # low waited 9 s: still low
    q.push(plain, since=105.0)
    assert q.pop_for(["t"], now=110.0) is jumped  # 10 s: competes as medium, and older


def test_pop_needs_a_time_when_no_clock_was_injected():
    q = TaskQueue(aging=10.0)
    q.push(make(created=0.0))
    with pytest.raises(ValueError):
        q.pop_for(["t"])


def test_counts_through_push_pop_discard():
    q = no_aging()
    tasks = [make(p, created=float(i), task_type=ty) for i, (p, ty) in enumerate(
        [("high", "x"), ("low", "x"), ("low", "x"), ("critical", "y"), ("medium", "x")])]
    for t in tasks:
        q.push(t)
    assert q.depth("x") == 4 and q.depth("y") == 1 and q.depth("nope") == 0
    assert q.by_priority() == {"critical": 1, "high": 1, "medium": 1, "low": 2}
    assert q.counts["x"] == [0, 1, 1, 2]
    assert q.ahead_of(tasks[4]) == 2  # high + medium (itself) of type x
    assert q.ahead_of(make("low", task_type="x")) == 4
    tasks[1].state = State.CANCELLED
    q.discard(tasks[1])
    q.discard(tasks[1])  # twice: nothing more to account for
    assert q.counts["x"] == [0, 1, 1, 1]
    assert q.pop_for(["x"]) is tasks[0]
    assert q.counts["x"] == [0, 0, 1, 1]
    assert q.by_priority() == {"critical": 1, "high": 0, "medium": 1, "low": 1}
    assert q.pop_for(["y"]) is tasks[3]
    assert q.depth("y") == 0


def test_push_of_a_task_already_queued_moves_it():
    q = no_aging()
    a, b = make(created=0), make(created=1)
    q.push(a)
    q.push(b)
    q.push(b, front=True)
    assert q.depth("t") == 2
    assert drain(q) == [b, a]


def test_heaps_are_compacted_after_many_discards():
    q = no_aging()
    keep = make(created=-1.0)
    q.push(keep)  # the head stays, so lazy entries behind it pile up until compaction
    for i in range(5000):
        t = make(agent=f"ag{i % 50}", created=float(i))
        q.push(t)
        t.state = State.CANCELLED
        q.discard(t)
    level = q.levels["t"][2]
    slots = len(level.turns) + len(level.ages) + sum(len(a.heap) for a in level.agents.values())
    assert slots < 500
    assert q.depth("t") == 1
    assert drain(q) == [keep]


# -- property: random sequences against a model ---------------------------------------------
op = st.one_of(
    st.tuples(st.just("push"), st.sampled_from(PRIORITIES), st.sampled_from("xy"),
              st.sampled_from("ABC"), st.one_of(st.none(), st.floats(0, 100)),
              st.booleans()),
    st.tuples(st.just("pop"), st.sampled_from([("x",), ("y",), ("x", "y")])),
    st.tuples(st.just("cancel"), st.integers(0, 10_000)),
    st.tuples(st.just("requeue"), st.integers(0, 10_000)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=120), st.booleans())
def test_random_sequences_match_a_model(ops, aging):
    clock = Clock(0.0)
    q = TaskQueue(aging=5.0 if aging else None, clock=clock)
    queued: list[Task] = []  # the model: what should be in the queue
    popped: list[Task] = []  # popped, not yet pushed back
    for n, step in enumerate(ops):
        clock.now = float(n)
        if step[0] == "push":
            _, priority, task_type, agent, deadline, front = step
            t = make(priority, agent, created=clock.now, deadline=deadline,
                     task_type=task_type)
            q.push(t, front=front)
            queued.append(t)
        elif step[0] == "pop":
            types = step[1]
            got = q.pop_for(types)
            candidates = [t for t in queued if t.type in types]
            if not candidates:
                assert got is None
                continue
            assert any(t is got for t in candidates)
            assert got.state is State.QUEUED and got.waiting == "worker"
            if not aging:
                best = min(PRIORITIES.index(t.priority) for t in candidates)
                assert PRIORITIES.index(got.priority) == best
            elif any(t.priority == "critical" for t in candidates):
                assert got.priority == "critical"
            queued[:] = [t for t in queued if t is not got]
            got.waiting = "reserving"
            popped.append(got)
        elif step[0] == "cancel" and queued:
            t = queued.pop(step[1] % len(queued))
            t.state = State.CANCELLED
            q.discard(t)
        elif step[0] == "requeue" and popped:
            t = popped.pop(step[1] % len(popped))
            t.waiting = "worker"
            q.push(t, front=True)
            queued.append(t)
        for task_type in "xy":
            model = [sum(1 for t in queued if t.type == task_type and t.priority == p)
                     for p in PRIORITIES]
            assert q.counts.get(task_type, [0] * 4) == model
        assert q.by_priority() == {p: sum(1 for t in queued if t.priority == p)
                                   for p in PRIORITIES}
    rest = drain(q, ("x", "y"))
    assert sorted(t.id for t in rest) == sorted(t.id for t in queued)


@given(st.lists(st.tuples(st.sampled_from("ABCDE"), st.floats(0, 100),
                          st.one_of(st.none(), st.floats(0, 100))), min_size=1, max_size=80))
def test_fairness_agents_never_drift_more_than_one_turn_apart(pushes):
    """One level, everything queued first: while two agents both have tasks left, neither
    is served more than one task ahead of the other."""
    q = no_aging()
    left: dict[str, int] = {}
    for agent, created, deadline in pushes:
        q.push(make(agent=agent, created=created, deadline=deadline))
        left[agent] = left.get(agent, 0) + 1
    served = dict.fromkeys(left, 0)
    for task in drain(q):
        served[task.agent] += 1
        left[task.agent] -= 1
        waiting = [a for a in left if left[a] > 0]
        for a in waiting:
            assert served[task.agent] <= served[a] + 1
    assert not any(left.values())
