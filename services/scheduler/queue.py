"""The dispatch order of queued tasks: priority, deadline, age, aging and per-agent fairness.

Pure: no sockets, no threads, no clock of its own: `pop_for` takes the caller's `now`
(or reads an injected clock). A task's age counts from the `since` it was pushed with,
on the caller's clock (the scheduler's monotonic one; by default `times["created"]`).

The order, for the tasks of one type (`pop_for` takes the best over the types it is given):

1. **Priority**, critical > high > medium > low, with **aging**: a level (type, priority)
   whose longest-waiting task has waited k x `aging` seconds competes as k levels higher,
   never above high (critical stays reserved for critical tasks: aged work never delays
   them). With the default 30 s, a low task waiting 30 s competes as medium, 60 s as high.
   A task's wait counts from its `since`, so a retry keeps its age. Aging is
   evaluated at each pop, with `now`, from the oldest entry of each level (a heap on
   created time), and it promotes the *level*, not the single task: the level's tasks
   still leave in fair order (3.), so aging cannot undo fairness (one agent's old flood
   would otherwise jump another agent's newer tasks of the same priority). The level
   stays promoted while its oldest task waits, and every agent in it is served once a
   round, so the oldest task's agent gets a turn within one round.
   Two levels at the same effective priority: a level holding aged work (its oldest task
   waited >= `aging`) goes first, the longest-waiting first, so a promoted level is not
   starved by a steady load native to that priority; otherwise by the deadline, then the
   age, of each level's next task.
2. **Re-queued tasks** (`push(task, front=True)`: retries, a worker refused it, its token
   wait is over) go before every other task of their level, among themselves by deadline
   then age (the queue they left already chose them once).
3. **Per-agent fairness** within a level: agents (`task.agent`) take turns in rounds, one
   task per agent per round, like start-time fair queuing with unit costs. An agent that
   starts queuing joins the current round; one that empties and comes back cannot take a
   second turn in a round it was already served in. Within a round, agents go by their
   next task's deadline, then its age; within an agent, by deadline (None = no deadline,
   after every deadline), then age (`since`). So 1,000 tasks of agent A delay
   agent B's 10 tasks of the same priority by at most one A task each.

Cost: push and pop are O(log n) (heaps per agent, per level of agents' turns, per level of
ages), amortised for the lazy removal; `pop_for` looks at 4 levels per type.

Lazy removal: `discard()` accounts for a task leaving other than by pop, and an entry
whose task is no longer `queued` when it comes up is skipped (and dropped from `counts`);
`discard()` of a task not in the queue does nothing. Pushing a task that is already
queued moves it instead of queuing it twice. Heaps are compacted when dead entries
outnumber live ones.
"""

from __future__ import annotations

from collections.abc import Callable
from heapq import heapify, heappop, heappush

from cortex.services.scheduler.tasks import PRIORITIES, PRIORITY_RANK, State, Task

INF = float("inf")
HIGH = PRIORITY_RANK["high"]  # aging never lifts a level above this one
COMPACT_SLACK = 64  # dead heap entries tolerated beyond the live ones before compacting


def _rank_key(contender: tuple) -> tuple:
    return contender[:2]


class _Entry:
    """One push of one task; dead once popped, discarded, skipped or pushed again. Keeps
    where it was counted, so the counts stay right whatever happens to the task."""

    __slots__ = ("task", "seq", "live", "level", "counts", "rank", "since")

    def __init__(self, task: Task, seq: int, level: _Level, counts: list[int], rank: int,
                 since: float):
        self.task, self.seq, self.live = task, seq, True
        self.level, self.counts, self.rank, self.since = level, counts, rank, since


class _Agent:
    __slots__ = ("heap", "round")

    def __init__(self, round_: int):
        self.heap: list = []  # (deadline, since, seq, entry)
        self.round = round_  # the round in which this agent's next task leaves


class _Level:
    """The queued tasks of one type and one priority."""

    __slots__ = ("front", "agents", "turns", "ages", "idle", "idle_limit", "round", "live",
                 "churn")

    def __init__(self):
        self.front: list = []  # (deadline, since, seq, entry): re-queued tasks
        self.agents: dict[str, _Agent] = {}  # agents with entries in their heap
        # (round, deadline, since, seq, agent): one turn per agent with entries; stale
        # turns (agent moved on to another round or head) are dropped when they surface.
        self.turns: list = []
        self.ages: list = []  # (since, seq, entry): the level's oldest task, for aging
        self.idle: dict[str, int] = {}  # emptied agent -> its next round
        self.idle_limit = 256
        self.round = 0  # the round of the last task taken by turn
        self.live = 0
        self.churn = 0  # pops and discards since the last look at the garbage


class TaskQueue:
    """Queued tasks per type in dispatch order (module docstring); lazy removal."""

    def __init__(self, aging: float | None = 30.0, clock: Callable[[], float] | None = None):
        """`aging`: seconds of waiting per priority level gained (None or <= 0: no aging).
        `clock`: what `pop_for` reads when not given `now` (on the time base of `since`)."""
        self.aging = aging if aging and aging > 0 else None
        self.clock = clock
        self.levels: dict[str, list[_Level]] = {}
        self.counts: dict[str, list[int]] = {}
        self._entries: dict[str, _Entry] = {}  # task id -> its live entry
        self._seq = 0

    # -- the interface ---------------------------------------------------------------------
    def push(self, task: Task, front: bool = False, since: float | None = None) -> None:
        """Queue a task (`front`: a re-queued one). `since`: when it started waiting, on
        the clock of `pop_for`'s `now` (default: `times["created"]`)."""
        old = self._entries.get(task.id)
        if old is not None:
            self._drop(old)  # queued already: move it rather than queue it twice
        levels = self.levels.get(task.type)
        if levels is None:
            levels = self.levels[task.type] = [_Level() for _ in PRIORITIES]
            self.counts[task.type] = [0] * len(PRIORITIES)
        rank = PRIORITY_RANK[task.priority]
        level = levels[rank]
        self._seq += 1
        created = task.times["created"] if since is None else since
        entry = _Entry(task, self._seq, level, self.counts[task.type], rank, created)
        self._entries[task.id] = entry
        entry.counts[rank] += 1
        level.live += 1
        deadline = INF if task.deadline is None else task.deadline
        item = (deadline, created, entry.seq, entry)
        if self.aging is not None and rank > 0:
            heappush(level.ages, (created, entry.seq, entry))
        if front:
            heappush(level.front, item)
            return
        agent = level.agents.get(task.agent)
        if agent is None:
            agent = level.agents[task.agent] = _Agent(
                max(level.idle.pop(task.agent, level.round), level.round))
        if not agent.heap or item < agent.heap[0]:
            heappush(level.turns, (agent.round, deadline, created, entry.seq, task.agent))
        heappush(agent.heap, item)

    def pop_for(self, types, now: float | None = None) -> Task | None:
        """The best queued task among `types` (module docstring), or None.

        `now` defaults to the injected clock; it only matters for aging."""
        if now is None:
            if self.clock is None:
                raise ValueError("pop_for needs `now` (no clock was injected)")
            now = self.clock()
        # First the levels' effective priorities (cheap: the oldest entry of each level),
        # then the next task of only those levels that can win. A level whose entries all
        # turn out cancelled is empty after the look: start again (rare).
        while True:
            contenders = []
            for task_type in types:
                levels = self.levels.get(task_type)
                if levels is None:
                    continue
                for rank, level in enumerate(levels):
                    if not level.live:
                        continue
                    effective, aged_since = rank, INF
                    if rank and self.aging is not None:
                        oldest = self._oldest(level)
                        if oldest is None:
                            continue
                        since = oldest.since
                        steps = int((now - since) // self.aging)
                        if steps > 0:
                            effective, aged_since = max(HIGH, rank - steps), since
                    contenders.append((effective, aged_since, level))
            if not contenders:
                return None
            top = min(contenders, key=_rank_key)[:2]
            best_key = best = None
            for effective, aged_since, level in contenders:
                if (effective, aged_since) != top:
                    continue
                head = self._head(level)
                if head is None:
                    continue
                entry, agent = head
                task = entry.task
                key = (INF if task.deadline is None else task.deadline,
                       entry.since, entry.seq)
                if best_key is None or key < best_key:
                    best_key, best = key, (level, entry, agent)
            if best is not None:
                level, entry, agent = best
                self._take(level, entry, agent)
                return entry.task

    def discard(self, task: Task) -> None:
        """Account for a queued task leaving the queue other than by pop (lazy removal)."""
        entry = self._entries.get(task.id)
        if entry is not None:
            self._drop(entry)
            self._maybe_compact(entry.level)

    def empty(self) -> bool:
        # Asked on every message (dispatch): the live entries are exactly what counts
        # counts, so this is one length test, not a pass over every type's counts.
        return not self._entries

    def critical_waiting(self) -> int:
        """Critical tasks queued (of every type)."""
        return sum(counts[0] for counts in self.counts.values())

    def depth(self, task_type: str) -> int:
        return sum(self.counts.get(task_type, ()))

    def ahead_of(self, task: Task) -> int:
        """Queued tasks of its type at its priority or higher (itself included if queued);
        the same count as before, ignoring aging and fairness."""
        counts = self.counts.get(task.type, [0] * len(PRIORITIES))
        return sum(counts[: PRIORITY_RANK[task.priority] + 1])

    def by_priority(self) -> dict[str, int]:
        totals = dict.fromkeys(PRIORITIES, 0)
        for counts in self.counts.values():
            for p, n in zip(PRIORITIES, counts, strict=True):
                totals[p] += n
        return totals

    # -- internals ------------------------------------------------------------------------
    def _drop(self, entry: _Entry) -> None:
        """The entry leaves the queue's accounting; its heap slots go lazily."""
        entry.live = False
        task_id = entry.task.id
        if self._entries.get(task_id) is entry:
            del self._entries[task_id]
        entry.counts[entry.rank] -= 1
        entry.level.live -= 1

    def _valid(self, entry: _Entry) -> bool:
        if not entry.live:
            return False
        if entry.task.state is not State.QUEUED:
            self._drop(entry)  # cancelled or moved on since it was queued
            return False
        return True

    def _head(self, level: _Level) -> tuple[_Entry, _Agent | None] | None:
        """The level's next task by fairness, and its agent (None: a re-queued task).
        Clears dead entries and stale turns on the way; changes no order."""
        front = level.front
        while front and not self._valid(front[0][3]):
            heappop(front)
        if front:
            return front[0][3], None
        turns = level.turns
        while turns:
            round_, _, _, seq, name = turns[0]
            agent = level.agents.get(name)
            if agent is None or agent.round != round_:
                heappop(turns)  # the agent moved on to a later round (or left)
                continue
            heap = agent.heap
            while heap and not self._valid(heap[0][3]):
                heappop(heap)
            if not heap:
                heappop(turns)
                self._retire(level, name, agent)
                continue
            if heap[0][2] != seq:
                # Its head left since this turn was queued: the turn's key is too early,
                # so it surfaced no later than due; requeue it with the true head.
                deadline, since, seq, _ = heap[0]
                heappop(turns)
                heappush(turns, (round_, deadline, since, seq, name))
                continue
            return heap[0][3], agent
        return None

    def _oldest(self, level: _Level) -> _Entry | None:
        """The level's longest-waiting queued entry."""
        ages = level.ages
        while ages and not self._valid(ages[0][2]):
            heappop(ages)
        return ages[0][2] if ages else None

    def _take(self, level: _Level, entry: _Entry, agent: _Agent | None) -> None:
        """Pop what `_head(level)` returned."""
        if agent is None:
            heappop(level.front)
        else:
            heappop(agent.heap)
            round_, *_, name = heappop(level.turns)
            level.round = round_
            agent.round = round_ + 1
            if agent.heap:
                deadline, since, seq, _ = agent.heap[0]
                heappush(level.turns, (agent.round, deadline, since, seq, name))
            else:
                self._retire(level, name, agent)
        self._drop(entry)
        self._maybe_compact(level)

    def _retire(self, level: _Level, name: str, agent: _Agent) -> None:
        """An agent with nothing queued: keep only its next round, while it still matters
        (a round at or before the level's current one is what a newcomer gets anyway)."""
        del level.agents[name]
        level.idle[name] = agent.round
        if len(level.idle) > level.idle_limit:
            level.idle = {a: r for a, r in level.idle.items() if r > level.round}
            level.idle_limit = max(256, 2 * len(level.idle))

    def _maybe_compact(self, level: _Level) -> None:
        """Rebuild the level's heaps without dead entries once they outnumber live ones.
        Looked at every `live + COMPACT_SLACK` pops/discards: amortised O(1)."""
        level.churn += 1
        if level.churn < level.live + COMPACT_SLACK:
            return
        level.churn = 0
        slots = len(level.front) + len(level.turns) + len(level.ages) + sum(
            len(a.heap) for a in level.agents.values())
        if slots <= 3 * level.live + COMPACT_SLACK:
            return
        level.front = [item for item in level.front if self._valid(item[3])]
        heapify(level.front)
        for name, agent in list(level.agents.items()):
            agent.heap = [item for item in agent.heap if self._valid(item[3])]
            heapify(agent.heap)
            if not agent.heap:
                self._retire(level, name, agent)
        level.turns = [(agent.round, *agent.heap[0][:3], name)
                       for name, agent in level.agents.items()]
        heapify(level.turns)
        level.ages = [item for item in level.ages if self._valid(item[2])]
        heapify(level.ages)
