"""The session object on its own: the correctness gate, load times, its end (baselines + report) and summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blip_triton_bench.judging.baselines import BaselineStore
from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel, LoadSettings
from blip_triton_bench.repository.variants import discover_variants
from blip_triton_bench.runs.perf import JudgedNumbers, PerfRun, PerfSettings
from blip_triton_bench.servers.base import ModelLoad, ServerStartError
from blip_triton_bench.session import BenchSession
from tests.test_baselines import fingerprint  # noqa: F401  (a fixture)
from tests.test_report import judged_level

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = REPOSITORY_ROOT / "model_repository"


@pytest.mark.unit
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


@pytest.mark.unit
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


def perf_run(store: BaselineStore, fingerprint) -> PerfRun:  # noqa: F811
    return PerfRun(
        settings=PerfSettings(load=LoadSettings(), concurrency=None, request_rate=None, tolerance_pct=None),
        store=store,
        fingerprint=fingerprint,
        url="unused",
        inputs=None,
        ceiling=lambda: None,
        pytest_args=("--model", "tiny"),
    )


def gated_session(run: PerfRun, *variants: str) -> BenchSession:
    """A session whose `variants` each measured concurrency=1 and passed their correctness tests."""
    run.results += [judged_level(variant, LoadLevel(CONCURRENCY, 1), 100.0) for variant in variants]
    session = BenchSession(perf=run)
    for variant in variants:
        session.record_correctness(variant, True)
    return session


@pytest.mark.unit
def test_finish_records_only_gated_variants_and_writes_the_report(tmp_path: Path, fingerprint) -> None:  # noqa: F811
    store = BaselineStore(tmp_path / "baselines")
    run = perf_run(store, fingerprint)
    run.results += [
        judged_level("passing", LoadLevel(CONCURRENCY, 1), 100.0),
        judged_level("failing", LoadLevel(CONCURRENCY, 1), 100.0),
    ]
    session = BenchSession(perf=run)
    session.record_correctness("passing", True)
    session.record_correctness("failing", False)
    session.model_loads["broken"] = ServerStartError("load of broken failed\nsecond line")

    outcome = session.finish(tmp_path / "report", update_baselines=True)

    assert not outcome.failed  # a variant the correctness gate refuses is a failed test already, not a failed write
    assert store.path_for(run.fingerprint, run.fingerprint.model_id, "passing").exists()
    assert not store.path_for(run.fingerprint, run.fingerprint.model_id, "failing").exists()
    assert "failing: not recorded: its correctness tests failed" in session.baseline_lines
    levels = json.loads((tmp_path / "report" / "results.json").read_text())["levels"]
    assert [level["variant"] for level in levels] == ["passing", "failing"]
    summary = session.summary_lines()
    assert "model load broken: FAILED (load of broken failed)" in summary
    assert "baselines (--update-baselines):" in summary
    assert any(line.startswith("report: ") for line in summary)


@pytest.mark.unit
def test_finish_without_measurements_writes_nothing(tmp_path: Path) -> None:
    BenchSession().finish(tmp_path / "report", update_baselines=True)
    assert not (tmp_path / "report").exists()


@pytest.mark.unit
def test_a_variant_whose_baseline_cannot_be_written_does_not_stop_the_others(
    tmp_path: Path,
    fingerprint,  # noqa: F811
) -> None:
    store = BaselineStore(tmp_path / "baselines")
    run = perf_run(store, fingerprint)
    session = gated_session(run, "unwritable", "not_finite", "fine")
    run.judged_numbers.append(
        JudgedNumbers("not_finite", {"ttft_ms": float("nan")}, 10.0, Path("x.json"), None, (), level_id="caption")
    )
    blocked = store.path_for(fingerprint, fingerprint.model_id, "unwritable")
    (blocked / "in_the_way").mkdir(parents=True)  # a directory where the file must go: the write is an OSError

    outcome = session.finish(tmp_path / "report", update_baselines=True)

    assert outcome.baselines_not_written == ("unwritable", "not_finite")
    assert outcome.failed and outcome.report_problem is None
    assert store.load(fingerprint, fingerprint.model_id, "fine") is not None  # recorded after both failures
    unwritable, not_finite = (line for line in session.baseline_lines if "NOT RECORDED" in line)
    assert unwritable.startswith(f"unwritable: NOT RECORDED: cannot write {blocked} ([Errno 21] Is a directory")
    assert f"; fix: make {blocked.parent} a writable directory, or pass --baseline-dir" in unwritable
    assert not_finite.startswith(f"not_finite: NOT RECORDED: {blocked.parent / 'not_finite.json'}: not saved:")
    assert "; fix: look at the run's errors and stability" in not_finite
    assert (tmp_path / "report" / "results.json").exists()  # the report is written whatever the baselines did
    assert session.summary_lines()[-1] == (
        "the run fails (exit status 1): baselines not written for unwritable, not_finite"
    )


@pytest.mark.unit
def test_a_file_where_the_baseline_directory_must_be_is_reported_per_variant(
    tmp_path: Path,
    fingerprint,  # noqa: F811
) -> None:
    store = BaselineStore(tmp_path / "baselines")
    store.root.write_text("not a directory")
    session = gated_session(perf_run(store, fingerprint), "a", "b")

    outcome = session.finish(tmp_path / "report", update_baselines=True)

    assert outcome.baselines_not_written == ("a", "b")
    for line in (line for line in session.baseline_lines if "NOT RECORDED" in line):
        assert "[Errno 17] File exists" in line or "[Errno 20] Not a directory" in line
        assert f"fix: a file stands in the way of the directory {store.root}/" in line
    assert store.root.read_text() == "not a directory"
    assert (tmp_path / "report" / "report.md").exists()


@pytest.mark.unit
def test_a_report_that_cannot_be_written_is_one_summary_line_and_the_tables_stay(
    tmp_path: Path,
    fingerprint,  # noqa: F811
) -> None:
    store = BaselineStore(tmp_path / "baselines")
    session = gated_session(perf_run(store, fingerprint), "fine")
    (tmp_path / "reports").write_text("a file where the report folder goes")
    report_dir = tmp_path / "reports" / "today"

    outcome = session.finish(report_dir, update_baselines=True)

    assert outcome.report_problem == (
        f"report NOT WRITTEN to {report_dir}: [Errno 20] Not a directory: '{report_dir}'; fix: a file stands in the "
        f"way of the directory {report_dir}: move it away, or pass --report-dir a writable directory"
    )
    assert outcome.failed and outcome.baselines_not_written == ()
    assert store.load(fingerprint, fingerprint.model_id, "fine") is not None
    summary = session.summary_lines()
    assert outcome.report_problem in summary
    assert any("| fine |" in line for line in summary)  # the load-level table still reaches the terminal
    assert not any(line.startswith("report: ") for line in summary)
    assert summary[-1] == "the run fails (exit status 1): the report was not written"


#: A test that hands the session a synthetic measurement, as the perf tests do, so pytest's own end runs.
SYNTHETIC_TEST = """
from blip_triton_bench.judging.baselines import BaselineStore
from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel
from tests.test_baselines import fingerprint
from tests.test_report import judged_level
from tests.test_session import gated_session, perf_run


def test_measures(bench_session, bench_options, fingerprint):
    measured = gated_session(perf_run(BaselineStore(bench_options.baseline_dir), fingerprint), "fine")
    bench_session.perf, bench_session.correctness_passed = measured.perf, measured.correctness_passed
"""


@pytest.mark.e2e
def test_writes_that_fail_at_the_end_fail_the_run_in_summary_lines_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "test_synthetic.py").write_text(SYNTHETIC_TEST)
    for blocked in ("baselines", "reports"):
        (tmp_path / blocked).write_text("a file where a directory must be")
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(REPOSITORY_ROOT)]
    command += ["--model", "tiny", "--server", "local", "--update-baselines", str(tmp_path / "test_synthetic.py")]
    command += ["--baseline-dir", str(tmp_path / "baselines"), "--report-dir", str(tmp_path / "reports" / "run")]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT), "CI": ""}
    result = subprocess.run(command, cwd=REPOSITORY_ROOT, env=environment, capture_output=True, text=True, timeout=120)

    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, output  # though its one test passed
    assert "1 passed" in output and "Traceback" not in output
    lines = [line.strip() for line in output.splitlines()]
    assert any(line.startswith(f"report NOT WRITTEN to {tmp_path / 'reports' / 'run'}: ") for line in lines), output
    assert any(line.startswith("fine: NOT RECORDED: cannot write ") for line in lines), output
    assert "the run fails (exit status 1): baselines not written for fine; the report was not written" in lines
