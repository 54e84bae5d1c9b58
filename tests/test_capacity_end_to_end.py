"""--slo end to end: every level reports its goodput and whether it met the SLO, and each variant's capacity at the
SLO is searched on a real Triton, reported and recorded as a baseline level of its own (tiny model, the seed's
base_model_cpu).

The SLO's limit (a p99 of 250 ms) is far above what an unloaded tiny request takes (a few ms), and far below what
an open loop beyond the server's throughput queues (its backlog grows to 2 s of requests): low rates meet it and
rates beyond saturation miss it on any host, so the search brackets a capacity wherever it runs. How fast the host
is sets only where.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip_triton_bench.report.write import CAPACITY_SECTION, SLO_SECTION
from blip_triton_bench.runs.capacity import capacity_level_id
from tests.suite_runs import RECORDING_LEVEL, Suite

pytestmark = pytest.mark.e2e

SLO = "latency_p99_ms=250"


def test_levels_report_goodput_and_the_capacity_at_the_slo_is_found_and_recorded(tmp_path: Path) -> None:
    suite = Suite(tmp_path, level=RECORDING_LEVEL)
    run = suite.run(
        "--slo", SLO, "--concurrency", "1", "--update-baselines",
        "suite/test_serving_correctness.py", "suite/test_perf.py", "suite/test_capacity.py",
    )  # fmt: skip
    assert run.returncode == 0, run.output[-6000:]

    (level,) = run.section(SLO_SECTION)["data"]
    assert (level["variant"], level["level"], level["slo"]) == ("base_model_cpu", "concurrency=1", SLO)
    assert 0 < level["good"] <= level["requests"]
    assert level["goodput_per_s"] == pytest.approx(level["good"] / level["duration_s"])
    assert "SLO met" in run.output or "SLO MISSED" in run.output  # the level's progress line says it

    (found,) = run.section(CAPACITY_SECTION)["data"]
    assert found["variant"] == "base_model_cpu" and found["slo"] == SLO
    assert 0 < found["capacity_per_s"] < found["missed_per_s"], found
    met = [probe for probe in found["probes"] if probe["met"]]
    assert max(probe["rate_per_s"] for probe in met) == found["capacity_per_s"]
    missed_above = [
        p["rate_per_s"] for p in found["probes"] if not p["met"] and p["rate_per_s"] > found["capacity_per_s"]
    ]
    assert min(missed_above) == found["missed_per_s"]

    (stored,) = suite.baseline_dir.rglob("base_model_cpu.json")
    levels = json.loads(stored.read_text())["levels"]
    (capacity,) = levels[capacity_level_id(SLO)]  # one run recorded
    assert capacity["metrics"]["capacity_per_s"] == pytest.approx(found["capacity_per_s"])
    # the probes were measured to find the capacity, not as levels of their own: none is a baseline
    assert sorted(levels) == sorted(["concurrency=1", capacity_level_id(SLO)])


def test_a_malformed_slo_is_a_usage_error_naming_the_target(tmp_path: Path) -> None:
    run = Suite(tmp_path).run("--slo", "latency_p99_ms=soon", "suite/test_perf.py")
    assert run.returncode == 4, run.output[-3000:]
    assert "--slo: latency_p99_ms='soon'; the limit must be a number of milliseconds above 0" in run.output
