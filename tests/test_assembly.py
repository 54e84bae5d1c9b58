"""The run assembled without pytest: the plan, the one server factory (main and A/B reference), the load workers and
the lock, and what ends a run as the user's error or the host's."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_options import ROOT, options

from blip_triton_bench.assembly import (
    RunEnded,
    describe_model,
    level_order,
    measurement_lock,
    plan_run,
    server_provider,
    worker_pool,
)
from blip_triton_bench.host.hardware import HostInfo
from blip_triton_bench.host.measure_lock import OFF
from blip_triton_bench.servers.choice import ServerChoice
from blip_triton_bench.servers.external import ExternalProvider
from blip_triton_bench.servers.local import LocalProvider
from blip_triton_bench.session import BenchSession

pytestmark = pytest.mark.unit

HOST = HostInfo(cpu_model="test CPU", cpu_cores=2, gpus=(), ort_providers=("CPUExecutionProvider",))
LOCAL = ServerChoice("local", "--server local")


def test_the_plan_stages_what_the_selected_variants_call() -> None:
    plan = plan_run(options(variants=("blip_caption",)), ROOT, ci=False)
    assert [variant.name for variant in plan.variants] == ["blip_caption"]
    assert [variant.name for variant in plan.staged] == ["blip_caption", "blip_caption_decoder", "blip_caption_vision"]
    assert plan.server_choice == LOCAL
    assert plan.reference == {}


def test_an_unknown_variant_ends_the_run_as_a_usage_error_naming_it() -> None:
    with pytest.raises(RunEnded, match="no_such_variant") as ended:
        plan_run(options(variants=("no_such_variant",)), ROOT, ci=False)
    assert ended.value.usage


def test_a_model_that_cannot_be_found_ends_the_run_as_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(RunEnded, match="missing-checkpoint") as ended:
        describe_model(options(model=str(tmp_path / "missing-checkpoint")))
    assert ended.value.usage


def test_the_main_server_comes_from_the_runs_choice(tmp_path: Path) -> None:
    prepared = server_provider(LOCAL, options(server_timeout_s=42.0), HOST, tmp_path)
    assert isinstance(prepared.provider, LocalProvider)
    assert prepared.notes == []


def test_the_reference_server_at_a_url_is_external_with_the_runs_timeout(tmp_path: Path) -> None:
    """The same factory as the main server's: the reference gets --server-timeout too (it once got a default)."""
    bench = options(reference_triton_url="127.0.0.1:18000", triton_url="127.0.0.1:8000", server_timeout_s=42.0)
    provider = server_provider(LOCAL, bench, HOST, tmp_path, reference=True).provider
    assert isinstance(provider, ExternalProvider)
    assert (provider.endpoints.host, provider.endpoints.http_port) == ("127.0.0.1", 18000)
    assert provider.timeout_s == 42.0


def test_a_reference_image_without_the_container_provider_is_a_usage_error(tmp_path: Path) -> None:
    bench = options(reference_triton_image="nvcr.io/nvidia/tritonserver:24.10-py3")
    with pytest.raises(RunEnded, match=r"^--reference-triton-image needs the container provider; this run uses local"):
        server_provider(LOCAL, bench, HOST, tmp_path, reference=True)


def test_one_load_worker_and_no_cluster_means_this_process_drives_the_load() -> None:
    session = BenchSession(variants=[], repository={})
    with worker_pool(options(load_workers=1, load_cluster=None), session) as pool:
        assert pool is None
    assert session.notes == []


def test_the_lock_switched_off_is_said_in_the_summary() -> None:
    session = BenchSession(variants=[], repository={})
    said: list[str] = []
    with measurement_lock(options(measure_lock=OFF), said.append, session):
        pass
    assert said == []
    assert session.notes == ["measurement lock: off (--measure-lock off): other runs may measure meanwhile"]


def copy_of_seed_variant(root: Path, name: str, extra_config: str = "") -> Path:
    """A repository holding one seed variant, its config extended by `extra_config`."""
    (root / name / "1").mkdir(parents=True)
    config = (ROOT / "model_repository" / name / "config.pbtxt").read_text()
    (root / name / "config.pbtxt").write_text(config + extra_config)
    return root


def test_a_variant_needing_a_gpu_is_skipped_on_a_host_without_one_naming_why() -> None:
    plan = plan_run(options(), ROOT, ci=False)
    by_name = {variant.name: variant for variant in plan.repository}
    assert plan.unmet_needs(HOST, by_name["base_model_cpu"]) == []
    (reason,) = plan.unmet_needs(HOST, by_name["base_model_gpu"])
    assert "needs 1 GPU" in reason and "this host has 0" in reason


def test_a_captioner_is_skipped_for_what_the_models_it_calls_need(tmp_path: Path) -> None:
    """The reasons of a BLS captioner include those of the models it calls: its own config asks for no GPU."""
    root = tmp_path / "repo"
    for name in ("blip_caption", "blip_caption_decoder"):
        copy_of_seed_variant(root, name)
    vision = (ROOT / "model_repository" / "blip_caption_vision" / "config.pbtxt").read_text()
    assert "KIND_CPU" in vision
    copy_of_seed_variant(root, "blip_caption_vision")
    (root / "blip_caption_vision" / "config.pbtxt").write_text(vision.replace("KIND_CPU", "KIND_GPU"))
    plan = plan_run(options(model_repository=root), ROOT, ci=False)
    (captioner,) = [variant for variant in plan.repository if variant.name == "blip_caption"]
    (reason,) = plan.unmet_needs(HOST, captioner)
    assert reason.startswith("calls blip_caption_vision, which needs 1 GPU")


def test_an_unusable_tolerance_in_a_config_ends_the_run_as_a_usage_error_naming_the_file(tmp_path: Path) -> None:
    bad = 'parameters { key: "bench_tolerance_pct" value: { string_value: "nan" } }\n'
    repository = copy_of_seed_variant(tmp_path / "repo", "base_model_cpu", bad)
    plan = plan_run(options(model_repository=repository), ROOT, ci=False)
    with pytest.raises(RunEnded, match=r"base_model_cpu/config\.pbtxt.*bench_tolerance_pct") as ended:
        plan.load_levels(plan.variants[0])
    assert ended.value.usage


def test_load_levels_come_from_the_options_and_run_concurrency_first_each_kind_ascending() -> None:
    plan = plan_run(options(concurrency="1:4:3", request_rate="5:20:15"), ROOT, ci=False)
    levels = plan.load_levels(plan.selected()[0])
    ids = [level.level_id for level in sorted(reversed(levels), key=level_order)]
    assert ids == ["concurrency=1", "concurrency=4", "request_rate=5", "request_rate=20"]
    assert level_order(None) == (False, 0.0)  # an empty parameter set's placeholder sorts first


def test_caption_levels_are_the_options_own() -> None:
    plan = plan_run(options(caption_concurrency="1:2:1", caption_request_rate=None), ROOT, ci=False)
    assert [level.level_id for level in plan.caption_levels()] == ["caption_concurrency=1", "caption_concurrency=2"]
    assert plan_run(options(caption_concurrency=None, caption_request_rate=None), ROOT, ci=False).caption_levels() == []


def test_a_variant_missing_from_the_reference_repository_cannot_be_compared(tmp_path: Path) -> None:
    reference = copy_of_seed_variant(tmp_path / "reference", "base_model_cpu")
    plan = plan_run(options(reference_repository=reference), ROOT, ci=False)
    by_name = {variant.name: variant for variant in plan.repository}
    assert plan.reference_problem(by_name["base_model_cpu"]) is None
    problem = plan.reference_problem(by_name["base_model_cpu_int8"])
    assert (
        problem == f"the reference repository {reference} has no variant base_model_cpu_int8: nothing to compare with"
    )
    assert plan_run(options(), ROOT, ci=False).reference_problem(by_name["base_model_cpu"]) is None  # no reference
