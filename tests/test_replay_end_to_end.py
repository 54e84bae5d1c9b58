"""--replay-baselines end to end: a store recorded by the suite kept the repository it recorded, and a later run
judges each level side by side against that copy (the A/B run's interleaved rounds), not against the stored numbers,
which move with the host's speed. The tiny model on a real local Triton, as a user types it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from blip_triton_bench.report.write import PROOF_SECTION
from tests.suite_runs import (
    REPOSITORY_ROOT,
    SEED_CONFIG,
    SEED_REPOSITORY,
    Suite,
    baseline_files,
    copy_recorded_baselines,
)
from tests.test_ab_end_to_end import repository_with

pytestmark = pytest.mark.e2e

#: The recorded store's level (concurrency 2), with 6 A/B rounds and a 25 % minimum effect: the slowdown below costs
#: each request a 20 ms wait for a batch of 8 that 2 clients never fill, about twice a tiny request's time, so it is
#: far beyond both the minimum effect and the noise of 6 rounds; an unchanged copy's rounds stay well inside 25 %.
REPLAY_LEVEL = ("--concurrency", "2", "--window-s", "1", "--warmup-s", "0.5", "--max-windows", "10",
                "--stability-percentage", "400", "--tolerance-pct", "25", "--ab-rounds", "6")  # fmt: skip
PERF = "suite/test_perf.py::test_throughput_and_latency[base_model_cpu-concurrency=2]"
AB = "suite/test_ab.py::test_after_vs_before[base_model_cpu-concurrency=2]"


def replayed(root: Path, config_text: str, store: Path):
    """A replay of `config_text` against a copy of `store`; the store must come out of it as it went in."""
    suite = Suite(root / "run", repository=repository_with(root / "repository", config_text), level=REPLAY_LEVEL)
    copy_recorded_baselines(store, suite.baseline_dir)
    before = baseline_files(suite.baseline_dir)
    run = suite.run("suite/test_perf.py", "suite/test_ab.py", "--replay-baselines")
    assert baseline_files(suite.baseline_dir) == before, "a replay records nothing"
    return run


@pytest.mark.serial
def test_a_replay_fails_a_slowed_repository_side_by_side_and_passes_an_unchanged_one(
    tmp_path: Path, recorded_tiny_baselines: Path
) -> None:
    kept = recorded_tiny_baselines / "recorded-repository" / "base_model_cpu" / "config.pbtxt"
    assert kept.read_bytes() == SEED_CONFIG.read_bytes()  # --update-baselines kept what it recorded

    seed = SEED_CONFIG.read_text()
    slowed = seed.replace("preferred_batch_size: [ 1, 2, 4, 8 ]", "preferred_batch_size: [ 8 ]").replace(
        "max_queue_delay_microseconds: 1000", "max_queue_delay_microseconds: 20000"
    )
    assert slowed != seed
    regressed = replayed(tmp_path / "slowed", slowed, recorded_tiny_baselines)
    assert regressed.returncode == 1, regressed.output[-4000:]
    assert f"FAILED {AB}" in regressed.output
    assert "regressed against the reference" in regressed.output
    assert f"{PERF} PASSED" in regressed.output  # its stored-number change is reported, and fails nothing
    measured = [
        finding
        for finding in regressed.section(PROOF_SECTION)["data"]
        if finding["check"].endswith("throughput_infer_per_s") and "throughput_and_latency" in finding["check"]
    ]
    assert measured and all(finding["outcome"] == "measured" for finding in measured), measured
    assert all("against the stored numbers, which drift with the host" in f["reason"] for f in measured)
    assert "--replay-baselines (the recorded repository" in regressed.output  # the A/B note names the 'before'

    unchanged = replayed(tmp_path / "unchanged", seed, recorded_tiny_baselines)
    assert unchanged.returncode == 0, unchanged.output[-4000:]
    assert f"{AB} PASSED" in unchanged.output and f"{PERF} PASSED" in unchanged.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "holds no recorded repository"),
        (("--update-baselines",), "--update-baselines replaces them: give one"),
        ((f"--reference-repository={SEED_REPOSITORY}",), "drop --reference-repository"),
    ],
    ids=["empty-store", "with-update-baselines", "with-reference-repository"],
)
def test_a_replay_without_what_it_needs_is_one_usage_error(
    tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--model", "tiny", "--collect-only", "-q",
         "--replay-baselines", f"--baseline-dir={tmp_path}", *extra, "suite/test_ab.py"],
        cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 4, result.stdout[-3000:] + result.stderr[-3000:]
    assert message in result.stderr + result.stdout
