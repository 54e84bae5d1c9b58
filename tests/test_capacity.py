"""The capacity search: bracketing by doubling or halving, bisection down to the precision, and the limits that stop
it, over a deterministic rule for which rates meet the SLO (the measuring itself is tests/test_capacity_end_to_end.py)."""

from __future__ import annotations

import math

import pytest

from blip_triton_bench.judging.verdict import VerdictStatus, compare_level
from blip_triton_bench.runs.capacity import (
    DEFAULT_PRECISION_PCT,
    MAX_HALVINGS,
    Probe,
    capacity_level_id,
    search_capacity,
)

pytestmark = pytest.mark.unit

SLO = "latency_p99_ms=100"


def server_with_capacity(capacity_per_s: float):
    """Which rates meet the SLO on a server that keeps it up to `capacity_per_s`, and the rates asked for."""
    asked: list[float] = []

    def measure(rate: float) -> Probe:
        asked.append(rate)
        met = rate <= capacity_per_s
        return Probe(rate, met, "within" if met else "over")

    return measure, asked


@pytest.mark.parametrize(("capacity", "start"), [(37.3, 5.0), (37.3, 200.0), (0.9, 1.0), (1000.0, 999.0)])
def test_the_search_brackets_the_capacity_within_its_precision(capacity: float, start: float) -> None:
    measure, asked = server_with_capacity(capacity)
    result = search_capacity(measure, start, SLO)
    assert result.bracketed
    assert result.capacity_per_s <= capacity < result.missed_per_s
    assert result.bracket_pct <= DEFAULT_PRECISION_PCT
    assert [probe.rate_per_s for probe in result.probes] == asked
    assert result.metrics()["capacity_per_s"] == result.capacity_per_s
    assert result.metrics()["capacity_spread_pct"] == pytest.approx(result.bracket_pct)


def test_a_start_that_misses_is_halved_until_a_rate_meets() -> None:
    measure, asked = server_with_capacity(3.0)
    result = search_capacity(measure, 20.0, SLO)
    assert asked[:4] == [20.0, 10.0, 5.0, 2.5]
    assert result.capacity_per_s <= 3.0 < result.missed_per_s


def test_a_variant_that_misses_at_every_rate_has_no_capacity_and_says_how_low_it_went() -> None:
    measure, asked = server_with_capacity(0.0)
    result = search_capacity(measure, 64.0, SLO)
    assert result.capacity_per_s is None and not result.bracketed
    assert len(asked) == 1 + MAX_HALVINGS
    assert "missed even at 1 requests/s, 1/64 of the start" in result.limited_by
    assert "no rate tried met the SLO" in result.describe()


def test_a_search_that_reaches_the_client_ceiling_is_a_lower_bound_naming_it() -> None:
    measure, asked = server_with_capacity(math.inf)
    result = search_capacity(measure, 10.0, SLO, max_per_s=50.0, max_reason="the client ceiling (50 requests/s)")
    assert asked == [10.0, 20.0, 40.0, 50.0]
    assert result.capacity_per_s == 50.0 and result.missed_per_s is None
    assert "the client ceiling (50 requests/s) met it" in result.limited_by
    assert "at least 50 requests/s" in result.describe()


def test_the_search_spends_at_most_its_probes() -> None:
    measure, asked = server_with_capacity(100.0)
    result = search_capacity(measure, 1.0, SLO, precision_pct=0.001, max_probes=9)
    assert len(asked) == 9
    assert result.bracketed  # doubling reached 128 after 8 probes; one bisection step was left


def test_a_capacity_that_fell_beyond_its_bracket_and_the_tolerance_is_a_regression() -> None:
    measure, _ = server_with_capacity(40.0)
    before = search_capacity(measure, 8.0, SLO).metrics()
    measure, _ = server_with_capacity(30.0)
    after = search_capacity(measure, 8.0, SLO).metrics()
    (verdict,) = compare_level(before, after, tolerance_pct=10.0)
    assert verdict.metric == "capacity_per_s"
    assert verdict.status is VerdictStatus.REGRESSION
    (same,) = compare_level(before, before, tolerance_pct=10.0)
    assert same.status is VerdictStatus.PASS


def test_each_slo_has_a_capacity_level_of_its_own() -> None:
    assert capacity_level_id("latency_p99_ms=100") != capacity_level_id("latency_p99_ms=200")
