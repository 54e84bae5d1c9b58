"""The A/B verdict on paired rounds: deterministic numbers shaped like this host's (it drifts between two speeds
from run to run, 1.28 and 1.41 infer/s at BLIP-base c=1), so each case shows what pairing buys."""

from __future__ import annotations

import numpy as np
import pytest

from blip_triton_bench.judging.verdict import VerdictStatus
from blip_triton_bench.load.engine import CONCURRENCY, REQUEST_RATE, LoadLevel
from blip_triton_bench.runs.ab import DEFAULT_AB_MIN_EFFECT_PCT, judge_ab, round_throughput

pytestmark = pytest.mark.unit

#: The host's speed in each of 10 rounds: two states, as issue 15 measured them, in no order.
HOST = np.array([1.41, 1.28, 1.28, 1.41, 1.28, 1.41, 1.41, 1.28, 1.41, 1.28])
#: Small per-measurement noise (±1.5 %), fixed so the test is deterministic.
JITTER = np.random.default_rng(7).uniform(-0.015, 0.015, size=(2, 10))


def rounds(after_factor: float, jitter: np.ndarray = JITTER) -> tuple[list[float], list[float]]:
    return list(HOST * (1 + jitter[0])), list(HOST * after_factor * (1 + jitter[1]))


def test_a_ten_percent_slowdown_is_a_regression_though_the_host_drifts_by_as_much() -> None:
    verdict = judge_ab(*rounds(1 / 1.1), DEFAULT_AB_MIN_EFFECT_PCT)  # 10 % more time per request
    assert verdict.status is VerdictStatus.REGRESSION
    assert verdict.p_value < 0.01
    assert -10.0 < verdict.effect_pct < -8.0  # -9.1 % throughput
    assert verdict.ci_low_pct < verdict.effect_pct < verdict.ci_high_pct < -DEFAULT_AB_MIN_EFFECT_PCT
    assert verdict.detectable_pct == DEFAULT_AB_MIN_EFFECT_PCT  # the pairs resolve finer than the minimum
    assert "-> REGRESSION; detects >= 5.0%" in verdict.message
    assert "Wilcoxon signed-rank one-sided p" in verdict.message


def test_unchanged_passes_though_the_spread_across_rounds_is_ten_percent() -> None:
    verdict = judge_ab(*rounds(1.0), DEFAULT_AB_MIN_EFFECT_PCT)
    assert verdict.status is VerdictStatus.PASS
    assert abs(verdict.effect_pct) < 1.5
    assert verdict.ci_low_pct < 0 < verdict.ci_high_pct


def test_a_slowdown_carried_by_a_few_pairs_is_inconclusive_and_says_what_it_can_detect() -> None:
    """Two pairs 30 % slower, the rest a little faster: the mean says -6 %, the signed ranks say nothing."""
    ratios = np.array([0.70, 1.04, 1.03, 0.72, 1.05, 1.02, 0.98, 1.06])
    before = HOST[:8]
    verdict = judge_ab(list(before), list(before * ratios), DEFAULT_AB_MIN_EFFECT_PCT)
    assert verdict.status is VerdictStatus.INCONCLUSIVE
    assert verdict.effect_pct < -DEFAULT_AB_MIN_EFFECT_PCT and verdict.p_value > 0.3
    assert verdict.detectable_pct > 10.0
    assert "raise --ab-rounds or --window-s" in verdict.message


def test_faster_is_an_improvement_and_small_changes_pass() -> None:
    assert judge_ab(*rounds(1.2), DEFAULT_AB_MIN_EFFECT_PCT).status is VerdictStatus.IMPROVED
    assert judge_ab(*rounds(0.98), DEFAULT_AB_MIN_EFFECT_PCT).status is VerdictStatus.PASS  # under the minimum


def test_identical_rounds_pass_with_p_one() -> None:
    verdict = judge_ab([2.0] * 6, [2.0] * 6, 5.0)
    assert (verdict.status, verdict.p_value, verdict.effect_pct) == (VerdictStatus.PASS, 1.0, 0.0)


def test_unpaired_or_empty_rounds_are_refused() -> None:
    with pytest.raises(ValueError, match="paired rounds"):
        judge_ab([1.0, 2.0], [1.0], 5.0)
    with pytest.raises(ValueError, match="completed requests"):
        judge_ab([1.0, 0.0], [1.0, 1.0], 5.0)


def test_a_closed_loop_rounds_throughput_is_continuous_where_completions_are_few() -> None:
    """Seven BLIP-base requests of ~860 ms at c=1 in a 6.4 s round: Little's law gives 1.16 infer/s, and 10 %
    slower requests give 10 % less; counting completions would read 7 / 6.4 both times."""
    fast = [860.0] * 7
    slow = [946.0] * 7
    assert round_throughput(LoadLevel(CONCURRENCY, 1), fast, 6.4) == pytest.approx(1000 / 860)
    assert round_throughput(LoadLevel(CONCURRENCY, 1), slow, 6.4) / round_throughput(
        LoadLevel(CONCURRENCY, 1), fast, 6.4
    ) == pytest.approx(860 / 946)
    assert round_throughput(LoadLevel(CONCURRENCY, 4), [100.0] * 40, 1.0) == pytest.approx(40.0)
    assert round_throughput(LoadLevel(REQUEST_RATE, 5), [20.0] * 10, 2.0) == pytest.approx(5.0)
    assert round_throughput(LoadLevel(CONCURRENCY, 1), [], 2.0) == 0.0
