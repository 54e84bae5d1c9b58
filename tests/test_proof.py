"""What this run proved: each check judged or not, a gate that could not have failed counted as not judged, and
--require-judged failing a run that left anything unjudged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip_triton_bench.fixtures.plugin import check_name, failure_line
from blip_triton_bench.judging.proof import Finding, Judgement, Outcome, RunProof
from blip_triton_bench.judging.verdict import MIN_REQUESTS_FOR_P99_VERDICT
from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel
from blip_triton_bench.runs.perf import record_judgement
from blip_triton_bench.session import BenchSession
from tests.test_report import judged_level

pytestmark = pytest.mark.unit

BASELINE = {
    "throughput_infer_per_s": 4.0,
    "throughput_spread_pct": 1.0,
    "latency_p99_ms": 400.0,
    "p99_spread_pct": 1.0,
    "request_count": 60,
}


def proof_of(*findings: Finding) -> RunProof:
    proof = RunProof()
    for finding in findings:
        proof.add(finding)
    return proof


def test_a_test_that_says_nothing_and_passes_is_one_gate_passed() -> None:
    assert Judgement().findings("base_model_cpu", "triton_matches_onnxruntime") == [
        Finding("base_model_cpu", "triton_matches_onnxruntime", Outcome.PASSED)
    ]


def test_a_level_passed_on_throughput_but_with_too_few_requests_for_its_p99_judges_only_the_throughput() -> None:
    level = judged_level("base_model_cpu", LoadLevel(CONCURRENCY, 1), latency_ms=250.0, baseline=BASELINE)
    assert level.measurement.summary.request_count < MIN_REQUESTS_FOR_P99_VERDICT
    judgement = Judgement()
    record_judgement(level, judgement)
    findings = {f.check: f for f in judgement.findings("base_model_cpu", "throughput_and_latency[c1]")}
    throughput = findings["throughput_and_latency[c1] concurrency=1 throughput_infer_per_s"]
    p99 = findings["throughput_and_latency[c1] concurrency=1 latency_p99_ms"]
    named = Judgement([("concurrency=1 latency_p99_ms", Outcome.WITHIN_TOLERANCE, "")])
    assert named.findings("v", "throughput_and_latency[concurrency=1]")[0].check == (
        "throughput_and_latency[concurrency=1] latency_p99_ms"  # the level is in the test's name already
    )
    assert throughput.outcome is Outcome.WITHIN_TOLERANCE
    assert p99.outcome is Outcome.NOT_JUDGED  # its rule does not hold at 60 requests: it could not have failed
    assert f"{MIN_REQUESTS_FOR_P99_VERDICT} are needed" in p99.reason and "60 requests" in p99.reason


def test_a_pass_on_an_unstable_level_is_not_judged_but_a_regression_on_one_still_is() -> None:
    settled = judged_level("v", LoadLevel(CONCURRENCY, 1), latency_ms=250.0, baseline=BASELINE)
    judgement = Judgement()
    record_judgement(settled, judgement, unstable_because="throughput varied 40 % across windows")
    outcomes = {part: outcome for part, outcome, _ in judgement.parts}
    assert outcomes["concurrency=1 throughput_infer_per_s"] is Outcome.NOT_JUDGED

    slow = judged_level(
        "v", LoadLevel(CONCURRENCY, 1), latency_ms=250.0, baseline=BASELINE | {"throughput_infer_per_s": 8.0}
    )
    judgement = Judgement()
    record_judgement(slow, judgement, unstable_because="throughput varied 40 % across windows")
    outcomes = {part: outcome for part, outcome, _ in judgement.parts}
    assert outcomes["concurrency=1 throughput_infer_per_s"] is Outcome.REGRESSION


def test_a_level_whose_baseline_gates_nothing_is_not_judged() -> None:
    level = judged_level("v", LoadLevel(CONCURRENCY, 1), latency_ms=250.0, baseline={"latency_avg_ms": 250.0})
    judgement = Judgement()
    record_judgement(level, judgement)
    assert [(outcome, part) for part, outcome, _ in judgement.parts] == [(Outcome.NOT_JUDGED, "concurrency=1")]


def test_the_summary_counts_per_variant_and_names_everything_not_judged() -> None:
    proof = proof_of(
        Finding("", "onnxruntime_matches_pytorch", Outcome.PASSED),
        Finding("", "in_process_onnxruntime_reference", Outcome.MEASURED, "the in-process speed"),
        Finding(
            "base_model_cpu",
            "throughput_and_latency[c1] concurrency=1 throughput_infer_per_s",
            Outcome.WITHIN_TOLERANCE,
        ),
        Finding("base_model_cpu", "throughput_and_latency[c4]", Outcome.NOT_JUDGED, "no baseline for c4"),
        Finding("base_model_cpu", "triton_matches_onnxruntime", Outcome.FAILED, "max abs error 0.3 > 1e-4"),
        Finding("base_model_gpu", "triton_matches_onnxruntime", Outcome.NOT_JUDGED, "needs 1 GPU, this host has 0"),
    )
    lines = proof.lines()
    # the reference measurement is no check: 3 of 5 judged (passed, within tolerance, failed)
    assert lines[0] == (
        "what this run proved: 3 of 5 checks judged (1 passed, 1 failed, 1 within tolerance, 2 not judged, 1 measured)"
    )
    assert "  base_model_cpu: 1 failed, 1 within tolerance, 1 not judged" in lines
    assert "    throughput_and_latency[c4]: not judged (no baseline for c4)" in lines
    assert "    triton_matches_onnxruntime: failed" in lines  # its message is pytest's to print, once
    assert "    triton_matches_onnxruntime: not judged (needs 1 GPU, this host has 0)" in lines
    assert proof.unproven() == [
        "base_model_cpu throughput_and_latency[c4]: not judged (no baseline for c4)",
        "base_model_gpu triton_matches_onnxruntime: not judged (needs 1 GPU, this host has 0)",
    ]


def test_require_judged_fails_the_run_and_the_proof_reaches_the_summary_report_and_json(tmp_path: Path) -> None:
    session = BenchSession()
    session.proof.add(Finding("base_model_cpu", "triton_matches_onnxruntime", Outcome.PASSED))
    session.proof.add(Finding("base_model_gpu", "triton_matches_onnxruntime", Outcome.NOT_JUDGED, "needs 1 GPU"))

    lenient = session.finish(tmp_path / "report", update_baselines=False)
    assert not lenient.failed  # a skip is listed, and fails nothing unless asked
    strict = session.finish(tmp_path / "report", update_baselines=False, require_judged=True)
    assert strict.failed and strict.unproven == ("base_model_gpu triton_matches_onnxruntime: not judged (needs 1 GPU)",)

    summary = session.summary_lines()
    assert summary[-1] == "the run fails (exit status 1): 1 check(s) not judged (--require-judged)"
    assert summary[-5].startswith("what this run proved: 1 of 2 checks judged")
    report = (tmp_path / "report" / "report.md").read_text()
    assert (
        "## What this run proved" in report and "| base_model_gpu | triton_matches_onnxruntime | not judged |" in report
    )
    section = json.loads((tmp_path / "report" / "results.json").read_text())["sections"]["What this run proved"]
    assert section["data"][1] == {
        "variant": "base_model_gpu",
        "check": "triton_matches_onnxruntime",
        "outcome": "not judged",
        "reason": "needs 1 GPU",
    }
    assert sum(line.startswith("what this run proved") for line in summary) == 1  # said once, last


def test_a_check_is_named_without_its_variant_and_a_failure_by_its_first_error_line() -> None:
    assert check_name("test_throughput_and_latency[base_model_cpu-concurrency=4]", "base_model_cpu") == (
        "throughput_and_latency[concurrency=4]"
    )
    assert check_name("test_caption_load[concurrency=2-blip_caption]", "blip_caption") == "caption_load[concurrency=2]"
    assert check_name("test_triton_matches_onnxruntime[base_model_cpu]", "base_model_cpu") == (
        "triton_matches_onnxruntime"
    )
    assert check_name("test_onnxruntime_matches_pytorch", "") == "onnxruntime_matches_pytorch"
    traceback = (
        "def test():\n>       assert 1 == 2\nE       assert 1 == 2\nE         extra\n\ntests/x.py:3: AssertionError"
    )
    assert failure_line(traceback) == "assert 1 == 2"
    assert failure_line("base_model_cpu c1 regressed:\nthroughput -30 %") == "base_model_cpu c1 regressed:"
