"""Resource metrics per level: the aggregation on synthetic samples, the sources' parsing, and what each
provider lets the sampler read."""

from __future__ import annotations

import pytest

from blip_triton_bench.servers.base import Endpoints
from blip_triton_bench.servers.container import container_gpu_indices
from blip_triton_bench.servers.external import ExternalServer
from blip_triton_bench.servers.resources import (
    GpuReading,
    NvmlGpus,
    ProcessReading,
    ResourceSample,
    cpu_percents,
    cuda_visible_indices,
    docker_stats_reading,
    summarize_resources,
)

pytestmark = pytest.mark.unit


def sample(time_s: float, cpu_s: dict[str, float] | None, rss_mb: float = 100.0, gpus=()) -> ResourceSample:
    process = ProcessReading(cpu_s=cpu_s, rss_mb=rss_mb) if cpu_s is not None else None
    return ResourceSample(time_s=time_s, process=process, gpus=tuple(gpus))


def test_cpu_percent_sums_the_processes_and_counts_one_core_as_100() -> None:
    samples = [
        sample(0.0, {"server": 1.0, "stub": 5.0}),
        sample(0.5, {"server": 1.1, "stub": 5.5}),  # 0.6 CPU s in 0.5 s: 120 %
        sample(1.0, {"server": 1.2, "stub": 5.7}),  # 0.3 CPU s in 0.5 s: 60 %
    ]
    assert cpu_percents(samples) == pytest.approx([120.0, 60.0])


def test_a_process_that_appears_or_exits_mid_level_is_not_counted_as_a_jump() -> None:
    samples = [
        sample(0.0, {"server": 1.0}),
        sample(1.0, {"server": 1.5, "new_stub": 30.0}),  # the stub's 30 s were spent before it was first seen
        sample(2.0, {"server": 2.0}),  # the stub exited: its counter vanishing is not negative CPU
    ]
    assert cpu_percents(samples) == pytest.approx([50.0, 50.0])


def test_summary_uses_only_the_samples_inside_the_measured_windows() -> None:
    samples = [
        sample(0.0, {"p": 0.0}, rss_mb=900.0),  # warm-up: busy and large, outside [1, 3]
        sample(1.0, {"p": 1.0}, rss_mb=200.0),
        sample(2.0, {"p": 1.5}, rss_mb=250.0),
        sample(3.0, {"p": 2.5}, rss_mb=210.0),
        sample(4.0, {"p": 4.0}, rss_mb=900.0),  # drain
    ]
    usage = summarize_resources(samples, start_s=1.0, end_s=3.0)
    assert usage.samples == 3
    assert usage.server_cpu_pct_mean == pytest.approx(75.0)  # 50 % then 100 %
    assert usage.server_cpu_pct_max == pytest.approx(100.0)
    assert usage.server_rss_mb_max == 250.0
    assert usage.gpu_util_pct_mean is None and usage.gpu_memory_mb_max is None and usage.gpu_power_w_mean is None


def test_gpu_utilisation_is_averaged_over_gpus_while_memory_and_power_add_up() -> None:
    two_gpus = [
        [GpuReading(util_pct=80.0, memory_mb=1000.0, power_w=100.0), GpuReading(40.0, 3000.0, 60.0)],
        [GpuReading(util_pct=100.0, memory_mb=1200.0, power_w=120.0), GpuReading(60.0, 3000.0, 80.0)],
    ]
    samples = [sample(0.0, None, gpus=two_gpus[0]), sample(0.5, None, gpus=two_gpus[1])]
    usage = summarize_resources(samples, 0.0, 1.0, unavailable=["server CPU/RAM: not measured"])
    assert usage.gpu_util_pct_mean == pytest.approx(70.0)  # (60 + 80) / 2
    assert usage.gpu_util_pct_max == pytest.approx(80.0)
    assert usage.gpu_memory_mb_max == pytest.approx(4200.0)
    assert usage.gpu_power_w_mean == pytest.approx(180.0)  # (160 + 200) / 2
    assert usage.server_cpu_pct_mean is None and usage.server_rss_mb_max is None
    assert usage.unavailable == ("server CPU/RAM: not measured",)


def test_a_level_with_fewer_than_two_samples_has_no_cpu_percent() -> None:
    usage = summarize_resources([sample(1.0, {"p": 1.0}, rss_mb=50.0)], 0.0, 2.0)
    assert usage.server_cpu_pct_mean is None and usage.server_rss_mb_max == 50.0 and usage.samples == 1


@pytest.mark.parametrize(
    ("memory_stats", "rss_mb"),
    [
        ({"usage": 600 * 2**20, "stats": {"inactive_file": 100 * 2**20}}, 500.0),  # cgroup v2
        ({"usage": 600 * 2**20, "stats": {"total_inactive_file": 200 * 2**20}}, 400.0),  # cgroup v1
        ({}, 0.0),  # a container that has just exited reports no memory
    ],
)
def test_docker_stats_count_memory_as_docker_stats_does(memory_stats: dict, rss_mb: float) -> None:
    stats = {"cpu_stats": {"cpu_usage": {"total_usage": 2_500_000_000}}, "memory_stats": memory_stats}
    reading = docker_stats_reading("abc", stats)
    assert reading.cpu_s == {"abc": 2.5}
    assert reading.rss_mb == pytest.approx(rss_mb)


def test_a_local_server_uses_the_gpus_cuda_visible_devices_names() -> None:
    assert cuda_visible_indices(None) is None  # unset: all of them
    assert cuda_visible_indices("") == () and cuda_visible_indices("-1") == ()
    assert cuda_visible_indices("1, 3") == (1, 3)
    assert cuda_visible_indices("GPU-8e1c0f3a") is None  # UUIDs: all of them rather than a wrong one


def test_no_nvml_means_no_gpu_metrics_not_an_error() -> None:
    gpus = NvmlGpus(None)
    try:
        if gpus.available:
            pytest.skip("this host has NVML and a GPU")
        assert gpus.reason.startswith("GPU: NVML not available") or gpus.reason.startswith("GPU: NVML sees none")
    finally:
        gpus.close()
    assert NvmlGpus(()).reason == "GPU: the server uses no GPU"


def test_a_container_uses_the_gpus_it_was_started_with() -> None:
    assert container_gpu_indices("none") == () and container_gpu_indices("all") is None
    assert container_gpu_indices("0,1") == (0, 1)


def test_an_external_server_says_its_resources_are_not_available() -> None:
    source = ExternalServer(Endpoints("example.invalid", 8000, 8001, 8002)).resource_source()
    assert source.read_process is None and source.gpu_indices == ()
    assert "external server" in source.process_unavailable and "external server" in source.gpu_unavailable
