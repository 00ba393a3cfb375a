"""Pure unit tests of the provider limits (services/scheduler/ratelimit.py): requests and
tokens per sliding window, concurrency, 429s shrinking and recovering, snapshots and
journal replay, and random walks that must never let a window hold more than allowed."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.services.runtime import settings as config
from cortex.services.scheduler.ratelimit import FLOOR, Limits, RateLimits, Verdict

T0 = 1_700_000_000.0


def limits(**kw) -> RateLimits:
    return RateLimits({"p": Limits(**kw)})


# --- requests per window ------------------------------------------------------------------

def test_requests_fit_until_the_window_is_full_then_wait_for_the_oldest_to_leave():
    rl = limits(requests=3, window=2.0)
    for i in range(3):
        assert rl.fits("p", 0, T0 + i * 0.1) is None
        rl.take("p", f"k{i}", 0, T0 + i * 0.1)
    wait = rl.fits("p", 0, T0 + 0.5)
    assert wait == pytest.approx(1.5, abs=1e-5)  # the first leaves at T0 + 2.0
    assert rl.check("p", 0, T0 + 0.5).limit == "requests"
    assert rl.fits("p", 0, T0 + 0.5 + wait) is None


def test_a_provider_without_limits_or_unknown_is_never_held():
    rl = limits()
    for i in range(1000):
        rl.take("p", f"k{i}", 10_000, T0)
    assert rl.fits("p", 10**9, T0) is None
    assert rl.fits("elsewhere", 10**9, T0) is None
    rl.take("elsewhere", "x", 5, T0)  # unknown providers are ignored, not an error


def test_given_back_requests_still_count_in_their_window():
    rl = limits(requests=1, window=10.0)
    rl.take("p", "a", 0, T0)
    rl.give_back("p", "a", 0, T0 + 1)
    assert rl.fits("p", 0, T0 + 2) == pytest.approx(8.0, abs=1e-5)


# --- tokens per window --------------------------------------------------------------------

def test_tokens_wait_until_enough_have_left_the_window():
    rl = limits(tokens=1000, window=60.0)
    rl.take("p", "a", 400, T0)
    rl.take("p", "b", 400, T0 + 10)
    assert rl.fits("p", 200, T0 + 20) is None
    assert rl.fits("p", 300, T0 + 20) == pytest.approx(40.0, abs=1e-5)  # a leaves at T0+60
    assert rl.fits("p", 700, T0 + 20) == pytest.approx(50.0, abs=1e-5)  # both must leave


def test_unused_tokens_given_back_return_to_the_window():
    rl = limits(tokens=1000)
    rl.take("p", "a", 900, T0)
    assert rl.check("p", 500, T0 + 1) == Verdict("tokens", pytest.approx(59.0, abs=1e-5))
    rl.give_back("p", "a", 300, T0 + 2)
    assert rl.fits("p", 500, T0 + 3) is None


def test_an_overrun_counts_in_full():
    rl = limits(tokens=1000)
    rl.take("p", "a", 100, T0)
    rl.give_back("p", "a", 950, T0 + 1)
    assert rl.fits("p", 100, T0 + 2) is not None


def test_more_tokens_than_a_window_allows_never_fit():
    rl = limits(tokens=1000)
    assert rl.check("p", 1001, T0) == Verdict("tokens", math.inf)
    assert rl.fits("p", 1001, T0) == math.inf


# --- concurrency --------------------------------------------------------------------------

def test_concurrency_holds_until_a_running_request_gives_back_its_slot():
    rl = limits(concurrent=2)
    rl.take("p", "a", 0, T0)
    rl.take("p", "b", 0, T0)
    assert rl.check("p", 0, T0 + 100) == Verdict("concurrent", None)
    assert rl.fits("p", 0, T0 + 100) == 0.0
    rl.give_back("p", "a", None, T0 + 101)
    assert rl.fits("p", 0, T0 + 101) is None


def test_take_and_give_back_are_idempotent_by_key():
    rl = limits(concurrent=2, requests=5)
    rl.take("p", "a", 10, T0)
    rl.take("p", "a", 10, T0)  # a replayed record
    assert rl.status(T0)["p"]["requests"] == 1
    rl.give_back("p", "a", 5, T0)
    rl.give_back("p", "a", 1, T0)
    assert rl.status(T0)["p"]["tokens"] == 5 and rl.status(T0)["p"]["running"] == 0


# --- 429: shrink, pause, recover ----------------------------------------------------------

def test_a_429_halves_the_allowance_and_it_grows_back_over_windows():
    rl = limits(requests=8, window=10.0)
    rl.throttled("p", T0)
    assert rl.status(T0)["p"]["allowed"]["requests"] == 4
    for i in range(4):
        rl.take("p", f"k{i}", 0, T0 + 1)
    assert rl.check("p", 0, T0 + 2).limit == "requests"
    assert rl.status(T0 + 10)["p"]["allowed"]["requests"] == 6  # one window: +1/4
    assert rl.status(T0 + 20)["p"]["allowed"]["requests"] == 8  # two: recovered
    assert rl.status(T0 + 20)["p"]["factor"] == 1.0


def test_repeated_429s_never_shrink_below_the_floor_or_one_request():
    rl = limits(requests=3, tokens=160, window=10.0)
    for _ in range(10):
        rl.throttled("p", T0)
    state = rl.status(T0)["p"]
    assert state["factor"] == FLOOR
    assert state["allowed"] == {"requests": 1, "tokens": 10}
    assert rl.fits("p", 10, T0) is None


def test_retry_after_pauses_the_provider():
    rl = limits(requests=100)
    rl.throttled("p", T0, retry_after=3.0)
    assert rl.check("p", 0, T0 + 1) == Verdict("paused", pytest.approx(2.0, abs=1e-5))
    assert rl.fits("p", 0, T0 + 3.0) is None


def test_a_429_without_configured_limits_learns_one_from_what_went_through():
    rl = limits(window=10.0)
    for i in range(10):
        rl.take("p", f"k{i}", 100, T0)
        rl.give_back("p", f"k{i}", 100, T0)
    rl.throttled("p", T0 + 1)
    assert rl.status(T0 + 1)["p"]["allowed"] == {"requests": 5, "tokens": 500}
    assert rl.fits("p", 0, T0 + 1) is not None  # 10 in the window, 5 allowed
    assert rl.status(T0 + 21)["p"]["allowed"] == {"requests": None, "tokens": None}
    for i in range(50):
        rl.take("p", f"later{i}", 100, T0 + 21)
    assert rl.fits("p", 100, T0 + 21) is None  # recovered: no limit again


def test_a_shrunk_token_allowance_below_the_request_waits_for_recovery():
    rl = limits(tokens=1000, window=10.0)
    rl.throttled("p", T0)
    rl.throttled("p", T0)  # a quarter: 250 tokens
    wait = rl.fits("p", 600, T0)
    assert wait == pytest.approx(20.0, abs=1e-5)  # two windows: 0.25 -> 0.5 -> 0.75
    assert rl.fits("p", 600, T0 + wait) is None


# --- snapshots and journal ----------------------------------------------------------------

def _busy() -> tuple[RateLimits, list[dict]]:
    rl = limits(requests=10, tokens=5000, concurrent=3, window=5.0)
    journal = [rl.take("p", "a", 1000, T0), rl.take("p", "b", 2000, T0 + 1),
               rl.give_back("p", "a", 400, T0 + 2), rl.throttled("p", T0 + 2.5, 1.5),
               rl.take("p", "c", 300, T0 + 4)]
    return rl, journal


def test_snapshot_restore_gives_the_same_state_and_verdicts():
    rl, _ = _busy()
    copy = limits(requests=10, tokens=5000, concurrent=3, window=5.0)
    copy.restore(rl.snapshot())
    assert copy.snapshot() == rl.snapshot()
    for t in (T0 + 4, T0 + 6, T0 + 12):
        for tokens in (0, 2500, 4999):
            assert copy.check("p", tokens, t) == rl.check("p", tokens, t)


def test_replaying_the_journal_rebuilds_the_state():
    rl, journal = _busy()
    replayed = limits(requests=10, tokens=5000, concurrent=3, window=5.0)
    for record in journal:
        replayed.apply(record)
    assert replayed.snapshot() == rl.snapshot()


def test_snapshot_is_json_and_survives_a_reconfigure():
    import json

    rl, _ = _busy()
    assert json.loads(json.dumps(rl.snapshot())) == rl.snapshot()
    before = rl.snapshot()["p"]
    rl.configure({"p": Limits(requests=20, window=5.0), "q": Limits(requests=1)})
    assert rl.snapshot()["p"] == before and set(rl.snapshot()) == {"p", "q"}
    rl.configure({"q": Limits(requests=1)})
    assert set(rl.snapshot()) == {"q"}


def test_limits_come_from_provider_settings(tmp_path):
    (tmp_path / "cortex.toml").write_text(
        '[providers.a]\nbase_url = "http://127.0.0.1:9/v1"\nrequests_per_window = 4\n'
        'tokens_per_window = 900\nconcurrent = 2\nwindow = 2\n'
        '[providers.b]\nbase_url = "http://127.0.0.1:9/v1"\n')
    rl = RateLimits.from_settings(config.load(tmp_path).providers)
    assert rl.buckets["a"].limits == Limits(4, 900, 2, 2.0)
    assert rl.buckets["b"].limits == Limits()


def test_a_clock_stepping_back_keeps_the_log_in_order():
    rl = limits(requests=2, window=10.0)
    rl.take("p", "a", 0, T0 + 5)
    rl.take("p", "b", 0, T0 + 1)  # the clock stepped back: counted at T0 + 5
    assert rl.fits("p", 0, T0 + 14.9) is not None
    assert rl.fits("p", 0, T0 + 15) is None


@pytest.mark.parametrize("call", [
    lambda rl: rl.take("p", "a", -1, T0),
    lambda rl: rl.take("p", "a", True, T0),
    lambda rl: rl.fits("p", 1.5, T0),
    lambda rl: rl.throttled("p", T0, retry_after=-1),
    lambda rl: rl.throttled("p", T0, retry_after=math.nan),
    lambda rl: rl.apply({"op": "nope"}),
    lambda rl: Limits(requests=-1),
    lambda rl: Limits(window=0),
    lambda rl: Limits(concurrent=1.5),
])
def test_bad_input_is_a_value_error(call):
    with pytest.raises(ValueError):
        call(limits(requests=1))


# --- random walks -------------------------------------------------------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.floats(0, 1.5)),
    st.tuples(st.just("try"), st.integers(0, 700)),
    st.tuples(st.just("finish"), st.integers(0, 20), st.floats(0, 1)),
    st.tuples(st.just("429"), st.one_of(st.none(), st.floats(0, 2))),
), max_size=120)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 6), tokens_limit=st.integers(0, 2000), concurrent=st.integers(0, 4),
       window=st.sampled_from([0.5, 1.0, 2.0]), ops=OPS)
def test_no_window_ever_holds_more_than_allowed(n, tokens_limit, concurrent, window, ops):
    rl = limits(requests=n, tokens=tokens_limit, concurrent=concurrent, window=window)
    now = T0
    takes: list[float] = []
    tokens_log: dict[str, list] = {}  # key -> [at, tokens] as the limiter should count them
    running: dict[str, int] = {}
    seq = 0
    for op in ops:
        if op[0] == "advance":
            now += op[1]
        elif op[0] == "try":
            wait = rl.fits("p", op[1], now)
            if wait is None:
                seq += 1
                key = f"k{seq}"
                rl.take("p", key, op[1], now)
                takes.append(now)
                tokens_log[key] = [now, op[1]]
                running[key] = op[1]
                # Never more than n requests in any window (the half-open one ending now).
                assert sum(1 for t in takes if t > now - window) <= n
                if tokens_limit:
                    assert sum(v for t, v in tokens_log.values() if t > now - window) \
                        <= tokens_limit
                if concurrent:
                    assert len(running) <= concurrent
            elif wait != math.inf and wait > 0:
                # The wait is honest: once waited (nothing else taken), it fits.
                probe = limits(requests=n, tokens=tokens_limit, concurrent=concurrent,
                               window=window)
                probe.restore(rl.snapshot())  # looking ahead must not move rl's clock
                later = probe.check("p", op[1], now + wait)
                assert later is None or later.limit == "concurrent"
            else:
                assert wait == math.inf and op[1] > tokens_limit > 0 or wait == 0.0
        elif op[0] == "finish" and running:
            key = sorted(running)[op[1] % len(running)]
            used = int(running.pop(key) * op[2])  # a request uses at most what it took
            rl.give_back("p", key, used, now)
            tokens_log[key][1] = used
        elif op[0] == "429":
            rl.throttled("p", now, op[1])
