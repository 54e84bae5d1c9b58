"""Serving efficiency's pure parts: the batch size read from the batcher, the in-process median, the threshold
decision and its config parameter."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from blip_triton_bench.judging.efficiency import FormedBatch, efficiency_shortfall, formed_batch_size, time_in_process
from blip_triton_bench.judging.stats import ServerStatistics
from blip_triton_bench.repository.variants import discover_variants, load_variant
from blip_triton_bench.runs.perf import MIN_EFFICIENCY_PARAMETER, PerfConfigError, variant_min_serving_efficiency

pytestmark = pytest.mark.unit

SEED_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def statistics(executions_by_batch_size: dict[int, int], inferences: int | None = None) -> ServerStatistics:
    executions = sum(executions_by_batch_size.values())
    return ServerStatistics(
        inference_count=inferences
        if inferences is not None
        else sum(s * c for s, c in executions_by_batch_size.items()),
        execution_count=executions,
        success_count=executions,
        queue_ms=0.0,
        compute_input_ms=0.0,
        compute_infer_ms=0.0,
        compute_output_ms=0.0,
        executions_by_batch_size=executions_by_batch_size,
    )


def test_formed_batch_is_the_size_that_carried_the_most_inferences() -> None:
    # 50 executions alone but 80 requests in batches of 4: the requests went through batch 4.
    assert formed_batch_size(statistics({1: 50, 4: 20}), max_batch_size=8).batch_size == 4
    # The rounded average (4.5) was never formed; the sizes that were tie at 80 requests and the larger wins.
    assert formed_batch_size(statistics({1: 80, 8: 10}), max_batch_size=8).batch_size == 8
    assert formed_batch_size(statistics({2: 30, 3: 1}), max_batch_size=8).how == (
        "carried the most inferences (2 x 30 executions)"
    )


def test_formed_batch_without_sizes_uses_the_average_then_batch_one() -> None:
    no_sizes = ServerStatistics(10, 4, 10, 0.0, 0.0, 0.0, 0.0, executions_by_batch_size={})
    assert formed_batch_size(no_sizes, max_batch_size=8) == FormedBatch(
        2, "rounded average batch size 2.50 (no sizes reported)"
    )
    assert formed_batch_size(no_sizes, max_batch_size=1).batch_size == 1  # never above the config's max
    assert formed_batch_size(None, max_batch_size=8).batch_size == 1


def test_in_process_rate_is_the_batch_over_the_median_timed_run() -> None:
    calls = []
    ticks = itertools.chain.from_iterable(
        (t, t + d) for t, d in zip(range(0, 50, 10), (0.5, 0.4, 2.0, 0.5, 0.6), strict=True)
    )
    reference = time_in_process(
        lambda: calls.append(1),
        FormedBatch(4, "how"),
        "CPU",
        "concurrency=4",
        warmup_runs=2,
        timed_runs=5,
        clock=lambda: next(ticks),
    )
    assert len(calls) == 7  # warm-up runs are made but not timed
    assert reference.infer_per_s == pytest.approx(4 / 0.5)  # median of 0.4 0.5 0.5 0.6 2.0: the outlier is ignored
    assert reference.spread_pct == pytest.approx(100 * (2.0 - 0.4) / 0.5)
    assert (reference.batch_size, reference.provider, reference.level) == (4, "CPU", "concurrency=4")


def test_shortfall_names_both_numbers_the_batch_and_the_parameter() -> None:
    reference = time_in_process(
        lambda: None,
        FormedBatch(4, "carried the most inferences (4 x 20 executions)"),
        "CUDA on GPU 0",
        "concurrency=8",
        0,
        1,
        clock=iter([0.0, 0.04]).__next__,
    )  # 100/s
    config = Path("model_repository/base_model_gpu/config.pbtxt")
    message = efficiency_shortfall(
        "base_model_gpu", 70.0, "concurrency=8", reference, 0.8, MIN_EFFICIENCY_PARAMETER, config
    )
    assert message is not None
    for part in (
        "70.00 infer/s at concurrency=8",
        "0.70 of",
        "100.00 infer/s at batch 4",
        "CUDA on GPU 0",
        "below 0.8",
        "'bench_min_serving_efficiency'",
        str(config),
    ):
        assert part in message
    assert (
        efficiency_shortfall("v", 80.0, "c", reference, 0.8, MIN_EFFICIENCY_PARAMETER, config) is None
    )  # 0.80 meets it
    assert (
        efficiency_shortfall("v", 1.0, "c", reference, None, MIN_EFFICIENCY_PARAMETER, config) is None
    )  # reported only


def test_min_serving_efficiency_is_set_for_the_batched_gpu_variants_only() -> None:
    minimums = {v.name: variant_min_serving_efficiency(v) for v in discover_variants(SEED_REPOSITORY)}
    assert minimums.pop("base_model_gpu") == 0.8
    assert minimums.pop("base_model_gpu_fp16") == 0.8
    assert set(minimums.values()) == {None}


@pytest.mark.parametrize("text", ["lots", "0", "-0.5", "inf", "nan", ""])
def test_a_bad_min_serving_efficiency_names_the_config_file(tmp_path: Path, text: str) -> None:
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "config.pbtxt").write_text(
        f'name: "v"\nplatform: "onnxruntime_onnx"\n'
        f'parameters {{ key: "bench_min_serving_efficiency" value: {{ string_value: "{text}" }} }}\n'
    )
    with pytest.raises(
        PerfConfigError,
        match=rf"v/config\.pbtxt: parameters 'bench_min_serving_efficiency' is '{text}'; it must be a ratio above 0",
    ):
        variant_min_serving_efficiency(load_variant(folder))
