"""The host-wide measurement lock: recording runs wait for every other measuring run and are waited for; measuring
runs may overlap; two recording runs on one store take turns and both runs end up in the baseline."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from blip_triton_bench.host.measure_lock import (
    EXCLUSIVE,
    LOCK_FILE_ENV,
    SHARED,
    MeasureLockError,
    acquire,
    default_lock_path,
    lock_holders,
    resolve_mode,
)
from blip_triton_bench.options import default_report_name
from tests.suite_runs import PERF_TEST, RECORDING_LEVEL, Suite


@pytest.mark.unit
def test_auto_is_exclusive_only_for_a_recording_run() -> None:
    assert resolve_mode("auto", update_baselines=True) == EXCLUSIVE
    assert resolve_mode("auto", update_baselines=False) == SHARED
    assert resolve_mode("off", update_baselines=True) == "off"
    with pytest.raises(ValueError, match="--measure-lock 'sometimes': use one of auto, exclusive, shared, off"):
        resolve_mode("sometimes", update_baselines=False)


@pytest.mark.unit
def test_the_environment_names_another_lock_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(LOCK_FILE_ENV, str(tmp_path / "mine.lock"))
    assert default_lock_path() == tmp_path / "mine.lock"
    monkeypatch.delenv(LOCK_FILE_ENV)
    assert default_lock_path().name == "blip-triton-bench-measure.lock"


@pytest.mark.unit
def test_measuring_runs_share_the_lock_without_waiting(tmp_path: Path) -> None:
    said: list[str] = []
    first = acquire(tmp_path / "measure.lock", SHARED, said.append)
    second = acquire(tmp_path / "measure.lock", SHARED, said.append)
    assert said == [] and first.waited_for == () and second.waited_for == ()
    assert first.describe() == f"measurement lock: shared on {tmp_path / 'measure.lock'}"
    first.release()
    second.release()


@pytest.mark.unit
def test_a_recording_run_waits_for_a_measuring_one_and_says_who_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "measure.lock"
    measuring = acquire(path, SHARED, lambda line: None)
    assert lock_holders(path) == (os.getpid(),)
    said: list[str] = []
    taken = threading.Event()
    held = []

    def record() -> None:
        held.append(acquire(path, EXCLUSIVE, said.append))
        taken.set()

    recorder = threading.Thread(target=record)
    recorder.start()
    assert not taken.wait(0.5)  # still waiting
    assert said == [
        f"waiting for the measurement lock {path} (exclusive): held by pid {os.getpid()}; another run of the suite "
        "is measuring or recording on this host (--measure-lock off to measure anyway)"
    ]
    measuring.release()
    recorder.join(timeout=10)
    assert taken.is_set()
    (recording,) = held
    assert recording.waited_for == (os.getpid(),) and recording.waited_s >= 0.5
    assert f"waited {recording.waited_s:.1f} s for pid {os.getpid()}" in recording.describe()
    recording.release()


@pytest.mark.unit
def test_a_lock_file_that_cannot_be_made_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MeasureLockError, match=r"cannot open the measurement lock .*pass --measure-lock-file"):
        acquire(tmp_path / "no-such-folder" / "measure.lock", SHARED, lambda line: None)


@pytest.mark.unit
def test_a_default_report_folder_is_this_runs_own() -> None:
    assert default_report_name().endswith(f"-{os.getpid()}")


@pytest.mark.e2e
def test_two_recording_runs_on_one_store_take_turns_and_both_are_kept(tmp_path: Path) -> None:
    suite = Suite(tmp_path, level=RECORDING_LEVEL)
    recording = (
        "suite/test_serving_correctness.py",
        "suite/test_perf.py",
        "--update-baselines",
        "--baseline-runs",
        "2",
    )
    with suite.started(*recording) as first:
        path = suite.measure_lock_file
        first.wait_until(lambda: first.process.pid in lock_holders(path), "the first run holding the measurement lock")
        with suite.started(*recording) as second:
            runs = [first.finish(), second.finish()]

    for run in runs:
        assert run.returncode == 0, run.output[-4000:]
    assert runs[0].report_dir != runs[1].report_dir
    assert all((run.report_dir / "results.json").is_file() for run in runs)
    assert f"waiting for the measurement lock {suite.measure_lock_file} (exclusive): held by pid {runs[0].pid}" in (
        runs[1].output
    )
    notes = runs[1].results()["metadata"]["notes"]
    assert any(f"measurement lock: exclusive on {suite.measure_lock_file}; waited" in note for note in notes), notes

    (baseline_file,) = suite.baseline_dir.rglob("base_model_cpu.json")
    level = PERF_TEST.split("[", 1)[1].rstrip("]").split("-", 1)[1]
    kept = json.loads(baseline_file.read_text())["levels"][level]
    assert len(kept) == 2, kept  # both runs, neither lost to the other's write
    assert kept[0]["recorded_at"] < kept[1]["recorded_at"]
