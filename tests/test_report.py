"""The report: perf_analyzer's CSV columns, the markdown table, serving efficiency and the plots."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from blip_triton_bench.judging.efficiency import FormedBatch, time_in_process
from blip_triton_bench.judging.stats import ServerStatistics, WindowSample, assess_stability, summarize_level
from blip_triton_bench.judging.verdict import compare_level
from blip_triton_bench.load.engine import CONCURRENCY, REQUEST_RATE, LevelMeasurement, LoadLevel
from blip_triton_bench.report.selection import serving_efficiency
from blip_triton_bench.report.text import markdown_table, verdict_text
from blip_triton_bench.report.write import write_report
from blip_triton_bench.runs.perf import JudgedLevel
from blip_triton_bench.servers.resources import ResourceUsage

pytestmark = pytest.mark.unit


def judged_level(
    variant: str,
    level: LoadLevel,
    latency_ms: float,
    baseline: dict[str, float] | None = None,
    jitter: float = 0.0,
    requests_per_window: int = 20,
) -> JudgedLevel:
    windows = tuple(
        WindowSample(
            start_s=i * 5.0,
            duration_s=5.0,
            latencies_ms=tuple([latency_ms + jitter * i] * requests_per_window),
            errors=0,
        )
        for i in range(3)
    )
    stability = assess_stability(windows)
    summary = summarize_level(windows, stability)
    server = ServerStatistics(
        inference_count=60,
        execution_count=40,
        success_count=60,
        queue_ms=1.5,
        compute_input_ms=0.2,
        compute_infer_ms=400.0,
        compute_output_ms=0.3,
        executions_by_batch_size={1: 20, 2: 20},
    )
    measurement = LevelMeasurement(
        level=level,
        windows=windows,
        stability=stability,
        summary=summary,
        server=server,
        offered_rate_per_s=level.value if level.mode == REQUEST_RATE else None,
        achieved_rate_per_s=4.0,
    )
    verdicts = compare_level(baseline, summary.metrics()) if baseline else []
    return JudgedLevel(
        variant=variant,
        measurement=measurement,
        tolerance_pct=10.0,
        baseline_path=Path("baselines/x.json"),
        baseline_metrics=baseline,
        verdicts=tuple(verdicts),
        ceiling_infer_per_s=10.0,
    )


def test_csv_uses_perf_analyzer_column_names_and_microseconds(tmp_path: Path) -> None:
    results = [judged_level("cpu", LoadLevel(CONCURRENCY, 1), latency_ms=400.0)]
    write_report(tmp_path, results, in_process_infer_per_s=2.5, notes=["a note"])
    with (tmp_path / "results.csv").open() as stream:
        (row,) = list(csv.DictReader(stream))
    assert row["Concurrency"] == "1"
    assert row["Inferences/Second"] == "4.0000"  # 20 requests per 5 s window
    assert row["p99 latency"] == "400000"  # perf_analyzer writes latencies in microseconds
    assert row["Server Compute Infer"] == "400000"
    assert row["Avg Batch Size"] == "1.50"
    assert row["Stable"] == "yes"


def test_report_files_and_terminal_lines(tmp_path: Path) -> None:
    baseline = {
        "throughput_infer_per_s": 5.0,
        "latency_p99_ms": 300.0,
        "throughput_spread_pct": 1.0,
        "p99_spread_pct": 1.0,
    }
    results = [
        judged_level("cpu", LoadLevel(CONCURRENCY, 1), latency_ms=400.0, baseline=baseline),
        judged_level("cpu", LoadLevel(CONCURRENCY, 2), latency_ms=420.0),
        judged_level("cpu", LoadLevel(REQUEST_RATE, 4), latency_ms=450.0),
    ]
    lines = write_report(tmp_path, results, in_process_infer_per_s=2.0, notes=[])

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latency_vs_throughput.png",
        "report.md",
        "results.csv",
        "results.json",
        "throughput_vs_concurrency.png",
    ]
    assert all(
        (tmp_path / name).stat().st_size > 10_000
        for name in ("latency_vs_throughput.png", "throughput_vs_concurrency.png")
    )
    document = json.loads((tmp_path / "results.json").read_text())
    assert [level["measurement"]["level"]["mode"] for level in document["levels"]] == ["concurrency"] * 2 + [
        "request_rate"
    ]
    efficiency = document["serving_efficiency"][0]
    assert efficiency["batch1_cpu_ratio"] == pytest.approx(2.0)  # 4 infer/s served vs 2 in-process (CPU, batch 1)
    assert efficiency["ratio"] is None and efficiency["in_process"] is None  # test_serving_efficiency did not run
    table = lines[0]
    assert "| cpu | concurrency=1 | 4.00 | 400.0 | 400.0 | 1x20 2x20 | regression (latency_p99_ms +33.3%)" in table
    assert "| cpu | concurrency=2 | 4.00 |" in table and "no baseline" in table
    assert "offered 4/s, achieved 4.00/s" in table
    assert "near client ceiling (10.0 infer/s)" not in table  # 4 infer/s is under half of the 10 infer/s ceiling


def test_near_ceiling_and_unstable_levels_are_flagged() -> None:
    judged = judged_level("cpu", LoadLevel(CONCURRENCY, 4), latency_ms=100.0, jitter=40.0)  # 100, 140, 180 ms
    table = markdown_table([judged])
    assert "UNSTABLE" in table
    assert "near client ceiling" in markdown_table(
        [judged_level("cpu", LoadLevel(CONCURRENCY, 8), latency_ms=2.0, requests_per_window=30)]  # 6 of 10 infer/s
    )


def test_serving_efficiency_takes_each_variants_best_level() -> None:
    results = [
        judged_level("a", LoadLevel(CONCURRENCY, 1), latency_ms=400.0),  # 4 infer/s
        judged_level("a", LoadLevel(CONCURRENCY, 2), latency_ms=200.0),  # 4 infer/s (20 requests per window)
    ]
    (efficiency,) = serving_efficiency(results, batch1_cpu_infer_per_s=None)
    assert efficiency.ratio is None and efficiency.batch1_cpu_ratio is None
    assert efficiency.best_level == "concurrency=1"


def test_efficiency_table_and_json_set_the_best_level_against_in_process_at_the_formed_batch(tmp_path: Path) -> None:
    results = [
        judged_level("gpu", LoadLevel(CONCURRENCY, 1), latency_ms=400.0),  # 4 infer/s, batches 1x20 2x20
        judged_level("cpu", LoadLevel(CONCURRENCY, 1), latency_ms=400.0),
    ]
    batch = FormedBatch(2, "carried the most inferences (2 x 20 executions)")
    in_process = {
        name: time_in_process(
            lambda: None, batch, provider, "concurrency=1", 0, 1, clock=iter([0.0, 2 / rate]).__next__
        )
        for name, provider, rate in (("gpu", "CUDA on GPU 0", 8.0), ("cpu", "CPU", 4.0))
    }
    lines = write_report(tmp_path, results, 2.0, [], in_process=in_process, min_ratios={"gpu": 0.8})

    efficiency = lines[2]
    assert (
        "| gpu | 4.00 (concurrency=1) | 1x20 2x20 | 8.00 at batch 2 (CUDA on GPU 0) | 0.50 | 0.8: BELOW | 2.00 | 2.00 |"
        in efficiency
    )
    assert (
        "| cpu | 4.00 (concurrency=1) | 1x20 2x20 | 4.00 at batch 2 (CPU) | 1.00 | - (reported only) | 2.00 | 2.00 |"
        in efficiency
    )
    gpu, cpu = json.loads((tmp_path / "results.json").read_text())["serving_efficiency"]
    assert (gpu["ratio"], gpu["meets_minimum"], gpu["min_ratio"]) == (pytest.approx(0.5), False, 0.8)
    assert gpu["in_process"]["batch_size"] == 2 and gpu["in_process"]["provider"] == "CUDA on GPU 0"
    assert gpu["batches_formed"] == {"1": 20, "2": 20}
    assert (cpu["ratio"], cpu["meets_minimum"]) == (pytest.approx(1.0), None)


def with_resources(judged: JudgedLevel, **fields: float | None) -> JudgedLevel:
    values = dict.fromkeys(
        (
            "gpu_util_pct_mean",
            "gpu_util_pct_max",
            "gpu_memory_mb_max",
            "gpu_power_w_mean",
            "server_cpu_pct_mean",
            "server_cpu_pct_max",
            "server_rss_mb_max",
        )
    )
    values.update(fields)
    unavailable = () if values["gpu_util_pct_mean"] is not None else ("GPU: NVML not available (no driver)",)
    return dataclasses.replace(judged, resources=ResourceUsage(**values, samples=8, unavailable=unavailable))


def test_resource_use_goes_into_model_analyzers_csv_columns_after_perf_analyzers(tmp_path: Path) -> None:
    cpu_host = with_resources(
        judged_level("cpu", LoadLevel(CONCURRENCY, 1), 400.0), server_cpu_pct_mean=181.6, server_rss_mb_max=412.25
    )
    gpu_host = with_resources(
        judged_level("gpu", LoadLevel(CONCURRENCY, 1), 40.0),
        server_cpu_pct_mean=95.0,
        server_rss_mb_max=900.0,
        gpu_util_pct_mean=73.4,
        gpu_memory_mb_max=2100.0,
        gpu_power_w_mean=180.5,
    )
    unsampled = judged_level("cpu", LoadLevel(CONCURRENCY, 2), 400.0)
    write_report(tmp_path, [cpu_host, gpu_host, unsampled], in_process_infer_per_s=None, notes=[])
    with (tmp_path / "results.csv").open() as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
    columns = reader.fieldnames
    assert columns[columns.index("Verdict") + 1 :] == [
        "CPU Utilization (%)",
        "RAM Usage (MB)",
        "GPU Utilization (%)",
        "GPU Memory Usage (MB)",
        "GPU Power Usage (W)",
    ]
    assert (rows[0]["CPU Utilization (%)"], rows[0]["RAM Usage (MB)"], rows[0]["GPU Utilization (%)"]) == (
        "181.6",
        "412.2",
        "",
    )
    assert (rows[1]["GPU Utilization (%)"], rows[1]["GPU Memory Usage (MB)"], rows[1]["GPU Power Usage (W)"]) == (
        "73.4",
        "2100.0",
        "180.5",
    )
    assert rows[2]["CPU Utilization (%)"] == "" and rows[2]["RAM Usage (MB)"] == ""
    levels = json.loads((tmp_path / "results.json").read_text())["levels"]
    assert levels[0]["resources"]["server_cpu_pct_mean"] == pytest.approx(181.6)
    assert levels[0]["resources"]["gpu_util_pct_mean"] is None
    assert levels[2]["resources"] is None
    assert (tmp_path / "resources_vs_concurrency.png").stat().st_size > 10_000


def test_levels_table_has_a_compact_resource_column_and_says_what_was_not_measured(tmp_path: Path) -> None:
    cpu_host = with_resources(
        judged_level("cpu", LoadLevel(CONCURRENCY, 1), 400.0), server_cpu_pct_mean=181.6, server_rss_mb_max=412.25
    )
    gpu_host = with_resources(
        judged_level("gpu", LoadLevel(CONCURRENCY, 1), 40.0),
        server_cpu_pct_mean=95.0,
        server_rss_mb_max=900.0,
        gpu_util_pct_mean=73.4,
        gpu_memory_mb_max=2100.0,
        gpu_power_w_mean=180.5,
    )
    external = with_resources(judged_level("ext", LoadLevel(CONCURRENCY, 1), 40.0))
    external = dataclasses.replace(
        external, resources=dataclasses.replace(external.resources, unavailable=("server CPU/RAM: external",))
    )
    table = markdown_table([cpu_host, gpu_host, external])
    assert "| server CPU (mean) RAM (max); GPU util mem power |" in table.splitlines()[0]
    assert "| CPU 182% 412 MB |" in table
    assert "| CPU 95% 900 MB; GPU 73% 2100 MB 180 W |" in table
    assert "| n/a |" in table
    report_table = write_report(tmp_path, [cpu_host, external], in_process_infer_per_s=None, notes=[])[0]
    assert "- Resource use not measured: GPU: NVML not available (no driver)" in report_table
    assert "- Resource use not measured: server CPU/RAM: external" in report_table
    assert "Resource use not measured" in (tmp_path / "report.md").read_text()


def test_the_report_verdict_states_the_p_value_and_the_detectable_slowdown() -> None:
    judged = judged_level(
        "cpu",
        LoadLevel(CONCURRENCY, 1),
        latency_ms=400.0,
        baseline={"throughput_infer_per_s": 2.5, "throughput_spread_pct": 2.0},
    )
    noisy = compare_level(
        {"throughput_infer_per_s": 10.0},
        {"throughput_infer_per_s": 8.7},
        measured_windows=(8.6, 8.8, 8.7),
        baseline_windows=((10.0, 13.0, 7.0), (12.0, 8.0, 11.0), (6.0, 14.0, 10.0)),
    )
    text = verdict_text(dataclasses.replace(judged, verdicts=tuple(noisy)))

    assert text == (
        f"inconclusive (throughput_infer_per_s -13.0%, p {noisy[0].p_value:.3f}); "
        f"detects >= {noisy[0].detectable_pct:.1f}%"
    )
    assert "detects" not in verdict_text(judged)  # a verdict without windows claims no power


def test_an_open_loop_whose_sends_waited_for_its_cap_says_the_schedule_slipped() -> None:
    judged = judged_level("cpu", LoadLevel(REQUEST_RATE, 4), latency_ms=100.0)
    assert "sends waited" not in markdown_table([judged])
    measurement = dataclasses.replace(judged.measurement, held_sends=7, in_flight_cap=16)
    held = dataclasses.replace(judged, measurement=measurement)
    assert "7 sends waited with 16 requests in flight (the open loop's cap, 2 s of its rate)" in markdown_table([held])
