"""The run assembled without pytest: the plan, the one server factory (main and A/B reference), the load workers and
the lock, and what ends a run as the user's error or the host's."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_options import ROOT, options

from blip_triton_bench.assembly import (
    RunEnded,
    describe_model,
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
