"""The session object on its own: the correctness gate, load times, its end (baselines + report) and summary."""

from __future__ import annotations

import json
from pathlib import Path

from blip_triton_bench.baselines import BaselineStore
from blip_triton_bench.load import CONCURRENCY, LoadLevel, LoadSettings
from blip_triton_bench.perf import PerfRun, PerfSettings
from blip_triton_bench.repository import discover_variants
from blip_triton_bench.servers.base import ModelLoad, ServerStartError
from blip_triton_bench.session import BenchSession
from tests.test_baselines import fingerprint  # noqa: F401  (a fixture)
from tests.test_report import judged_level

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def test_gate_needs_the_exports_and_the_variants_own_correctness_to_pass() -> None:
    session = BenchSession()
    assert "did not run" in session.correctness_gate("a")
    session.record_correctness("a", True)
    assert session.correctness_gate("a") is None
    session.record_correctness(None, False)  # the export's own test failed: nothing may be recorded
    assert session.correctness_gate("a") == "the export's correctness tests failed"
    other = BenchSession()
    other.record_correctness("b", True)
    other.record_correctness("b", False)
    assert other.correctness_gate("b") == "its correctness tests failed"


def test_a_variants_load_time_counts_the_models_it_calls_and_the_first_load_wins() -> None:
    variants = {variant.name: variant for variant in discover_variants(REPOSITORY)}
    session = BenchSession(variants=[variants["blip_caption"]])
    assert session.record_model_load("blip_caption_vision", ModelLoad("blip_caption_vision", 2.0)).load_s == 2.0
    assert session.record_model_load("blip_caption_vision", ModelLoad("blip_caption_vision", 0.01)).load_s == 2.0
    session.record_model_load("blip_caption_decoder", ModelLoad("blip_caption_decoder", 3.0))
    session.record_model_load("blip_caption", ModelLoad("blip_caption", 0.5))
    assert session.load_seconds()["blip_caption"] == 5.5
    session.artifact_bytes.update({"blip_caption": 10, "blip_caption_vision": 100, "blip_caption_decoder": 1000})
    assert session.variant_bytes()["blip_caption"] == 1110


def test_finish_records_only_gated_variants_and_writes_the_report(tmp_path: Path, fingerprint) -> None:  # noqa: F811
    store = BaselineStore(tmp_path / "baselines")
    run = PerfRun(
        settings=PerfSettings(load=LoadSettings(), concurrency=None, request_rate=None, tolerance_pct=None),
        store=store,
        fingerprint=fingerprint,
        url="unused",
        inputs=None,
        ceiling=lambda: None,
        pytest_args=("--model", "tiny"),
    )
    run.results += [
        judged_level("passing", LoadLevel(CONCURRENCY, 1), 100.0),
        judged_level("failing", LoadLevel(CONCURRENCY, 1), 100.0),
    ]
    session = BenchSession(perf=run)
    session.record_correctness("passing", True)
    session.record_correctness("failing", False)
    session.model_loads["broken"] = ServerStartError("load of broken failed\nsecond line")

    session.finish(tmp_path / "report", update_baselines=True)

    assert store.path_for(run.fingerprint, run.fingerprint.model_id, "passing").exists()
    assert not store.path_for(run.fingerprint, run.fingerprint.model_id, "failing").exists()
    assert "failing: not recorded: its correctness tests failed" in session.baseline_lines
    levels = json.loads((tmp_path / "report" / "results.json").read_text())["levels"]
    assert [level["variant"] for level in levels] == ["passing", "failing"]
    summary = session.summary_lines()
    assert "model load broken: FAILED (load of broken failed)" in summary
    assert "baselines (--update-baselines):" in summary
    assert any(line.startswith("report: ") for line in summary)


def test_finish_without_measurements_writes_nothing(tmp_path: Path) -> None:
    BenchSession().finish(tmp_path / "report", update_baselines=True)
    assert not (tmp_path / "report").exists()
