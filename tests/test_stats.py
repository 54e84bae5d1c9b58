"""Window statistics, perf_analyzer's stability rule and the level summary, on synthetic samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blip_triton_bench.judging import stats
from blip_triton_bench.judging.stats import (
    WindowSample,
    assess_stability,
    latency_percentile,
    needs_more_windows,
    spread_pct,
    summarize_level,
    summarize_window,
)

pytestmark = pytest.mark.unit


def window(throughput_infer_per_s: float, latency_ms: float = 40.0, duration_s: float = 1.0) -> WindowSample:
    """A window of `throughput x duration` requests that all took `latency_ms`."""
    count = round(throughput_infer_per_s * duration_s)
    return WindowSample(start_s=0.0, duration_s=duration_s, latencies_ms=(latency_ms,) * count, errors=0)


def test_window_percentiles_follow_perf_analyzer_nearest_rank() -> None:
    # 1..100 shuffled: rank round(p/100 x 99) -> p50 is the 51st value, p99 the 99th.
    latencies = np.random.default_rng(0).permutation(np.arange(1.0, 101.0))
    stats = summarize_window(WindowSample(start_s=5.0, duration_s=4.0, latencies_ms=tuple(latencies), errors=2))
    assert stats.count == 100
    assert stats.errors == 2
    assert stats.throughput_infer_per_s == 25.0
    assert stats.latency_avg_ms == 50.5
    assert (stats.latency_p50_ms, stats.latency_p90_ms, stats.latency_p95_ms, stats.latency_p99_ms) == (
        51.0,
        90.0,
        95.0,
        99.0,
    )


def test_percentile_rounds_half_ranks_up_and_reports_an_observed_latency() -> None:
    ordered = np.array([10.0, 20.0, 30.0, 40.0])
    assert latency_percentile(ordered, 50) == 30.0  # rank 1.5 -> 2; numpy's linear default would say 25
    assert latency_percentile(ordered, 99) == 40.0
    assert math.isnan(latency_percentile(np.array([]), 99))


def test_window_without_completed_requests_has_zero_throughput_and_no_latency() -> None:
    stats = summarize_window(WindowSample(start_s=0.0, duration_s=2.0, latencies_ms=(), errors=3))
    assert stats.throughput_infer_per_s == 0.0
    assert stats.errors == 3
    assert math.isnan(stats.latency_p99_ms)


def test_window_rejects_a_zero_duration() -> None:
    with pytest.raises(ValueError, match="duration_s=0"):
        WindowSample(start_s=0.0, duration_s=0.0, latencies_ms=(1.0,), errors=0)


def test_three_windows_within_ten_percent_are_stable() -> None:
    stability = assess_stability([window(500), window(520), window(510)])
    assert stability.stable
    assert stability.window_indices == (0, 1, 2)
    assert stability.throughput_variation_pct == pytest.approx(4.0)
    assert "throughput varied 4.0%" in stability.reason


def test_one_window_25_percent_off_is_unstable() -> None:
    stability = assess_stability([window(100), window(100), window(125)])
    assert not stability.stable
    assert stability.reason == "throughput varied 25.0% across the last 3 windows (limit 10%)"


def test_average_latency_counts_for_stability_too() -> None:
    stability = assess_stability([window(100, latency_ms=45), window(100, latency_ms=50), window(100, latency_ms=60)])
    assert not stability.stable
    assert "average latency varied 33.3%" in stability.reason


def test_exactly_the_threshold_is_stable_as_in_perf_analyzer() -> None:
    assert assess_stability([window(100), window(110), window(105)]).stable


def test_only_the_last_windows_count() -> None:
    # perf_analyzer's own unit test: early chaos does not matter once the last 3 agree.
    settled = [window(ips) for ips in (1, 1000, 500, 1500, 500, 520, 510)]
    stability = assess_stability(settled)
    assert stability.stable
    assert stability.window_indices == (4, 5, 6)
    # ... and an early calm does not help when the last 3 disagree.
    assert not assess_stability([window(ips) for ips in (500, 505, 510, 500, 800)]).stable


def test_only_the_judged_windows_are_summarised(monkeypatch: pytest.MonkeyPatch) -> None:
    # the load loop asks after every window: the windows before the last 3 are never read, so never summarised
    summarised: list[WindowSample] = []
    real = stats.summarize_window

    def counted(sample: WindowSample) -> stats.WindowStats:
        summarised.append(sample)
        return real(sample)

    monkeypatch.setattr(stats, "summarize_window", counted)
    windows = [window(ips) for ips in (1, 1000, 500, 505, 510)]
    stability = assess_stability(windows)
    assert stability.stable
    assert stability.window_indices == (2, 3, 4)
    assert {id(sample) for sample in summarised} == {id(sample) for sample in windows[2:]}


def test_too_few_windows_or_an_empty_window_is_not_stable() -> None:
    few = assess_stability([window(500), window(500)])
    assert not few.stable
    assert few.window_indices == (0, 1)
    assert "only 2 window(s)" in few.reason
    empty = assess_stability([window(500), window(0), window(500)])
    assert not empty.stable
    assert "index 1 completed no request" in empty.reason


def test_needs_more_windows_until_stable_or_out_of_windows() -> None:
    assert needs_more_windows([window(500), window(500)], max_windows=10)
    assert not needs_more_windows([window(500), window(505), window(500)], max_windows=10)
    noisy = [window(ips) for ips in (100, 200, 100, 200)]
    assert needs_more_windows(noisy, max_windows=5)
    assert not needs_more_windows(noisy, max_windows=4)


def test_spread_is_range_over_median() -> None:
    assert spread_pct([9.0, 10.0, 12.0]) == pytest.approx(30.0)
    assert spread_pct([100.0, 110.0, 120.0]) == pytest.approx(20.0 / 110.0 * 100.0)
    assert spread_pct([7.0]) == 0.0
    assert math.isnan(spread_pct([1.0, math.nan]))


def test_level_summary_uses_the_judged_windows_and_pools_their_requests() -> None:
    windows = [
        window(1000, latency_ms=1.0),  # warm-up, outside the last 3: must not count
        WindowSample(start_s=1.0, duration_s=1.0, latencies_ms=(10.0,) * 9, errors=1),
        WindowSample(start_s=2.0, duration_s=1.0, latencies_ms=(10.0,) * 9 + (30.0,), errors=0),
        WindowSample(start_s=3.0, duration_s=1.0, latencies_ms=(10.0,) * 11 + (40.0,), errors=2),
    ]
    stability = assess_stability(windows)
    summary = summarize_level(windows, stability)
    assert summary.window_indices == (1, 2, 3)
    assert summary.request_count == 31
    assert summary.errors == 3
    assert summary.throughput_infer_per_s == 10.0  # median of 9, 10, 12 infer/sec
    assert summary.throughput_spread_pct == pytest.approx(30.0)  # (12 - 9) / 10
    # Pooled: 29 requests at 10 ms, one at 30, one at 40. Rank round(0.99 x 30) = 30 -> 40 ms.
    assert summary.latency_p99_ms == 40.0
    assert summary.latency_p50_ms == 10.0
    assert summary.latency_avg_ms == pytest.approx((29 * 10.0 + 30.0 + 40.0) / 31)
    # Per-window p99: 10, 30, 40 -> (40 - 10) / 30.
    assert summary.p99_spread_pct == pytest.approx(100.0)
    assert summary.stable == stability.stable
    assert summary.stability_reason == stability.reason
    assert summary.metrics()["throughput_infer_per_s"] == 10.0
    assert summary.metrics()["p99_spread_pct"] == pytest.approx(100.0)
