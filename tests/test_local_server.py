"""The local provider and the Python-based onnxruntime backend, on a real tritonserver with tiny ONNX models.

Each config below exercises one thing the backend must honour or one failure a user must understand.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from blip_triton_bench.host.hardware import query_gpus
from blip_triton_bench.servers.base import ServerDied, ServerStartError
from blip_triton_bench.servers.local import LocalProvider, LocalServer

pytestmark = pytest.mark.server

DOUBLER_IO = """
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
CONFIGS = {
    "doubler": f"""
name: "doubler"
platform: "onnxruntime_onnx"
max_batch_size: 8
{DOUBLER_IO}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
optimization {{ graph {{ level: 1 }} }}
""",
    "batcher": f"""
name: "batcher"
platform: "onnxruntime_onnx"
max_batch_size: 8
{DOUBLER_IO}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
dynamic_batching {{ max_queue_delay_microseconds: 300000 }}
""",
    "wants_openvino": f"""
name: "wants_openvino"
platform: "onnxruntime_onnx"
max_batch_size: 8
{DOUBLER_IO}
optimization {{ execution_accelerators {{ cpu_execution_accelerator: [ {{ name: "openvino" }} ] }} }}
""",
    "wants_gpu": f"""
name: "wants_gpu"
platform: "onnxruntime_onnx"
max_batch_size: 8
{DOUBLER_IO}
instance_group [ {{ kind: KIND_GPU count: 1 gpus: [ 0 ] }} ]
""",
    "no_model_file": f"""
name: "no_model_file"
platform: "onnxruntime_onnx"
max_batch_size: 8
{DOUBLER_IO}
""",
    "wrong_input": """
name: "wrong_input"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "z" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
""",
    "wrong_type": """
name: "wrong_type"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_INT64 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
""",
}


def doubler_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "doubler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])],
        initializer=[helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # onnx writes its newest IR version (1.23: IR 14), which onnxruntime 1.31.1 (constraints.txt) refuses; opset 17
    # needs IR 8, which every onnxruntime since 1.12 reads
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    for name, config in CONFIGS.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config)
        if name != "no_model_file":
            onnx.save_model(doubler_model(), str(root / name / "1" / "model.onnx"))
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with LocalProvider(tmp_path_factory.mktemp("server")).start(repository) as running:
        yield running
    assert running.process.poll() is not None  # stopped and reaped when the context exits


def test_grpc_and_http_equal_in_process_onnxruntime(server: LocalServer) -> None:
    server.load_model("doubler")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    expected = onnxruntime.InferenceSession(doubler_model().SerializeToString()).run(None, {"x": x})[0]
    for module, protocol, url in (
        (triton_grpc, "grpc", server.endpoints.grpc_url),
        (triton_http, "http", server.endpoints.http_url),
    ):
        client = module.InferenceServerClient(url)
        request = module.InferInput("x", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        served = client.infer("doubler", [request], headers=server.request_headers(protocol))
        np.testing.assert_array_equal(served.as_numpy("y"), expected)
        client.close()


def test_thread_count_and_graph_level_are_honoured(server: LocalServer) -> None:
    server.load_model("doubler")
    (line,) = [line for line in server.log_text().splitlines() if "onnxruntime backend: model 'doubler'" in line][:1]
    assert "intra_op_num_threads 1" in line
    assert "graph_optimization_level ORT_ENABLE_EXTENDED" in line
    assert "providers ['CPUExecutionProvider']" in line


def test_dynamic_batching_runs_one_onnxruntime_call_per_batch(server: LocalServer) -> None:
    server.load_model("batcher")
    # The timeout turns a sender that failed before the barrier into a BrokenBarrierError in the others
    # instead of a hang.
    barrier = threading.Barrier(6, timeout=60)

    def send(value: float) -> np.ndarray:
        client = triton_grpc.InferenceServerClient(server.endpoints.grpc_url)
        request = triton_grpc.InferInput("x", [1, 4], "FP32")
        request.set_data_from_numpy(np.full((1, 4), value, dtype=np.float32))
        barrier.wait()
        return client.infer("batcher", [request], headers=server.request_headers("grpc")).as_numpy("y")

    values = [float(i) for i in range(6)]
    # Results (and any exception) come back to this thread: an assert in a worker thread would be lost.
    with ThreadPoolExecutor(max_workers=len(values)) as pool:
        results = list(pool.map(send, values))
    for value, result in zip(values, results, strict=True):
        np.testing.assert_array_equal(result, np.full((1, 4), 2 * value, dtype=np.float32))  # each gets its own rows
    stats = statistics_once_counted(server, "batcher", inferences=6)
    assert stats["inference_count"] == 6
    assert stats["execution_count"] < 6  # requests were executed together


def statistics_once_counted(server: LocalServer, model: str, inferences: int, timeout_s: float = 30.0) -> dict:
    """The model's statistics once they count `inferences`. A backend reports a batch's statistics after it sent
    the responses, so a query right after the last response can still see fewer (0 of 6, on a busy host); the
    deadline only guards against a hang."""
    client = triton_http.InferenceServerClient(server.endpoints.http_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            (stats,) = client.get_inference_statistics(model)["model_stats"]
            if stats.get("inference_count", 0) >= inferences or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)
    finally:
        client.close()


def test_missing_provider_names_it_and_the_config_field(server: LocalServer) -> None:
    with pytest.raises(ServerStartError) as error:
        server.load_model("wants_openvino")
    message = str(error.value)
    assert "Triton failed to load model 'wants_openvino'" in message
    assert "cpu_execution_accelerator[0] 'openvino' needs ONNX Runtime's OpenVINOExecutionProvider" in message
    assert "pip install" in message or "install onnxruntime-openvino" in message


def test_gpu_instance_on_a_host_without_one_fails_to_load_clearly(server: LocalServer) -> None:
    # What this host lacks, read as the package reads it: nvidia-smi's GPUs and onnxruntime's providers.
    has_gpu = bool(query_gpus())
    if has_gpu and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("needs a host without a GPU or without onnxruntime-gpu: this one serves a KIND_GPU instance")
    with pytest.raises(ServerStartError) as error:
        server.load_model("wants_gpu")
    message = str(error.value)
    assert message.startswith("Triton failed to load model 'wants_gpu': ")
    # The cause comes before the quoted log lines, which name the model `wants_gpu` whatever the cause.
    cause = message.split("\nServer log lines about 'wants_gpu'")[0]
    if has_gpu:  # GPUs but a CPU-only onnxruntime: the backend names the missing provider and the fix
        assert "instance_group kind KIND_GPU (device 0) needs ONNX Runtime's CUDAExecutionProvider" in cause
        assert "install onnxruntime-gpu" in cause
    else:  # no GPU: Triton itself refuses a GPU id it cannot see
        assert "instance group wants_gpu_0 of model wants_gpu specifies invalid or unsupported gpu id 0" in cause
    assert "Server log lines about 'wants_gpu'" in message


def test_missing_model_file_names_the_path(server: LocalServer, repository: Path) -> None:
    with pytest.raises(ServerStartError, match=r"no model file at .*no_model_file/1/model\.onnx"):
        server.load_model("no_model_file")


def test_config_that_disagrees_with_the_graph_names_the_field(server: LocalServer) -> None:
    with pytest.raises(ServerStartError, match=r"input\[0\] name 'z' is not an input of .*\(it has x\)"):
        server.load_model("wrong_input")
    with pytest.raises(ServerStartError, match=r"input\[0\] 'x' data_type is TYPE_INT64 but .* has tensor\(float\)"):
        server.load_model("wrong_type")


def test_a_port_in_use_is_reported_with_the_fix(repository: Path, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        expected = rf"http port {port} on 127\.0\.0\.1 is already in use; .*choose another"
        with pytest.raises(ServerStartError, match=expected), LocalProvider(tmp_path, http_port=port).start(repository):
            pass


def test_a_server_that_never_becomes_ready_times_out_with_its_log_and_is_stopped(
    repository: Path, tmp_path: Path
) -> None:
    with pytest.raises(ServerStartError) as error, LocalProvider(tmp_path, startup_timeout_s=0.05).start(repository):
        pass
    assert "was not ready after 0 s (raise --server-timeout" in str(error.value)
    assert "Its log ends with:" in str(error.value)
    running = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert running == []  # the half-started tritonserver was stopped, not left behind


def test_model_control_needs_the_sessions_key_and_the_suite_sends_it(server: LocalServer) -> None:
    assert server.run_key is not None
    for client in (
        triton_http.InferenceServerClient(server.endpoints.http_url),
        triton_grpc.InferenceServerClient(server.endpoints.grpc_url),
    ):
        with pytest.raises(InferenceServerException, match="restricted, expecting header"):
            client.load_model("doubler")  # anything else reaching the port: no key
        with pytest.raises(InferenceServerException, match="restricted, expecting header"):
            client.unload_model("doubler", headers={server.run_key.header: "guessed"})
        assert client.is_server_live()  # health and metadata stay open (readiness checks, monitors)
        client.close()
    server.unload_model("doubler")
    assert not server.is_model_ready("doubler")
    assert server.load_model("doubler").load_s > 0  # the suite's own calls carry the key
    assert server.is_model_ready("doubler")


def restricted_calls(client: Any) -> dict[str, Callable[[dict[str, str] | None], object]]:
    """One call to each API the run's key guards besides model control, with the headers given."""
    module = triton_grpc if isinstance(client, triton_grpc.InferenceServerClient) else triton_http
    request = module.InferInput("x", [1, 4], "FP32")
    request.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    return {
        "inference": lambda headers: client.infer("doubler", [request], headers=headers),
        "register shared memory": lambda headers: client.register_system_shared_memory(
            "intruder", "/intruder", 64, headers=headers
        ),
        "shared-memory status": lambda headers: client.get_system_shared_memory_status(headers=headers),
        "log settings": lambda headers: client.update_log_settings({"log_verbose_level": 1}, headers=headers),
        "trace settings": lambda headers: client.update_trace_settings(
            settings={"trace_level": ["TIMESTAMPS"]}, headers=headers
        ),
    }


def test_inference_shared_memory_logging_and_trace_need_the_runs_key_too(server: LocalServer) -> None:
    """Another program on the host that reaches the ports cannot send the run's server load it would measure as
    its own, map its memory into the run, read the run's tensors through a region of its own, or turn on verbose
    logging or tracing mid-measurement."""
    assert server.run_key is not None
    if not server.is_model_ready("doubler"):  # this test's own model, whichever test of the module ran before it
        server.load_model("doubler")
    for protocol, client in (
        ("http", triton_http.InferenceServerClient(server.endpoints.http_url)),
        ("grpc", triton_grpc.InferenceServerClient(server.endpoints.grpc_url)),
    ):
        for name, call in restricted_calls(client).items():
            for headers in (None, {server.run_key.header: "guessed"}):
                with pytest.raises(InferenceServerException, match="restricted, expecting header"):
                    call(headers)
                    pytest.fail(f"{protocol} {name} went through with {headers}")
        keyed = server.run_key.headers_for(protocol)
        client.get_system_shared_memory_status(headers=keyed)  # the run's own calls go through
        client.get_log_settings(headers=keyed)
        client.get_trace_settings(headers=keyed)
        restricted_calls(client)["inference"](keyed)
        assert client.is_server_live() and client.is_model_ready("doubler")  # health and metadata stay open
        client.close()


SLOW_START_MODEL = """
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(600)  # long past the test's bounds: only the server's death can end this load
"""


def test_a_server_that_dies_mid_load_ends_the_load_at_once_with_its_cause(tmp_path: Path) -> None:
    """Triton 2.51's Python backend can abort while initialising instances (boost lock_exception, SIGABRT); the
    stubs inherit the load call's connection and hold it open, so before this the load waited out --server-timeout
    (300 s) against a dead server."""
    repository = tmp_path / "repository"
    (repository / "slow_start" / "1").mkdir(parents=True)
    (repository / "slow_start" / "1" / "model.py").write_text(SLOW_START_MODEL)
    (repository / "slow_start" / "config.pbtxt").write_text(
        'name: "slow_start"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    with LocalProvider(tmp_path / "server", startup_timeout_s=300).start(repository) as server:

        def abort_once_initialising() -> None:
            deadline = time.monotonic() + 120  # a hang guard only
            while "ModelInstanceInitialize: slow_start" not in server.log_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            server.process.send_signal(signal.SIGABRT)

        threading.Thread(target=abort_once_initialising, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(ServerDied, match=r"died while loading model 'slow_start': tritonserver .*SIGABRT"):
            server.load_model("slow_start")
    assert time.monotonic() - started < 150  # the load's own deadline is 300 s
