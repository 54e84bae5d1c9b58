"""The installed ONNX Runtime: one distribution per environment, the IR versions it loads, providers that really run."""

from __future__ import annotations

import onnx
import onnxruntime
import pytest

from blip_triton_bench.host.environment import (
    Distribution,
    _identity_model,
    installed_onnxruntime,
    max_ir_version_onnxruntime_loads,
    onnxruntime_distribution,
    onnxruntime_install_problem,
    probe_provider,
    summarise_provider_failure,
)

pytestmark = pytest.mark.unit


def test_cpu_and_gpu_builds_together_are_named_with_versions_and_the_fix() -> None:
    message = onnxruntime_install_problem(
        [Distribution("onnxruntime", "1.30.0"), Distribution("onnxruntime_gpu", "1.31.1")]
    )
    assert message is not None
    assert "onnxruntime 1.30.0 and onnxruntime-gpu 1.31.1 are both installed" in message
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu==1.31.1" in message


def test_one_distribution_is_no_problem_whichever_it_is() -> None:
    assert onnxruntime_install_problem([Distribution("onnxruntime", "1.32.0")]) is None
    assert onnxruntime_install_problem([Distribution("onnxruntime-gpu", "1.31.1")]) is None
    # packages_distributions() may name one distribution twice (spelled two ways): still one
    assert (
        onnxruntime_install_problem(
            [Distribution("onnxruntime_gpu", "1.31.1"), Distribution("onnxruntime-gpu", "1.31.1")]
        )
        is None
    )


def test_messages_name_the_distribution_of_the_imported_version() -> None:
    both = [Distribution("onnxruntime", "1.30.0"), Distribution("onnxruntime_gpu", "1.31.1")]
    assert onnxruntime_distribution(both, "1.31.1") == "onnxruntime-gpu 1.31.1"
    assert onnxruntime_distribution(both[:1], "1.30.0") == "onnxruntime 1.30.0"
    assert onnxruntime_distribution([Distribution("onnxruntime", "1.31.1"), both[1]], "1.31.1") == "onnxruntime 1.31.1"


def test_no_onnxruntime_says_which_extra_to_install() -> None:
    message = onnxruntime_install_problem([])
    assert message is not None
    assert "pip install -e '.[cpu]'" in message and "'.[gpu]'" in message


def test_this_environment_has_exactly_the_onnxruntime_it_imports() -> None:
    installed = installed_onnxruntime()
    assert onnxruntime_install_problem(installed) is None
    assert [d.version for d in installed] == [onnxruntime.__version__]


def test_the_max_ir_version_is_the_newest_onnxruntime_loads() -> None:
    newest = max_ir_version_onnxruntime_loads()
    assert 8 <= newest <= onnx.IR_VERSION  # opset 17 needs IR 8; onnx writes nothing newer than its own
    onnxruntime.InferenceSession(_identity_model(newest), providers=["CPUExecutionProvider"])
    if newest < onnx.IR_VERSION:
        with pytest.raises(Exception, match="IR version"):
            onnxruntime.InferenceSession(_identity_model(newest + 1), providers=["CPUExecutionProvider"])


def test_the_probe_keeps_a_provider_that_runs() -> None:
    probe = probe_provider("CPUExecutionProvider")
    assert probe.usable and probe.detail == ""


def test_the_probe_reports_a_provider_the_session_fell_back_from() -> None:
    # TensorRT where this onnxruntime does not list it (the CPU build): asked for, the session silently runs on the CPU.
    listed = onnxruntime.get_available_providers()
    absent = next(p for p in ("TensorrtExecutionProvider", "NoSuchExecutionProvider") if p not in listed)
    probe = probe_provider(absent)
    assert not probe.usable
    # The CPU build falls back quietly; a GPU build prints an "EP Error" naming the unknown provider, which is kept.
    assert probe.detail == "the session fell back to CPUExecutionProvider" or (
        f"Unknown Provider Type: {absent}" in probe.detail
    )


def test_a_missing_shared_library_in_onnxruntimes_log_is_the_reason() -> None:
    log = (
        "2026-11-26 10:00:00.0 [E:onnxruntime:Default, provider_bridge_ort.cc:2251 TryGetProviderInfo_TensorRT] "
        "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:1844 onnxruntime::Provider& "
        "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
        "libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: cannot open shared object file: "
        "No such file or directory\n"
    )
    assert summarise_provider_failure(["CUDAExecutionProvider", "CPUExecutionProvider"], log) == (
        "libnvinfer.so.10 not loadable"
    )
    assert summarise_provider_failure(["CPUExecutionProvider"], "[E:onnxruntime:Default] TensorRT init failed\n") == (
        "TensorRT init failed"
    )
