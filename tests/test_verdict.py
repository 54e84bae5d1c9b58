"""The regression verdict: tolerance, the run's own spread, direction, and the words a user reads."""

from __future__ import annotations

import pytest

from blip_triton_bench.judging.verdict import VerdictStatus, compare, compare_level

pytestmark = pytest.mark.unit


def test_a_20_percent_throughput_drop_with_small_spread_is_a_regression() -> None:
    verdict = compare("throughput_infer_per_s", 24.30, 19.40, spread_pct=3.1)
    assert verdict.status is VerdictStatus.REGRESSION
    assert verdict.failed
    assert verdict.change_pct == pytest.approx(-20.16, abs=0.01)
    assert verdict.worsening_pct == pytest.approx(20.16, abs=0.01)
    assert verdict.message == (
        "throughput_infer_per_s: baseline 24.30, measured 19.40 (-20.2%), tolerance 10%, run spread 3.1% -> REGRESSION"
    )


def test_a_3_percent_throughput_drop_passes() -> None:
    verdict = compare("throughput_infer_per_s", 100.0, 97.0, spread_pct=2.0)
    assert verdict.status is VerdictStatus.PASS
    assert not verdict.failed
    assert verdict.message.endswith("-> pass")


def test_a_20_percent_p99_rise_is_a_regression() -> None:
    verdict = compare("latency_p99_ms", 250.0, 300.0, spread_pct=4.0)
    assert verdict.status is VerdictStatus.REGRESSION
    assert verdict.change_pct == pytest.approx(20.0)
    assert "(+20.0%)" in verdict.message


def test_a_20_percent_p99_fall_is_an_improvement_that_suggests_re_recording() -> None:
    verdict = compare("latency_p99_ms", 250.0, 200.0, spread_pct=4.0)
    assert verdict.status is VerdictStatus.IMPROVED
    assert not verdict.failed
    assert "--update-baselines" in verdict.message


def test_a_drop_within_the_runs_spread_is_inconclusive_and_says_why() -> None:
    verdict = compare("throughput_infer_per_s", 24.30, 19.40, spread_pct=25.0)
    assert verdict.status is VerdictStatus.INCONCLUSIVE
    assert not verdict.failed
    assert "too noisy to tell (spread 25.0% exceeds the 20.2% change)" in verdict.message


def test_a_pass_from_a_noisy_run_calls_out_the_spread() -> None:
    verdict = compare("throughput_infer_per_s", 100.0, 97.0, spread_pct=14.0)
    assert verdict.status is VerdictStatus.PASS
    assert "run spread 14.0% exceeds the 10% tolerance" in verdict.message
    quiet = compare("throughput_infer_per_s", 100.0, 97.0, spread_pct=9.0)
    assert "exceeds" not in quiet.message


def test_boundaries_a_change_at_the_tolerance_passes_and_one_equal_to_the_spread_is_inconclusive() -> None:
    assert compare("throughput_infer_per_s", 100.0, 90.0, spread_pct=1.0).status is VerdictStatus.PASS
    assert compare("throughput_infer_per_s", 100.0, 80.0, spread_pct=20.0).status is VerdictStatus.INCONCLUSIVE


def test_direction_comes_from_the_metric_or_must_be_given() -> None:
    # Lower latency is better by default; the same numbers for a higher-is-better metric are a regression.
    assert compare("latency_p99_ms", 100.0, 70.0, 1.0).status is VerdictStatus.IMPROVED
    assert compare("score", 100.0, 70.0, 1.0, higher_is_better=True).status is VerdictStatus.REGRESSION
    with pytest.raises(ValueError, match="pass higher_is_better"):
        compare("score", 100.0, 70.0, 1.0)


def test_unusable_numbers_are_inconclusive_not_a_crash() -> None:
    zero = compare("throughput_infer_per_s", 0.0, 10.0, 1.0)
    assert zero.status is VerdictStatus.INCONCLUSIVE
    assert "--update-baselines" in zero.message
    nothing = compare("latency_p99_ms", 100.0, float("nan"), float("nan"))
    assert nothing.status is VerdictStatus.INCONCLUSIVE


def test_compare_level_judges_gated_metrics_with_the_larger_of_both_runs_spreads() -> None:
    baseline = {"throughput_infer_per_s": 100.0, "latency_p99_ms": 50.0, "throughput_spread_pct": 25.0}
    measured = {"throughput_infer_per_s": 80.0, "latency_p99_ms": 65.0, "p99_spread_pct": 2.0}
    verdicts = {verdict.metric: verdict for verdict in compare_level(baseline, measured)}
    assert set(verdicts) == {"throughput_infer_per_s", "latency_p99_ms"}
    assert verdicts["throughput_infer_per_s"].spread_pct == 25.0  # the baseline's noise
    assert verdicts["throughput_infer_per_s"].status is VerdictStatus.INCONCLUSIVE
    assert verdicts["latency_p99_ms"].status is VerdictStatus.REGRESSION


def test_p99_of_few_requests_is_never_a_failure() -> None:
    from blip_triton_bench.judging.verdict import MIN_REQUESTS_FOR_P99_VERDICT

    baseline = {"latency_p99_ms": 100.0, "p99_spread_pct": 1.0}
    few = {"latency_p99_ms": 150.0, "p99_spread_pct": 1.0, "request_count": MIN_REQUESTS_FOR_P99_VERDICT - 1.0}
    (verdict,) = compare_level(baseline, few)
    assert verdict.status is VerdictStatus.INCONCLUSIVE
    assert "fewer than 100: reported, never failed on" in verdict.message
    enough = {**few, "request_count": float(MIN_REQUESTS_FOR_P99_VERDICT)}
    (verdict,) = compare_level(baseline, enough)
    assert verdict.status is VerdictStatus.REGRESSION


def test_the_exceedances_a_p99_regression_needs_follow_the_binomial_bound() -> None:
    from blip_triton_bench.judging.verdict import exceedances_for_regression

    # P(Binomial(n, 1 %) >= k) < 1 %: one request of 5 above the limit happens 4.9 % of the time, two 0.1 %
    assert [exceedances_for_regression(n) for n in (1, 2, 5, 20, 60, 100)] == [2, 2, 2, 3, 4, 5]


def few_requests(slow: int, total: int = 20, slow_ms: float = 200.0) -> tuple[dict[str, float], list[float]]:
    latencies = [50.0] * (total - slow) + [slow_ms] * slow
    p99 = sorted(latencies)[-1]
    return {"latency_p99_ms": p99, "p99_spread_pct": 1.0, "request_count": float(total)}, latencies


@pytest.mark.parametrize(
    ("slow", "status", "said"),
    [
        (3, VerdictStatus.REGRESSION, "3 of 20 requests above the limit 110.00 ms (baseline p99 + 10%)"),
        (
            2,
            VerdictStatus.INCONCLUSIVE,
            "worse beyond the tolerance, but a regression needs >= 3 of 20 above the limit",
        ),
        (0, VerdictStatus.IMPROVED, "improved (a regression needs >= 3 of 20 above it)"),
    ],
)
def test_a_p99_over_few_requests_is_judged_by_how_many_exceed_its_limit(
    slow: int, status: VerdictStatus, said: str
) -> None:
    measured, latencies = few_requests(slow)
    (verdict,) = compare_level(
        {"latency_p99_ms": 100.0, "p99_spread_pct": 1.0}, measured, 10.0, measured_latencies_ms=latencies
    )
    assert verdict.status is status
    assert verdict.gated  # a bound valid at 20 requests: it could have failed, so it counts as judged
    assert said in verdict.message
    assert "a p99 judged by its value needs 100 requests" in verdict.message


def test_a_p99_over_one_request_cannot_fail_and_is_not_judged() -> None:
    measured, latencies = few_requests(1, total=1)
    (verdict,) = compare_level(
        {"latency_p99_ms": 100.0, "p99_spread_pct": 1.0}, measured, 10.0, measured_latencies_ms=latencies
    )
    assert not verdict.gated and verdict.status is VerdictStatus.INCONCLUSIVE
