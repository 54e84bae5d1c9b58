"""Every variant this host can serve answers like in-process ONNX Runtime, over gRPC and over HTTP.

The reference runs on the variant's own execution provider where this onnxruntime has it (a GPU variant
against in-process CUDA), else on the CPU with the GPU-vs-CPU tolerance; the summary line names which.
"""

from __future__ import annotations

import pytest

from blip_triton_bench.judging.correctness import assert_close, serving_tolerance
from blip_triton_bench.load.client import TritonInferClient
from blip_triton_bench.model.reference import ReferenceSessions
from blip_triton_bench.model.source import ModelDescription
from blip_triton_bench.model.workload import build_inputs
from blip_triton_bench.options import BenchOptions
from blip_triton_bench.servers.served import ServedVariant

pytestmark = pytest.mark.correctness

SEQUENCE_LENGTH = 16


def batch_sizes(served: ServedVariant) -> list[int]:
    """One request of one image, and one batch as large as the config allows (up to 4)."""
    largest = min(4, served.variant.config.max_batch_size)
    return sorted({1, max(largest, 1)})


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_matches_onnxruntime(
    served_variant: ServedVariant,
    reference_sessions: ReferenceSessions,
    model_description: ModelDescription,
    bench_session,
    bench_options: BenchOptions,
    protocol: str,
) -> None:
    session = reference_sessions.for_variant(served_variant.variant)
    reference = reference_sessions.provider_for(served_variant.variant)
    tolerance = serving_tolerance(
        on_gpu=served_variant.variant.requirements.gpu_count > 0,
        fp16=served_variant.variant.runs_in_fp16,
        reference_on_gpu=reference.on_gpu,
    )
    with TritonInferClient.to_server(served_variant.server, protocol, bench_options.request_timeout_s) as client:
        for batch_size in batch_sizes(served_variant):
            inputs = build_inputs(model_description, batch_size, SEQUENCE_LENGTH, seed=batch_size)
            served = client.infer(served_variant.name, inputs)
            (expected,) = session.run(["logits"], inputs.as_dict())
            comparison = assert_close("logits", served, expected, tolerance)
            bench_session.record_correctness_line(
                f"triton {served_variant.name} vs onnxruntime ({reference.describe()}), {protocol}, batch "
                f"{batch_size}: max abs error {comparison.max_abs_error:.2e} (tolerance '{tolerance.name}')"
            )
