"""What the dispatched tasks hold of the machine, from dispatch to end (feasibility).

A task's share (feasibility.task_share) is held from its dispatch until it ends, so the
headroom a new task is checked against already counts the work the readings cannot see
yet. Once its worker has been measured, what the readings already show of it is not
counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from cortex.services.scheduler.feasibility import Readings, ResourceMonitor, blocker, task_share
from cortex.services.scheduler.tasks import Task


@dataclass(slots=True)
class Hold:
    cpu: float  # cores
    memory_mb: float  # growth of its worker's RSS
    pid: int  # its worker's pid (0: unknown)
    sample: int  # the monitor's sample count when it was dispatched
    rss_base: float | None  # its worker's RSS in that sample, when the sample had it


class MachineHolds:
    def __init__(self, monitor: ResourceMonitor, memory_threshold: float):
        self.monitor = monitor
        self.memory_threshold = memory_threshold
        self.holds: dict[str, Hold] = {}  # task id -> its share
        self.memory_pressure = False  # as of the last reading

    def needs(self, predicted: dict | None) -> dict:
        """What a task will hold while it runs: its predicted CPU seconds over its
        predicted duration (at least a sampling interval, so a no-op holds next to
        nothing), and its predicted memory growth."""
        return task_share(predicted, self.monitor.interval)

    def readings(self, now_mono: float) -> tuple[Readings, dict]:
        """The machine now (read at most once per interval) and what is held beyond it."""
        readings = self.monitor.readings(now_mono)
        self.memory_pressure = readings.mem_percent > self.memory_threshold
        return readings, self.held(readings)

    def blocker(self, task: Task, readings: Readings, held: dict) -> tuple[str, dict] | None:
        """None if the task fits beside what is held, else its waiting reason and detail."""
        return blocker(self.needs(task.predicted), readings, held, task.priority,
                       self.memory_threshold)

    def hold(self, task: Task, pid: int) -> dict:
        """Hold a task's share from its dispatch (to a worker of `pid`, 0: unknown);
        returns the share."""
        share = self.needs(task.predicted)
        latest = self.monitor.latest
        usage = latest.per_pid.get(pid) if latest is not None and pid else None
        self.holds[task.id] = Hold(share["cpu"], share["memory_mb"], pid,
                                   self.monitor.samples, usage[1] if usage else None)
        return share

    def release(self, task_id: str) -> None:
        """Its share is free at once (the task ended or went back to the queue)."""
        self.holds.pop(task_id, None)

    def held(self, readings: Readings) -> dict:
        """What the running tasks hold and the readings do not already show.

        A task's CPU is its predicted share, or what its worker was measured using if it
        ran through the whole last interval and used more (so an unpredicted CPU hog still
        counts). Its memory is its predicted growth less the growth its worker already
        shows (which the readings' available memory has taken off)."""
        cpu = memory = 0.0
        samples = self.monitor.samples
        for hold in self.holds.values():
            usage = readings.per_pid.get(hold.pid) if hold.pid else None
            hold_cpu, hold_mem = hold.cpu, hold.memory_mb
            if usage is not None:
                if samples >= hold.sample + 2:
                    hold_cpu = max(hold_cpu, usage[0])
                if hold.rss_base is not None and samples > hold.sample:
                    hold_mem = max(0.0, hold_mem - max(0.0, usage[1] - hold.rss_base))
            cpu += hold_cpu
            memory += hold_mem
        return {"cpu": cpu, "memory_mb": memory}
