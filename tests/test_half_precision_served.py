"""The seed's FP16 variant served by a real tritonserver through the Python-based ONNX Runtime backend: its config
on a CPU instance (this host has no GPU), staged with the tiny FP16 artifact, answers with FP32 logits that match the
same file in process and agree with the FP32 teacher."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from tritonclient.grpc import model_config_pb2

from blip_triton_bench.judging.agreement import check_agreement
from blip_triton_bench.judging.correctness import AGREEMENT_THRESHOLDS, assert_close, serving_tolerance
from blip_triton_bench.load.client import TritonInferClient
from blip_triton_bench.model.artifacts import ModelArtifacts
from blip_triton_bench.model.workload import build_inputs
from blip_triton_bench.repository.variants import STAGED_VERSION, discover_variants, stage_generated
from blip_triton_bench.servers.local import LocalProvider, LocalServer
from tests.conftest import SEED_REPOSITORY

pytestmark = pytest.mark.server

NAME = "fp16_on_cpu"


@pytest.fixture(scope="module")
def repository(tiny_artifacts: ModelArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    variant = next(v for v in discover_variants(SEED_REPOSITORY) if v.name == "base_model_gpu_fp16")
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(variant.config)
    config.name = NAME
    del config.instance_group[:]
    config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
    root = tmp_path_factory.mktemp("fp16-repository")
    stage_generated(root, config, tiny_artifacts.files_for(variant, root))
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with LocalProvider(tmp_path_factory.mktemp("server")).start(repository) as running:
        running.load_model(NAME)
        yield running


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_fp16_matches_the_same_file_in_process_and_agrees_with_fp32(
    server: LocalServer, repository: Path, tiny_artifacts: ModelArtifacts, protocol: str
) -> None:
    served_file = repository / NAME / STAGED_VERSION / "model.onnx"
    assert served_file.read_bytes() == tiny_artifacts.fp16().onnx_path.read_bytes()
    inputs = build_inputs(tiny_artifacts.teacher.description, 4, 16, seed=3)
    url = server.endpoints.grpc_url if protocol == "grpc" else server.endpoints.http_url
    with TritonInferClient(url, protocol, headers=server.request_headers(protocol)) as client:
        served = client.infer(NAME, inputs)

    assert served.dtype == np.float32
    (in_process,) = onnxruntime.InferenceSession(str(served_file), providers=["CPUExecutionProvider"]).run(
        ["logits"], inputs.as_dict()
    )
    assert_close("logits", served, in_process, serving_tolerance(on_gpu=False, fp16=True))
    teacher = onnxruntime.InferenceSession(str(tiny_artifacts.teacher_export.onnx_path))
    (fp32,) = teacher.run(["logits"], inputs.as_dict())
    check_agreement(f"{NAME} vs FP32", served, fp32, AGREEMENT_THRESHOLDS["fp16_vs_fp32"])
