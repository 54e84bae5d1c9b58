"""The in-process reference runs on the variant's own execution provider, or says why it does not."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from blip_triton_bench.model.reference import CPU_PROVIDER, CUDA_PROVIDER, TENSORRT_PROVIDER, reference_provider
from blip_triton_bench.repository.variants import discover_variants, parse_config

pytestmark = pytest.mark.unit

SEED_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
GPU_ONNXRUNTIME = [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]
CUDA_ONLY = [CUDA_PROVIDER, CPU_PROVIDER]
CPU_ONLY = [CPU_PROVIDER]


def seed_config(name: str) -> model_config_pb2.ModelConfig:
    return {variant.name: variant for variant in discover_variants(SEED_REPOSITORY)}[name].config


def config_from(tmp_path: Path, text: str) -> model_config_pb2.ModelConfig:
    path = tmp_path / "config.pbtxt"
    path.write_text(f'name: "v"\nplatform: "onnxruntime_onnx"\n{text}\n')
    return parse_config(path)


def test_gpu_variant_gets_cuda_on_the_configs_device(tmp_path: Path) -> None:
    provider = reference_provider(seed_config("base_model_gpu"), CUDA_ONLY)
    assert (provider.provider, provider.device_id, provider.fallback) == (CUDA_PROVIDER, 0, None)
    assert provider.session_providers() == [(CUDA_PROVIDER, {"device_id": 0}), CPU_PROVIDER]
    on_gpu_1 = reference_provider(config_from(tmp_path, "instance_group [ { kind: KIND_GPU gpus: [ 1 ] } ]"), CUDA_ONLY)
    assert on_gpu_1.device_id == 1 and on_gpu_1.describe() == "CUDA on GPU 1"


def test_gpu_variant_without_cuda_in_onnxruntime_falls_back_to_cpu_and_says_so() -> None:
    provider = reference_provider(seed_config("base_model_gpu"), CPU_ONLY)
    assert provider.provider == CPU_PROVIDER and not provider.on_gpu
    assert "the config asks for GPU 0" in provider.fallback and "has no CUDAExecutionProvider" in provider.fallback


def test_cpu_variant_stays_on_the_cpu_even_where_cuda_exists() -> None:
    provider = reference_provider(seed_config("base_model_cpu"), GPU_ONNXRUNTIME)
    assert provider.session_providers() == [CPU_PROVIDER] and provider.fallback is None


def test_tensorrt_variant_gets_tensorrt_with_its_precision_and_engine_cache() -> None:
    provider = reference_provider(seed_config("trt_model"), GPU_ONNXRUNTIME)
    assert provider.provider == TENSORRT_PROVIDER
    (trt, options), (cuda, _), cpu = provider.session_providers()
    assert (trt, cuda, cpu) == (TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER)
    assert options["trt_fp16_enable"] is True and options["device_id"] == 0
    assert options["trt_engine_cache_path"] == "/tmp/blip_trt_engine_cache"  # the local server's engines are reused


def test_tensorrt_variant_without_tensorrt_runs_on_cuda_and_says_so() -> None:
    provider = reference_provider(seed_config("trt_model"), CUDA_ONLY)
    assert provider.provider == CUDA_PROVIDER
    assert provider.describe().startswith("CUDA on GPU 0 (the config asks for TensorRT, which onnxruntime")
