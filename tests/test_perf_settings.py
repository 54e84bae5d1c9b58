"""Per-variant load settings ride in the variant's own config.pbtxt; the command line overrides them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from blip_triton_bench.load.engine import LoadSettings
from blip_triton_bench.options import OptionError, check_variant_slos
from blip_triton_bench.repository.variants import discover_variants, load_variant
from blip_triton_bench.runs.perf import (
    PerfConfigError,
    PerfSettings,
    variant_levels,
    variant_service_level,
    variant_tolerance_pct,
)

pytestmark = pytest.mark.unit

SEED_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
DEFAULTS = PerfSettings(load=LoadSettings(), concurrency=None, request_rate=None, tolerance_pct=None)


def variant_with(tmp_path: Path, parameters: str):
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "config.pbtxt").write_text(f'name: "v"\nplatform: "onnxruntime_onnx"\n{parameters}\n')
    return load_variant(folder)


def test_seed_variants_sweep_what_the_seed_swept() -> None:
    variants = {v.name: v for v in discover_variants(SEED_REPOSITORY)}
    assert [level.level_id for level in variant_levels(variants["base_model_cpu"], DEFAULTS)] == [
        "concurrency=1",
        "concurrency=2",
        "concurrency=3",
        "concurrency=4",
    ]
    assert len(variant_levels(variants["base_model_gpu"], DEFAULTS)) == 8  # its bench_concurrency "1:8:1"


def test_config_parameters_and_their_override(tmp_path: Path) -> None:
    variant = variant_with(
        tmp_path,
        'parameters { key: "bench_concurrency" value: { string_value: "2:4:2" } }\n'
        'parameters { key: "bench_request_rate" value: { string_value: "5" } }\n'
        'parameters { key: "bench_tolerance_pct" value: { string_value: "25" } }',
    )
    assert [level.level_id for level in variant_levels(variant, DEFAULTS)] == [
        "concurrency=2",
        "concurrency=4",
        "request_rate=5",
    ]
    assert variant_tolerance_pct(variant, DEFAULTS) == 25.0
    overridden = PerfSettings(load=LoadSettings(), concurrency="1", request_rate=None, tolerance_pct=5.0)
    assert [level.level_id for level in variant_levels(variant, overridden)] == ["concurrency=1", "request_rate=5"]
    assert variant_tolerance_pct(variant, overridden) == 5.0


def test_bad_parameters_name_the_config_file(tmp_path: Path) -> None:
    bad_range = variant_with(tmp_path, 'parameters { key: "bench_concurrency" value: { string_value: "4:1" } }')
    with pytest.raises(PerfConfigError, match=r"v/config\.pbtxt: parameters 'bench_concurrency' '4:1'"):
        variant_levels(bad_range, DEFAULTS)
    (tmp_path / "r").mkdir()
    (tmp_path / "o").mkdir()
    bad_rate = variant_with(tmp_path / "r", 'parameters { key: "bench_request_rate" value: { string_value: "x" } }')
    with pytest.raises(PerfConfigError, match=r"v/config\.pbtxt: parameters 'bench_request_rate' 'x': expected"):
        variant_levels(bad_rate, DEFAULTS)
    with pytest.raises(PerfConfigError, match=r"--concurrency '4:1'"):  # an option given names the option
        variant_levels(variant_with(tmp_path / "o", ""), replace(DEFAULTS, concurrency="4:1"))
    (tmp_path / "t").mkdir()
    bad_tolerance = variant_with(
        tmp_path / "t", 'parameters { key: "bench_tolerance_pct" value: { string_value: "lots" } }'
    )
    with pytest.raises(
        PerfConfigError, match=r"parameters 'bench_tolerance_pct' 'lots': a tolerance must be a number of percent"
    ):
        variant_tolerance_pct(bad_tolerance, DEFAULTS)


def test_a_configs_slo_is_read_overridden_by_slo_and_refused_naming_its_file_when_malformed(tmp_path: Path) -> None:
    variant = variant_with(tmp_path, 'parameters { key: "bench_slo" value: { string_value: "latency_p99_ms=2000" } }')
    assert variant_service_level(variant, DEFAULTS).text == "latency_p99_ms=2000"
    overridden = PerfSettings(
        load=LoadSettings(), concurrency=None, request_rate=None, tolerance_pct=None, slo="ttft_p50_ms=9"
    )
    assert variant_service_level(variant, overridden).text == "ttft_p50_ms=9"
    (tmp_path / "none").mkdir()
    assert variant_service_level(variant_with(tmp_path / "none", ""), DEFAULTS) is None  # no SLO: no goodput
    check_variant_slos([variant])  # a good one passes the usage check
    (tmp_path / "bad").mkdir()
    bad = variant_with(
        tmp_path / "bad", 'parameters { key: "bench_slo" value: { string_value: "latency_p99_ms=soon" } }'
    )
    named = r"v/config\.pbtxt: parameters 'bench_slo'"
    with pytest.raises(PerfConfigError, match=named):
        variant_service_level(bad, DEFAULTS)
    with pytest.raises(OptionError, match=named):
        check_variant_slos([variant, bad])


def test_a_shared_memory_run_reads_and_records_baselines_of_its_own(tmp_path: Path) -> None:
    from blip_triton_bench.judging.baselines import BaselineStore, Fingerprint
    from blip_triton_bench.runs.perf import PerfRun

    fingerprint = Fingerprint("cpu", 2, (), 0, "", "2.51.0", "local", "", "tiny", "1", "grpc")
    settings = PerfSettings(
        load=LoadSettings(shared_memory="system"), concurrency=None, request_rate=None, tolerance_pct=None
    )
    run = PerfRun(settings, BaselineStore(tmp_path), fingerprint, "127.0.0.1:8001", None, lambda: None)
    assert run.baseline_path("v").parent.parent.name.startswith("2cpu-0gpu-local-grpc-shm-system-")
    plain = PerfRun(DEFAULTS, BaselineStore(tmp_path), fingerprint, "127.0.0.1:8001", None, lambda: None)
    assert plain.fingerprint == fingerprint


def test_a_bench_concurrency_past_the_limits_names_the_config_and_the_limit(tmp_path: Path) -> None:
    variant = variant_with(tmp_path, 'parameters { key: "bench_concurrency" value: { string_value: "1:2000000" } }')
    with pytest.raises(
        PerfConfigError, match=r"v/config\.pbtxt: parameters 'bench_concurrency' '1:2000000': .* limit of 4096"
    ):
        variant_levels(variant, DEFAULTS)
