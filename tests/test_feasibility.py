"""Tests for cortex.services.scheduler.feasibility (and machine.py, its psutil half): each
waiting reason with the figures it compared, the memory-pressure rule (critical exempt),
the sampling interval on an injected clock, and ETA arithmetic on hand-computed cases. No
sockets, no real machine readings (except one smoke test)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cortex.services.scheduler.feasibility import (
    CPU_SLACK,
    Readings,
    ResourceMonitor,
    blocker,
    check,
    estimate_start,
    task_share,
)
from cortex.services.scheduler.machine import MachineSampler, fixed_sampler

# 4 cores, 2 free; 16 GB, 50 % used, 8 GB available.
ROOMY = Readings(cpu_free_cores=2.0, mem_available_mb=8192.0, mem_percent=50.0,
                 mem_total_mb=16384.0, cpu_cores=4)


# -- check: each waiting reason -----------------------------------------------------------
def test_fits():
    assert check({"cpu": 1.0, "memory_mb": 1000}, ROOMY) is None
    assert check({}, ROOMY) is None  # no prediction: nothing to hold it


def test_waiting_cpu():
    assert check({"cpu": 2.5, "memory_mb": 10}, ROOMY) == "cpu"


def test_waiting_cpu_counts_what_running_tasks_hold():
    assert check({"cpu": 1.0}, ROOMY, held={"cpu": 0.5}) is None
    assert check({"cpu": 1.0}, ROOMY, held={"cpu": 1.5}) == "cpu"


def test_cpu_slack_lets_a_one_core_task_onto_a_nearly_idle_one_core_machine():
    one = Readings(cpu_free_cores=0.95, mem_available_mb=1000, mem_percent=10,
                   mem_total_mb=2000, cpu_cores=1)
    assert check({"cpu": 1.0}, one) is None
    assert check({"cpu": 1.0}, one, held={"cpu": CPU_SLACK}) == "cpu"


def test_a_need_larger_than_the_machine_counts_as_the_machine():
    idle = Readings(cpu_free_cores=4.0, mem_available_mb=8000, mem_percent=10,
                    mem_total_mb=16000, cpu_cores=4)
    assert check({"cpu": 16.0}, idle) is None
    busy = Readings(cpu_free_cores=3.0, mem_available_mb=8000, mem_percent=10,
                    mem_total_mb=16000, cpu_cores=4)
    assert check({"cpu": 16.0}, busy) == "cpu"


def test_waiting_memory_when_it_does_not_fit_in_available_memory():
    assert check({"memory_mb": 9000}, ROOMY, priority="critical") == "memory"
    assert check({"memory_mb": 5000}, ROOMY, held={"memory_mb": 4000},
                 priority="critical") == "memory"


def test_memory_is_reported_before_cpu():
    assert check({"cpu": 3.0, "memory_mb": 9000}, ROOMY) == "memory"


# -- check: memory pressure ----------------------------------------------------------------
PRESSED = Readings(cpu_free_cores=2.0, mem_available_mb=2800.0, mem_percent=82.0,
                   mem_total_mb=16384.0, cpu_cores=4)


@pytest.mark.parametrize("priority", ["high", "medium", "low"])
def test_memory_pressure_holds_non_critical_work(priority):
    assert check({"cpu": 0.1, "memory_mb": 10}, PRESSED, priority=priority) == "memory"


def test_memory_pressure_lets_critical_run():
    assert check({"cpu": 0.1, "memory_mb": 10}, PRESSED, priority="critical") is None


def test_memory_pressure_counts_what_is_held_and_the_task_itself():
    # 16384 MB total, 70 % used = 11468.8 MB; the threshold (80 %) is at 13107.2 MB.
    at70 = Readings(cpu_free_cores=2.0, mem_available_mb=4915.0, mem_percent=70.0,
                    mem_total_mb=16384.0, cpu_cores=4)
    assert check({"memory_mb": 1600}, at70) is None  # 13068.8 MB: 79.8 %
    assert check({"memory_mb": 1700}, at70) == "memory"  # 13168.8 MB: 80.4 %
    assert check({"memory_mb": 800}, at70, held={"memory_mb": 900}) == "memory"
    assert check({"memory_mb": 1700}, at70, priority="critical") is None


def test_memory_threshold_is_configurable_and_total_may_be_unknown():
    unknown_total = Readings(cpu_free_cores=2.0, mem_available_mb=3000.0, mem_percent=85.0)
    assert check({"memory_mb": 10}, unknown_total) == "memory"
    assert check({"memory_mb": 10}, unknown_total, memory_threshold=90.0) is None


# -- blocker: the figures compared ---------------------------------------------------------
def test_blocker_gives_the_cpu_figures_it_compared():
    reason, detail = blocker({"cpu": 2.5, "memory_mb": 10}, ROOMY, held={"cpu": 0.25})
    assert reason == "cpu"
    assert detail == {"check": "cpu", "need_cores": 2.5, "free_cores": 2.0,
                      "held_cores": 0.25, "slack_cores": CPU_SLACK}


def test_blocker_names_which_memory_check_failed():
    reason, detail = blocker({"memory_mb": 9000}, ROOMY, priority="critical")
    assert (reason, detail["check"]) == ("memory", "memory_available")
    assert (detail["need_mb"], detail["available_mb"]) == (9000.0, 8192.0)
    reason, detail = blocker({"memory_mb": 10}, PRESSED)
    assert (reason, detail["check"], detail["threshold"]) == ("memory", "memory_pressure", 80.0)
    assert detail["percent"] > 80.0


def test_blocker_agrees_with_check():
    for needs, readings in (({"cpu": 1.0}, ROOMY), ({"cpu": 3.0}, ROOMY),
                            ({"memory_mb": 10}, PRESSED), ({"memory_mb": 9e4}, ROOMY)):
        found = blocker(needs, readings)
        assert check(needs, readings) == (None if found is None else found[0])


# -- the monitor: sampled, not per task -----------------------------------------------------
def test_monitor_samples_at_most_every_interval():
    values = iter(range(100))

    def sample():
        n = next(values)
        return Readings(cpu_free_cores=float(n), mem_available_mb=1.0, mem_percent=1.0)

    mon = ResourceMonitor(sample=sample, interval=1.0)
    assert mon.readings(100.0).cpu_free_cores == 0
    for now in (100.0, 100.2, 100.999):  # many tasks checked within one interval
        assert mon.readings(now).cpu_free_cores == 0
    assert mon.samples == 1
    assert mon.readings(101.0).cpu_free_cores == 1
    assert mon.readings(101.5).cpu_free_cores == 1
    assert mon.readings(105.0).cpu_free_cores == 2
    assert mon.readings(50.0).cpu_free_cores == 3  # the clock went back: sample again
    assert mon.samples == 4


def test_default_sample_reads_this_machine():
    r = MachineSampler()()
    assert r.cpu_cores >= 1 and 0 <= r.cpu_free_cores <= r.cpu_cores
    assert 0 < r.mem_available_mb <= r.mem_total_mb and 0 <= r.mem_percent <= 100
    assert set(r.as_dict()) == {"cpu_free_cores", "mem_available_mb", "mem_percent",
                                "mem_total_mb", "cpu_cores", "cpu_suite_cores"}


# -- ETA ------------------------------------------------------------------------------------
def test_eta_idle_worker_and_nothing_ahead_is_now():
    assert estimate_start(100.0, 0, 10.0, 1, []) == 100.0
    assert estimate_start(100.0, 1, 10.0, 2, []) == 100.0  # one ahead, two idle workers


def test_eta_two_workers_three_ahead_of_ten_seconds():
    # Workers free at 0, 0 -> tasks ahead start at 0, 0, 10 -> free at 10, 20: ours at 10.
    assert estimate_start(0.0, 3, [10.0, 10.0, 10.0], 2, []) == 10.0
    assert estimate_start(0.0, 3, 10.0, 2, []) == 10.0
    assert estimate_start(0.0, 4, 10.0, 2, []) == 20.0


def test_eta_busy_workers_free_after_their_remaining_time():
    # Worker A busy 5 s more, B idle. Ahead: 10, 2, 3.
    # 10 -> B (0..10); 2 -> A (5..7); 3 -> A (7..10); free: 10, 10 -> ours at 10.
    assert estimate_start(0.0, 3, [10.0, 2.0, 3.0], 2, [5.0]) == 10.0
    # Both busy (4 s and 9 s), nothing ahead: the first to finish.
    assert estimate_start(50.0, 0, 1.0, 2, [9.0, 4.0]) == 54.0


def test_eta_short_list_continues_with_its_mean():
    # One worker; durations 2 and 4 given, 3 ahead: the third takes the mean, 3.
    assert estimate_start(0.0, 3, [2.0, 4.0], 1, []) == 9.0


def test_eta_no_worker_yet_counts_as_one():
    assert estimate_start(0.0, 2, 5.0, 0, []) == 10.0


def test_eta_rejects_bad_arguments():
    with pytest.raises(ValueError):
        estimate_start(0.0, -1, 1.0, 1)
    with pytest.raises(ValueError):
        estimate_start(0.0, 2, [], 1)
    assert estimate_start(0.0, 0, [], 1) == 0.0


@given(st.integers(0, 200), st.floats(0.01, 100), st.integers(1, 16))
def test_eta_equal_durations_idle_workers_closed_form(ahead, d, workers):
    got = estimate_start(0.0, ahead, d, workers, [])
    assert math.isclose(got, (ahead // workers) * d, rel_tol=1e-9, abs_tol=1e-9)


@given(st.lists(st.floats(0, 50), max_size=60), st.integers(1, 8),
       st.lists(st.floats(0, 50), max_size=8))
def test_eta_never_before_now_and_grows_with_the_queue(durations, workers, busy):
    busy = busy[:workers]
    previous = 0.0
    for ahead in range(len(durations) + 1):
        got = estimate_start(0.0, ahead, durations or 1.0, workers, busy)
        assert got >= previous >= 0.0
        previous = got


# -- what a task holds ----------------------------------------------------------------------
def test_a_no_op_holds_next_to_nothing_and_a_long_cpu_bound_task_a_whole_core():
    noop = task_share({"duration": 40e-6, "cpu_s": 36e-6, "memory_mb": 0.0,
                       "source": "model"}, interval=1.0)
    assert noop["cpu"] < 1e-4 and noop["memory_mb"] == 0.0
    long = task_share({"duration": 10.0, "cpu_s": 10.0, "memory_mb": 300.0,
                       "source": "average"}, interval=1.0)
    assert long == {"cpu": pytest.approx(1.0), "memory_mb": 300.0}
    # Half a second of a whole core is half a core over the one-second interval.
    assert task_share({"duration": 0.5, "cpu_s": 0.5, "source": "model"}, 1.0)["cpu"] == 0.5


def test_nothing_learned_holds_nothing():
    assert task_share({"duration": 60.0, "cpu_s": 1.0, "memory_mb": 64.0,
                       "source": "default"}, 1.0) == {"cpu": 0.0, "memory_mb": 0.0}
    assert task_share(None, 1.0) == {"cpu": 0.0, "memory_mb": 0.0}


def test_the_share_is_cpu_seconds_not_the_product_of_two_averages():
    # One type mixing 0.1 s sleeps (2 ms of CPU) and no-ops (36 us): its averages are what
    # a type-level predictor gives. CPU seconds averaged stay tiny; the product of the
    # average core share and the average duration would make every no-op hold 26 ms of
    # a core.
    sleeps, noops = [(0.1, 0.002)] * 100, [(36e-6, 36e-6)] * 100
    rows = sleeps + noops
    avg_duration = sum(d for d, _ in rows) / len(rows)
    avg_cpu_s = sum(c for _, c in rows) / len(rows)
    share = task_share({"duration": avg_duration, "cpu_s": avg_cpu_s, "source": "average"},
                       1.0)
    assert share["cpu"] < 0.002
    avg_core_share = sum(c / d for d, c in rows) / len(rows)
    assert avg_core_share * avg_duration > 10 * share["cpu"]  # what the product would say


# -- the machine sampler: the suite is not foreign load -------------------------------------
def test_the_suites_own_cpu_is_not_counted_as_foreign_load(monkeypatch):
    """Injected psutil readings: the machine 1.8 of 2 cores busy, 1.5 of them the suite's
    own processes. Free of outside load: 2 - 0.3 = 1.7 cores."""
    import psutil

    clock = iter([100.0, 101.0])
    busy = iter([10.0, 11.8])
    own = {11: iter([5.0, 6.0]), 12: iter([3.0, 3.5])}

    class Times:
        def __init__(self, busy):
            self.idle, self.iowait, self._busy = 0.0, 0.0, busy

        def __iter__(self):
            return iter([self._busy, 0.0])

    class Proc:
        def __init__(self, pid):
            self.pid = pid

        def oneshot(self):
            import contextlib
            return contextlib.nullcontext()

        def cpu_times(self):
            class T:
                pass
            t = T()
            t.user, t.system = next(own[self.pid]), 0.0
            return t

        def memory_info(self):
            class M:
                rss = 100 * 2**20
            return M()

    monkeypatch.setattr(psutil, "cpu_times", lambda: Times(next(busy)))
    monkeypatch.setattr(psutil, "Process", Proc)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    sampler = MachineSampler(lambda: [11, 12], clock=lambda: next(clock))
    first = sampler()
    assert first.cpu_free_cores == 2.0  # no interval yet: idle
    r = sampler()
    assert r.cpu_suite_cores == pytest.approx(1.5)
    assert r.cpu_free_cores == pytest.approx(1.7)
    assert r.per_pid[11] == (pytest.approx(1.0), 100.0)
    # Without the suite's pids the same machine reads 0.2 cores free.
    assert check({"cpu": 1.0}, r) is None
    assert check({"cpu": 1.0}, Readings(cpu_free_cores=0.2, mem_available_mb=8e3,
                                        mem_percent=10.0, cpu_cores=2)) == "cpu"


def test_fixed_readings_for_tests_on_the_real_suite():
    r = fixed_sampler('{"cpu_free_cores": 2, "mem_available_mb": 8000, "mem_percent": 20,'
                      ' "mem_total_mb": 10000, "cpu_cores": 2}')()
    assert (r.cpu_free_cores, r.cpu_cores, r.mem_percent) == (2, 2, 20)
    for bad in ("nope", "[]", '{"cpu_free_cores": 1}', '{"cpu_free_cores": -1, '
                '"mem_available_mb": 1, "mem_percent": 1}', '{"cpu_free_cores": 1, '
                '"mem_available_mb": 1, "mem_percent": 1, "extra": 1}'):
        with pytest.raises(ValueError):
            fixed_sampler(bad)
