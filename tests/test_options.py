"""Usage errors check_options raises before a run spends minutes measuring."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from blip_triton_bench.options import BenchOptions, OptionError, check_options
from blip_triton_bench.repository.variants import discover_variants

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = discover_variants(ROOT / "model_repository")


def options(**changes) -> BenchOptions:
    plain = BenchOptions(
        model="tiny",
        cache_dir=Path("/nonexistent/cache"),
        opset=17,
        model_repository=ROOT / "model_repository",
        variants=(),
        server="local",
        triton_url=None,
        triton_grpc_url=None,
        triton_image=None,
        gpus="auto",
        server_timeout_s=300.0,
        protocol="grpc",
        concurrency=None,
        request_rate=None,
        request_distribution="constant",
        window_s=5.0,
        min_requests_per_window=10,
        warmup_s=2.0,
        max_windows=10,
        stability_pct=10.0,
        tolerance_pct=None,
        sequence_length=16,
        baseline_dir=(ROOT / "baselines").resolve(),
        update_baselines=False,
        require_baselines=False,
        report_dir=Path("/nonexistent/report"),
    )
    return replace(plain, **changes)


def test_a_range_of_two_million_levels_is_a_usage_error_naming_the_option_and_the_limit() -> None:
    with pytest.raises(OptionError, match=r"^--concurrency '1:2000000': 2000000 is above the limit of 4096"):
        check_options(options(concurrency="1:2000000"), REPOSITORY, ROOT, ci=False)
    with pytest.raises(OptionError, match=r"^--request-rate '1:65': 65 levels, more than the limit of 64"):
        check_options(options(request_rate="1:65"), REPOSITORY, ROOT, ci=False)
    with pytest.raises(OptionError, match=r"^--sweep-concurrency '1:100': 100 levels"):
        check_options(
            options(sweep_variants=("base_model_cpu",), sweep_concurrency="1:100"), REPOSITORY, ROOT, ci=False
        )
    check_options(options(concurrency="1:64", request_rate="10000"), REPOSITORY, ROOT, ci=False)  # at the limits


def test_caption_load_levels_are_checked_before_anything_runs() -> None:
    with pytest.raises(OptionError, match=r"^--caption-concurrency '2:1': need 0 < start <= end"):
        check_options(options(caption_concurrency="2:1"), REPOSITORY, ROOT, ci=False)
    with pytest.raises(OptionError, match=r"^--caption-request-rate 'fast': expected start:end:step numbers"):
        check_options(options(caption_request_rate="fast"), REPOSITORY, ROOT, ci=False)
    check_options(options(caption_concurrency=None, caption_request_rate="0.5:2:0.5"), REPOSITORY, ROOT, ci=False)


@pytest.mark.parametrize("store", ["baselines", "baselines/sub", "baselines/sub/../other"])
def test_ci_records_into_no_folder_of_the_committed_baselines(store: str) -> None:
    with pytest.raises(OptionError, match=r"--update-baselines refused: CI is set .* or inside it"):
        check_options(options(update_baselines=True, baseline_dir=(ROOT / store).resolve()), REPOSITORY, ROOT, ci=True)


def test_ci_may_record_outside_the_committed_baselines(tmp_path: Path) -> None:
    check_options(options(update_baselines=True, baseline_dir=tmp_path / "baselines"), REPOSITORY, ROOT, ci=True)
    check_options(options(update_baselines=True), REPOSITORY, ROOT, ci=False)  # not CI: the committed store


def test_the_request_timeout_reaches_every_load_level_and_must_be_positive() -> None:
    from blip_triton_bench.runs.perf import PerfSettings

    assert PerfSettings.from_options(options(request_timeout_s=7.5)).load.request_timeout_s == 7.5
    with pytest.raises(OptionError, match=r"^--request-timeout-s 0.0: must be a number of seconds above 0"):
        check_options(options(request_timeout_s=0.0), REPOSITORY, ROOT, ci=False)


def test_external_server_descriptions_need_an_external_server() -> None:
    with pytest.raises(OptionError, match=r"^--fingerprint-label and --triton-metrics-url describe an external server"):
        check_options(options(fingerprint_label="h100-staging"), REPOSITORY, ROOT, ci=False)
    with pytest.raises(OptionError, match="describe an external server"):
        check_options(options(server="container", triton_metrics_url="h:8002"), REPOSITORY, ROOT, ci=False)
    check_options(
        options(server="external", triton_url="h:8000", fingerprint_label="h100-staging"), REPOSITORY, ROOT, ci=False
    )
    check_options(options(server="auto", triton_url="h:8000", triton_metrics_url="h:9102"), REPOSITORY, ROOT, ci=False)


def test_one_before_side_per_ab_run_each_where_it_can_run(tmp_path: Path) -> None:
    repository = ROOT / "model_repository"
    with pytest.raises(OptionError, match="give one"):
        check_options(
            options(reference_repository=repository, reference_triton_url="h:8000"), REPOSITORY, ROOT, ci=False
        )
    with pytest.raises(OptionError, match=r"^--reference-repository .*missing: not a folder"):
        check_options(options(reference_repository=tmp_path / "missing"), REPOSITORY, ROOT, ci=False)
    with pytest.raises(OptionError, match=r"^--ab-rounds 4: at least 5"):
        check_options(options(reference_triton_url="h:8000", ab_rounds=4), REPOSITORY, ROOT, ci=False)
    with pytest.raises(OptionError, match=r"^--reference-triton-grpc-url goes with --reference-triton-url"):
        check_options(options(reference_triton_grpc_url="h:8001"), REPOSITORY, ROOT, ci=False)
    with pytest.raises(OptionError, match="use it with --server container, not --server local"):
        check_options(options(reference_triton_image="old:24.09"), REPOSITORY, ROOT, ci=False)
    with pytest.raises(OptionError, match="the suite loads nothing on an external server"):
        check_options(
            options(server="external", triton_url="h:8000", reference_repository=repository), REPOSITORY, ROOT, ci=False
        )
    check_options(options(reference_repository=repository, ab_rounds=5), REPOSITORY, ROOT, ci=False)
    check_options(options(server="container", reference_triton_image="old:24.09"), REPOSITORY, ROOT, ci=False)
    assert options(reference_triton_url="h:8000").ab_reference == "--reference-triton-url h:8000"
    assert options().ab_reference is None


def test_load_workers_are_counted_and_a_cluster_gets_no_system_shared_memory() -> None:
    with pytest.raises(OptionError, match=r"^--load-workers 0: give 1 to 256 load workers"):
        check_options(options(load_workers=0), REPOSITORY, ROOT, ci=False)
    with pytest.raises(OptionError, match=r"^--shared-memory system needs every client on the server's host"):
        check_options(options(load_cluster="127.0.0.1:6379", shared_memory="system"), REPOSITORY, ROOT, ci=False)
    check_options(options(load_workers=256, load_cluster="127.0.0.1:6379"), REPOSITORY, ROOT, ci=False)


@pytest.mark.parametrize("tolerance", [math.nan, math.inf, -5.0, 0.0, 100.0, 250.0])
def test_a_tolerance_that_would_turn_the_gate_off_is_a_usage_error(tolerance: float) -> None:
    with pytest.raises(
        OptionError, match=r"^--tolerance-pct .*: a tolerance must be a number of percent above 0 and below 100"
    ):
        check_options(options(tolerance_pct=tolerance), REPOSITORY, ROOT, ci=False)
    check_options(options(tolerance_pct=99.0), REPOSITORY, ROOT, ci=False)


def test_a_configs_tolerance_that_would_turn_the_gate_off_is_refused_naming_the_file(tmp_path: Path) -> None:
    from blip_triton_bench.runs.perf import PerfConfigError, PerfSettings, variant_tolerance_pct

    seed = (ROOT / "model_repository" / "base_model_cpu" / "config.pbtxt").read_text()
    for text, accepted in (('"nan"', False), ('"100"', False), ('"ten"', False), ('"12.5"', True)):
        (tmp_path / "base_model_cpu").mkdir(exist_ok=True)
        config = tmp_path / "base_model_cpu" / "config.pbtxt"
        config.write_text(seed + f'parameters {{ key: "bench_tolerance_pct" value: {{ string_value: {text} }} }}\n')
        (variant,) = discover_variants(tmp_path)
        settings = PerfSettings.from_options(options())
        if accepted:
            assert variant_tolerance_pct(variant, settings) == 12.5
            continue
        with pytest.raises(
            PerfConfigError, match=re.escape(f"{config}: parameters 'bench_tolerance_pct' {text[1:-1]!r}")
        ):
            variant_tolerance_pct(variant, settings)


def test_require_gpus_counts_this_hosts_gpus_and_never_an_external_servers() -> None:
    with pytest.raises(OptionError, match=r"^--require-gpus -1: a number of GPUs"):
        check_options(options(require_gpus=-1), REPOSITORY, ROOT, ci=False)
    with pytest.raises(OptionError, match=r"^--require-gpus counts this host's GPUs"):
        check_options(options(require_gpus=1, server="external", triton_url="h:8000"), REPOSITORY, ROOT, ci=False)
    check_options(options(require_gpus=1), REPOSITORY, ROOT, ci=False)  # counted against the host at configure
