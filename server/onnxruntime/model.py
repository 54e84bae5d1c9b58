"""A Python-based Triton backend named `onnxruntime`: serves `platform: "onnxruntime_onnx"` configs unchanged.

The nvidia-pytriton tritonserver build has no native ONNX Runtime backend; this one honours what a
config says (instance kind, thread counts, graph level, execution accelerators) as NVIDIA's does, and
runs one ONNX Runtime call per batch the dynamic batcher forms.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

#: Triton data types -> ONNX tensor element types, for checking a config against its graph.
TRITON_TO_ONNX_TYPE = {
    "TYPE_BOOL": "tensor(bool)",
    "TYPE_UINT8": "tensor(uint8)",
    "TYPE_UINT16": "tensor(uint16)",
    "TYPE_UINT32": "tensor(uint32)",
    "TYPE_UINT64": "tensor(uint64)",
    "TYPE_INT8": "tensor(int8)",
    "TYPE_INT16": "tensor(int16)",
    "TYPE_INT32": "tensor(int32)",
    "TYPE_INT64": "tensor(int64)",
    "TYPE_FP16": "tensor(float16)",
    "TYPE_FP32": "tensor(float)",
    "TYPE_FP64": "tensor(double)",
    "TYPE_STRING": "tensor(string)",
    "TYPE_BF16": "tensor(bfloat16)",
}

#: Triton's onnxruntime_backend: `optimization.graph.level` -1 basic, 1 extended, anything else all.
GRAPH_LEVELS = {
    -1: onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}

#: TensorRT accelerator parameters as Triton names them -> ONNX Runtime TensorRT provider options.
TENSORRT_OPTIONS = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "trt_engine_cache_enable": "trt_engine_cache_enable",
    "trt_engine_cache_path": "trt_engine_cache_path",
    "trt_max_partition_iterations": "trt_max_partition_iterations",
    "trt_min_subgraph_size": "trt_min_subgraph_size",
}

PROVIDER_FIX = {
    "CUDAExecutionProvider": "install onnxruntime-gpu on a host with a CUDA GPU (`pip install .[gpu]`)",
    "TensorrtExecutionProvider": "install onnxruntime-gpu built with TensorRT and the TensorRT libraries",
    "OpenVINOExecutionProvider": "install onnxruntime-openvino",
}


#: The nvidia-pytriton 0.7.0 Python backend stub is built against numpy 1's C API. Under numpy 2 it reads
#: arrays wrongly: `pb_utils.Tensor(name, array)` sends zero bytes (shape intact) and `as_numpy()` returns
#: inputs with zero strides (every element equals the first). DLPack carries both correctly under numpy 2;
#: under numpy 1.26, `Tensor.from_dlpack` of an ndarray makes the stub unhealthy, so numpy 1 keeps the
#: numpy path. Measured on the tiny BLIP export (tests/test_stub_numpy.py). The captioner's BLS model
#: (model_repository/blip_caption/1/model.py) carries the same two functions: Triton loads it from the
#: model repository and this file from the backend directory, so neither can import the other.
NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


def to_triton(name: str, array: Any) -> Any:
    """A pb_utils.Tensor holding `array` (an ndarray or another pb_utils.Tensor) whole, under numpy 1 and 2."""
    if isinstance(array, pb_utils.Tensor):
        if not NUMPY_2:
            return pb_utils.Tensor(name, array.as_numpy())
        return pb_utils.Tensor.from_dlpack(name, array)
    array = np.ascontiguousarray(array)  # DLPack exports C-order only
    # Strings (BYTES) have no DLPack form; an empty array has no bytes to lose (and the stub calls numpy's
    # DLPack strides of a zero-size array non-contiguous).
    if not NUMPY_2 or array.dtype == np.object_ or array.size == 0:
        return pb_utils.Tensor(name, array)
    if not array.flags.writeable:  # numpy refuses to export a read-only array over DLPack
        array = array.copy()
    return pb_utils.Tensor.from_dlpack(name, array)


def from_triton(tensor: Any) -> np.ndarray:
    """The ndarray a pb_utils.Tensor in host memory holds, read correctly under numpy 1 and 2."""
    return np.from_dlpack(tensor) if NUMPY_2 else tensor.as_numpy()


class BackendConfigError(Exception):
    """The config asks for something this backend or this onnxruntime cannot do."""


def _parameter(config: dict[str, Any], key: str) -> str | None:
    value = config.get("parameters", {}).get(key)
    return None if value is None else str(value.get("string_value", ""))


def session_options(config: dict[str, Any]) -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    for key, attribute in (
        ("intra_op_thread_count", "intra_op_num_threads"),
        ("inter_op_thread_count", "inter_op_num_threads"),
    ):
        text = _parameter(config, key)
        if text:
            try:
                setattr(options, attribute, int(text))
            except ValueError:
                raise BackendConfigError(f"parameters '{key}' is {text!r}; it must be an integer") from None
    if _parameter(config, "execution_mode") == "1":
        options.execution_mode = onnxruntime.ExecutionMode.ORT_PARALLEL
    level = int(config.get("optimization", {}).get("graph", {}).get("level", 0))
    options.graph_optimization_level = GRAPH_LEVELS.get(level, onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return options


def _require(provider: str, asked_by: str, available: Sequence[str]) -> None:
    if provider not in available:
        raise BackendConfigError(
            f"{asked_by} needs ONNX Runtime's {provider}, which this onnxruntime "
            f"{onnxruntime.__version__} lacks (it has {', '.join(available)}); fix: {PROVIDER_FIX.get(provider, '')}"
        )


def _tensorrt_options(parameters: dict[str, str], device_id: int) -> dict[str, Any]:
    options: dict[str, Any] = {"device_id": device_id}
    precision = parameters.get("precision_mode", "FP32").upper()
    if precision == "FP16":
        options["trt_fp16_enable"] = True
    elif precision == "INT8":
        options["trt_int8_enable"] = True
    elif precision != "FP32":
        raise BackendConfigError(f"tensorrt parameter precision_mode is {precision!r}; use FP32, FP16 or INT8")
    for triton_key, ort_key in TENSORRT_OPTIONS.items():
        if triton_key in parameters:
            options[ort_key] = parameters[triton_key]
    return options


def providers_for(config: dict[str, Any], instance_kind: str, device_id: int, available: Sequence[str]) -> list:
    """The providers in priority order, from the instance kind and the execution accelerators."""
    accelerators = config.get("optimization", {}).get("execution_accelerators", {})
    providers: list = []
    if instance_kind == "GPU":
        for index, accelerator in enumerate(accelerators.get("gpu_execution_accelerator", [])):
            name = accelerator.get("name", "")
            asked_by = f"optimization.execution_accelerators.gpu_execution_accelerator[{index}] '{name}'"
            parameters = accelerator.get("parameters", {})
            if name == "tensorrt":
                _require("TensorrtExecutionProvider", asked_by, available)
                providers.append(("TensorrtExecutionProvider", _tensorrt_options(parameters, device_id)))
            elif name == "cuda":
                _require("CUDAExecutionProvider", asked_by, available)
                providers.append(("CUDAExecutionProvider", {"device_id": device_id, **parameters}))
            else:
                raise BackendConfigError(f"{asked_by}: unknown GPU accelerator; use tensorrt or cuda")
        _require("CUDAExecutionProvider", f"instance_group kind KIND_GPU (device {device_id})", available)
        if not any(name == "CUDAExecutionProvider" for name, _ in providers):
            providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
    for index, accelerator in enumerate(accelerators.get("cpu_execution_accelerator", [])):
        name = accelerator.get("name", "")
        asked_by = f"optimization.execution_accelerators.cpu_execution_accelerator[{index}] '{name}'"
        if name != "openvino":
            raise BackendConfigError(f"{asked_by}: unknown CPU accelerator; use openvino")
        _require("OpenVINOExecutionProvider", asked_by, available)
        providers.append(("OpenVINOExecutionProvider", dict(accelerator.get("parameters", {}))))
    providers.append("CPUExecutionProvider")
    return providers


#: How ONNX Runtime logs a provider library whose own dependency is missing, e.g. "Failed to load library
#: libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: cannot open shared object file".
MISSING_LIBRARY = re.compile(r"(lib[\w.+-]+?\.so[\d.]*?)\s*: cannot open shared object file")
FAILED_LIBRARY = re.compile(r"Failed to load library (\S+)")


def provider_names(providers: Sequence[Any]) -> list[str]:
    """The names in an InferenceSession providers list (each a name or a (name, options) pair)."""
    return [provider if isinstance(provider, str) else provider[0] for provider in providers]


def check_active_providers(requested: Sequence[str], active: Sequence[str], onnxruntime_log: str) -> None:
    """Fail when the session runs without a provider the config asked for.

    ONNX Runtime lists TensorRT as available whenever its provider library ships, and when that library cannot
    load (e.g. libnvinfer.so.10 absent) it logs an error and falls back to the next provider: a TensorRT FP16
    variant was served on plain CUDA, reported "successfully loaded". Only the session's own list tells.
    """
    missing = [name for name in requested if name not in active]
    if not missing:
        return
    libraries = MISSING_LIBRARY.findall(onnxruntime_log) or FAILED_LIBRARY.findall(onnxruntime_log)
    cause = (
        f"ONNX Runtime could not load {', '.join(dict.fromkeys(libraries))}"
        if libraries
        else "ONNX Runtime logged no library it failed to load (see its lines above in the server log)"
    )
    fixes = "; ".join(PROVIDER_FIX[name] for name in missing if name in PROVIDER_FIX)
    raise BackendConfigError(
        f"the config asks for {', '.join(missing)} but ONNX Runtime {onnxruntime.__version__} created the session "
        f"with {', '.join(active)} only (it falls back silently); {cause}" + (f"; fix: {fixes}" if fixes else "")
    )


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Collect what native code (ONNX Runtime's logger) writes to fd 2 meanwhile; it is passed on to the log too."""
    captured: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read()
            os.write(2, text)
            captured.append(text.decode(errors="replace"))


def check_io(config: dict[str, Any], session: onnxruntime.InferenceSession, model_path: str) -> None:
    """Every configured input and output exists in the graph with the same element type."""
    for field_name, graph_values in (("input", session.get_inputs()), ("output", session.get_outputs())):
        graph = {value.name: value.type for value in graph_values}
        for index, tensor in enumerate(config.get(field_name, [])):
            name, data_type = tensor["name"], tensor["data_type"]
            if name not in graph:
                raise BackendConfigError(
                    f"{field_name}[{index}] name '{name}' is not an {field_name} of {model_path} "
                    f"(it has {', '.join(sorted(graph))})"
                )
            expected = TRITON_TO_ONNX_TYPE.get(data_type)
            if expected != graph[name]:
                raise BackendConfigError(
                    f"{field_name}[{index}] '{name}' data_type is {data_type} but {model_path} has {graph[name]}"
                )


def _group_by_shape(requests: Sequence[Any], input_names: Sequence[str]) -> dict[tuple, list[int]]:
    """Request indices keyed by their non-batch input shapes: only equal shapes can share one run."""
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        shapes = tuple(tuple(pb_utils.get_input_tensor_by_name(request, name).shape()[1:]) for name in input_names)
        groups.setdefault(shapes, []).append(index)
    return groups


def model_file_path(model_dir: str, version: str, filename: str, model_name: str) -> str:
    """`<model_dir>/<version>/<filename>`, refused unless it is a plain name that stays inside the model's folder
    once links are followed: a config under review must not make the server read a file from elsewhere."""
    if not filename or filename in (".", "..") or os.path.basename(filename) != filename or "\\" in filename:
        raise BackendConfigError(
            f"model '{model_name}': default_model_filename '{filename}' is not a plain file name; name a file in "
            f"the version folder, e.g. 'model.onnx'"
        )
    path = os.path.join(model_dir, version, filename)
    real_dir = os.path.realpath(model_dir)
    real_path = os.path.realpath(path)
    if os.path.commonpath([real_dir, real_path]) != real_dir:
        raise BackendConfigError(
            f"model '{model_name}': {path} resolves to {real_path}, outside the model's folder {real_dir}; "
            "put the model file itself there, not a link out of it"
        )
    return path


class TritonPythonModel:
    """One ONNX Runtime session per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        self.config = json.loads(args["model_config"])
        self.name = self.config["name"]
        filename = self.config.get("default_model_filename") or "model.onnx"
        model_path = model_file_path(args["model_repository"], args["model_version"], filename, self.name)
        if not os.path.isfile(model_path):
            raise BackendConfigError(
                f"model '{self.name}': no model file at {model_path}; put the ONNX file there "
                f"(or set default_model_filename in config.pbtxt)"
            )
        instance_kind = args.get("model_instance_kind", "CPU")
        device_id = int(args.get("model_instance_device_id", 0))
        options = session_options(self.config)
        providers = providers_for(self.config, instance_kind, device_id, onnxruntime.get_available_providers())
        with native_stderr_captured() as onnxruntime_log:
            self.session = onnxruntime.InferenceSession(model_path, sess_options=options, providers=providers)
        check_active_providers(provider_names(providers), self.session.get_providers(), "".join(onnxruntime_log))
        check_io(self.config, self.session, model_path)
        self.input_names = [tensor["name"] for tensor in self.config.get("input", [])]
        self.output_names = [tensor["name"] for tensor in self.config.get("output", [])]
        self.batching = int(self.config.get("max_batch_size", 0)) > 0
        pb_utils.Logger.log_info(
            f"onnxruntime backend: model '{self.name}' instance {args.get('model_instance_name', '')} "
            f"kind {instance_kind} providers {self.session.get_providers()} "
            f"intra_op_num_threads {options.intra_op_num_threads} inter_op_num_threads {options.inter_op_num_threads} "
            f"graph_optimization_level {options.graph_optimization_level.name} file {model_path} "
            f"numpy {np.__version__} onnxruntime {onnxruntime.__version__}"
        )

    def _run(self, requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """Concatenate along the batch dimension, run once, split back per request."""
        arrays = {
            name: [from_triton(pb_utils.get_input_tensor_by_name(request, name)) for request in requests]
            for name in self.input_names
        }
        feed = {name: parts[0] if len(parts) == 1 else np.concatenate(parts) for name, parts in arrays.items()}
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))
        sizes = [part.shape[0] for part in arrays[self.input_names[0]]]
        boundaries = np.cumsum(sizes)[:-1]
        return [
            {name: piece for name, piece in zip(outputs, pieces, strict=True)}
            for pieces in zip(*(np.split(value, boundaries) for value in outputs.values()), strict=True)
        ]

    def _respond(self, request: Any, outputs: dict[str, np.ndarray]) -> Any:
        wanted = request.requested_output_names() or self.output_names
        return pb_utils.InferenceResponse(output_tensors=[to_triton(name, outputs[name]) for name in wanted])

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups = (
            _group_by_shape(requests, self.input_names) if self.batching else {(i,): [i] for i in range(len(requests))}
        )
        for indices in groups.values():
            members = [requests[i] for i in indices]
            try:
                results = self._run(members)
            except Exception as error:  # one bad group fails its own requests, not the others
                for index in indices:
                    responses[index] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"onnxruntime backend: {error}")
                    )
                continue
            for index, outputs in zip(indices, results, strict=True):
                responses[index] = self._respond(requests[index], outputs)
        return responses

    def finalize(self) -> None:
        self.session = None
