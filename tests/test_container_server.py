"""The container provider end to end: the locally built CPU image, a real Docker engine, a real Triton.

A tiny ONNX model (y = x @ W + b) is served through the `onnxruntime` backend and compared with in-process
ONNX Runtime over HTTP and gRPC; every way out of `start()` must leave no container behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import docker
import numpy as np
import onnx
import onnxruntime
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from blip_triton_bench.host.files import default_cache_dir
from blip_triton_bench.judging.correctness import TOLERANCES, assert_close
from blip_triton_bench.servers.base import ServerStartError
from blip_triton_bench.servers.container import ContainerProvider
from blip_triton_bench.servers.docker_engine import CONTAINER_LABEL, docker_available
from blip_triton_bench.servers.image import CONTENT_HASH_LABEL, BuiltImage, ImageBuildError, ensure_image

pytestmark = [
    pytest.mark.server,
    pytest.mark.serial,  # counts the engine's labelled containers: another test's would show
    pytest.mark.skipif(
        not docker_available(),
        reason="no Docker engine answers: start one with server/docker_engine.sh to run the container provider's tests",
    ),
]

MODEL_NAME = "tiny_linear"
FEATURES = 4
STARTUP_TIMEOUT_S = 120.0

CONFIG_PBTXT = f"""
name: "{MODEL_NAME}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {FEATURES} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {FEATURES} ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


def tiny_linear_model() -> onnx.ModelProto:
    """y = x @ W + b with fixed, non-trivial weights: a wrong layout or a dropped bias changes every element."""
    rng = np.random.default_rng(7)
    weight = numpy_helper.from_array(rng.standard_normal((FEATURES, FEATURES)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(FEATURES).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "tiny_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", FEATURES])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what opset 17 needs; any ONNX Runtime since 1.12 reads it
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def cpu_image() -> BuiltImage:
    """The CPU image for this checkout's server/, built once (minutes) or found by its content hash."""
    try:
        return ensure_image(default_cache_dir())
    except ImageBuildError as error:
        pytest.fail(f"could not build the CPU image: {error}", pytrace=False)


@pytest.fixture(scope="module")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=60)
    with contextlib.closing(client):
        yield client


@pytest.fixture(scope="module")
def preexisting_containers(docker_client: docker.DockerClient) -> set[str]:
    """Labelled containers that were there before this module ran (not ours to account for)."""
    return {c.id for c in docker_client.containers.list(all=True, filters={"label": CONTAINER_LABEL})}


def labelled_containers(client: docker.DockerClient, ignore: set[str]) -> list[str]:
    return [c.name for c in client.containers.list(all=True, filters={"label": CONTAINER_LABEL}) if c.id not in ignore]


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "repository"
    (root / MODEL_NAME / "1").mkdir(parents=True)
    (root / MODEL_NAME / "config.pbtxt").write_text(CONFIG_PBTXT)
    onnx.save(tiny_linear_model(), root / MODEL_NAME / "1" / "model.onnx")
    return root


@pytest.fixture
def provider(cpu_image: BuiltImage, tmp_path: Path) -> ContainerProvider:
    return ContainerProvider(tmp_path / "work", startup_timeout_s=STARTUP_TIMEOUT_S, image=cpu_image.tag, gpus="none")


def test_second_ensure_finds_the_image_by_content_hash(
    cpu_image: BuiltImage, docker_client: docker.DockerClient
) -> None:
    again = ensure_image(default_cache_dir())
    assert (again.tag, again.built) == (cpu_image.tag, False)
    labels = docker_client.images.get(cpu_image.tag).labels
    assert cpu_image.tag.endswith(labels[CONTENT_HASH_LABEL][:16])


def test_serves_onnx_over_http_and_grpc_like_onnxruntime(
    provider: ContainerProvider,
    repository: Path,
    cpu_image: BuiltImage,
    docker_client: docker.DockerClient,
    preexisting_containers: set[str],
) -> None:
    batch = np.random.default_rng(0).standard_normal((3, FEATURES)).astype(np.float32)
    session = onnxruntime.InferenceSession(
        str(repository / MODEL_NAME / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (expected,) = session.run(["y"], {"x": batch})
    tolerance = TOLERANCES["triton_vs_onnxruntime"]

    with provider.start(repository) as server:
        assert server.endpoints.host == "127.0.0.1"
        container = docker_client.containers.get(server.container_id)
        assert container.labels[CONTAINER_LABEL] == "1"
        published = {binding["HostIp"] for bindings in container.ports.values() for binding in bindings or ()}
        assert published == {"127.0.0.1"}  # loopback only
        assert container.attrs["HostConfig"]["ShmSize"] == 1024**3
        assert {m["Destination"]: m["RW"] for m in container.attrs["Mounts"]} == {"/models": False}

        description = server.describe()
        assert (description.provider, description.image) == ("container", cpu_image.tag)
        assert description.triton_version.startswith("2.")
        assert not server.is_model_ready(MODEL_NAME)  # explicit mode: nothing loads until asked
        server.load_model(MODEL_NAME)
        assert server.is_model_ready(MODEL_NAME)

        with contextlib.closing(server.http_client()) as http:
            assert http.get_model_config(MODEL_NAME)["backend"] == "onnxruntime"
            http_input = triton_http.InferInput("x", list(batch.shape), "FP32")
            http_input.set_data_from_numpy(batch)
            with pytest.raises(InferenceServerException, match="restricted, expecting header"):
                http.infer(MODEL_NAME, [http_input])  # inference needs the run's key too
            over_http = http.infer(MODEL_NAME, [http_input], headers=server.request_headers("http")).as_numpy("y")
        with contextlib.closing(triton_grpc.InferenceServerClient(server.endpoints.grpc_url)) as grpc:
            grpc_input = triton_grpc.InferInput("x", list(batch.shape), "FP32")
            grpc_input.set_data_from_numpy(batch)
            over_grpc = grpc.infer(MODEL_NAME, [grpc_input], headers=server.request_headers("grpc")).as_numpy("y")
        assert_close("y (HTTP)", over_http, expected, tolerance)
        assert_close("y (gRPC)", over_grpc, expected, tolerance)
        container_id = server.container_id

    assert labelled_containers(docker_client, preexisting_containers) == []
    assert container_id not in {c.id for c in docker_client.containers.list(all=True)}
    saved_log = provider.work_dir / f"tritonserver-{container_id[:12]}.log"
    assert f"successfully loaded '{MODEL_NAME}'" in saved_log.read_text()
    assert server.log_text() == saved_log.read_text()  # the log outlives the container


def test_interrupt_inside_the_block_still_removes_the_container(
    provider: ContainerProvider,
    repository: Path,
    docker_client: docker.DockerClient,
    preexisting_containers: set[str],
) -> None:
    with pytest.raises(KeyboardInterrupt), provider.start(repository) as server:
        assert labelled_containers(docker_client, preexisting_containers) != []
        raise KeyboardInterrupt
    assert labelled_containers(docker_client, preexisting_containers) == []
    assert "Started HTTPService" in server.log_text()


def test_model_that_fails_to_load_is_named_with_its_log(
    provider: ContainerProvider,
    repository: Path,
    docker_client: docker.DockerClient,
    preexisting_containers: set[str],
) -> None:
    (repository / MODEL_NAME / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with provider.start(repository) as server, pytest.raises(ServerStartError) as raised:
        server.load_model(MODEL_NAME)
    message = str(raised.value)
    assert f"Triton failed to load model '{MODEL_NAME}'" in message
    assert f"Server log lines about '{MODEL_NAME}'" in message
    assert labelled_containers(docker_client, preexisting_containers) == []


def test_server_that_exits_is_reported_with_its_log(
    cpu_image: BuiltImage,
    repository: Path,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    preexisting_containers: set[str],
) -> None:
    provider = ContainerProvider(tmp_path, image=cpu_image.tag, gpus="none", extra_args=("--load-model=no_such_model",))
    with (
        pytest.raises(ServerStartError, match=r"exited before it became ready(.|\n)*failed to load all models"),
        provider.start(repository),
    ):
        pass
    assert labelled_containers(docker_client, preexisting_containers) == []


def test_server_not_ready_in_time_is_a_timeout_with_its_log(
    cpu_image: BuiltImage,
    repository: Path,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    preexisting_containers: set[str],
) -> None:
    provider = ContainerProvider(tmp_path, startup_timeout_s=0.0, image=cpu_image.tag, gpus="none")
    with (
        pytest.raises(ServerStartError, match=r"was not ready after 0 s .*--server-timeout.*Its log ends with"),
        provider.start(repository),
    ):
        pass
    assert labelled_containers(docker_client, preexisting_containers) == []


def test_image_not_built_names_the_build_command(repository: Path, tmp_path: Path) -> None:
    provider = ContainerProvider(tmp_path, image="blip-triton-bench/tritonserver-cpu:0000000000000000", gpus="none")
    with (
        pytest.raises(
            ServerStartError, match=r"tritonserver-cpu:0000000000000000 is not on this Docker engine.*blip-build-image"
        ),
        provider.start(repository),
    ):
        pass


def test_image_that_cannot_be_pulled_says_a_registry_is_needed(repository: Path, tmp_path: Path) -> None:
    provider = ContainerProvider(tmp_path, image="registry.invalid/tritonserver:0", gpus="none")
    with (
        pytest.raises(ServerStartError, match=r"pulling it failed.*nvcr.io.*blip-build-image"),
        provider.start(repository),
    ):
        pass


def test_no_engine_says_how_to_start_one(repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-engine.sock'}")
    assert not docker_available()
    provider = ContainerProvider(tmp_path, image="any:tag", gpus="none")
    with (
        pytest.raises(ServerStartError, match=r"no Docker engine answers at unix://.*docker_engine.sh.*--server local"),
        provider.start(repository),
    ):
        pass


def test_system_shared_memory_reaches_a_container_that_shares_host_ipc(
    cpu_image: BuiltImage, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """Not run on the CPU CI host without Docker; where an engine answers, a shared-memory level must succeed."""
    from blip_triton_bench.load.ceiling import stage_ceiling_model
    from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel, LoadSettings, measure_level
    from blip_triton_bench.model.workload import ModelInputs

    repository = tmp_path / "ceiling"
    name = stage_ceiling_model(repository, 384, 30524)
    provider = ContainerProvider(
        tmp_path / "work", startup_timeout_s=STARTUP_TIMEOUT_S, image=cpu_image.tag, gpus="none", shared_memory="system"
    )
    ids = np.ones((1, 16), dtype=np.int64)
    inputs = ModelInputs(np.ones((1, 3, 384, 384), dtype=np.float32), ids, ids.copy())
    settings = LoadSettings(
        window_s=0.5, warmup_s=0.2, max_windows=3, min_requests_per_window=1, shared_memory="system"
    )
    with provider.start(repository) as server:
        assert docker_client.containers.get(server.container_id).attrs["HostConfig"]["IpcMode"] == "host"
        server.load_model(name)
        with contextlib.closing(triton_http.InferenceServerClient(server.endpoints.http_url)) as stranger:
            for refused in (
                lambda: stranger.register_system_shared_memory("intruder", "/intruder", 64),
                lambda: stranger.update_log_settings({"log_verbose_level": 1}),
                lambda: stranger.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
            ):
                with pytest.raises(InferenceServerException, match="restricted, expecting header"):
                    refused()
        level = measure_level(
            server.endpoints.grpc_url, name, inputs, LoadLevel(CONCURRENCY, 1), settings.keyed_for(server)
        )
    assert sum(len(window.latencies_ms) for window in level.windows) > 0 and level.summary.errors == 0
