"""The onnxruntime backend serves BLIP's logits whole under the project's numpy and under numpy 2.

The nvidia-pytriton 0.7.0 stub is built against numpy 1: under numpy 2 its numpy path sent every output with
its shape and 0 bytes (seen on the GPU host). The stub here runs a second venv's interpreter with numpy 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from blip_triton_bench.judging.correctness import TOLERANCES, assert_close
from blip_triton_bench.load.client import TritonInferClient
from blip_triton_bench.model.source import LoadedModel
from blip_triton_bench.model.workload import build_inputs
from blip_triton_bench.options import BenchOptions
from blip_triton_bench.servers.local import LocalProvider, LocalServer
from blip_triton_bench.servers.stub_env import stub_interpreter

pytestmark = pytest.mark.server

CONFIG = """
name: "logits"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, 384, 384 ] },
  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }
]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ -1, 30524 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""
#: Exact pins, so every run tests the same numpy 2 and the stub's venv, keyed by its requirements, is built (and
#: downloaded) once per cache, not again whenever a newer numpy appears. 2.4.6: the newest numpy 2 with wheels for
#: Python 3.11 (the project's lowest) through 3.14. onnxruntime pinned to the suite's own, so the two stubs differ
#: in numpy only.
NUMPY_2_STUB = ("numpy==2.4.6", f"onnxruntime=={onnxruntime.__version__}")
BATCH_SIZE = 2
SEQUENCE_LENGTH = 16


@pytest.fixture(scope="module")
def repository(tiny_artifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    (root / "logits" / "1").mkdir(parents=True)
    (root / "logits" / "config.pbtxt").write_text(CONFIG)
    (root / "logits" / "1" / "model.onnx").hardlink_to(tiny_artifacts.teacher_export.onnx_path)
    return root


@pytest.fixture(scope="module", params=["project numpy", "numpy 2"])
def server(
    request: pytest.FixtureRequest,
    repository: Path,
    bench_options: BenchOptions,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalServer]:
    stub_bin_dir = stub_interpreter(bench_options.cache_dir, NUMPY_2_STUB) if request.param == "numpy 2" else None
    with LocalProvider(tmp_path_factory.mktemp("server"), stub_bin_dir=stub_bin_dir).start(repository) as running:
        running.load_model("logits")
        yield running


def stub_numpy_version(server: LocalServer) -> str:
    (line,) = [line for line in server.log_text().splitlines() if "onnxruntime backend: model 'logits'" in line]
    return line.split(" numpy ")[1].split()[0]


def test_the_stub_runs_the_chosen_numpy(server: LocalServer, request: pytest.FixtureRequest) -> None:
    major = stub_numpy_version(server).split(".")[0]
    assert major == ("2" if request.node.callspec.id == "numpy 2" else np.__version__.split(".")[0])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_logits_arrive_whole_and_equal_in_process_onnxruntime(
    server: LocalServer, tiny_model: LoadedModel, tiny_artifacts, protocol: str
) -> None:
    inputs = build_inputs(tiny_model.description, BATCH_SIZE, SEQUENCE_LENGTH, seed=1)
    (expected,) = onnxruntime.InferenceSession(str(tiny_artifacts.teacher_export.onnx_path)).run(
        ["logits"], inputs.as_dict()
    )
    url = server.endpoints.grpc_url if protocol == "grpc" else server.endpoints.http_url
    with TritonInferClient(url, protocol, headers=server.request_headers(protocol)) as client:
        served = client.infer("logits", inputs)  # an empty output raises EmptyOutput naming its byte count
    assert served.nbytes == BATCH_SIZE * SEQUENCE_LENGTH * 30524 * 4
    assert_close("logits", served, expected, TOLERANCES["triton_vs_onnxruntime"])
