"""The onnxruntime backend's pure parts, imported as Triton imports them (beside the wheel's triton_python_backend_utils)."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from blip_triton_bench.servers.local import BACKEND_SOURCE, pytriton_paths

pytestmark = pytest.mark.unit

#: What ONNX Runtime 1.31.1 logged on the GPU host for trt_model without TensorRT (docs: shared/notes/gpu-host.md).
TENSORRT_LOAD_FAILURE = (
    "[E:onnxruntime:Default, provider_bridge_ort.cc:2167 TryGetProviderInfo_TensorRT] provider_bridge_ort.cc:1778 "
    "onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load "
    "library libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: cannot open shared object file: "
    "No such file or directory\n"
)
TRT_CONFIG = {
    "optimization": {
        "execution_accelerators": {
            "gpu_execution_accelerator": [{"name": "tensorrt", "parameters": {"precision_mode": "FP16"}}]
        }
    }
}
EVERY_GPU_PROVIDER = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def backend() -> ModuleType:
    utils_dir = str(pytriton_paths()[0] / "backends" / "python")
    sys.path.insert(0, utils_dir)
    try:
        spec = importlib.util.spec_from_file_location("onnxruntime_backend", BACKEND_SOURCE / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(utils_dir)
    return module


def test_tensorrt_dropped_by_onnxruntime_fails_naming_the_provider_and_the_library(backend: ModuleType) -> None:
    requested = backend.provider_names(backend.providers_for(TRT_CONFIG, "GPU", 0, EVERY_GPU_PROVIDER))
    assert requested == EVERY_GPU_PROVIDER
    with pytest.raises(backend.BackendConfigError) as error:
        backend.check_active_providers(
            requested, ["CUDAExecutionProvider", "CPUExecutionProvider"], TENSORRT_LOAD_FAILURE
        )
    message = str(error.value)
    assert "the config asks for TensorrtExecutionProvider but ONNX Runtime" in message
    assert "with CUDAExecutionProvider, CPUExecutionProvider only" in message
    assert "ONNX Runtime could not load libnvinfer.so.10" in message
    assert "install onnxruntime-gpu built with TensorRT" in message


def test_a_missing_provider_without_a_logged_library_still_fails(backend: ModuleType) -> None:
    with pytest.raises(backend.BackendConfigError, match=r"asks for CUDAExecutionProvider.*logged no library"):
        backend.check_active_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"], "")


def test_a_session_with_every_requested_provider_passes(backend: ModuleType) -> None:
    import onnxruntime

    requested = backend.provider_names(backend.providers_for({}, "CPU", 0, onnxruntime.get_available_providers()))
    assert requested == ["CPUExecutionProvider"]
    backend.check_active_providers(requested, ["CPUExecutionProvider"], "")  # a CPU config still loads
    backend.check_active_providers(EVERY_GPU_PROVIDER, EVERY_GPU_PROVIDER, TENSORRT_LOAD_FAILURE)


def test_native_stderr_is_captured_and_passed_on(backend: ModuleType, capfd: pytest.CaptureFixture[str]) -> None:
    with backend.native_stderr_captured() as captured:
        os.write(2, b"Failed to load library libexample.so\n")
    assert captured == ["Failed to load library libexample.so\n"]
    assert "Failed to load library libexample.so" in capfd.readouterr().err


def test_the_backend_loads_only_a_plain_model_file_inside_the_model_folder(backend: ModuleType, tmp_path) -> None:
    model_dir = tmp_path / "models" / "m"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(b"onnx")
    victim = tmp_path / "victim.onnx"
    victim.write_bytes(b"not yours")
    (model_dir / "1" / "linked.onnx").symlink_to(victim)

    assert backend.model_file_path(str(model_dir), "1", "model.onnx", "m") == str(model_dir / "1" / "model.onnx")
    for filename in ("../../victim.onnx", str(victim), "..", ""):
        with pytest.raises(backend.BackendConfigError, match=f"default_model_filename '{filename}' is not a plain"):
            backend.model_file_path(str(model_dir), "1", filename, "m")
    with pytest.raises(backend.BackendConfigError, match="outside the model's folder"):
        backend.model_file_path(str(model_dir), "1", "linked.onnx", "m")


#: What the captioner's BLS model and the ONNX Runtime backend each carry of the stub's numpy 1 / numpy 2 handling:
#: Triton loads one from the model repository and the other from the backend folder, so neither imports the other.
SHARED_STUB_HELPERS = ("NUMPY_2", "to_triton", "from_triton")
CAPTIONER_MODEL = Path(__file__).resolve().parents[1] / "model_repository" / "blip_caption" / "1" / "model.py"


def _top_level_definitions(path: Path, names: tuple[str, ...]) -> dict[str, str]:
    """The source of each named top-level function or assignment, as the AST prints it (comments and blank lines
    do not count; a changed statement, argument or docstring does)."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found[node.name] = ast.unparse(node)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets):
            found[node.targets[0].id] = ast.unparse(node)  # type: ignore[attr-defined]
    return found


def test_the_two_python_models_carry_the_same_stub_helpers() -> None:
    backend = _top_level_definitions(BACKEND_SOURCE / "model.py", SHARED_STUB_HELPERS)
    captioner = _top_level_definitions(CAPTIONER_MODEL, SHARED_STUB_HELPERS)
    assert sorted(backend) == sorted(captioner) == sorted(SHARED_STUB_HELPERS)
    for name in SHARED_STUB_HELPERS:
        assert backend[name] == captioner[name], (
            f"{name} differs between {BACKEND_SOURCE / 'model.py'} and {CAPTIONER_MODEL}"
        )
