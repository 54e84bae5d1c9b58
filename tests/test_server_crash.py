"""One server crash costs one failure: the suite's tritonserver is signalled mid-level or between two tests of a real
run (tests/plugins/crash_server.py), and the run names the death once, replaces the server, and measures on.

Measured before this was built: a SIGSEGV to the suite's server after 3 passed tests cost 5 failures and errors,
and no message said the server had died.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
LEVELS = "1:3:1"
LEVEL_TWO = "test_throughput_and_latency[base_model_cpu-concurrency=2]"
FIRST_CORRECTNESS = "test_triton_matches_onnxruntime"
#: Short levels: the tiny model answers hundreds of requests a second; only their outcome matters here.
LOAD = ("--concurrency", LEVELS, "--window-s", "1", "--warmup-s", "0.5", "--max-windows", "3",
        "--stability-percentage", "100", "--tolerance-pct", "50")  # fmt: skip
RUN_TIMEOUT_S = 900


@dataclass(frozen=True)
class CrashedRun:
    returncode: int
    output: str
    report_dir: Path

    def outcomes(self) -> dict[str, str]:
        """Test id -> PASSED / FAILED / SKIPPED / ERROR, from pytest's -v lines."""
        found = {}
        for line in self.output.splitlines():
            for outcome in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
                if line.startswith("suite/") and f" {outcome}" in line:
                    found[line.split(" ")[0]] = outcome
        return found

    def measured_levels(self) -> list[str]:
        results = json.loads((self.report_dir / "results.json").read_text())
        return [
            f"{level['measurement']['level']['mode']}={level['measurement']['level']['value']:g}"
            for level in results["levels"]
        ]


def run_with_crash(tmp_path: Path, test: str, when: str, signal_name: str) -> CrashedRun:
    report_dir = tmp_path / "report"
    command = [
        sys.executable, "-u", "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.plugins.crash_server", "-v",
        "suite/test_serving_correctness.py", "suite/test_perf.py",
        "--model", "tiny", "--server", "local", "--variant", "base_model_cpu",
        f"--baseline-dir={tmp_path / 'baselines'}", f"--report-dir={report_dir}", f"--basetemp={tmp_path / 'tmp'}",
        *LOAD,
    ]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "CI"}
    environment |= {"BLIP_CRASH_TEST": test, "BLIP_CRASH_WHEN": when, "BLIP_CRASH_SIGNAL": signal_name}
    finished = subprocess.run(
        command, cwd=REPOSITORY_ROOT, env=environment, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    return CrashedRun(finished.returncode, finished.stdout + finished.stderr, report_dir)


def test_a_server_that_segfaults_mid_level_fails_that_level_alone_and_the_next_level_is_measured(
    tmp_path: Path,
) -> None:
    run = run_with_crash(tmp_path, LEVEL_TWO, "mid-level", "SIGSEGV")
    outcomes = run.outcomes()

    failed = [test for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]
    assert failed == [f"suite/test_perf.py::{LEVEL_TWO}"], run.output[-6000:]
    assert run.returncode == pytest.ExitCode.TESTS_FAILED
    assert run.output.count(f"tritonserver died during suite/test_perf.py::{LEVEL_TWO}") == 1, run.output[-6000:]
    assert "killed by signal 11 (SIGSEGV). A fresh server took its place" in run.output
    assert "Its log ends with:" in run.output
    assert "SERVER CRASH during suite/test_perf.py::" in run.output
    assert "the run fails (exit status 1): tritonserver died 1 time(s) during the run" in run.output
    # The level after the crash ran on the fresh server and was measured.
    assert "concurrency=3" in run.measured_levels()
    assert outcomes[f"suite/test_perf.py::{LEVEL_TWO.replace('=2', '=3')}"] in ("PASSED", "SKIPPED")
    assert "stopped earlier" not in run.output


def test_a_server_killed_between_two_tests_costs_no_test_and_fails_the_run(tmp_path: Path) -> None:
    run = run_with_crash(tmp_path, FIRST_CORRECTNESS, "after", "SIGKILL")
    outcomes = run.outcomes()

    assert not [test for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")], run.output[-6000:]
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.output[-6000:]
    assert run.output.count("SERVER CRASH during the gap before suite/") == 1, run.output[-6000:]
    assert "killed by signal 9 (SIGKILL) (a fresh server took its place)" in run.output
    assert {"concurrency=1", "concurrency=2", "concurrency=3"} <= set(run.measured_levels())
