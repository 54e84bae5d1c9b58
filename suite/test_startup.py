"""Start-up costs per provider and variant: cold start, model load, first request against steady state.

They go into the report and the baselines (level "startup") and are judged like throughput and latency.
"""

from __future__ import annotations

import pytest

from blip_triton_bench.fixtures.verdicts import enforce_verdict, judged_numbers
from blip_triton_bench.judging.proof import Judgement
from blip_triton_bench.model.source import ModelDescription
from blip_triton_bench.model.workload import build_inputs
from blip_triton_bench.repository.variants import StagedRepository
from blip_triton_bench.runs.perf import PerfRun
from blip_triton_bench.runs.startup import ColdStart, measure_cold_start, measure_warm_up
from blip_triton_bench.servers.choice import ServerChoice
from blip_triton_bench.servers.served import ServedVariant

pytestmark = pytest.mark.perf

REPEATS = 3


@pytest.fixture(scope="session")
def cold_start(
    server_choice: ServerChoice,
    bench_options,
    host_info,
    staged_repository: StagedRepository,
    tmp_path_factory: pytest.TempPathFactory,
    bench_session,
) -> ColdStart:
    from blip_triton_bench.assembly import server_provider

    choice = server_choice
    if choice.kind == "external":
        pytest.skip("--server external: the suite starts no server there, so it has no cold start to measure")
    provider = server_provider(choice, bench_options, host_info, tmp_path_factory.mktemp("cold-start")).provider
    measured = measure_cold_start(provider, staged_repository.root, REPEATS)
    bench_session.note(
        f"cold start ({measured.provider}, start to ready): "
        + ", ".join(f"{seconds:.2f} s" for seconds in measured.ready_s)
    )
    return measured


def test_startup_costs(
    served_variant: ServedVariant,
    cold_start: ColdStart,
    perf_run: PerfRun,
    model_description: ModelDescription,
    bench_options,
    judgement: Judgement,
) -> None:
    inputs = build_inputs(model_description, 1, bench_options.sequence_length)
    warm_up = measure_warm_up(served_variant.server, served_variant.name, inputs, REPEATS)
    assert served_variant.server.is_model_ready(served_variant.name)  # left loaded for the tests after this one
    # judged (so kept for the report and the baselines) before the sanity check below can end the test
    judged = judged_numbers(perf_run, served_variant.variant, {**cold_start.metrics(), **warm_up.metrics()})
    assert all(seconds > 0 for seconds in warm_up.load_s)
    enforce_verdict(judged, perf_run, judgement)
