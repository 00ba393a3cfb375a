"""The one-of-each helpers: durable writes, the retry delay, the budget-window parser."""

from __future__ import annotations

import os
import random
import stat

import pytest

from cortex.protocol.backoff import Backoff, delay
from cortex.protocol.vocabulary import DAY, window_seconds
from cortex.services.runtime.durable import remove_temp_files, write_atomic


def test_write_atomic_replaces_whole_and_private(tmp_path):
    target = tmp_path / "state" / "x.json"
    write_atomic(target, b"first")
    write_atomic(target, lambda f: f.write(b"second"))
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]  # no temp file left


def test_a_failed_write_leaves_the_old_content_and_no_temp_file(tmp_path):
    target = tmp_path / "x.json"
    write_atomic(target, b"good")

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, boom)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_temp_files_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / ".x.json.123.tmp").write_bytes(b"torn")
    (tmp_path / ".other.json.1.tmp").write_bytes(b"not ours")
    assert [p.name for p in remove_temp_files(tmp_path, "x.json")] == [".x.json.123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.1.tmp"]


def test_backoff_doubles_to_its_cap_with_jitter():
    rng = random.Random(1)
    exact = [delay(n, 0.5, 30.0, jitter=0) for n in range(1, 9)]
    assert exact == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    spread = [delay(3, 0.5, 30.0, jitter=0.2, rng=rng) for _ in range(200)]
    assert all(1.6 <= d <= 2.4 for d in spread) and len(set(spread)) > 100
    assert delay(10_000, 1.0, 5.0, jitter=0) == 5.0  # no overflow for a huge attempt
    b = Backoff(0.1, 1.0, jitter=0)
    assert [b.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    b.reset()
    assert b.next() == 0.1
    for bad in ((0, 1, 1), (1, -1, 1), (1, 1, -1)):
        with pytest.raises(ValueError):
            delay(*bad)


@pytest.mark.parametrize("window,seconds", [(None, None), ("daily", DAY),
                                            ("rolling:60", 60), ("rolling:1", 1)])
def test_budget_windows(window, seconds):
    assert window_seconds(window) == seconds


@pytest.mark.parametrize("bad", ["rolling:1.5", "rolling:0", "rolling:-5", "rolling:",
                                 "rolling:01", "weekly", "", 60, "rolling:١٢", True,
                                 "rolling:99999999999"])
def test_bad_budget_windows_are_refused(bad):
    with pytest.raises(ValueError):
        window_seconds(bad)
