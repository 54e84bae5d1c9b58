"""The load workers' machinery, without a server: how a level is split, how their batches merge into one
completion order, which completions a window holds, and the clock offset between a worker and the coordinator."""

from __future__ import annotations

import time

import pytest

from blip_triton_bench.load import CONCURRENCY, REQUEST_RATE, LoadLevel, _Completions
from blip_triton_bench.load_workers import WorkerPool, in_windows, split_level
from blip_triton_bench.stats import WindowSample

pytestmark = pytest.mark.unit


def test_concurrency_is_dealt_out_in_whole_requests_and_a_rate_divided() -> None:
    assert split_level(LoadLevel(CONCURRENCY, 5), 2) == [LoadLevel(CONCURRENCY, 3), LoadLevel(CONCURRENCY, 2)]
    assert split_level(LoadLevel(CONCURRENCY, 1), 3) == [LoadLevel(CONCURRENCY, 1)]  # no worker with nothing to do
    assert split_level(LoadLevel(REQUEST_RATE, 30.0), 3) == [LoadLevel(REQUEST_RATE, 10.0)] * 3
    assert sum(share.value for share in split_level(LoadLevel(CONCURRENCY, 64), 7)) == 64


def test_batches_from_two_workers_merge_in_completion_order_and_wake_the_watchdog() -> None:
    done = _Completions()
    done.merge([(0.0, 1.0, True), (0.5, 3.0, True)], set(), "")
    assert not done.failed.is_set()
    done.merge([(1.0, 2.0, True), (2.5, 4.0, False)], {"connection"}, "connection refused")
    assert [completed for _, completed, _ in done.records] == [1.0, 2.0, 3.0, 4.0]
    assert done.failed.is_set() and done.failure_kinds == {"connection"}
    window, index = done.window(1.5, 3.5, 0)
    assert (len(window.latencies_ms), window.errors, index) == (2, 0, 3)


def test_a_completion_counts_in_the_window_whose_start_it_is_at_or_after_and_end_before() -> None:
    windows = [WindowSample(1.0, 1.0, (), 0), WindowSample(2.5, 1.0, (), 0)]  # a gap between 2.0 and 2.5
    assert in_windows([0.9, 1.0, 1.99, 2.0, 2.2, 2.5, 3.49, 3.5], windows) == 4


class SkewedClock(WorkerPool):
    """A worker whose clock runs 5 s ahead of ours and answers after a short delay each way."""

    kind = "test"

    def __init__(self) -> None:
        super().__init__(["0"], ["here"])

    def call(self, index: int, method: str, *args: object, timeout_s: float = 1.0) -> object:
        time.sleep(0.002)
        moment = time.perf_counter() + 5.0
        time.sleep(0.002)
        return moment

    def close(self) -> None:
        pass


def test_the_clock_offset_is_measured_from_the_shortest_round_trip() -> None:
    offset_s, uncertainty_s = SkewedClock().clock_offset_s(0)
    assert offset_s == pytest.approx(5.0, abs=uncertainty_s + 1e-4)
    assert 0.002 <= uncertainty_s < 0.05
