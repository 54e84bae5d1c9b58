"""The caption load machinery without a server: level parsing, per-caption timings, windows and genai-perf metrics."""

from __future__ import annotations

import math

import pytest

from blip_triton_bench.captioning.load import (
    CAPTION_CONCURRENCY,
    CAPTION_REQUEST_RATE,
    CaptionLevelMeasurement,
    CaptionRecord,
    CaptionWindow,
    caption_levels,
    caption_stability,
)
from blip_triton_bench.judging.stats import WindowSample, assess_stability
from blip_triton_bench.load.engine import LoadLevel, LoadSpecError
from blip_triton_bench.report.text import caption_load_table, caption_scaling_lines

pytestmark = pytest.mark.unit


def record(asked_s: float, first_s: float, gap_s: float, tokens: int, error: str | None = None) -> CaptionRecord:
    return CaptionRecord(asked_s, tuple(first_s + i * gap_s for i in range(tokens)), error)


def test_levels_parse_as_perf_analyzer_ranges_and_name_themselves_as_caption_levels() -> None:
    levels = list(caption_levels("1:4:3", "2.5"))
    assert levels == [
        LoadLevel(CAPTION_CONCURRENCY, 1),
        LoadLevel(CAPTION_CONCURRENCY, 4),
        LoadLevel(CAPTION_REQUEST_RATE, 2.5),
    ]
    assert [level.level_id for level in levels] == [
        "caption_concurrency=1",
        "caption_concurrency=4",
        "caption_request_rate=2.5",
    ]
    assert list(caption_levels(None, None)) == []
    with pytest.raises(LoadSpecError, match=r"--caption-concurrency .1\.5.: concurrency levels must be whole numbers"):
        list(caption_levels("1.5", None))
    with pytest.raises(LoadSpecError, match="--caption-request-rate"):
        list(caption_levels(None, "0"))


def test_a_captions_timings_are_genai_perfs() -> None:
    caption = record(asked_s=10.0, first_s=10.3, gap_s=0.05, tokens=5)
    assert caption.time_to_first_token_ms == pytest.approx(300.0)
    assert caption.latency_ms == pytest.approx(500.0)
    assert caption.inter_token_latency_ms == pytest.approx(50.0)  # (500 - 300) / (5 - 1)
    assert record(0.0, 0.2, 0.1, 1).inter_token_latency_ms is None
    failed = CaptionRecord(3.0, (), "gone")
    assert failed.ended_s == 3.0


def measurement(windows: list[CaptionWindow], tokens: int = 5) -> CaptionLevelMeasurement:
    stability = caption_stability(windows, 3, 10.0)
    return CaptionLevelMeasurement(LoadLevel(CAPTION_CONCURRENCY, 2), tokens, tuple(windows), stability)


def window(start_s: float, tokens: int, captions: tuple[CaptionRecord, ...]) -> CaptionWindow:
    """An open-loop window: tokens/s is the tokens that arrived in it."""
    return CaptionWindow(start_s, 1.0, tokens, captions, 5)


def test_metrics_pool_the_judged_windows_captions_and_take_tokens_per_second_from_arrivals() -> None:
    warmup_like = window(0.0, 1, (record(0.0, 0.9, 0.01, 5),))  # never judged: only the last 3 windows count
    windows = [
        warmup_like,
        window(1.0, 100, (record(1.0, 1.1, 0.05, 5), record(1.1, 1.3, 0.05, 5))),
        window(2.0, 110, (record(2.0, 2.2, 0.05, 5),)),
        window(3.0, 90, (record(3.0, 3.4, 0.05, 5), record(3.0, 3.1, 0.05, 5, error="cut short"))),
    ]
    result = measurement(windows)
    metrics = result.metrics()
    assert result.stability.window_indices == (1, 2, 3)
    assert metrics["output_token_throughput_per_s"] == 100.0  # median of 100, 110, 90 tokens/s
    assert metrics["caption_throughput_per_s"] == 20.0  # 100 tokens/s over 5 tokens per caption
    assert metrics["caption_count"] == 4.0 and metrics["caption_errors"] == 1.0
    assert result.errors == ["cut short"]
    assert metrics["time_to_first_token_ms"] == pytest.approx(200.0)  # p50 of 100, 200, 200, 400
    assert metrics["inter_token_latency_ms"] == pytest.approx(50.0)
    assert metrics["time_to_first_token_p99_ms"] == pytest.approx(400.0, rel=0.05)
    assert metrics["output_token_throughput_spread_pct"] == pytest.approx(20.0)  # (110 - 90) / 100
    assert math.isfinite(metrics["caption_spread_pct"])


def test_the_report_names_each_level_and_the_scaling_from_concurrency_one() -> None:
    one = measurement([window(float(i), 100, (record(i, i + 0.1, 0.05, 5),)) for i in range(3)])
    four = CaptionLevelMeasurement(
        LoadLevel(CAPTION_CONCURRENCY, 4),
        5,
        tuple(window(float(i), 300, (record(i, i + 0.2, 0.05, 5),)) for i in range(3)),
        one.stability,
    )
    rows = [
        ("blip_caption", CaptionLevelMeasurement(LoadLevel(CAPTION_CONCURRENCY, 1), 5, one.windows, one.stability)),
        ("blip_caption", four),
    ]
    table = caption_load_table(rows)
    assert "| blip_caption | caption_concurrency=4 | 300.0 (0%) | 60.00 |" in table
    assert caption_scaling_lines(rows) == [
        "blip_caption: 3.00x the output tokens/s at caption concurrency 4 as at 1 (same run; in-flight batching "
        "shares each decoder step)"
    ]


def test_closed_loop_throughput_is_littles_law_so_lockstep_bursts_do_not_alias_with_the_windows() -> None:
    """Four captions that run together finish together every 4 s: a 5 s window holds one burst of 20 tokens or two.
    Counted by arrivals the windows read 4 or 8 tokens/s; Little's law reads 4 x 5 tokens / 4 s = 5 tokens/s in each."""
    burst = tuple(record(0.0, 3.0, 0.25, 5) for _ in range(4))  # asked at 0, tokens 3.0 .. 4.0: 4 s each
    one_burst = CaptionWindow(0.0, 5.0, 20, burst, 5, concurrency=4)
    two_bursts = CaptionWindow(5.0, 5.0, 40, burst + burst, 5, concurrency=4)
    assert one_burst.tokens_per_s == two_bursts.tokens_per_s == pytest.approx(5.0)
    stability = caption_stability([one_burst, two_bursts, one_burst], 3, 10.0)
    assert stability.stable, stability.reason
    open_loop = CaptionWindow(0.0, 5.0, 20, burst, 5)
    assert open_loop.tokens_per_s == 4.0


def test_a_window_without_an_ended_caption_is_not_stable() -> None:
    empty = CaptionWindow(0.0, 1.0, 10, (), 5, concurrency=2)
    full = CaptionWindow(1.0, 1.0, 10, (record(1.0, 1.1, 0.05, 5),), 5, concurrency=2)
    stability = caption_stability([full, empty, full], 3, 10.0)
    assert not stability.stable
    assert "ended no caption" in stability.reason
    assert not caption_stability([full, full], 3, 10.0).stable  # too few windows


@pytest.mark.parametrize(
    ("rates", "stable"),
    [((100, 110, 100), True), ((100, 111, 100), False), ((100, 100, 100), True)],
    ids=["at-the-10%-limit", "past-it", "even"],
)
def test_caption_and_request_levels_are_held_to_one_stability_rule(rates: tuple[int, ...], stable: bool) -> None:
    """perf_analyzer's max / min <= 1 + limit for both: at exactly 10 % (110 / 100, where max / min - 1 reads
    10.000000000000009 % in floating point) a caption level is as stable as a request level."""
    captions = [CaptionWindow(float(i), 1.0, rate, (record(i, i + 0.1, 0.05, 5),), 5) for i, rate in enumerate(rates)]
    requests = [WindowSample(float(i), 1.0, (40.0,) * rate) for i, rate in enumerate(rates)]
    by_captions = caption_stability(captions, 3, 10.0)
    by_requests = assess_stability(requests, 3, 10.0)
    assert by_captions.stable is by_requests.stable is stable, (by_captions.reason, by_requests.reason)
    assert by_captions.throughput_variation_pct == by_requests.throughput_variation_pct
    assert ("output tokens/s" in by_captions.reason) and ("throughput" in by_requests.reason)
