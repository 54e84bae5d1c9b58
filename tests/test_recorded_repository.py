"""The repository the baselines were recorded with: kept beside them by --update-baselines (each recorded variant and
the models it calls, copied, swapped in whole), and what --replay-baselines does with a level's stored numbers (they
are reported, and judge only what a replay cannot see)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from blip_triton_bench.fixtures.verdicts import enforce_verdict
from blip_triton_bench.judging.baselines import BaselineStore
from blip_triton_bench.judging.proof import Judgement, Outcome
from blip_triton_bench.judging.verdict import VerdictStatus
from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel
from blip_triton_bench.repository.recorded import (
    RECORDED_REPOSITORY_DIRNAME,
    RecordedRepositoryError,
    keep_recorded,
    replay_repository,
)
from blip_triton_bench.repository.variants import discover_variants
from blip_triton_bench.session import BenchSession
from tests.test_baselines import fingerprint  # noqa: F401  (a fixture)
from tests.test_report import judged_level
from tests.test_session import perf_run

pytestmark = pytest.mark.unit

SEED = Path(__file__).resolve().parents[1] / "model_repository"
CAPTIONER = "blip_caption"


def seed_variants() -> dict:
    return {variant.name: variant for variant in discover_variants(SEED)}


def test_a_recorded_captioner_is_kept_with_the_models_it_calls_byte_for_byte(tmp_path: Path) -> None:
    repository = seed_variants()
    captioner = repository[CAPTIONER]
    assert captioner.composing_models  # the seed's BLS captioner calls its encoder and decoder

    kept = keep_recorded(tmp_path / "recorded", captioner, repository)

    assert set(kept) == {CAPTIONER, *captioner.composing_models}
    for name in kept:
        source = repository[name]
        copy = tmp_path / "recorded" / name
        assert (copy / "config.pbtxt").read_bytes() == source.config_path.read_bytes()
        for path in source.own_model_files:  # model.py of the BLS captioner
            assert (copy / path.relative_to(source.source_dir)).read_bytes() == path.read_bytes()
    again = {variant.name: variant for variant in discover_variants(tmp_path / "recorded")}
    assert set(again) == set(kept)  # a repository the A/B run can stage as 'before'
    assert not [path for path in (tmp_path / "recorded").iterdir() if path.name.startswith(".")]


def test_a_new_recording_replaces_the_copy_and_a_failed_one_leaves_the_previous_whole(tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(SEED / "base_model_cpu", work / "base_model_cpu")
    root = tmp_path / "recorded"
    keep_recorded(root, seed_variants()["base_model_cpu"], seed_variants())
    first = (root / "base_model_cpu" / "config.pbtxt").read_bytes()

    config = work / "base_model_cpu" / "config.pbtxt"
    config.write_text(
        config.read_text().replace("max_queue_delay_microseconds: 1000", "max_queue_delay_microseconds: 9")
    )
    changed = {variant.name: variant for variant in discover_variants(work)}
    keep_recorded(root, changed["base_model_cpu"], changed)
    assert b"max_queue_delay_microseconds: 9" in (root / "base_model_cpu" / "config.pbtxt").read_bytes()

    recorded = (root / "base_model_cpu" / "config.pbtxt").read_bytes()
    vanished = dataclasses.replace(changed["base_model_cpu"], own_model_files=(work / "base_model_cpu" / "gone.onnx",))
    with pytest.raises(FileNotFoundError):
        keep_recorded(root, vanished, changed)
    assert (root / "base_model_cpu" / "config.pbtxt").read_bytes() == recorded != first
    assert sorted(path.name for path in root.iterdir()) == ["base_model_cpu"]  # no half-built folder left


def test_a_replay_needs_a_store_that_kept_a_repository(tmp_path: Path) -> None:
    with pytest.raises(RecordedRepositoryError, match=r"record the baselines with --update-baselines first"):
        replay_repository(tmp_path)
    (tmp_path / RECORDED_REPOSITORY_DIRNAME / ".tmp-base_model_cpu-1").mkdir(parents=True)
    with pytest.raises(RecordedRepositoryError, match=RECORDED_REPOSITORY_DIRNAME):
        replay_repository(tmp_path)  # a copy that never finished is not a recording
    keep_recorded(tmp_path / RECORDED_REPOSITORY_DIRNAME, seed_variants()["base_model_cpu"], seed_variants())
    assert replay_repository(tmp_path) == tmp_path / RECORDED_REPOSITORY_DIRNAME


def test_recording_baselines_keeps_the_recorded_variants_configuration(tmp_path: Path, fingerprint) -> None:  # noqa: F811
    run = perf_run(BaselineStore(tmp_path / "store"), fingerprint)
    run.results.append(judged_level("base_model_cpu", LoadLevel(CONCURRENCY, 1), 100.0))
    session = BenchSession(perf=run, repository=seed_variants())
    session.record_correctness("base_model_cpu", True)
    session.finish(tmp_path / "report", update_baselines=True)

    kept = tmp_path / "store" / RECORDED_REPOSITORY_DIRNAME / "base_model_cpu" / "config.pbtxt"
    assert kept.read_bytes() == (SEED / "base_model_cpu" / "config.pbtxt").read_bytes()
    assert any("configuration kept for --replay-baselines: base_model_cpu" in line for line in session.baseline_lines)


def regressed_level():
    baseline = {"throughput_infer_per_s": 20.0, "throughput_spread_pct": 0.0, "latency_p99_ms": 50.0}
    judged = judged_level("base_model_cpu", LoadLevel(CONCURRENCY, 1), 100.0, baseline=baseline)
    assert any(verdict.status is VerdictStatus.REGRESSION for verdict in judged.verdicts)  # 10 infer/s against 20
    return judged


def test_under_a_replay_a_stored_number_regression_is_reported_and_fails_nothing(tmp_path: Path, fingerprint) -> None:  # noqa: F811
    run = perf_run(BaselineStore(tmp_path), fingerprint)
    judged = regressed_level()
    with pytest.raises(AssertionError, match="regressed"):
        enforce_verdict(judged, run, Judgement())  # without a replay the stored numbers judge

    run.replayed = frozenset({"base_model_cpu"})
    judgement = Judgement()
    enforce_verdict(judged, run, judgement)
    outcomes = {part: (outcome, reason) for part, outcome, reason in judgement.parts}
    outcome, reason = outcomes["concurrency=1 throughput_infer_per_s"]
    assert outcome is Outcome.MEASURED and "% against the stored numbers" in reason and "--replay-baselines" in reason


def test_under_a_replay_a_baseline_recorded_under_other_software_still_judges(tmp_path: Path, fingerprint) -> None:  # noqa: F811
    run = perf_run(BaselineStore(tmp_path), fingerprint)
    run.replayed = frozenset({"base_model_cpu"})
    upgraded = dataclasses.replace(regressed_level(), software_changes=("triton 2.51.0 -> 2.52.0",))
    with pytest.raises(AssertionError, match=r"(?s)regressed.*triton 2\.51\.0 -> 2\.52\.0"):
        enforce_verdict(upgraded, run, Judgement())  # the replay runs on this server: it cannot see the upgrade
    other = dataclasses.replace(regressed_level(), variant="base_model_cpu_int8")
    with pytest.raises(AssertionError, match="regressed"):
        enforce_verdict(other, run, Judgement())  # not in the recorded repository: nothing replays it
