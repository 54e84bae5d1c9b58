"""Serving efficiency: a variant's best served throughput against in-process ONNX Runtime on the same provider,
at the batch size the dynamic batcher formed there; the batch choice, the timing and the threshold decision.

No pytest and no Triton in here: suite/test_serving_efficiency.py measures, blip_triton_bench.report renders.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from blip_triton_bench.judging.stats import ServerStatistics

#: Uncounted runs first: CUDA's first call searches cuDNN algorithms, TensorRT's builds (or loads) an engine.
WARMUP_RUNS = 2
#: Timed runs, reported as their median (as pytest-benchmark's reference is); BLIP-base at batch 8 on 2 CPU
#: cores takes ~8 s a run, so five keep the test within a minute there.
TIMED_RUNS = 5


@dataclass(frozen=True)
class FormedBatch:
    """The batch size the in-process reference runs at, and how it was read from the server's statistics."""

    batch_size: int
    how: str


def formed_batch_size(server: ServerStatistics | None, max_batch_size: int) -> FormedBatch:
    """The batch size that carried the most inferences at the level (size x executions; ties: the larger).

    Not the rounded average: batches of 1 and 8 average to 4.5, a size the batcher may never have formed,
    whose in-process speed says nothing about either. Weighted by inferences rather than executions because
    efficiency is about where the requests went: 1x50 4x20 served 80 requests in batches of 4 and 50 alone.
    The larger of a tie is the stricter reference (in-process throughput grows with the batch).
    """
    cap = max(max_batch_size, 1)
    if server is None or not server.executions_by_batch_size:
        if server is not None and server.average_batch_size > 0:
            size = min(max(round(server.average_batch_size), 1), cap)
            return FormedBatch(size, f"rounded average batch size {server.average_batch_size:.2f} (no sizes reported)")
        return FormedBatch(1, "no server statistics for the level: batch 1")
    size, executions = max(server.executions_by_batch_size.items(), key=lambda item: (item[0] * item[1], item[0]))
    return FormedBatch(min(size, cap), f"carried the most inferences ({size} x {executions} executions)")


@dataclass(frozen=True)
class InProcessReference:
    """In-process ONNX Runtime throughput of a variant's served file on its own provider at one batch size."""

    batch_size: int
    infer_per_s: float  # batch_size / median seconds per run
    provider: str  # ReferenceProvider.describe(): device, and why it is not the served one when not
    batch_choice: str  # FormedBatch.how
    level: str  # the served level the batch size was read from
    timed_runs: int
    spread_pct: float  # (slowest - fastest) / median run, over the timed runs


def time_in_process(
    run: Callable[[], object],
    batch: FormedBatch,
    provider: str,
    level: str,
    warmup_runs: int = WARMUP_RUNS,
    timed_runs: int = TIMED_RUNS,
    clock: Callable[[], float] = time.perf_counter,
) -> InProcessReference:
    """Call `run` (one inference of `batch.batch_size` requests) warmup + timed times; the median timed run."""
    for _ in range(warmup_runs):
        run()
    seconds = []
    for _ in range(timed_runs):
        start = clock()
        run()
        seconds.append(clock() - start)
    median = statistics.median(seconds)
    return InProcessReference(
        batch_size=batch.batch_size,
        infer_per_s=batch.batch_size / median,
        provider=provider,
        batch_choice=batch.how,
        level=level,
        timed_runs=timed_runs,
        spread_pct=100.0 * (max(seconds) - min(seconds)) / median,
    )


def efficiency_shortfall(
    variant: str,
    served_infer_per_s: float,
    level: str,
    reference: InProcessReference,
    minimum: float | None,
    parameter: str,
    config_path: object,
) -> str | None:
    """Why the variant fails its config's minimum served / in-process ratio; None when it meets it or sets none."""
    if minimum is None:
        return None
    ratio = served_infer_per_s / reference.infer_per_s
    if ratio >= minimum:
        return None
    return (
        f"{variant} serves {served_infer_per_s:.2f} infer/s at {level}, {ratio:.2f} of in-process ONNX Runtime's "
        f"{reference.infer_per_s:.2f} infer/s at batch {reference.batch_size} ({reference.provider}, the batch size "
        f"that {reference.batch_choice}); below {minimum:g}, its '{parameter}' in {config_path}"
    )
