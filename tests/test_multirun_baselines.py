"""Baselines of several runs and their verdict: a Mann-Whitney U test plus the tolerance, and the stated power.

Synthetic, fixed per-window throughputs (no randomness): 3 windows per run, as perf_analyzer's stability keeps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from blip_triton_bench.judging.baselines import SCHEMA_VERSION, Baseline, BaselineStore, LevelRun
from blip_triton_bench.judging.stats import detectable_change_pct
from blip_triton_bench.judging.verdict import (
    SIGNIFICANCE_P,
    VerdictStatus,
    compare,
    compare_distribution,
    compare_level,
)

pytestmark = pytest.mark.unit

LEVEL = "concurrency=1"
THROUGHPUT = "throughput_infer_per_s"
#: three recorded runs, each within +-1 % of 10 infer/s
TIGHT_RUNS = ((10.0, 10.1, 9.9), (10.05, 9.95, 10.0), (10.1, 10.0, 9.9))
#: three runs of a host that swings +-40 % from window to window
NOISY_RUNS = ((10.0, 13.0, 7.0), (12.0, 8.0, 11.0), (6.0, 14.0, 10.0))
SLOWED = (8.8, 8.85, 8.9)  # -11.5 %: beyond the 10 % tolerance
UNCHANGED = (10.0, 10.05, 9.95)
#: a baseline file as schema 1 wrote it (the CPU kind's base_model_cpu, committed 2026-11-25 and since re-recorded)
COMMITTED_SCHEMA_1 = Path(__file__).parent / "data/baseline-schema-1.json"


def metrics(throughput: float, spread_pct: float = 2.0) -> dict[str, float]:
    return {THROUGHPUT: throughput, "throughput_spread_pct": spread_pct}


def test_a_clear_slowdown_against_three_tight_runs_is_a_significant_regression() -> None:
    verdict = compare_distribution(THROUGHPUT, TIGHT_RUNS, SLOWED)

    assert verdict.status is VerdictStatus.REGRESSION
    assert verdict.p_value < SIGNIFICANCE_P
    assert verdict.baseline == pytest.approx(10.0)  # the median of the 9 pooled windows
    assert verdict.change_pct == pytest.approx(-11.5)
    assert f"p {verdict.p_value:.3f} -> REGRESSION" in verdict.message
    assert "median of 3 runs, 9 windows" in verdict.message


def test_the_same_data_unchanged_passes() -> None:
    verdict = compare_distribution(THROUGHPUT, TIGHT_RUNS, UNCHANGED)

    assert verdict.status is VerdictStatus.PASS
    assert verdict.p_value > SIGNIFICANCE_P
    assert verdict.detectable_pct == pytest.approx(10.0)  # tight enough that the tolerance is the limit


def test_a_noisy_baseline_makes_the_same_slowdown_inconclusive_and_says_how_blind_the_run_was() -> None:
    verdict = compare_distribution(THROUGHPUT, NOISY_RUNS, (8.6, 8.8, 8.7))

    assert verdict.change_pct == pytest.approx(-13.0)  # beyond the tolerance ...
    assert verdict.status is VerdictStatus.INCONCLUSIVE  # ... but not significant
    assert verdict.p_value >= SIGNIFICANCE_P
    assert verdict.detectable_pct > 15.0  # it could not have seen a 10 % slowdown
    assert f"not significant (p {verdict.p_value:.3f}" in verdict.message
    assert f"detects >= {verdict.detectable_pct:.1f}%" in verdict.message


def test_the_detectable_change_is_the_stated_two_sample_bound() -> None:
    measured, baseline = (9.0, 10.0, 11.0), (8.0, 10.0, 12.0, 10.0)
    expected = 1.96 * math.sqrt(1.0**2 / 3 + (math.sqrt(8 / 3)) ** 2 / 4) / 10.0 * 100
    assert detectable_change_pct(measured, baseline, 10.0) == pytest.approx(expected)
    # no stored windows (schema 1): the baseline is taken to be as noisy as this run
    assert detectable_change_pct(measured, (), 10.0) == pytest.approx(1.96 * math.sqrt(2 / 3) / 10.0 * 100)


def test_a_single_run_baseline_keeps_the_single_run_rule_and_adds_the_power_statement() -> None:
    plain = compare(THROUGHPUT, 10.0, 8.0, 2.0)
    (verdict,) = compare_level(metrics(10.0), metrics(8.0), measured_windows=(8.0, 8.1, 7.9), baseline_windows=[()])

    assert verdict.status is plain.status is VerdictStatus.REGRESSION
    assert math.isnan(verdict.p_value)
    assert verdict.message.startswith(plain.message + "; detects >= ")
    assert verdict.detectable_pct >= 10.0


def test_compare_level_judges_throughput_by_the_test_once_two_runs_kept_windows() -> None:
    (single,) = compare_level(metrics(10.0), metrics(8.85), measured_windows=SLOWED, baseline_windows=TIGHT_RUNS[:1])
    (multi,) = compare_level(metrics(10.0), metrics(8.85), measured_windows=SLOWED, baseline_windows=TIGHT_RUNS)

    assert math.isnan(single.p_value) and single.baseline_runs == 1
    assert multi.baseline_runs == 3 and multi.p_value < SIGNIFICANCE_P
    assert multi.status is VerdictStatus.REGRESSION


def test_a_committed_schema_1_file_loads_as_a_one_run_distribution() -> None:
    stored = json.loads(COMMITTED_SCHEMA_1.read_text())
    assert stored["schema_version"] == 1

    loaded = Baseline.from_json(COMMITTED_SCHEMA_1.read_text(), COMMITTED_SCHEMA_1)

    assert loaded.levels == stored["levels"]
    assert set(loaded.runs) == set(stored["levels"])
    for runs in loaded.runs.values():
        assert len(runs) == 1 and runs[0].window_throughputs_infer_per_s == ()
        assert runs[0].recorded_at == stored["recorded_at"]
    # written again it is schema 2, and reads back the same
    assert json.loads(loaded.to_json())["schema_version"] == SCHEMA_VERSION == 2
    assert Baseline.from_json(loaded.to_json(), COMMITTED_SCHEMA_1).runs == loaded.runs


def test_recording_appends_runs_and_keeps_only_the_most_recent_n(tmp_path: Path) -> None:
    fingerprint = Baseline.from_json(COMMITTED_SCHEMA_1.read_text(), COMMITTED_SCHEMA_1).fingerprint
    store = BaselineStore(tmp_path)
    for day, throughput in enumerate((9.0, 10.0, 11.0, 12.0), start=1):
        recorded = Baseline.create(
            fingerprint,
            "base_model_cpu",
            "pytest --update-baselines --baseline-runs 3",
            {LEVEL: metrics(throughput)},
            recorded_at=f"2026-01-0{day}T00:00:00+00:00",
            window_throughputs={LEVEL: (throughput, throughput)},
        )
        lines = store.save(recorded, max_runs=3)

    loaded = store.load(fingerprint, fingerprint.model_id, "base_model_cpu")
    assert [run.metrics[THROUGHPUT] for run in loaded.runs[LEVEL]] == [10.0, 11.0, 12.0]  # the first dropped
    assert loaded.runs[LEVEL][-1] == LevelRun("2026-01-04T00:00:00+00:00", metrics(12.0), (12.0, 12.0))
    assert loaded.levels[LEVEL][THROUGHPUT] == 11.0  # the median of the kept runs
    assert f"{LEVEL}: 3 run(s) kept (at most 3)" in lines

    store.save(Baseline.create(fingerprint, "base_model_cpu", "pytest", {LEVEL: metrics(5.0)}))  # default: 1 run
    assert [run.metrics[THROUGHPUT] for run in store.load(fingerprint, "base", "base_model_cpu").runs[LEVEL]] == [5.0]
