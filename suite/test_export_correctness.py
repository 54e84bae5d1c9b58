"""The exported ONNX graph computes what PyTorch computes: logits on real images across batch and length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_triton_bench.judging.correctness import TOLERANCES, assert_close
from blip_triton_bench.model.reference import ReferenceSessions
from blip_triton_bench.model.source import LoadedModel
from blip_triton_bench.model.workload import build_inputs

pytestmark = pytest.mark.correctness


@pytest.mark.parametrize("sequence_length", [1, 16, 40], ids=lambda s: f"seq{s}")
@pytest.mark.parametrize("batch_size", [1, 2, 8], ids=lambda b: f"batch{b}")
def test_onnxruntime_matches_pytorch(
    loaded_model: LoadedModel,
    reference_sessions: ReferenceSessions,
    bench_session,
    batch_size: int,
    sequence_length: int,
) -> None:
    inputs = build_inputs(loaded_model.description, batch_size, sequence_length)
    (onnx_logits,) = reference_sessions.for_export().run(["logits"], inputs.as_dict())
    with torch.no_grad():
        torch_logits = loaded_model.model(
            **{name: torch.from_numpy(array) for name, array in inputs.as_dict().items()}, use_cache=False
        ).logits.numpy()

    assert onnx_logits.shape == (batch_size, sequence_length, loaded_model.description.vocab_size)
    comparison = assert_close("logits", onnx_logits, torch_logits, TOLERANCES["onnxruntime_vs_pytorch"])
    bench_session.record_correctness_line(
        f"onnxruntime vs pytorch, batch {batch_size}, sequence {sequence_length}: max abs error "
        f"{comparison.max_abs_error:.2e}, relative {comparison.max_rel_error:.2e}"
    )
    if batch_size > 1 and sequence_length > 1:  # different ids give different logits: the graph reads its inputs
        # (with one start token the image alone decides, and the tiny random model's image effect is below
        # float32 resolution, so sequence 1 cannot show it)
        assert not np.array_equal(onnx_logits[0], onnx_logits[1])
