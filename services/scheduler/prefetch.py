"""Prefetch slots: a busy worker may hold one more task, to start the moment its current
one ends, so it never idles for the scheduler's round trip while its queue is non-empty.

Pure bookkeeping over the registry's `Worker`s (no sockets, no clock):

- a slot is free on a worker that is busy, not leaving, not asked to give its task back,
  and holds no prefetched task; `[scheduler] prefetch = 0` turns every slot off;
- `may_fill()`: a critical task is never prefetched (it waits in the queue for the first
  worker to free up), and while a prefetched task has not started no slot of its type
  takes a lower one, so no lower task held anywhere starts before it;
- pause: for `[scheduler] prefetch_pause` seconds after a critical task was queued, no
  slot of its type is filled. Critical tasks come in bursts (an incident, a user waiting);
  each one queued while every worker is busy recalls every slot it outranks, and without
  the pause the slots filled again between two of them, so each paid a recall of every
  slot, its answers and the refills, on a suite already saturated. Paused, the slots
  empty as their tasks start and the next critical task takes the first worker to free
  up. A paused worker idles one round trip between tasks (what prefetch saves);
- `fill()` puts a dispatched task in a worker's slot, `empty()` takes it out (the task
  started there, was given back, or the worker left);
- recall: once a task enters the queue, `to_recall()` names each slot whose task is of
  lower priority than a task still queued for one of that worker's types (after the
  dispatch, so no idle worker could take it). Those workers get a `task.recall`; until
  they answer, their slot is neither refilled nor asked again;
- reserve: for the same `prefetch_pause` seconds, `[scheduler] critical_reserve` idle
  workers of the type (1 by default) take only critical tasks, so the next critical task
  of the burst starts at once rather than after a lower task ends (with 20 workers on
  20 ms tasks, up to 20 ms later: they free up together, as one turn gave them their
  tasks). Never a type's only workers: at least one other keeps taking its lower tasks.
  The reserved workers idle for the window's length (what a burst of critical tasks
  costs the lower ones);
- steal: a worker idle while a slot holds a task of its type (it registered, or freed up
  with nothing queued) has `to_steal()` recall one, so the task starts there at once
  rather than after the other worker's task (a surge for a critical task relies on it).

Priorities are compared as submitted (aging does not count): a critical task outranks
every prefetched task of lower priority, whatever their ages.
"""

from __future__ import annotations

from collections.abc import Callable

from cortex.protocol import wire
from cortex.services.scheduler.tasks import PRIORITIES, PRIORITY_RANK, Task
from cortex.services.scheduler.workers import Worker, WorkerState

NONE_QUEUED = (0,) * len(PRIORITIES)
NONE_KEPT: set[str] = set()  # never added to
BELOW_ALL = len(PRIORITIES)  # a rank below every priority: nothing there


class Slots:
    def __init__(self, size: int, pause: float = 0.0, reserve: int = 0):
        self.size = max(0, min(1, size))  # one task per worker at most
        self.pause = pause
        self.reserve = reserve  # idle workers per type kept for critical tasks meanwhile
        self.paused: dict[str, float] = {}  # type -> until when (monotonic) no slot fills
        self.held: dict[str, tuple[str, int, str]] = {}  # worker -> (task id, rank, type)
        self.ranks = [0] * len(PRIORITIES)  # prefetched tasks per priority
        self.by_type: dict[str, int] = {}  # prefetched tasks per type
        self.recall_due = False  # a task was queued that may outrank a prefetched one

    def free(self, worker: Worker) -> bool:
        return bool(self.size) and worker.state is WorkerState.BUSY \
            and worker.prefetched is None and not worker.recalling

    def pause_for_critical(self, counts: dict[str, list[int]], mono: float) -> None:
        """Critical tasks are queued: the slots of their types fill no more for `pause`
        seconds from now."""
        if self.pause > 0:
            for task_type, queued in counts.items():
                if queued[0]:
                    self.paused[task_type] = mono + self.pause

    def kept_free(self, idle: list[Worker], serving: Callable[[str], int], mono: float
                  ) -> tuple[set[str], float | None]:
        """The idle workers kept for critical tasks (the names), and when the first window
        that keeps one closes (None: none kept). `serving(type)`: its workers."""
        if not self.reserve or not self.paused:
            return NONE_KEPT, None
        if min(self.paused.values()) <= mono:  # closed windows go: this stays cheap
            self.paused = {t: until for t, until in self.paused.items() if until > mono}
        kept: set[str] = set()
        closes = None
        for task_type, until in self.paused.items():
            if until <= mono or serving(task_type) <= self.reserve:
                continue
            free = [w.name for w in idle if task_type in w.types]
            need = self.reserve - sum(1 for name in free if name in kept)
            for name in reversed(free):  # the last idle: the first ones take the work
                if need <= 0:
                    break
                if name not in kept:
                    kept.add(name)
                    need -= 1
                    closes = until if closes is None else min(closes, until)
        return kept, closes

    def may_fill(self, worker: Worker, counts: dict[str, list[int]], mono: float) -> bool:
        """Whether the worker's slot may take the best task queued for its types: not a
        critical one (it waits for the first worker to free up, never behind another
        task), nothing while a prefetched task of those types that outranks it has not
        started (lower work would start first elsewhere), and nothing while a critical
        task of those types was queued less than `pause` seconds ago."""
        best = min((next((rank for rank, n in enumerate(counts.get(t, NONE_QUEUED)) if n),
                         BELOW_ALL) for t in worker.types), default=BELOW_ALL)
        if best in (0, BELOW_ALL):
            return False
        if self.paused and any(self.paused.get(t, 0.0) > mono for t in worker.types):
            return False
        held = min((rank for _, rank, task_type in self.held.values()
                    if task_type in worker.types), default=BELOW_ALL)
        return held >= best

    def fill(self, worker: Worker, task: Task) -> None:
        rank = PRIORITY_RANK[task.priority]
        worker.prefetched = task.id
        self.held[worker.name] = (task.id, rank, task.type)
        self.ranks[rank] += 1
        self.by_type[task.type] = self.by_type.get(task.type, 0) + 1

    def empty(self, worker: Worker) -> str | None:
        """The slot's task id (None: it held none); the slot is free again."""
        task_id = worker.prefetched
        worker.prefetched, worker.recalling = None, False
        held = self.held.pop(worker.name, None)
        if held is not None:
            _, rank, task_type = held
            self.ranks[rank] -= 1
            self.by_type[task_type] -= 1
        return task_id

    def queued(self, task: Task) -> None:
        """A task entered the queue: a recall is due if something of lower priority is
        prefetched (O(1): the common case, a flood of one priority, costs nothing more)."""
        if any(self.ranks[PRIORITY_RANK[task.priority] + 1:]):
            self.recall_due = True

    def to_recall(self, workers: dict[str, Worker], counts: dict[str, list[int]]
                  ) -> list[tuple[Worker, str]]:
        """(worker, task id) of each prefetched task outranked by a task queued for one of
        its worker's types; each is marked recalling."""
        self.recall_due = False
        found = []
        for name, (task_id, rank, _) in self.held.items():
            worker = workers.get(name)
            if worker is None or worker.recalling or rank == 0:
                continue
            if any(any(counts.get(t, NONE_QUEUED)[:rank]) for t in worker.types):
                worker.recalling = True
                found.append((worker, task_id))
        return found

    def to_steal(self, idle: list[Worker], workers: dict[str, Worker]
                 ) -> list[tuple[Worker, str]]:
        """Prefetched tasks that idle workers could start now (one came or freed up since
        the dispatch): recalled, the highest priority first, one per idle worker that no
        recall on its way (of a task of its types) already stands for."""
        on_the_way = [name for name in self.held if workers[name].recalling]
        found = []
        for worker in idle:
            covered = next((n for n in on_the_way if self.held[n][2] in worker.types), None)
            if covered is not None:
                on_the_way.remove(covered)
                continue
            best = min(((rank, name, task_id)
                        for name, (task_id, rank, task_type) in self.held.items()
                        if task_type in worker.types and not workers[name].recalling),
                       default=None)
            if best is not None:
                holder = workers[best[1]]
                holder.recalling = True
                found.append((holder, best[2]))
        return found


def fold_prefetches(sends: list, finished: dict[bytes, bytes]) -> list:
    """The turn's sends with each prefetch order (`task.run` to a slot) folded into the
    reply to the same worker's `task.finished` (`finished`: worker -> corr of a finish
    that allows it), as that reply's `run`: one message fewer per task when workers are
    kept busy. The reply goes out after the journal's sync, the order would have gone
    before it: a prefetched task only starts when the worker's current one ends, so the
    sync is off its path. A run whose reply is lost on the way is found as every lost
    prefetch is: the worker, idle, says it holds nothing."""
    if not finished:
        return sends
    replies = {(peer, corr): i for i, (peer, type_, corr, _body) in enumerate(sends)
               if type_ == wire.REPLY and finished.get(peer) == corr}
    if not replies:
        return sends
    out, folded = list(sends), set()
    for i, (peer, type_, _corr, body) in enumerate(sends):
        if type_ != wire.NOTIFY or body.get("op") != "task.run" or not body.get("prefetch"):
            continue
        at = replies.get((peer, finished.get(peer)))
        if at is None or at in folded:
            continue
        to, reply_type, corr, reply = out[at]
        out[at] = (to, reply_type, corr, {**reply, "run": body["task"]})
        folded.add(at)
        out[i] = None
    return [send for send in out if send is not None]
