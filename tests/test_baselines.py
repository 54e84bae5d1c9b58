"""The baseline store: layout, validation with useful errors, read-only loads, atomic merging saves."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from blip_triton_bench.judging.baselines import (
    CONTENT_DIGEST_FIELD,
    SCHEMA_VERSION,
    Baseline,
    BaselineError,
    BaselineStore,
    Fingerprint,
    cpu_features_mismatch,
    lock_path,
    record_command,
)

pytestmark = pytest.mark.unit


def written_by_hand(text: str) -> dict:
    """A recorded baseline's data as a person writing a file would have it: without the content digest (a file
    edited with its digest kept is refused as edited, before any other check)."""
    data = json.loads(text)
    del data[CONTENT_DIGEST_FIELD]
    return data


MODEL_ID = "Salesforce/blip-image-captioning-base"
VARIANT = "base_model_cpu"


@pytest.fixture
def fingerprint() -> Fingerprint:
    return Fingerprint(
        cpu_model="AMD EPYC 9654 96-Core Processor",
        cpu_cores=16,
        gpu_names=(),
        gpu_count=0,
        gpu_driver="",
        triton_version="2.52.0",
        server_provider="local",
        server_image="",
        model_id=MODEL_ID,
        model_size="247414076",
        protocol="grpc",
    )


def baseline(fingerprint: Fingerprint, levels: dict[str, dict[str, float]], when: str = "2025-01-01T00:00:00+00:00"):
    return Baseline.create(fingerprint, VARIANT, "pytest --variant base_model_cpu", levels, recorded_at=when)


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_fingerprint_from_host_and_server(fingerprint: Fingerprint) -> None:
    from blip_triton_bench.host.hardware import GpuInfo, HostInfo
    from blip_triton_bench.servers.base import ServerDescription

    host = HostInfo("Xeon", 32, (GpuInfo("NVIDIA H100", "560.35.03", 81559),) * 2, ("CPUExecutionProvider",))
    server = ServerDescription(provider="container", triton_version="2.52.0", image="nvcr.io/nvidia/tritonserver")
    made = Fingerprint.from_parts(host, server, MODEL_ID, 247414076, "http")
    assert made.gpu_names == ("NVIDIA H100", "NVIDIA H100")
    assert (made.gpu_count, made.gpu_driver, made.server_image) == (2, "560.35.03", "nvcr.io/nvidia/tritonserver")
    assert made.model_size == "247414076"
    assert made.slug() == "32cpu-2gpu-container-http"


def test_an_external_servers_fingerprint_is_the_servers_own_never_the_client_hosts() -> None:
    from blip_triton_bench.host.hardware import GpuInfo, HostInfo
    from blip_triton_bench.servers.base import ServerDescription

    server = ServerDescription(
        "external", "2.51.0", "triton.internal:8000", {"label": "h100-staging", "gpu_count": "8"}
    )
    laptop = HostInfo("AMD EPYC", 2, (), ("CPUExecutionProvider",), cpu_features=("avx2",))
    workstation = HostInfo("Xeon", 32, (GpuInfo("NVIDIA H100", "560.35.03", 81559),), ("CPUExecutionProvider",))
    made = Fingerprint.from_parts(laptop, server, MODEL_ID, 1, "grpc")
    assert made == Fingerprint.from_parts(workstation, server, MODEL_ID, 1, "grpc")
    assert (made.cpu_model, made.gpu_count, made.server_image) == (
        "external server: h100-staging",
        8,
        "triton.internal:8000",
    )
    assert made.slug() == "external-h100-staging-8gpu-grpc"
    relabelled = ServerDescription("external", "2.51.0", "triton.internal:8000", {"label": "a100", "gpu_count": "8"})
    assert Fingerprint.from_parts(laptop, relabelled, MODEL_ID, 1, "grpc").key() != made.key()
    unknown = ServerDescription(
        "external", "2.51.0", "triton.internal:8000", {"label": "unlabelled", "gpu_count": "-1"}
    )
    assert Fingerprint.from_parts(laptop, unknown, MODEL_ID, 1, "grpc").slug() == "external-unlabelled-unknowngpu-grpc"


def test_fingerprint_key_is_short_stable_and_sensitive_to_every_field(fingerprint: Fingerprint) -> None:
    key = fingerprint.key()
    assert len(key) == 12 and int(key, 16) >= 0
    assert Fingerprint(**fingerprint.to_dict() | {"gpu_names": ()}).key() == key
    assert replace(fingerprint, triton_version="2.53.0").key() != key
    assert replace(fingerprint, cpu_cores=8).key() != key
    assert fingerprint.slug() == "16cpu-0gpu-local-grpc"


def test_baseline_json_round_trip(fingerprint: Fingerprint) -> None:
    original = baseline(
        fingerprint, {"concurrency=1": {"throughput_infer_per_s": 24.3}, "startup": {"cold_start_s": 9}}
    )
    text = original.to_json()
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION
    assert Baseline.from_json(text, Path("x.json")) == original


def test_missing_baseline_is_none_and_creates_nothing(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = BaselineStore(tmp_path / "baselines")
    assert store.load(fingerprint, MODEL_ID, VARIANT) is None
    assert not (tmp_path / "baselines").exists()


def test_save_lays_files_out_by_fingerprint_model_and_variant(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = BaselineStore(tmp_path)
    recorded = baseline(fingerprint, {"concurrency=1": {"throughput_infer_per_s": 24.3, "latency_p99_ms": 80.0}})
    lines = store.save(recorded)
    expected = tmp_path / f"16cpu-0gpu-local-grpc-{fingerprint.key()}" / "Salesforce--blip-image-captioning-base"
    assert store.path_for(fingerprint, MODEL_ID, VARIANT) == expected / "base_model_cpu.json"
    assert sorted(os.listdir(expected)) == [".base_model_cpu.json.lock", "base_model_cpu.json"]  # no temp file
    assert store.load(fingerprint, MODEL_ID, VARIANT) == recorded
    assert lines == [
        "concurrency=1 throughput_infer_per_s: 24.30 (new)",
        "concurrency=1 latency_p99_ms: 80.00 (new)",
    ]


def test_resave_reports_old_to_new_and_keeps_levels_not_re_recorded(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = BaselineStore(tmp_path)
    store.save(
        baseline(
            fingerprint,
            {
                "concurrency=1": {"throughput_infer_per_s": 24.30, "latency_p99_ms": 80.0, "old_metric": 1.0},
                "concurrency=2": {"throughput_infer_per_s": 40.0},
            },
        )
    )
    newer = baseline(
        fingerprint,
        {"concurrency=1": {"throughput_infer_per_s": 25.10, "latency_p99_ms": 72.0, "p99_spread_pct": 3.0}},
        when="2025-02-01T00:00:00+00:00",
    )
    lines = store.save(newer)
    assert lines == [
        "previous file kept as base_model_cpu.json.bak",
        "concurrency=1 throughput_infer_per_s: 24.30 -> 25.10 (+3.3%)",
        "concurrency=1 latency_p99_ms: 80.00 -> 72.00 (-10.0%)",
        "concurrency=1 p99_spread_pct: 3.00 (new)",
        "concurrency=1 old_metric: 1.00 -> (no longer recorded)",
        "concurrency=2: kept from the previous baseline (2025-01-01T00:00:00+00:00)",
    ]
    loaded = store.load(fingerprint, MODEL_ID, VARIANT)
    assert loaded is not None
    assert loaded.levels == {
        "concurrency=1": {"throughput_infer_per_s": 25.10, "latency_p99_ms": 72.0, "p99_spread_pct": 3.0},
        "concurrency=2": {"throughput_infer_per_s": 40.0},
    }
    assert loaded.recorded_at == "2025-02-01T00:00:00+00:00"


def test_corrupt_file_is_named_and_left_untouched(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = BaselineStore(tmp_path)
    path = store.path_for(fingerprint, MODEL_ID, VARIANT)
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"schema_version": 1, "levels": {')
    before = snapshot(path)

    with pytest.raises(BaselineError) as loading:
        store.load(fingerprint, MODEL_ID, VARIANT)
    assert str(path) in str(loading.value)
    assert "is not valid JSON" in str(loading.value)
    assert "delete it, or re-record it with --update-baselines" in str(loading.value)
    assert snapshot(path) == before

    with pytest.raises(BaselineError, match="left as it is"):
        store.save(baseline(fingerprint, {"concurrency=1": {"throughput_infer_per_s": 24.3}}))
    assert snapshot(path) == before
    assert sorted(os.listdir(path.parent)) == [lock_path(path).name, path.name]

    lines = store.save(
        baseline(fingerprint, {"concurrency=1": {"throughput_infer_per_s": 24.3}}), overwrite_corrupt=True
    )
    assert lines[0].startswith("replaced the unreadable previous file (is not valid JSON")
    assert lines[1] == "previous file kept as base_model_cpu.json.bak"
    assert store.load(fingerprint, MODEL_ID, VARIANT) is not None
    assert (path.parent / "base_model_cpu.json.bak").read_bytes() == before[0]  # the broken file, as it was


def test_wrong_or_missing_schema_version_is_named(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = BaselineStore(tmp_path)
    store.save(baseline(fingerprint, {"startup": {"cold_start_s": 9.0}}))
    path = store.path_for(fingerprint, MODEL_ID, VARIANT)
    data = written_by_hand(path.read_text())

    path.write_text(json.dumps(data | {"schema_version": 99}))
    with pytest.raises(BaselineError, match="has schema_version 99, but this suite reads schema_version 1 or 2"):
        store.load(fingerprint, MODEL_ID, VARIANT)

    del data["schema_version"]
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError, match="has no schema_version"):
        store.load(fingerprint, MODEL_ID, VARIANT)


def test_missing_and_mistyped_fields_are_named(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = BaselineStore(tmp_path)
    store.save(baseline(fingerprint, {"startup": {"cold_start_s": 9.0}}))
    path = store.path_for(fingerprint, MODEL_ID, VARIANT)
    data = written_by_hand(path.read_text())

    path.write_text(json.dumps({key: value for key, value in data.items() if key != "levels"}))
    with pytest.raises(BaselineError, match="missing field\\(s\\) levels"):
        store.load(fingerprint, MODEL_ID, VARIANT)

    path.write_text(json.dumps(data | {"schema_version": 1, "levels": {"startup": {"cold_start_s": "fast"}}}))
    with pytest.raises(BaselineError, match="levels\\['startup'\\]\\['cold_start_s'\\] should be a finite number"):
        store.load(fingerprint, MODEL_ID, VARIANT)


@pytest.mark.parametrize(
    ("metric", "value", "problem"),
    [
        ("throughput_infer_per_s", 0, "not above 0"),
        ("latency_p99_ms", -3.5, "not above 0"),
        ("throughput_spread_pct", -1, "below 0"),
    ],
)
def test_a_baseline_edited_to_what_no_measurement_reads_is_refused(
    tmp_path: Path, fingerprint: Fingerprint, metric: str, value: float, problem: str
) -> None:
    """A stored throughput of 0 reads as an improvement for ever, a p99 of -3.5 ms as a regression nobody can fix:
    a gate silently off (or stuck) is refused, naming the file, the field and the fix."""
    store = BaselineStore(tmp_path)
    measured = {
        "throughput_infer_per_s": 40.0,
        "latency_p99_ms": 30.0,
        "throughput_spread_pct": 0.0,
        "caption_errors": 0.0,
    }
    store.save(baseline(fingerprint, {"concurrency=1": measured}))  # zero spreads and error counts are measurements
    path = store.path_for(fingerprint, MODEL_ID, VARIANT)
    data = written_by_hand(path.read_text())
    data["levels"]["concurrency=1"][0]["metrics"][metric] = value
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError) as refused:
        store.load(fingerprint, MODEL_ID, VARIANT)
    assert f"levels['concurrency=1'][0].metrics['{metric}'] is {value!r}, {problem}" in str(refused.value)
    assert str(refused.value).endswith("Fix: restore it from version control, or re-record it with --update-baselines")


def test_fingerprint_that_does_not_match_its_folder_is_reported(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = BaselineStore(tmp_path)
    store.save(baseline(fingerprint, {"startup": {"cold_start_s": 9.0}}))
    other = replace(fingerprint, triton_version="2.53.0")
    moved = store.path_for(other, MODEL_ID, VARIANT)
    moved.parent.mkdir(parents=True)
    moved.write_bytes(store.path_for(fingerprint, MODEL_ID, VARIANT).read_bytes())
    before = snapshot(moved)
    with pytest.raises(BaselineError, match="does not match the folder it is in") as error:
        store.load(other, MODEL_ID, VARIANT)
    assert str(moved) in str(error.value)
    assert snapshot(moved) == before


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, fingerprint: Fingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BaselineStore(tmp_path)
    store.save(baseline(fingerprint, {"startup": {"cold_start_s": 9.0}}))
    path = store.path_for(fingerprint, MODEL_ID, VARIANT)
    before = snapshot(path)

    def fail_replace(source: object, target: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save(baseline(fingerprint, {"startup": {"cold_start_s": 5.0}}))
    assert snapshot(path) == before
    assert sorted(os.listdir(path.parent)) == [lock_path(path).name, path.name]


def test_a_non_finite_measurement_is_not_saved(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = BaselineStore(tmp_path)
    with pytest.raises(BaselineError, match="latency_p99_ms is nan"):
        store.save(baseline(fingerprint, {"concurrency=1": {"latency_p99_ms": float("nan")}}))
    assert store.load(fingerprint, MODEL_ID, VARIANT) is None


def test_record_command_adds_update_baselines_once() -> None:
    assert record_command(["--variant", "base_model_cpu", "--model", "base"]) == (
        "pytest --variant base_model_cpu --model base --update-baselines"
    )
    assert record_command(["pytest", "-k", "not slow", "--update-baselines"]) == (
        "pytest -k 'not slow' --update-baselines"
    )
    assert record_command([]) == "pytest --update-baselines"


def test_pure_modules_import_nothing_from_pytest_triton_or_docker() -> None:
    code = (
        "import sys, blip_triton_bench.judging.stats, blip_triton_bench.judging.verdict, blip_triton_bench.judging.baselines\n"
        "heavy = {'pytest', 'tritonclient', 'docker', 'testcontainers', 'onnxruntime', 'torch'}\n"
        "print(sorted(heavy & {name.split('.')[0] for name in sys.modules}))\n"
    )
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"


def test_shared_memory_keys_apart_and_none_keeps_every_recorded_path(fingerprint: Fingerprint) -> None:
    system = replace(fingerprint, shared_memory="system")
    assert "shared_memory" not in fingerprint.to_dict()  # "none" hashes as before the option existed
    assert system.key() != fingerprint.key() != replace(fingerprint, shared_memory="cuda").key()
    assert system.slug() == "16cpu-0gpu-local-grpc-shm-system"
    assert Baseline.from_json(baseline(system, {}).to_json(), Path("x.json")).fingerprint == system
    committed = sorted((Path(__file__).resolve().parents[1] / "baselines").glob("*/*/*.json"))
    assert committed, "the repository's recorded baselines"
    for path in committed:
        stored = Baseline.from_json(path.read_text(), path).fingerprint
        assert stored.dirname() == path.parent.parent.name  # every recorded file still sits under its own key
        assert (stored.shared_memory != "none") == ("-shm-" in path.parent.parent.name)


def test_overwriting_keeps_the_previous_file_as_bak(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = BaselineStore(tmp_path)
    store.save(baseline(fingerprint, {"startup": {"cold_start_s": 9.0}}))
    path = store.path_for(fingerprint, MODEL_ID, VARIANT)
    first = path.read_bytes()
    store.save(baseline(fingerprint, {"startup": {"cold_start_s": 5.0}}))
    second = path.read_bytes()
    store.save(baseline(fingerprint, {"startup": {"cold_start_s": 4.0}}))

    backup = path.with_name("base_model_cpu.json.bak")
    assert backup.read_bytes() == second != first  # the file as it was before the latest save
    assert [run["metrics"] for run in json.loads(path.read_bytes())["levels"]["startup"]] == [{"cold_start_s": 4.0}]
    assert sorted(os.listdir(path.parent)) == [lock_path(path).name, "base_model_cpu.json", "base_model_cpu.json.bak"]


def test_a_write_that_fails_after_the_backup_leaves_the_previous_file_and_its_backup(
    tmp_path: Path, fingerprint: Fingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BaselineStore(tmp_path)
    store.save(baseline(fingerprint, {"startup": {"cold_start_s": 9.0}}))
    path = store.path_for(fingerprint, MODEL_ID, VARIANT)
    before = snapshot(path)
    replace_file = os.replace

    def disk_full_for_the_baseline(source: str, target: str) -> None:
        if Path(target) == path:
            raise OSError(28, "No space left on device")
        replace_file(source, target)

    monkeypatch.setattr(os, "replace", disk_full_for_the_baseline)
    with pytest.raises(OSError, match="No space left on device"):
        store.save(baseline(fingerprint, {"startup": {"cold_start_s": 5.0}}))
    assert snapshot(path) == before
    assert path.with_name("base_model_cpu.json.bak").read_bytes() == before[0]
    assert sorted(os.listdir(path.parent)) == [
        lock_path(path).name,
        "base_model_cpu.json",
        "base_model_cpu.json.bak",
    ]  # no temp file


def test_a_backup_that_cannot_be_written_stops_the_save_before_the_file_is_touched(
    tmp_path: Path, fingerprint: Fingerprint
) -> None:
    store = BaselineStore(tmp_path)
    store.save(baseline(fingerprint, {"startup": {"cold_start_s": 9.0}}))
    path = store.path_for(fingerprint, MODEL_ID, VARIANT)
    before = snapshot(path)
    path.with_name("base_model_cpu.json.bak").mkdir()  # in the way of the backup: os.replace raises

    with pytest.raises(IsADirectoryError):
        store.save(baseline(fingerprint, {"startup": {"cold_start_s": 5.0}}))
    assert snapshot(path) == before


AVX2 = ("avx2",)
AVX512 = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")


def test_cpu_features_key_apart_and_unknown_keys_as_before_the_field(fingerprint: Fingerprint) -> None:
    # Unknown (None) is left out of the JSON, so files recorded before the field keep their folder.
    assert "cpu_features" not in fingerprint.to_dict()
    assert fingerprint.key() == "d76c2a035f3d"  # the key this fingerprint had before cpu_features existed
    keys = {replace(fingerprint, cpu_features=features).key() for features in (None, (), AVX2, AVX512)}
    assert len(keys) == 4  # no AVX2 host ever reads an AVX-512 host's file, nor an unknown one
    assert replace(fingerprint, cpu_features=AVX512).to_dict()["cpu_features"] == list(AVX512)


def test_committed_baselines_load_where_they_are_and_cpu_ones_know_their_features() -> None:
    committed = sorted((Path(__file__).parent.parent / "baselines").glob("*/*/*.json"))
    assert committed
    for path in committed:
        stored = Baseline.from_json(path.read_text(), path)
        assert stored.fingerprint.dirname() == path.parent.parent.name
        if stored.fingerprint.gpu_count == 0:
            # A CPU baseline without its features would be skipped as "unknown features" on every host.
            assert stored.fingerprint.cpu_features, path


def test_cpu_features_round_trip_and_are_checked(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = BaselineStore(tmp_path)
    recorded = baseline(replace(fingerprint, cpu_features=AVX512), {"startup": {"cold_start_s": 2.0}})
    store.save(recorded)
    assert store.load(recorded.fingerprint, MODEL_ID, VARIANT) == recorded
    data = written_by_hand(recorded.to_json())
    data["fingerprint"]["cpu_features"] = "avx2"
    with pytest.raises(BaselineError, match=r"field fingerprint\.cpu_features should be a list"):
        Baseline.from_json(json.dumps(data), Path("x.json"))


def test_a_baseline_from_another_cpu_feature_set_is_not_used_and_says_why(fingerprint: Fingerprint) -> None:
    avx2, avx512 = replace(fingerprint, cpu_features=AVX2), replace(fingerprint, cpu_features=AVX512)
    assert cpu_features_mismatch(avx2, avx512) == (
        "baseline recorded on a CPU with avx2 only; this CPU has avx2 avx512f avx512_vnni avx512_bf16: "
        "re-record with --update-baselines on this machine kind"
    )
    assert cpu_features_mismatch(avx512, avx512) is None  # same features: it is simply used
    assert cpu_features_mismatch(replace(avx2, cpu_cores=4), avx512) is None  # another machine altogether


def test_a_baseline_with_unknown_cpu_features_never_counts_as_matching(fingerprint: Fingerprint) -> None:
    unknown, avx2 = fingerprint, replace(fingerprint, cpu_features=AVX2)
    reason = cpu_features_mismatch(unknown, avx2)
    assert reason is not None and reason.startswith("baseline recorded on a CPU with unknown features")
    assert "this CPU has avx2 only" in reason


def test_missing_baseline_message_names_the_other_feature_sets_file(tmp_path: Path, fingerprint: Fingerprint) -> None:
    store = BaselineStore(tmp_path)
    legacy = baseline(fingerprint, {"startup": {"cold_start_s": 2.0}})  # recorded before cpu_features
    store.save(legacy)
    store.save(baseline(replace(fingerprint, cpu_features=AVX2), {"startup": {"cold_start_s": 2.0}}))
    store.save(baseline(replace(fingerprint, cpu_cores=4, cpu_features=AVX2), {"startup": {"cold_start_s": 2.0}}))
    here = replace(fingerprint, cpu_features=AVX512)
    assert store.load(here, MODEL_ID, VARIANT) is None
    reasons = store.cpu_features_mismatches(here, MODEL_ID, VARIANT)
    assert len(reasons) == 2  # the 4-core file is another machine's, not another feature set's
    assert any("avx2 only" in reason for reason in reasons)
    assert any("unknown features" in reason for reason in reasons)
    legacy_path = str(store.path_for(fingerprint, MODEL_ID, VARIANT))
    assert any(reason.endswith(f"({legacy_path})") for reason in reasons)

    from blip_triton_bench.runs.perf import missing_baseline_message

    message = missing_baseline_message(VARIANT, "startup", store.path_for(here, MODEL_ID, VARIANT), [], reasons)
    assert message.startswith(f"no baseline for {VARIANT} startup on this machine")
    assert "baseline recorded on a CPU with avx2 only; this CPU has avx2 avx512f" in message
    assert message.endswith("record one with: pytest --update-baselines")


def test_the_load_side_is_named_in_the_fingerprint_but_not_keyed(tmp_path: Path, fingerprint: Fingerprint) -> None:
    """A level recorded from one client is judged from load workers (and back): the server's speed does not depend
    on how many processes ask; the baseline still says who sent the load."""
    workers = replace(fingerprint, load_side="2 load worker(s) (processes) on 1 host(s)")
    assert fingerprint.load_side == "one client process"
    assert workers.key() == fingerprint.key() and workers.dirname() == fingerprint.dirname()
    store = BaselineStore(tmp_path / "baselines")
    store.save(baseline(workers, {"concurrency=2": {"throughput_infer_per_s": 90.0}}))
    path = store.path_for(fingerprint, MODEL_ID, VARIANT)
    assert json.loads(path.read_text())["fingerprint"]["load_side"] == workers.load_side
    loaded = store.load(fingerprint, MODEL_ID, VARIANT)  # found from one client's fingerprint
    assert loaded is not None and loaded.fingerprint.load_side == workers.load_side


def test_a_save_waits_for_the_writer_holding_the_files_lock(tmp_path: Path, fingerprint: Fingerprint) -> None:
    """Two runs recording into one store take turns on `.<variant>.json.lock` (opened for writing, as a lock on NFS
    must be), so neither loses the other's levels."""
    store = BaselineStore(tmp_path)
    path = store.path_for(fingerprint, MODEL_ID, VARIANT)
    path.parent.mkdir(parents=True)
    saved = threading.Event()
    with open(lock_path(path), "a") as other_writer:
        fcntl.flock(other_writer, fcntl.LOCK_EX)
        saver = threading.Thread(
            target=lambda: (store.save(baseline(fingerprint, {"startup": {"cold_start_s": 9.0}})), saved.set())
        )
        saver.start()
        assert not saved.wait(0.5)  # waiting on the other writer
        assert not path.exists()
    saver.join(timeout=10)
    assert saved.is_set() and store.load(fingerprint, MODEL_ID, VARIANT) is not None


def test_a_baseline_edited_after_recording_is_refused_and_one_without_a_digest_still_loads(
    tmp_path: Path, fingerprint: Fingerprint
) -> None:
    store = BaselineStore(tmp_path)
    store.save(baseline(fingerprint, {"concurrency=1": {"throughput_infer_per_s": 24.3, "latency_p99_ms": 80.0}}))
    path = store.path_for(fingerprint, MODEL_ID, VARIANT)
    recorded = path.read_text()
    path.write_text(json.dumps(json.loads(recorded), indent=4))  # indented anew: the same content
    assert store.load(fingerprint, MODEL_ID, VARIANT) is not None

    path.write_text(recorded.replace('"throughput_infer_per_s": 24.3', '"throughput_infer_per_s": 12.0'))
    with pytest.raises(
        BaselineError, match=r"was edited after it was recorded: its content no longer matches"
    ) as error:
        store.load(fingerprint, MODEL_ID, VARIANT)
    assert "restore the recorded file (base_model_cpu.json.bak beside it, or version control)" in error.value.fix

    path.write_text(json.dumps(written_by_hand(recorded.replace("24.3", "12.0"))))  # a file a person wrote
    loaded = store.load(fingerprint, MODEL_ID, VARIANT)
    assert loaded is not None and loaded.levels["concurrency=1"]["throughput_infer_per_s"] == 12.0
