"""Caption latency in genai-perf's terms, the pick-a-variant table and plot, and their place in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blip_triton_bench.captioning.caption import Caption, greedy_caption
from blip_triton_bench.captioning.latency import CaptionLatency, speedup
from blip_triton_bench.judging.agreement import measure_agreement
from blip_triton_bench.judging.verdict import VerdictStatus, compare_level
from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel
from blip_triton_bench.model.source import SpecialTokens
from blip_triton_bench.model.workload import ModelInputs
from blip_triton_bench.report.plots import plot_accuracy_vs_speed
from blip_triton_bench.report.selection import summarize_variants
from blip_triton_bench.report.text import caption_ratio_lines, caption_table, choice_table, throughput_ratio_lines
from blip_triton_bench.report.write import ReportSection, write_report
from tests.test_report import judged_level

pytestmark = pytest.mark.unit


def caption(step_ms: list[float]) -> Caption:
    return Caption(token_ids=tuple(range(len(step_ms) + 1)), step_latencies_ms=tuple(step_ms))


def test_genai_perf_metrics_from_step_latencies() -> None:
    latency = CaptionLatency("v", "captioner (streamed)", (caption([100, 10, 10, 10]), caption([120, 20, 20, 20])))
    metrics = latency.metrics()
    assert latency.output_tokens == 4
    assert metrics["caption_ms"] == pytest.approx((130 + 180) / 2)
    assert metrics["time_to_first_token_ms"] == pytest.approx(110)
    assert metrics["inter_token_latency_ms"] == pytest.approx(15)  # (request latency - ttft) / (tokens - 1)
    assert metrics["output_token_throughput_per_s"] == pytest.approx(4 / 0.155)
    assert metrics["caption_spread_pct"] == pytest.approx(50 / 155 * 100)


def test_speedup_compares_equal_lengths_only() -> None:
    fast = CaptionLatency("split", "captioner", (caption([50, 5, 5]),))
    slow = CaptionLatency("mono", "monolithic", (caption([300, 300, 300]),))
    assert speedup(fast, slow) == pytest.approx(900 / 60)
    with pytest.raises(ValueError, match="compare only at equal length"):
        speedup(fast, CaptionLatency("mono", "monolithic", (caption([300, 300]),)))


def test_a_slower_caption_is_a_regression_of_the_caption_level() -> None:
    baseline = CaptionLatency("v", "w", (caption([100, 10, 10]), caption([100, 10, 10]))).metrics()
    slower = CaptionLatency("v", "w", (caption([100, 30, 30]), caption([100, 30, 30]))).metrics()
    verdicts = {verdict.metric: verdict for verdict in compare_level(baseline, slower, 10.0)}
    assert verdicts["caption_ms"].status is VerdictStatus.REGRESSION
    assert verdicts["inter_token_latency_ms"].status is VerdictStatus.REGRESSION
    assert verdicts["time_to_first_token_ms"].status is VerdictStatus.PASS


def test_greedy_caption_ignores_the_end_token_when_told_to() -> None:
    tokens = SpecialTokens(bos_token_id=5, eos_token_id=2, pad_token_id=0)

    def always_end(inputs: ModelInputs) -> np.ndarray:
        logits = np.zeros((1, inputs.input_ids.shape[1], 8), dtype=np.float32)
        logits[0, -1, tokens.eos_token_id] = 1.0
        return logits

    pixel_values = np.zeros((1, 3, 4, 4), dtype=np.float32)
    assert greedy_caption(always_end, pixel_values, tokens, 6).token_ids == (5, 2)
    assert greedy_caption(always_end, pixel_values, tokens, 6, ignore_eos=True).token_ids == (5, 2, 2, 2, 2, 2, 2)


def test_pick_a_variant_table_plot_and_ratios(tmp_path: Path) -> None:
    results = [
        judged_level("fp32", LoadLevel(CONCURRENCY, 1), 1000.0),
        judged_level("fp32", LoadLevel(CONCURRENCY, 2), 1500.0, requests_per_window=30),
        judged_level("int8", LoadLevel(CONCURRENCY, 1), 400.0),
    ]
    latencies = {
        "fp32": CaptionLatency("fp32", "monolithic", (caption([1000.0] * 4),)),
        "int8": CaptionLatency("int8", "monolithic", (caption([400.0] * 4),)),
        "split": CaptionLatency("split", "captioner", (caption([500.0, 50.0, 50.0, 50.0]),)),
    }
    logits = np.random.default_rng(0).normal(size=(1, 4, 10))
    accuracy = {"fp32": measure_agreement(logits, logits)}
    summaries = summarize_variants(
        {"fp32": "fp32", "int8": "int8", "split": "split", "unmeasured": "student"},
        results,
        latencies,
        accuracy,
        {"fp32": 1.0, "int8": 0.5, "split": 1.0},
        {"fp32": 989_000_000, "int8": 324_000_000},
        {"fp32": 4.9},
    )

    assert [item.variant for item in summaries] == ["fp32", "int8", "split"]  # nothing measured: no row
    fp32 = summaries[0]
    assert fp32.best_infer_per_s == pytest.approx(results[1].measurement.summary.throughput_infer_per_s)
    assert fp32.best_level == "concurrency=2"
    assert fp32.top1_vs_teacher == 1.0
    table = choice_table(summaries)
    assert "| fp32 | fp32 |" in table and "| 989 | 4.90 |" in table
    assert "| split | split | - | - | 650 |" in table
    ratios = throughput_ratio_lines(summaries, "fp32") + caption_ratio_lines(summaries, latencies, "fp32")
    assert "int8 vs fp32: captions 2.50x faster (4 tokens, medians, same run)" in ratios
    assert "split vs fp32: captions 6.15x faster (4 tokens, medians, same run)" in ratios
    assert any(line.startswith("int8 vs fp32: ") and "x infer/s" in line for line in ratios)
    plot = plot_accuracy_vs_speed(summaries, tmp_path)
    assert plot is not None and plot.stat().st_size > 0


def test_report_sections_reach_report_md_json_and_the_summary(tmp_path: Path) -> None:
    results = [judged_level("fp32", LoadLevel(CONCURRENCY, 1), 1000.0)]
    latency = CaptionLatency("fp32", "monolithic", (caption([100.0, 100.0]),))
    section = ReportSection("Caption latency", caption_table([latency]), data=[latency.metrics()])

    lines = write_report(tmp_path, results, None, [], (), [section])

    assert "## Caption latency" in (tmp_path / "report.md").read_text()
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["sections"]["Caption latency"]["data"][0]["caption_ms"] == pytest.approx(200.0)
    assert "Caption latency:" in lines


def test_the_caption_command_sends_the_headers_it_is_given_and_refuses_a_malformed_one(capsys) -> None:
    """blip-caption's -H NAME:VALUE (perf_analyzer's form) carries a run's key to a server that restricts
    inference; header_options writes the same options back."""
    from blip_triton_bench.captioning.caption import _header, header_options
    from blip_triton_bench.captioning.caption import main as caption_main

    headers = {"triton-grpc-protocol-blip-bench-run-key": "k:3y"}
    options = header_options(headers)
    assert options == ["-H", "triton-grpc-protocol-blip-bench-run-key:k:3y"]
    assert dict([_header(options[1])]) == headers  # a value may hold ":" itself
    assert header_options(None) == []
    with pytest.raises(SystemExit) as refused:
        caption_main(["-H", "no-separator", "--url", "127.0.0.1:1"])
    assert refused.value.code == 2
    assert "'no-separator': give a header as NAME:VALUE" in capsys.readouterr().err
