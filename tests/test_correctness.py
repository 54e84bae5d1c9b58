"""The comparison that every correctness gate uses: it names the output, the worst element and the tolerance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2

from blip_triton_bench.judging.correctness import (
    TOLERANCES,
    EmptyOutput,
    OutputMismatch,
    Tolerance,
    assert_close,
    compare_outputs,
    served_array,
    serving_tolerance,
)

pytestmark = pytest.mark.unit

STRICT = Tolerance(name="strict", atol=1e-3, rtol=0.0, why="test")


def test_worst_element_and_its_values_are_reported() -> None:
    expected = np.zeros((2, 3, 4), dtype=np.float32)
    actual = expected.copy()
    actual[1, 2, 3] = 0.5
    actual[0, 0, 0] = 0.1

    comparison = compare_outputs("logits", actual, expected, STRICT)

    assert not comparison.within_tolerance
    assert comparison.worst_index == (1, 2, 3)
    assert comparison.max_abs_error == pytest.approx(0.5)
    assert (comparison.actual_value, comparison.expected_value) == (pytest.approx(0.5), 0.0)
    with pytest.raises(
        OutputMismatch, match=r"logits: max abs error 0\.5, .* at index \[1, 2, 3\] .*OUTSIDE tolerance 'strict'"
    ):
        assert_close("logits", actual, expected, STRICT)


def test_relative_tolerance_scales_with_the_reference() -> None:
    expected = np.array([1000.0, 1.0])
    actual = np.array([1000.5, 1.0])
    relative = Tolerance(name="relative", atol=0.0, rtol=1e-3, why="test")
    assert compare_outputs("y", actual, expected, relative).within_tolerance
    assert compare_outputs("y", actual, expected, relative).max_rel_error == pytest.approx(5e-4)
    assert not compare_outputs("y", actual, expected, STRICT).within_tolerance


def test_nan_never_passes() -> None:
    expected = np.ones(3)
    actual = np.array([1.0, np.nan, 1.0])
    assert not compare_outputs(
        "y", actual, expected, Tolerance("loose", atol=1e9, rtol=1.0, why="test")
    ).within_tolerance


def test_shape_mismatch_is_a_failure_not_a_broadcast() -> None:
    with pytest.raises(OutputMismatch, match=r"shape \(2, 3\) differs from the reference's \(3,\)"):
        compare_outputs("y", np.zeros((2, 3)), np.zeros(3), STRICT)


def test_every_tolerance_says_why() -> None:
    for name, tolerance in TOLERANCES.items():
        assert tolerance.name == name
        assert len(tolerance.why) > 40


def test_serving_tolerance_follows_precision_and_device() -> None:
    assert serving_tolerance(on_gpu=False, fp16=False) is TOLERANCES["triton_vs_onnxruntime"]
    assert serving_tolerance(on_gpu=True, fp16=False) is TOLERANCES["triton_gpu_vs_onnxruntime_cpu"]
    gpu_vs_gpu = serving_tolerance(on_gpu=True, fp16=False, reference_on_gpu=True)
    assert gpu_vs_gpu is TOLERANCES["triton_gpu_vs_onnxruntime_gpu"]
    # Against its own provider a GPU server is held tighter than against the CPU, never looser than CPU-vs-CPU.
    assert TOLERANCES["triton_vs_onnxruntime"].atol < gpu_vs_gpu.atol < TOLERANCES["triton_gpu_vs_onnxruntime_cpu"].atol
    assert (
        serving_tolerance(on_gpu=True, fp16=True, reference_on_gpu=True) is TOLERANCES["triton_fp16_vs_onnxruntime_cpu"]
    )
    assert serving_tolerance(on_gpu=True, fp16=True) is TOLERANCES["triton_fp16_vs_onnxruntime_cpu"]


LOGITS_SHAPE = [1, 16, 30524]
LOGITS_BYTES = 16 * 30524 * 4


def grpc_result(raw: bytes) -> triton_grpc.InferResult:
    response = service_pb2.ModelInferResponse(model_name="m")
    response.outputs.add(name="logits", datatype="FP32", shape=LOGITS_SHAPE)
    response.raw_output_contents.append(raw)
    return triton_grpc.InferResult(response)


def http_result(raw: bytes) -> triton_http.InferResult:
    header = json.dumps(
        {
            "model_name": "m",
            "outputs": [
                {
                    "name": "logits",
                    "datatype": "FP32",
                    "shape": LOGITS_SHAPE,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
        }
    ).encode()
    return triton_http.InferResult.from_response_body(header + raw, header_length=len(header))


@pytest.mark.parametrize("make_result", [grpc_result, http_result], ids=["grpc", "http"])
def test_an_output_with_its_shape_but_no_bytes_is_named_not_a_reshape_error(make_result) -> None:
    with pytest.raises(EmptyOutput, match=rf"empty output tensor logits: 0 of {LOGITS_BYTES} bytes"):
        served_array(make_result(b""), "logits")
    with pytest.raises(EmptyOutput, match=rf"truncated output tensor logits: 8 of {LOGITS_BYTES} bytes"):
        served_array(make_result(b"\0" * 8), "logits")
    logits = np.arange(16 * 30524, dtype=np.float32).reshape(LOGITS_SHAPE)
    np.testing.assert_array_equal(served_array(make_result(logits.tobytes()), "logits"), logits)


def test_a_missing_output_is_named() -> None:
    with pytest.raises(OutputMismatch, match="the response has no output tensor token_ids"):
        served_array(grpc_result(b""), "token_ids")
