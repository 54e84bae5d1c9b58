"""Each variant's best served throughput against in-process ONNX Runtime on the variant's own execution provider,
at the batch size the dynamic batcher formed at that level: what serving costs over calling the model directly.

Runs after the session's load levels (marker `reads_levels`); fails only a variant whose config sets
`bench_min_serving_efficiency` and falls below it, every other one is reported.
"""

from __future__ import annotations

import pytest

from blip_triton_bench.judging.efficiency import efficiency_shortfall, formed_batch_size, time_in_process
from blip_triton_bench.judging.proof import Judgement
from blip_triton_bench.model.reference import ReferenceSessions
from blip_triton_bench.model.source import ModelDescription
from blip_triton_bench.model.workload import build_inputs
from blip_triton_bench.report.selection import best_levels
from blip_triton_bench.repository.variants import Variant
from blip_triton_bench.runs.perf import MIN_EFFICIENCY_PARAMETER, PerfConfigError, variant_min_serving_efficiency

pytestmark = [pytest.mark.perf, pytest.mark.reads_levels]


def test_served_throughput_against_in_process_at_the_formed_batch(
    variant: Variant,
    reference_sessions: ReferenceSessions,
    model_description: ModelDescription,
    bench_options,
    bench_session,
    judgement: Judgement,
) -> None:
    try:
        minimum = variant_min_serving_efficiency(variant)
    except PerfConfigError as error:
        pytest.fail(str(error), pytrace=False)
    results = bench_session.perf.results if bench_session.perf is not None else []
    best = best_levels(results).get(variant.name)
    if best is None:
        pytest.skip(f"no load level of {variant.name} was measured in this session: run suite/test_perf.py with it")
    batch = formed_batch_size(best.measurement.server, variant.config.max_batch_size)
    session = reference_sessions.for_variant(variant)
    provider = reference_sessions.provider_for(variant)
    inputs = build_inputs(model_description, batch.batch_size, bench_options.sequence_length).as_dict()
    reference = time_in_process(lambda: session.run(["logits"], inputs), batch, provider.describe(), best.level_id)
    bench_session.record_in_process(variant.name, reference, minimum)

    shortfall = efficiency_shortfall(
        variant.name,
        best.measurement.summary.throughput_infer_per_s,
        best.level_id,
        reference,
        minimum,
        MIN_EFFICIENCY_PARAMETER,
        variant.config_path,
    )
    assert shortfall is None, shortfall
    if minimum is None:  # the ratio is reported; with nothing to hold it to, it could not have failed
        judgement.not_judged(
            best.level_id, f"no {MIN_EFFICIENCY_PARAMETER} in {variant.config_path}: the ratio is reported, not judged"
        )
