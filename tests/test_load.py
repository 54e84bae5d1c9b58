"""Load-generation machinery without a server: ranges, arrival schedules, windows, statistics deltas."""

from __future__ import annotations

import numpy as np
import pytest

from blip_triton_bench.load.engine import (
    CONCURRENCY,
    REQUEST_RATE,
    Completions,
    LoadLevel,
    LoadSpecError,
    arrival_gaps_s,
    concurrency_levels,
    parse_range,
    request_rate_levels,
    statistics_delta,
)

pytestmark = pytest.mark.unit


def test_perf_analyzer_range_syntax() -> None:
    assert parse_range("1:4:1", "--concurrency") == [1, 2, 3, 4]
    assert parse_range("2:10:2", "--request-rate") == [2, 4, 6, 8, 10]
    assert parse_range("3", "--concurrency") == [3]
    assert parse_range("1:8", "--concurrency") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert parse_range("0.5:1.5:0.5", "--request-rate") == [0.5, 1.0, 1.5]
    assert [level.level_id for level in concurrency_levels("1:3:2")] == ["concurrency=1", "concurrency=3"]
    assert [level.level_id for level in request_rate_levels("2.5")] == ["request_rate=2.5"]


@pytest.mark.parametrize("text", ["0:4:1", "4:1:1", "1:4:0", "a:b", "1:2:3:4"])
def test_malformed_ranges_say_what_is_expected(text: str) -> None:
    with pytest.raises(LoadSpecError, match="--concurrency"):
        parse_range(text, "--concurrency")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1:2000000", "--concurrency '1:2000000': 2000000 is above the limit of 4096; use 4096 or less"),
        ("1:4096", "--concurrency '1:4096': 4096 levels, more than the limit of 64 per run"),
        ("1:inf", "need 0 < start <= end"),
        ("nan", "need 0 < start <= end"),
    ],
)
def test_a_range_past_the_limits_is_refused_before_any_level_is_built(text: str, expected: str) -> None:
    with pytest.raises(LoadSpecError) as caught:
        concurrency_levels(text)
    assert expected in str(caught.value)
    assert len(concurrency_levels("1:4096:65")) == 64  # the limits themselves are allowed


def test_request_rates_have_the_same_limits() -> None:
    with pytest.raises(LoadSpecError, match=r"--request-rate '20000': 20000 is above the limit of 10000"):
        request_rate_levels("20000")
    with pytest.raises(LoadSpecError, match=r"--request-rate '1:100': 100 levels, more than the limit of 64"):
        request_rate_levels("1:100")


def test_fractional_concurrency_is_refused() -> None:
    with pytest.raises(LoadSpecError, match="whole numbers"):
        concurrency_levels("1:2:0.5")


def test_constant_and_poisson_arrivals() -> None:
    assert np.allclose(arrival_gaps_s(4.0, 10, "constant", seed=0), 0.25)
    gaps = arrival_gaps_s(4.0, 20_000, "poisson", seed=1)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: std equals the mean
    assert np.array_equal(gaps, arrival_gaps_s(4.0, 20_000, "poisson", seed=1))  # reproducible
    with pytest.raises(LoadSpecError, match="constant or poisson"):
        arrival_gaps_s(4.0, 1, "bursty", seed=0)


def test_windows_take_requests_by_completion_time_and_latency_from_the_reference_time() -> None:
    done = Completions()
    # (reference time, completion time, succeeded): the reference is the send (closed loop) or the
    # scheduled send (open loop), so a late request carries its queueing in its latency.
    done.records.extend([(0.0, 0.5, True), (0.2, 1.2, True), (1.0, 1.5, False), (0.5, 2.1, True)])
    first, next_index = done.window(1.0, 2.0, 0)
    assert first.latencies_ms == pytest.approx((1000.0,))
    assert first.errors == 1
    assert first.duration_s == pytest.approx(1.0)
    second, _ = done.window(2.0, 3.0, next_index)
    assert second.latencies_ms == pytest.approx((1600.0,))


def _stats(success: int, executions: int, queue_ns: int, infer_ns: int, batches: dict[int, int]) -> dict:
    return {
        "model_stats": [
            {
                "name": "m",
                "inference_count": str(success),
                "execution_count": str(executions),
                "inference_stats": {
                    "success": {"count": str(success), "ns": "0"},
                    "queue": {"count": str(success), "ns": str(queue_ns)},
                    "compute_input": {"count": str(success), "ns": "0"},
                    "compute_infer": {"count": str(success), "ns": str(infer_ns)},
                    "compute_output": {"count": str(success), "ns": "0"},
                },
                "batch_stats": [
                    {"batch_size": size, "compute_infer": {"count": count, "ns": 0}} for size, count in batches.items()
                ],
            }
        ]
    }


def test_statistics_delta_is_the_measured_interval_only() -> None:
    before = _stats(success=10, executions=10, queue_ns=1_000_000, infer_ns=50_000_000, batches={1: 10})
    after = _stats(success=30, executions=20, queue_ns=21_000_000, infer_ns=450_000_000, batches={1: 14, 2: 4, 4: 2})
    delta = statistics_delta(before, after)
    assert (delta.inference_count, delta.execution_count, delta.success_count) == (20, 10, 20)
    assert delta.average_batch_size == pytest.approx(2.0)
    assert delta.queue_ms == pytest.approx(1.0)  # 20 ms of queueing over 20 requests
    assert delta.compute_infer_ms == pytest.approx(20.0)
    assert delta.executions_by_batch_size == {1: 4, 2: 4, 4: 2}


def test_a_model_that_has_served_nothing_yet_counts_zero() -> None:
    """Triton's JSON leaves zero counts out: a first snapshot before any request completes has no `count`
    (BLIP-base at ~1 s a request after a 0.5 s warm-up)."""
    before = {"model_stats": [{"name": "m", "version": "1", "inference_stats": {"success": {}, "queue": {}}}]}
    after = _stats(success=3, executions=3, queue_ns=3_000_000, infer_ns=3_000_000_000, batches={1: 3})
    delta = statistics_delta(before, after)
    assert (delta.success_count, delta.inference_count, delta.executions_by_batch_size) == (3, 3, {1: 3})
    assert delta.compute_infer_ms == pytest.approx(1000.0)


def test_level_ids_name_the_mode() -> None:
    assert LoadLevel(CONCURRENCY, 2).level_id == "concurrency=2"
    assert LoadLevel(REQUEST_RATE, 2.0).level_id == "request_rate=2"
    assert LoadLevel(REQUEST_RATE, 0.5).level_id == "request_rate=0.5"


def test_an_open_loop_schedule_never_runs_out_and_is_one_seeded_stream() -> None:
    """A window that waits for --min-requests-per-window outlasts --window-s: the schedule must not end first (it
    once did, and the level's last windows measured no request at all)."""
    from itertools import islice

    from blip_triton_bench.load.engine import ARRIVAL_CHUNK, arrival_gaps

    drawn = list(islice(arrival_gaps(100.0, "poisson", seed=3), 3 * ARRIVAL_CHUNK + 5))
    assert len(drawn) == 3 * ARRIVAL_CHUNK + 5
    assert drawn == list(islice(arrival_gaps(100.0, "poisson", seed=3), 3 * ARRIVAL_CHUNK + 5))  # reproducible
    assert drawn[:ARRIVAL_CHUNK] == arrival_gaps_s(100.0, ARRIVAL_CHUNK, "poisson", seed=3).tolist()
    assert len(set(drawn)) == len(drawn)  # later chunks continue the stream, never repeat the first
    assert set(islice(arrival_gaps(4.0, "constant", seed=0), 2 * ARRIVAL_CHUNK)) == {0.25}


def test_an_open_loop_at_its_in_flight_cap_waits_and_counts_the_wait_as_latency() -> None:
    """A host that cannot keep up (a busy client, a slow server) must not pile up unsent requests without bound (a
    client once held 9.8 GB and no window completed a request): past the cap a send waits for one to end, and its
    latency still counts from its scheduled time, so the slip shows as the queue it is."""
    import asyncio
    import time

    from blip_triton_bench.load.engine import LoadSettings, open_loop_in_flight_cap, send_on_schedule

    cap, rate_per_s, hold_s = 5, 1000.0, 0.1
    peak = 0

    async def scenario() -> tuple[Completions, float]:
        nonlocal peak
        released = asyncio.Event()
        running = 0

        async def infer() -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await released.wait()
            running -= 1

        done, in_flight = Completions(), set()
        sending = asyncio.create_task(send_on_schedule(infer, rate_per_s, LoadSettings(), done, in_flight, cap))
        await asyncio.sleep(hold_s)  # the first `cap` requests never end in this time: the next send waits
        assert len(in_flight) == cap
        released.set()
        released_at = time.perf_counter()
        await asyncio.sleep(0.05)
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await asyncio.gather(*in_flight, return_exceptions=True)
        return done, released_at

    done, released_at = asyncio.run(scenario())
    assert peak == cap
    assert done.held_sends >= 1
    first_held = sorted(done.records)[cap]  # the send scheduled right after the first `cap`
    scheduled, completed, succeeded = first_held
    assert succeeded and completed >= released_at
    assert completed - scheduled >= released_at - scheduled > hold_s / 2  # its wait is in its latency
    assert open_loop_in_flight_cap(1.0) == 16 and open_loop_in_flight_cap(60.0) == 120  # 2 s of the rate, at least 16
