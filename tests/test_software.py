"""The software that decides speed is recorded with each baseline run, and a verdict against a baseline recorded
under other software names both versions: a "regression" that is really an upgrade says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip_triton_bench.fixtures.verdicts import enforce_verdict
from blip_triton_bench.host.software import software_changes, speed_software
from blip_triton_bench.judging.baselines import CONTENT_DIGEST_FIELD, Baseline, BaselineError, BaselineStore
from blip_triton_bench.judging.proof import Judgement, Outcome
from blip_triton_bench.repository.variants import discover_variants
from blip_triton_bench.runs.perf import record_judgement
from blip_triton_bench.session import BenchSession
from tests.test_baselines import fingerprint  # noqa: F401  (a fixture)
from tests.test_session import perf_run

pytestmark = pytest.mark.unit


def written_by_hand(text: str) -> dict:
    """A recorded baseline's data as a person writing a file would have it: without the content digest (a file
    edited with its digest kept is refused as edited, before any other check)."""
    data = json.loads(text)
    del data[CONTENT_DIGEST_FIELD]
    return data


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
RECORDED = {"triton": "2.51.0", "onnxruntime": "1.31.1", "numpy": "2.3.1"}
NOW = {"triton": "2.51.0", "onnxruntime": "1.32.0", "numpy": "2.3.1"}
STARTUP = {
    "cold_start_s": 10.0,
    "cold_start_spread_pct": 1.0,
    "model_load_s": 2.0,
    "first_request_ms": 50.0,
    "steady_request_ms": 20.0,
}


def test_this_environment_names_its_runtime_exporter_and_server() -> None:
    software = speed_software("2.51.0", 17)
    assert software["triton"] == "2.51.0" and software["onnx opset"] == "17"
    assert {"onnxruntime", "numpy", "torch", "transformers", "python"} <= software.keys()


def test_each_difference_is_named_once_with_every_recorded_version() -> None:
    assert software_changes([RECORDED], NOW) == ("onnxruntime 1.31.1 -> 1.32.0",)
    runs = [RECORDED, RECORDED | {"onnxruntime": "1.30.0"}, NOW]
    assert software_changes(runs, NOW) == ("onnxruntime 1.30.0 / 1.31.1 -> 1.32.0",)
    assert software_changes([{}], NOW) == ()  # recorded before the suite named its software: nothing to say
    assert software_changes([NOW], NOW) == ()


def test_a_baseline_keeps_the_software_of_each_run_and_older_files_still_load(tmp_path: Path, fingerprint) -> None:  # noqa: F811
    store = BaselineStore(tmp_path)
    store.save(Baseline.create(fingerprint, "base_model_cpu", "pytest", {"startup": STARTUP}, software=RECORDED))
    path = store.path_for(fingerprint, fingerprint.model_id, "base_model_cpu")
    loaded = store.load(fingerprint, fingerprint.model_id, "base_model_cpu")
    assert loaded.runs["startup"][0].software == RECORDED

    data = written_by_hand(path.read_text())
    del data["levels"]["startup"][0]["software"]  # as the suite wrote it before it named software
    path.write_text(json.dumps(data))
    assert store.load(fingerprint, fingerprint.model_id, "base_model_cpu").runs["startup"][0].software == {}

    data["levels"]["startup"][0]["software"] = {"onnxruntime": 1.31}
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError, match=r"levels\['startup'\]\[0\]\.software\['onnxruntime'\] should be a str"):
        store.load(fingerprint, fingerprint.model_id, "base_model_cpu")


def test_a_verdict_against_a_baseline_recorded_under_other_software_names_both(tmp_path: Path, fingerprint) -> None:  # noqa: F811
    store = BaselineStore(tmp_path / "baselines")
    store.save(Baseline.create(fingerprint, "base_model_cpu", "pytest", {"startup": STARTUP}, software=RECORDED))
    run = perf_run(store, fingerprint)
    run.software = NOW
    variant = next(v for v in discover_variants(REPOSITORY_ROOT / "model_repository") if v.name == "base_model_cpu")

    unchanged = run.judge_measured_numbers(variant, STARTUP | {"cold_start_s": 10.1})
    assert unchanged.software_changes == ("onnxruntime 1.31.1 -> 1.32.0",)
    judgement = Judgement()
    record_judgement(unchanged, judgement)
    ((outcome, reason),) = [(o, r) for part, o, r in judgement.parts if part == "startup cold_start_s"]
    assert outcome is Outcome.WITHIN_TOLERANCE and "onnxruntime 1.31.1 -> 1.32.0" in reason

    slower = run.judge_measured_numbers(variant, STARTUP | {"cold_start_s": 30.0})
    with pytest.raises(AssertionError, match=r"(?s)regressed.*other software \(onnxruntime 1\.31\.1 -> 1\.32\.0\)"):
        enforce_verdict(slower, run, Judgement())

    session = BenchSession(perf=run)
    session.finish(tmp_path / "report", update_baselines=False)
    section = json.loads((tmp_path / "report" / "results.json").read_text())["sections"][
        "Software changed since the baselines"
    ]
    assert section["data"][0] == {
        "variant": "base_model_cpu",
        "level": "startup",
        "changes": ["onnxruntime 1.31.1 -> 1.32.0"],
    }
