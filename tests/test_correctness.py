"""The comparison that every correctness gate uses: it names the output, the worst element and the tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from blip_triton_bench.correctness import (
    TOLERANCES,
    OutputMismatch,
    Tolerance,
    assert_close,
    compare_outputs,
    serving_tolerance,
)

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
