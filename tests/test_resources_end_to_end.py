"""Resource metrics on a real local Triton serving the tiny BLIP: the perf run samples tritonserver and its
Python backend stubs during a level's measured windows, and the server's GPUs where NVML sees them (on a host without
one, no GPU metrics and the reason why)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from blip_triton_bench.judging.baselines import BaselineStore
from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel, LoadSettings
from blip_triton_bench.model.workload import build_inputs
from blip_triton_bench.repository.variants import discover_variants, stage_repository
from blip_triton_bench.runs.perf import PerfRun, PerfSettings
from blip_triton_bench.servers.local import LocalProvider, LocalServer
from blip_triton_bench.servers.resources import NvmlGpus
from tests.test_baselines import fingerprint  # noqa: F401  (a fixture)

pytestmark = pytest.mark.server

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
VARIANT = "base_model_cpu"
SETTINGS = LoadSettings(window_s=1.0, warmup_s=0.5, max_windows=3, min_requests_per_window=1)


@pytest.fixture(scope="module")
def server(tiny_artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    exported = tiny_artifacts.teacher_export  # the session's one tiny export
    (variant,) = [v for v in discover_variants(REPOSITORY) if v.name == VARIANT]
    staged = stage_repository([variant], lambda _v: exported.artifact_files, tmp_path_factory.mktemp("repo") / "r")
    with LocalProvider(Path(tmp_path_factory.mktemp("server"))).start(staged.root) as running:
        running.load_model(VARIANT)
        yield running


def test_a_level_records_the_servers_cpu_and_memory_and_its_gpus_where_nvml_sees_them(
    server: LocalServer,
    tiny_model,
    tmp_path: Path,
    fingerprint,  # noqa: F811
) -> None:
    run = PerfRun(
        settings=PerfSettings(load=SETTINGS.keyed_for(server), concurrency="1", request_rate=None, tolerance_pct=None),
        store=BaselineStore(tmp_path / "baselines"),
        fingerprint=fingerprint,
        url=server.endpoints.grpc_url,
        inputs=build_inputs(tiny_model.description, batch_size=1, sequence_length=16),
        ceiling=lambda: None,
        resources=server.resource_source(),
    )
    (variant,) = [v for v in discover_variants(REPOSITORY) if v.name == VARIANT]
    judged = run.run_level(variant, LoadLevel(CONCURRENCY, 1))

    usage = judged.resources
    assert usage is not None and usage.samples >= 2
    assert usage.server_cpu_pct_mean is not None and usage.server_cpu_pct_mean > 0  # the stub did the work
    assert usage.server_cpu_pct_max >= usage.server_cpu_pct_mean
    assert usage.server_rss_mb_max is not None and usage.server_rss_mb_max > 0
    # What this host offers, read as the sampler reads it: NVML, on the GPUs the server was given.
    gpus = NvmlGpus(server.resource_source().gpu_indices)
    try:
        host_has_gpus, no_gpu_reason = gpus.available, gpus.reason
    finally:
        gpus.close()
    if host_has_gpus:
        assert usage.gpu_memory_mb_max is not None and usage.gpu_util_pct_mean is not None
        assert not any(reason.startswith("GPU:") for reason in usage.unavailable)
    else:
        assert (usage.gpu_util_pct_mean, usage.gpu_memory_mb_max, usage.gpu_power_w_mean) == (None, None, None)
        assert no_gpu_reason.startswith("GPU: ") and no_gpu_reason in usage.unavailable
