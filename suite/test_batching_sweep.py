"""A Model-Analyzer-style sweep around one variant: its config regenerated over batching and instance settings,
each point checked for correctness, then measured by the load generator beside the config as given; the report names the throughput /
p99 frontier and the best config under --latency-budget-ms, and writes that config.pbtxt.

Exploration, not regression: sweep points are never stored as baselines.
"""

from __future__ import annotations

import pytest

from blip_triton_bench.client import TritonInferClient
from blip_triton_bench.correctness import assert_close, serving_tolerance
from blip_triton_bench.load import concurrency_levels, measure_level
from blip_triton_bench.fixtures.plugin import SERVER_CHOICE_KEY, perf_settings
from blip_triton_bench.reference import ReferenceSessions, reference_model_path
from blip_triton_bench.repository import StagedRepository, Variant, stage_generated
from blip_triton_bench.servers.base import RunningServer
from blip_triton_bench.sweep import SweepMeasurement, as_given_point, parse_grid, sweep_points, write_sweep_report
from blip_triton_bench.workload import build_inputs

pytestmark = pytest.mark.perf


def test_batching_and_instance_sweep(
    swept_variant: Variant,
    triton_server: RunningServer,
    staged_repository: StagedRepository,
    model_artifacts,
    reference_sessions: ReferenceSessions,
    model_description,
    bench_options,
    run_record,
    pytestconfig: pytest.Config,
) -> None:
    if pytestconfig.stash[SERVER_CHOICE_KEY].kind == "external":
        pytest.skip("--server external: the sweep writes configs into the server's repository, which it does not own")
    grid = parse_grid(bench_options.sweep_grid)
    points = [
        as_given_point(swept_variant.name, swept_variant.config),
        *sweep_points(swept_variant.name, swept_variant.config, grid),
    ]
    model_file = reference_model_path(swept_variant, model_artifacts)
    files = sorted(p for p in model_file.parent.iterdir() if p.name.startswith(model_file.name))
    settings = perf_settings(bench_options).load
    levels = concurrency_levels(bench_options.sweep_concurrency)
    inputs = build_inputs(model_description, 1, bench_options.sequence_length)
    (expected,) = reference_sessions.for_variant(swept_variant).run(["logits"], inputs.as_dict())
    tolerance = serving_tolerance(swept_variant.requirements.gpu_count > 0, swept_variant.runs_in_fp16)
    url = triton_server.endpoints.grpc_url

    measurements = []
    for point in points:
        stage_generated(staged_repository.root, point.config, files, swept_variant.model_filename)
        run_record.model_loads[point.name] = triton_server.load_model(point.name)
        try:
            with TritonInferClient(url, "grpc") as client:  # a point that answers wrong is not worth timing
                assert_close("logits", client.infer(point.name, inputs), expected, tolerance)
            for level in levels:
                summary = measure_level(url, point.name, inputs, level, settings).summary
                measurements.append(
                    SweepMeasurement(
                        point_name=point.name,
                        level_id=level.level_id,
                        level_value=level.value,
                        throughput_infer_per_s=summary.throughput_infer_per_s,
                        latency_p50_ms=summary.latency_p50_ms,
                        latency_p99_ms=summary.latency_p99_ms,
                        stable=summary.stable,
                        errors=summary.errors,
                    )
                )
        finally:
            triton_server.unload_model(point.name)

    report = write_sweep_report(
        bench_options.report_dir / "sweep" / swept_variant.name,
        swept_variant.name,
        points,
        measurements,
        bench_options.latency_budget_ms,
    )
    run_record.sweep_lines.extend(report.lines)
    failed = [m for m in measurements if m.errors]
    assert not failed, f"requests failed during the sweep: {[(m.point_name, m.level_id, m.errors) for m in failed]}"
    if report.winner is None:
        budget = bench_options.latency_budget_ms
        pytest.fail(
            f"no swept config of {swept_variant.name} kept p99 within {budget} ms at a stable level; see "
            f"{report.markdown_path} (raise --latency-budget-ms, or widen --sweep-grid)",
            pytrace=False,
        )
