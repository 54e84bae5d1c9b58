"""In-process ONNX Runtime sessions on the exact file each variant is served with: the serving reference.

A variant that ships its own model file is compared with that file, every other one with the artifact its
config names (the FP32 export, the INT8 quantization, the student's export, ...). A variant served on a GPU
is compared with a session on the same kind of device (its execution provider) where the installed
onnxruntime has it, so a GPU server is held to GPU arithmetic and its efficiency to GPU speed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime
from tritonclient.grpc import model_config_pb2

from blip_triton_bench.model.artifacts import ModelArtifacts
from blip_triton_bench.repository.variants import Variant

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"

#: The tensorrt accelerator's parameters as Triton names them -> ONNX Runtime TensorRT provider options, as
#: server/onnxruntime/model.py maps them (the engine cache path is shared, so a local server's engine is reused).
TENSORRT_OPTIONS = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "trt_engine_cache_enable": "trt_engine_cache_enable",
    "trt_engine_cache_path": "trt_engine_cache_path",
}


@dataclass(frozen=True)
class ReferenceProvider:
    """The execution provider a variant's reference session runs on, and why it is not the config's when not."""

    provider: str  # the provider asked of ONNX Runtime first (CPU, CUDA or TensorRT)
    device_id: int | None  # the GPU, for CUDA and TensorRT
    options: tuple[tuple[str, Any], ...] = ()  # the provider's options
    fallback: str | None = None  # why this is not the provider the variant is served with

    @property
    def on_gpu(self) -> bool:
        return self.provider != CPU_PROVIDER

    def session_providers(self) -> list:
        """`providers=` for onnxruntime.InferenceSession, in priority order (TensorRT falls back to CUDA)."""
        if self.provider == CPU_PROVIDER:
            return [CPU_PROVIDER]
        providers: list = [(self.provider, dict(self.options))]
        if self.provider == TENSORRT_PROVIDER:
            providers.append((CUDA_PROVIDER, {"device_id": self.device_id}))
        return [*providers, CPU_PROVIDER]

    def describe(self) -> str:
        name = self.provider.removesuffix("ExecutionProvider")
        where = f" on GPU {self.device_id}" if self.device_id is not None else ""
        return f"{name}{where}" + (f" ({self.fallback})" if self.fallback else "")


#: The float32 CPU reference every accuracy and export check is held to.
CPU_REFERENCE = ReferenceProvider(CPU_PROVIDER, None)


def first_gpu(config: model_config_pb2.ModelConfig) -> int | None:
    """The device of the config's first KIND_GPU instance group (its first id; 0 when it names none)."""
    for group in config.instance_group:
        if group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU:
            return group.gpus[0] if group.gpus else 0
    return None


def reference_provider(config: model_config_pb2.ModelConfig, available: Sequence[str]) -> ReferenceProvider:
    """The provider the variant is served with, where `available` (onnxruntime.get_available_providers()) has
    it; else the next one down (TensorRT -> CUDA -> CPU), saying why."""
    device_id = first_gpu(config)
    accelerators = [a.name.lower() for a in config.optimization.execution_accelerators.gpu_execution_accelerator]
    if device_id is None and accelerators:
        device_id = 0  # a GPU accelerator without a KIND_GPU group: Triton puts the instance on GPU 0
    if device_id is None:
        return ReferenceProvider(CPU_PROVIDER, None)
    version = f"onnxruntime {onnxruntime.__version__} (has {', '.join(available)})"
    fallback = None
    if "tensorrt" in accelerators:
        if TENSORRT_PROVIDER in available:
            return ReferenceProvider(TENSORRT_PROVIDER, device_id, tensorrt_options(config, device_id))
        fallback = f"the config asks for TensorRT, which {version} lacks"
    if CUDA_PROVIDER in available:
        return ReferenceProvider(CUDA_PROVIDER, device_id, (("device_id", device_id),), fallback)
    why = fallback or f"the config asks for GPU {device_id}"
    return ReferenceProvider(CPU_PROVIDER, None, fallback=f"{why}; {version} has no {CUDA_PROVIDER}")


def tensorrt_options(config: model_config_pb2.ModelConfig, device_id: int) -> tuple[tuple[str, Any], ...]:
    options: dict[str, Any] = {"device_id": device_id}
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        if accelerator.name.lower() != "tensorrt":
            continue
        parameters = dict(accelerator.parameters)
        precision = parameters.get("precision_mode", "FP32").upper()
        if precision == "FP16":
            options["trt_fp16_enable"] = True
        elif precision == "INT8":
            options["trt_int8_enable"] = True
        options.update({ort: parameters[triton] for triton, ort in TENSORRT_OPTIONS.items() if triton in parameters})
    return tuple(options.items())


def reference_model_path(variant: Variant, artifacts: ModelArtifacts) -> Path:
    for path in variant.own_model_files:
        if path.name == variant.model_filename:
            return path
    return artifacts.for_kind(variant.artifact).onnx_path


class ReferenceSessions:
    """Sessions per (model file, provider), created on first use and shared by the session's tests.

    `notes` gets one line per reference that does not run where its variant is served.
    """

    def __init__(self, artifacts: ModelArtifacts, notes: list[str] | None = None) -> None:
        self._artifacts = artifacts
        self._notes = notes if notes is not None else []
        self._sessions: dict[tuple[Path, ReferenceProvider], onnxruntime.InferenceSession] = {}
        self._providers: dict[tuple[Path, ReferenceProvider], ReferenceProvider] = {}

    def for_path(self, path: Path, provider: ReferenceProvider = CPU_REFERENCE) -> onnxruntime.InferenceSession:
        key = (path, provider)
        if key not in self._sessions:
            session = onnxruntime.InferenceSession(str(path), providers=provider.session_providers())
            ran = session.get_providers()[0]
            if ran != provider.provider:
                # ONNX Runtime falls back silently when a listed provider cannot start (TensorRT without
                # libnvinfer): the reference then says what it really runs on.
                why = f"{provider.provider} is listed but did not start, ONNX Runtime fell back to {ran}"
                provider = ReferenceProvider(ran, provider.device_id if ran != CPU_PROVIDER else None, fallback=why)
                self._notes.append(f"in-process reference on {path}: {why}")
            self._sessions[key], self._providers[key] = session, provider
        return self._sessions[key]

    def for_export(self) -> onnxruntime.InferenceSession:
        """The FP32 teacher on the CPU: what every variant's accuracy is measured against."""
        return self.for_path(self._artifacts.teacher_export.onnx_path)

    def for_variant(self, variant: Variant) -> onnxruntime.InferenceSession:
        """The variant's served file on the variant's own execution provider (see reference_provider)."""
        return self.for_path(reference_model_path(variant, self._artifacts), self._asked(variant))

    def provider_for(self, variant: Variant) -> ReferenceProvider:
        """What `for_variant(variant)` runs on (creating the session if needed)."""
        self.for_variant(variant)
        return self._providers[(reference_model_path(variant, self._artifacts), self._asked(variant))]

    def _asked(self, variant: Variant) -> ReferenceProvider:
        asked = reference_provider(variant.config, onnxruntime.get_available_providers())
        if asked.fallback:
            note = f"in-process reference of {variant.name}: {asked.describe()}"
            if note not in self._notes:
                self._notes.append(note)
                logger.warning(note)
        return asked
