"""Single-request latency with pytest-benchmark: through Triton at concurrency 1, and in-process ONNX Runtime.

The in-process number is the reference the report sets each variant's best served throughput against.
"""

from __future__ import annotations

import pytest

from blip_triton_bench.load.client import TritonInferClient
from blip_triton_bench.model.reference import ReferenceSessions
from blip_triton_bench.model.source import ModelDescription
from blip_triton_bench.model.workload import build_inputs
from blip_triton_bench.servers.served import ServedVariant

pytestmark = pytest.mark.perf

ROUNDS = 10


def test_single_request_latency_through_triton(
    served_variant: ServedVariant, model_description: ModelDescription, bench_options, benchmark, judgement
) -> None:
    inputs = build_inputs(model_description, 1, bench_options.sequence_length)
    with TritonInferClient.to_server(served_variant.server) as client:
        logits = benchmark.pedantic(client.infer, args=(served_variant.name, inputs), rounds=ROUNDS, warmup_rounds=1)
    assert logits.shape == (1, bench_options.sequence_length, model_description.vocab_size)
    judgement.measured("", "one request's latency, for pytest-benchmark's table; no baseline holds it")


def test_in_process_onnxruntime_reference(
    reference_sessions: ReferenceSessions,
    model_description: ModelDescription,
    bench_options,
    bench_session,
    benchmark,
    judgement,
) -> None:
    inputs = build_inputs(model_description, 1, bench_options.sequence_length).as_dict()
    session = reference_sessions.for_export()
    (logits,) = benchmark.pedantic(session.run, args=(["logits"], inputs), rounds=ROUNDS, warmup_rounds=1)
    assert logits.shape == (1, bench_options.sequence_length, model_description.vocab_size)
    bench_session.record_in_process_speed(1.0 / benchmark.stats.stats.median)
    judgement.measured("", "the in-process speed served throughput is compared with")
