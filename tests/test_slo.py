"""Service-level objectives: parsing --slo, each target's percentile against its limit (failed requests counted as
over), whether the answer holds at 95 % confidence, and goodput."""

from __future__ import annotations

import math

import pytest

from blip_triton_bench.captioning.load import CaptionRecord
from blip_triton_bench.judging.slo import (
    CAPTION_QUANTITIES,
    REQUEST_QUANTITIES,
    RequestOutcome,
    SLOError,
    Target,
    judge_level,
    judge_target,
    parse_slo,
    requests_to_show_met,
    window_outcomes,
)
from blip_triton_bench.judging.stats import WindowSample

pytestmark = pytest.mark.unit


def latencies(*values_ms: float) -> list[RequestOutcome]:
    return [RequestOutcome(True, {"latency": value}) for value in values_ms]


def test_an_slo_reads_each_target_with_its_percentile_and_limit() -> None:
    service_level = parse_slo("latency_p99_ms=2000, ttft_p90_ms=250.5,itl_p99.9_ms=40")
    assert [(t.quantity, t.percentile, t.limit_ms) for t in service_level.targets] == [
        ("latency", 99.0, 2000.0),
        ("ttft", 90.0, 250.5),
        ("itl", 99.9, 40.0),
    ]
    assert service_level.text == "latency_p99_ms=2000,ttft_p90_ms=250.5,itl_p99.9_ms=40"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("", "no target"),
        ("latency_p99=2000", "'latency_p99=2000' is not a target"),
        ("throughput_p99_ms=5", "is not a target"),
        ("latency_p99_ms", "is not a target"),
        ("latency_p100_ms=5", "percentile 100"),
        ("latency_p0_ms=5", "percentile 0"),
        ("latency_p99_ms=0", "above 0"),
        ("latency_p99_ms=-3", "above 0"),
        ("latency_p99_ms=nan", "above 0"),
        ("latency_p99_ms=inf", "above 0"),
        ("latency_p99_ms=fast", "above 0"),
        ("latency_p99_ms=5,latency_p99_ms=6", "latency_p99_ms given twice"),
    ],
)
def test_a_malformed_slo_is_refused_naming_the_target_and_the_fix(text: str, named: str) -> None:
    with pytest.raises(SLOError, match="--slo") as raised:
        parse_slo(text)
    assert named in str(raised.value)


def test_the_error_names_the_config_field_it_came_from() -> None:
    with pytest.raises(SLOError, match=r"m/config.pbtxt: parameters 'bench_slo'"):
        parse_slo("latency_p99_ms=soon", "m/config.pbtxt: parameters 'bench_slo'")


def test_a_target_is_met_when_its_percentile_is_within_the_limit() -> None:
    target = Target("latency", 50.0, 10.0)
    assert judge_target(target, latencies(5, 6, 7, 20, 30)).met  # p50 is 7 ms
    assert not judge_target(target, latencies(5, 6, 20, 30, 40)).met  # p50 is 20 ms


def test_a_failed_request_counts_as_over_every_limit() -> None:
    target = Target("latency", 50.0, 10.0)
    three_good = latencies(1, 1, 1)
    assert judge_target(target, three_good + [RequestOutcome(False, {})] * 2).met
    missed = judge_target(target, three_good + [RequestOutcome(False, {})] * 4)
    assert not missed.met
    assert missed.over_limit == 4
    assert math.isinf(missed.measured_ms)
    assert "a failed request" in missed.describe()


def test_a_p99_met_by_few_requests_is_not_settled_and_says_how_many_would_settle_it() -> None:
    target = Target("latency", 99.0, 100.0)
    few = judge_target(target, latencies(*[50.0] * 100))
    assert few.met and not few.settled
    assert requests_to_show_met(target) == 299  # 0.99^299 < 0.05 <= 0.99^298
    assert "needs >= 299 requests" in few.describe()
    many = judge_target(target, latencies(*[50.0] * 299))
    assert many.met and many.settled


def test_a_p99_missed_by_many_requests_over_the_limit_is_settled() -> None:
    target = Target("latency", 99.0, 100.0)
    result = judge_target(target, latencies(*[50.0] * 90, *[150.0] * 10))
    assert not result.met and result.settled
    assert "MISSED at 95% confidence" in result.describe()


def test_goodput_counts_the_requests_that_met_every_target_per_second() -> None:
    service_level = parse_slo("latency_p90_ms=100")
    outcomes = [*latencies(*([50.0] * 8), 150.0, 250.0), RequestOutcome(False, {})]
    result = judge_level(service_level, outcomes, 2.0, REQUEST_QUANTITIES, "requests")
    assert result is not None
    assert (result.good, result.requests) == (8, 11)
    assert result.goodput_per_s == pytest.approx(4.0)
    assert not result.met  # p90 of 11 with 3 over 100 ms
    assert "goodput 4.00 requests/s" in result.describe()


def test_caption_targets_do_not_apply_to_a_request_level() -> None:
    service_level = parse_slo("ttft_p99_ms=100")
    assert judge_level(service_level, latencies(1.0), 1.0, REQUEST_QUANTITIES, "requests") is None
    mixed = parse_slo("latency_p99_ms=100,ttft_p99_ms=100")
    result = judge_level(mixed, latencies(1.0), 1.0, REQUEST_QUANTITIES, "requests")
    assert result is not None
    assert [t.target.key for t in result.targets] == ["latency_p99_ms"]
    assert result.not_applicable == ("ttft_p99_ms",)


def test_a_caption_is_good_only_when_each_of_its_own_quantities_is_within_its_limit() -> None:
    fast = CaptionRecord(0.0, (0.05, 0.06, 0.07))  # ttft 50 ms, itl 10 ms, latency 70 ms
    slow_start = CaptionRecord(0.0, (0.5, 0.51, 0.52))
    one_token = CaptionRecord(0.0, (0.05,))  # no inter-token latency: only its other targets hold it
    failed = CaptionRecord(0.0, (), "RuntimeError: gone")
    service_level = parse_slo("ttft_p50_ms=100,itl_p50_ms=20,latency_p50_ms=1000")
    outcomes = [record.outcome() for record in (fast, slow_start, one_token, failed)]
    result = judge_level(service_level, outcomes, 1.0, CAPTION_QUANTITIES, "captions")
    assert result is not None
    assert result.good == 2  # fast and one_token
    itl = next(t for t in result.targets if t.target.quantity == "itl")
    assert itl.requests == 3  # the one-token caption has none; the failed one counts as over


def test_a_request_levels_windows_become_outcomes_with_their_failures() -> None:
    windows = [
        WindowSample(0.0, 1.0, (10.0, 20.0), errors=1),
        WindowSample(1.0, 1.0, (30.0,)),
    ]
    outcomes = window_outcomes(windows)
    assert sorted(o.values_ms["latency"] for o in outcomes if o.succeeded) == [10.0, 20.0, 30.0]
    assert sum(not o.succeeded for o in outcomes) == 1
