"""The regression verdict end to end: record a baseline, slow the repository down, see the perf test fail.

Real Triton, real ONNX Runtime, tiny model; each step is the pytest command a user would type.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SEED_CONFIG = REPOSITORY_ROOT / "model_repository" / "base_model_cpu" / "config.pbtxt"
# Short windows and a loose stability criterion keep the test quick on a noisy 2-core machine; the slowdown
# below (about -80% throughput, +300% p99) is far larger than the 50% tolerance and any spread they let through.
QUICK_LOAD = (
    "--concurrency", "2", "--window-s", "1", "--warmup-s", "0.5", "--max-windows", "10",
    "--stability-percentage", "30", "--tolerance-pct", "50",
)  # fmt: skip


def run_suite(repository: Path, baselines: Path, reports: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "CI"}
    return subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "--model", "tiny",
            "--server", "local",  # the fingerprint names the provider: every step must use the same one
            f"--model-repository={repository}",
            f"--baseline-dir={baselines}",
            f"--report-dir={reports}",
            "--variant", "base_model_cpu",
            *QUICK_LOAD,
            "suite/test_serving_correctness.py", "suite/test_perf.py",
            *extra,
        ],
        cwd=REPOSITORY_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip


def copy_of_seed_variant(destination: Path, config_text: str) -> Path:
    variant = destination / "base_model_cpu"
    variant.mkdir(parents=True)
    (variant / "config.pbtxt").write_text(config_text)
    return destination


def slowed(config_text: str) -> str:
    """Every request now waits 200 ms for a batch of 8 that two clients can never fill."""
    slow = config_text.replace("max_queue_delay_microseconds: 1000", "max_queue_delay_microseconds: 200000")
    slow = slow.replace("preferred_batch_size: [ 1, 2, 4, 8 ]", "preferred_batch_size: [ 8 ]")
    assert slow != config_text
    return slow


@pytest.mark.serial
@pytest.mark.slow
def test_recorded_baseline_then_slowed_repository_fails_and_unchanged_passes(tmp_path: Path) -> None:
    unchanged = copy_of_seed_variant(tmp_path / "unchanged", SEED_CONFIG.read_text())
    slow = copy_of_seed_variant(tmp_path / "slow", slowed(SEED_CONFIG.read_text()))
    baselines = tmp_path / "baselines"

    recorded = run_suite(unchanged, baselines, tmp_path / "r1", "--update-baselines")
    assert recorded.returncode == 0, recorded.stdout[-4000:] + recorded.stderr[-2000:]
    (baseline_file,) = baselines.rglob("base_model_cpu.json")
    stored = json.loads(baseline_file.read_text())
    (run,) = stored["levels"]["concurrency=2"]  # schema 2: one recorded run, with the windows the verdict tests
    assert run["metrics"]["throughput_infer_per_s"] > 0
    assert len(run["window_throughputs_infer_per_s"]) >= 3
    assert "concurrency=2 throughput_infer_per_s: " in recorded.stdout and "(new)" in recorded.stdout
    before = baseline_file.read_bytes()

    regressed = run_suite(slow, baselines, tmp_path / "r2")
    assert regressed.returncode == 1, regressed.stdout[-4000:]
    assert "FAILED suite/test_perf.py::test_throughput_and_latency[base_model_cpu-concurrency=2]" in regressed.stdout
    assert "base_model_cpu concurrency=2 regressed:" in regressed.stdout
    assert "throughput_infer_per_s: baseline" in regressed.stdout
    assert "-> REGRESSION" in regressed.stdout
    assert baseline_file.read_bytes() == before  # a run without --update-baselines never writes

    rerun = run_suite(unchanged, baselines, tmp_path / "r3")
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    # the client ceiling one of the runs before measured on this host: reused, not measured again
    assert re.search(r"load generator ceiling \(grpc, .* \(measured \d+ min ago by an earlier run", rerun.stdout)
    assert "3 passed" in rerun.stdout.splitlines()[-1]  # two correctness tests and the perf level
    assert (tmp_path / "r3" / "results.csv").is_file()


def test_ci_never_records_into_the_repository_baselines() -> None:
    before = sorted(p.relative_to(REPOSITORY_ROOT) for p in (REPOSITORY_ROOT / "baselines").rglob("*"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--model",
            "tiny",
            "--update-baselines",
            "suite/test_perf.py",
        ],
        cwd=REPOSITORY_ROOT,
        env={**os.environ, "CI": "true"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 4
    assert "--update-baselines refused: CI is set" in result.stderr
    assert sorted(p.relative_to(REPOSITORY_ROOT) for p in (REPOSITORY_ROOT / "baselines").rglob("*")) == before


def test_missing_baseline_skips_with_the_command_that_records_it(tmp_path: Path) -> None:
    repository = copy_of_seed_variant(tmp_path / "repo", SEED_CONFIG.read_text())
    result = run_suite(repository, tmp_path / "empty-store", tmp_path / "reports", "-rs", "-m", "perf")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "no baseline for base_model_cpu concurrency=2 on this machine" in result.stdout
    assert "record one with: pytest " in result.stdout and "--update-baselines" in result.stdout
    # green, and the summary says the level was not judged and why, last; so do report.md and results.json
    proved = result.stdout[result.stdout.index("what this run proved: ") :]
    assert (
        "    throughput_and_latency[concurrency=2]: not judged (no baseline for base_model_cpu concurrency=2" in proved
    )
    (proof,) = [
        finding
        for finding in json.loads((tmp_path / "reports" / "results.json").read_text())["sections"][
            "What this run proved"
        ]["data"]
        if finding["check"] == "throughput_and_latency[concurrency=2]"
    ]
    assert proof["variant"] == "base_model_cpu" and proof["outcome"] == "not judged"
    required = run_suite(
        repository, tmp_path / "empty-store", tmp_path / "reports2", "-m", "perf", "--require-baselines"
    )
    assert required.returncode == 1
    # --require-judged: the skip fails nothing, the run fails for what it left unjudged
    judged = run_suite(repository, tmp_path / "empty-store", tmp_path / "reports3", "-m", "perf", "--require-judged")
    assert judged.returncode == 1, judged.stdout[-4000:]
    assert " 1 skipped" in judged.stdout and " failed" not in judged.stdout.splitlines()[-1]
    assert "the run fails (exit status 1): 1 check(s) not judged (--require-judged)" in judged.stdout
    assert not (tmp_path / "empty-store").exists()  # nothing was recorded without --update-baselines
    shutil.rmtree(tmp_path / "reports", ignore_errors=True)
