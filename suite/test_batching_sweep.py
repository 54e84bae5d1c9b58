"""A Model-Analyzer-style sweep around one variant: its config regenerated over batching and instance settings,
each point checked for correctness, then measured by the load generator beside the config as given; the report names the throughput /
p99 frontier and the best config under --latency-budget-ms, and writes that config.pbtxt. The report is rewritten after
every point, and a point that fails to load or to match the reference is listed as failed while the others run.

Exploration, not regression: sweep points are never stored as baselines.
"""

from __future__ import annotations

import pytest

from blip_triton_bench.assembly import Serving
from blip_triton_bench.judging.correctness import assert_close, serving_tolerance
from blip_triton_bench.load.client import TritonInferClient
from blip_triton_bench.load.engine import concurrency_levels
from blip_triton_bench.model.reference import ReferenceSessions, reference_model_path
from blip_triton_bench.model.workload import ModelInputs
from blip_triton_bench.report.write import write_sweep_report
from blip_triton_bench.repository.variants import Variant
from blip_triton_bench.runs.sweep import (
    SweepPoint,
    SweepResult,
    as_given_point,
    parse_grid,
    point_measurements,
    run_sweep,
    sweep_points,
)
from blip_triton_bench.servers.choice import ServerChoice

pytestmark = pytest.mark.perf


def test_batching_and_instance_sweep(
    swept_variant: Variant,
    serving: Serving,
    model_artifacts,
    reference_sessions: ReferenceSessions,
    bench_options,
    bench_session,
    server_choice: ServerChoice,
) -> None:
    if server_choice.kind == "external":
        pytest.skip("--server external: the sweep writes configs into the server's repository, which it does not own")
    grid = parse_grid(bench_options.sweep_grid)
    points = [
        as_given_point(swept_variant.name, swept_variant.config),
        *sweep_points(swept_variant.name, swept_variant.config, grid),
    ]
    model_file = reference_model_path(swept_variant, model_artifacts)
    files = sorted(p for p in model_file.parent.iterdir() if p.name.startswith(model_file.name))
    inputs = serving.inputs
    (expected,) = reference_sessions.for_variant(swept_variant).run(["logits"], inputs.as_dict())
    tolerance = serving_tolerance(
        swept_variant.requirements.gpu_count > 0,
        swept_variant.runs_in_fp16,
        reference_sessions.provider_for(swept_variant).on_gpu,
    )

    def check_outputs(point_name: str, point_inputs: ModelInputs) -> None:
        with TritonInferClient.to_server(serving.server) as client:
            assert_close("logits", client.infer(point_name, point_inputs), expected, tolerance)

    directory = bench_options.report_dir / "sweep" / swept_variant.name
    reports = []

    def write_progress(result: SweepResult) -> None:  # after every point: a fault later keeps what was measured
        reports.append(
            write_sweep_report(
                directory,
                swept_variant.name,
                points,
                result.measurements,
                bench_options.latency_budget_ms,
                result.failures,
            )
        )

    def measure_point(point: SweepPoint):
        return point_measurements(
            point,
            serving.server,
            serving.staged.root,
            files,
            swept_variant.model_filename,
            inputs,
            check_outputs,
            concurrency_levels(bench_options.sweep_concurrency),
            serving.settings.load,
            bench_session.record_sweep_load,
            serving.workers,
        )

    result = run_sweep(points, measure_point, write_progress)
    report = reports[-1]
    bench_session.record_sweep_lines(report.lines)
    assert not result.failures, "sweep points failed (the others are in the report):\n" + "\n".join(
        f"{failure.point_name}: {failure.cause}" for failure in result.failures
    )
    failed = [m for m in result.measurements if m.errors]
    assert not failed, f"requests failed during the sweep: {[(m.point_name, m.level_id, m.errors) for m in failed]}"
    if report.winner is None:
        budget = bench_options.latency_budget_ms
        pytest.fail(
            f"no swept config of {swept_variant.name} kept p99 within {budget} ms at a stable level; see "
            f"{report.markdown_path} (raise --latency-budget-ms, or widen --sweep-grid)",
            pytrace=False,
        )
