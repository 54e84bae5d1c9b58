"""Capacity at the SLO: per variant, the highest request rate it serves within its service-level objective (--slo,
or its config's bench_slo), found by bracketing then bisection over open-loop levels (blip_triton_bench/runs/capacity.py)
and judged against the baseline like any level: a capacity that fell beyond the tolerance and beyond the search's
own bracket is a regression.

Runs after the session's load levels (marker `reads_levels`): the search starts at the highest throughput the
variant reached at its concurrency levels, near its capacity.
"""

from __future__ import annotations

import pytest

from blip_triton_bench.fixtures.verdicts import enforce_measured_numbers
from blip_triton_bench.judging.proof import Judgement
from blip_triton_bench.judging.slo import REQUEST_QUANTITIES
from blip_triton_bench.runs.capacity import capacity_level_id, search_variant_capacity, start_rate_per_s
from blip_triton_bench.runs.perf import PerfRun, VariantStopped, variant_service_level
from blip_triton_bench.servers.served import ServedVariant

pytestmark = [pytest.mark.perf, pytest.mark.capacity, pytest.mark.reads_levels]


def test_capacity_at_the_slo(
    served_variant: ServedVariant, perf_run: PerfRun, bench_session, judgement: Judgement
) -> None:
    variant = served_variant.variant
    service_level = variant_service_level(variant, perf_run.settings)
    if service_level is None:
        pytest.skip(f"no SLO for {variant.name}: give --slo (e.g. latency_p99_ms=2000) or its config's bench_slo")
    if not any(target.quantity in REQUEST_QUANTITIES for target in service_level.targets):
        pytest.skip(f"the SLO {service_level.text} names no target a request to {variant.name} has (latency_pNN_ms)")
    try:
        capacity = search_variant_capacity(
            perf_run, variant, start_rate_per_s(perf_run.results, variant.name), perf_run.ceiling()
        )
    except VariantStopped as stopped:
        pytest.fail(str(stopped), pytrace=False)
    bench_session.record_capacity(variant.name, capacity)
    level_id = capacity_level_id(service_level.text)
    assert capacity.capacity_per_s is not None, f"{variant.name} meets its SLO at no rate: {capacity.describe()}"
    if not capacity.bracketed:
        judgement.not_judged(level_id, f"the search found no rate that misses the SLO: {capacity.limited_by}")
        return
    enforce_measured_numbers(perf_run, judgement, variant, capacity.metrics(), level_id)
