"""The external provider: a server the suite does not own is checked, never loaded or unloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from blip_triton_bench.load.engine import LoadSettings
from blip_triton_bench.model.export import export_model
from blip_triton_bench.model.source import ModelSpec, load_model
from blip_triton_bench.model.workload import ModelInputs
from blip_triton_bench.repository.variants import discover_variants, stage_repository
from blip_triton_bench.runs.perf import NO_CEILING_ON_EXTERNAL, CeilingProbe, PerfSettings
from blip_triton_bench.servers.base import ServerStartError, ServerUsageError
from blip_triton_bench.servers.external import (
    ExternalProvider,
    config_differences,
    external_endpoints,
    gpu_uuids,
    read_server_gpus,
)
from blip_triton_bench.servers.local import LocalProvider, LocalServer, free_port
from tests.open_model_control import OpenModelControl, model_control_trace

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SEED_CONFIG = REPOSITORY_ROOT / "model_repository" / "base_model_cpu" / "config.pbtxt"


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.unit
def test_only_fields_the_repository_sets_are_compared() -> None:
    expected = parse(SEED_CONFIG.read_text())
    served = parse(SEED_CONFIG.read_text())
    served.version_policy.latest.num_versions = 1  # Triton fills in defaults the file never set
    served.instance_group[0].count = 1
    served.instance_group[0].name = "base_model_cpu_0"
    assert config_differences(expected, served) == []


@pytest.mark.unit
def test_every_difference_is_named() -> None:
    expected = parse(SEED_CONFIG.read_text())
    served = parse(SEED_CONFIG.read_text())
    served.dynamic_batching.max_queue_delay_microseconds = 2000
    served.max_batch_size = 4
    del served.dynamic_batching.preferred_batch_size[-1]
    served.input[1].dims[0] = 16
    assert config_differences(expected, served) == [
        "max_batch_size: repository 8, server 4",
        "input[1].dims: repository [-1], server [16]",
        "dynamic_batching.preferred_batch_size: repository [1, 2, 4, 8], server [1, 2, 4]",
        "dynamic_batching.max_queue_delay_microseconds: repository 1000, server 2000",
    ]


TRITON_METRICS = """# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="base_model_cpu",version="1"} 12
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-b1"} 0.5
nv_gpu_utilization{gpu_uuid="GPU-a0"} 0
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-a0"} 1024
"""


@pytest.mark.unit
def test_gpus_come_from_the_servers_metrics_labels() -> None:
    assert gpu_uuids(TRITON_METRICS) == ("GPU-a0", "GPU-b1")
    assert gpu_uuids(TRITON_METRICS.split("# HELP nv_gpu_utilization")[0]) == ()  # a CPU-only server


@pytest.mark.unit
def test_an_unreachable_metrics_endpoint_is_unknown_not_zero_gpus() -> None:
    closed = f"http://127.0.0.1:{free_port()}/metrics"
    gpus = read_server_gpus(closed)
    assert gpus.count == -1
    assert gpus.describe(closed).startswith(f"GPUs unknown ({closed}: ConnectionError; pass --triton-metrics-url")


@pytest.mark.unit
def test_urls() -> None:
    endpoints = external_endpoints("triton.internal:9000", None)
    assert (endpoints.host, endpoints.http_port, endpoints.grpc_port) == ("triton.internal", 9000, 8001)
    assert external_endpoints("http://h:8000/", "h:9001").grpc_port == 9001
    assert external_endpoints("h:8000", None).metrics_url == "http://h:8002/metrics"
    assert external_endpoints("h:8000", None, "h:9102").metrics_url == "http://h:9102/metrics"
    with pytest.raises(ServerStartError, match="--triton-metrics-url host other differs from --triton-url host h"):
        external_endpoints("h:8000", None, "other:8002")
    with pytest.raises(ServerStartError, match="the port must be a number"):
        external_endpoints("h:http", None)


@pytest.fixture(scope="module")
def running_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A server 'someone else' runs: the seed's CPU variant, loaded, on the tiny model, and its model-repository API
    open to anyone, as on a server started by hand: a load or unload by the suite would succeed there, and show."""
    exported = export_model(load_model(ModelSpec("tiny")), tmp_path_factory.mktemp("cache"))
    staged = stage_repository(
        discover_variants(REPOSITORY_ROOT / "model_repository"),
        lambda _v: exported.artifact_files,
        tmp_path_factory.mktemp("repo"),
    )
    provider = LocalProvider(tmp_path_factory.mktemp("server"), run_key=OpenModelControl("unused"))
    with provider.start(staged.root) as server:
        server.load_model("base_model_cpu")
        yield server


@pytest.mark.server
def test_an_unready_variant_is_reported_not_loaded(running_server: LocalServer) -> None:
    before = model_control_trace(running_server)
    with ExternalProvider(running_server.endpoints.http_url, running_server.endpoints.grpc_url).start(
        Path(".")
    ) as server:
        (gpu_variant,) = [
            v for v in discover_variants(REPOSITORY_ROOT / "model_repository") if v.name == "base_model_gpu"
        ]
        with pytest.raises(ServerStartError, match="'base_model_gpu' is not ready on the external server"):
            server.prepare_variant(gpu_variant)
    assert model_control_trace(running_server) == before  # nothing was loaded on someone else's server, or tried


@pytest.mark.server
def test_a_grpc_endpoint_that_does_not_answer_is_one_usage_error_naming_the_option(
    running_server: LocalServer,
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    starting = ExternalProvider(running_server.endpoints.http_url, closed).start(Path("."))
    with pytest.raises(
        ServerUsageError, match=f"gRPC endpoint {closed} does not answer .* --triton-grpc-url HOST:PORT"
    ):
        starting.__enter__()


def probe(server, tmp_path: Path, model_name: str | None, notes: list[str]) -> CeilingProbe:
    load = LoadSettings(window_s=0.5, warmup_s=0.2, max_windows=3, min_requests_per_window=1)
    inputs = ModelInputs(
        np.zeros((1, 3, 384, 384), dtype=np.float32), np.ones((1, 16), dtype=np.int64), np.ones((1, 16), dtype=np.int64)
    )
    settings = PerfSettings(load=load, concurrency=None, request_rate=None, tolerance_pct=None)
    return CeilingProbe(server, tmp_path, 384, 30524, server.endpoints.grpc_url, inputs, settings, notes, model_name)


@pytest.mark.server
def test_the_client_ceiling_loads_nothing_on_an_external_server(running_server: LocalServer, tmp_path: Path) -> None:
    endpoints = running_server.endpoints
    before = model_control_trace(running_server)
    with ExternalProvider(endpoints.http_url, endpoints.grpc_url).start(Path(".")) as server:
        notes: list[str] = []
        assert probe(server, tmp_path, None, notes)() is None
        assert notes == [NO_CEILING_ON_EXTERNAL]
        named = probe(server, tmp_path, "base_model_cpu", notes)()  # a model already loaded there
        assert named is not None and named > 0
        assert "base_model_cpu, one client process):" in notes[-1]
        assert probe(server, tmp_path, "not_loaded", notes)() is None
        assert (
            notes[-1] == f"client ceiling not measured: --ceiling-model not_loaded is not ready on {endpoints.http_url}"
        )
    assert model_control_trace(running_server) == before  # nothing was loaded there, or tried


def run_suite_against(
    server: LocalServer, repository: Path, grpc: tuple[str, ...] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--model", "tiny",
            "--server", "external", "--triton-url", server.endpoints.http_url,
            *(("--triton-grpc-url", server.endpoints.grpc_url) if grpc is None else grpc),
            f"--model-repository={repository}", "--variant", "base_model_cpu",
            "suite/test_serving_correctness.py",
        ],
        cwd=REPOSITORY_ROOT,
        env={k: v for k, v in os.environ.items() if k != "CI"},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip


@pytest.mark.e2e
def test_the_suite_runs_against_an_external_server_and_names_config_drift(
    running_server: LocalServer, tmp_path: Path
) -> None:
    before = model_control_trace(running_server)
    passed = run_suite_against(running_server, REPOSITORY_ROOT / "model_repository")
    assert passed.returncode == 0, passed.stdout[-3000:]
    assert "2 passed" in passed.stdout
    assert f"server provider: external (--triton-url {running_server.endpoints.http_url})" in passed.stdout

    drifted = tmp_path / "repo" / "base_model_cpu"
    drifted.mkdir(parents=True)
    (drifted / "config.pbtxt").write_text(
        SEED_CONFIG.read_text().replace("max_queue_delay_microseconds: 1000", "max_queue_delay_microseconds: 5000")
    )
    failed = run_suite_against(running_server, tmp_path / "repo")
    assert failed.returncode == 1
    assert "is not configured as" in failed.stdout
    assert "dynamic_batching.max_queue_delay_microseconds: repository 5000, server 1000" in failed.stdout
    assert model_control_trace(running_server) == before  # the suite loaded and unloaded nothing, not even again
    assert running_server.is_model_ready("base_model_cpu")


@pytest.mark.e2e
def test_an_http_url_on_another_port_without_its_grpc_url_is_one_usage_error(running_server: LocalServer) -> None:
    """gRPC is then assumed on port 8001, where this server does not listen: one message, not a failure per test."""
    refused = run_suite_against(running_server, REPOSITORY_ROOT / "model_repository", grpc=())
    assert refused.returncode == pytest.ExitCode.USAGE_ERROR, refused.stdout[-3000:] + refused.stderr[-3000:]
    output = refused.stdout + refused.stderr
    assert output.count("pass the gRPC endpoint with --triton-grpc-url HOST:PORT") == 1
    assert output.count("Connection refused") == 1  # quoted once, in that message; no test ran into it on its own
    assert " passed" not in output and " failed" not in output
