"""The load workers' machinery, without a server: how a level is split, how their batches merge into one
completion order, which completions a window holds, and the clock offset between a worker and the coordinator."""

from __future__ import annotations

import asyncio
import time

import pytest

from blip_triton_bench.judging.stats import WindowSample
from blip_triton_bench.load.engine import CONCURRENCY, REQUEST_RATE, Completions, LoadLevel, watched
from blip_triton_bench.load.workers import WorkerDied, WorkerPool, in_windows, split_level

pytestmark = pytest.mark.unit


def test_concurrency_is_dealt_out_in_whole_requests_and_a_rate_divided() -> None:
    assert split_level(LoadLevel(CONCURRENCY, 5), 2) == [LoadLevel(CONCURRENCY, 3), LoadLevel(CONCURRENCY, 2)]
    assert split_level(LoadLevel(CONCURRENCY, 1), 3) == [LoadLevel(CONCURRENCY, 1)]  # no worker with nothing to do
    assert split_level(LoadLevel(REQUEST_RATE, 30.0), 3) == [LoadLevel(REQUEST_RATE, 10.0)] * 3
    assert sum(share.value for share in split_level(LoadLevel(CONCURRENCY, 64), 7)) == 64


def test_batches_from_two_workers_merge_in_completion_order_and_wake_the_watchdog() -> None:
    done = Completions()
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


async def _forever() -> None:
    await asyncio.Event().wait()


def test_a_worker_death_ends_the_measurement_at_once_and_cancels_it() -> None:
    """The collector, the level's guard, ends only by raising a worker's death. The windows wait for completions
    only the collector merges, so they must not wait out their stretch for it: the death ends the measurement,
    which is cancelled."""
    cancelled = asyncio.Event()

    async def measuring() -> tuple[list[WindowSample], None]:
        try:
            await _forever()
        finally:
            cancelled.set()
        return [], None

    async def died() -> None:
        raise WorkerDied("load worker 1 (pid 7) exited with code -9")

    async def level() -> tuple[list[WindowSample], None]:
        measured = watched(measuring(), Completions(), None, 1.0, guard=asyncio.ensure_future(died()))
        return await asyncio.wait_for(measured, timeout=60.0)  # a hang guard: the death must end it, not this

    with pytest.raises(WorkerDied, match="exited with code -9"):
        asyncio.run(level())
    assert cancelled.is_set()


def test_a_measurement_that_ends_while_every_worker_lives_is_returned() -> None:
    async def measured() -> tuple[list[WindowSample], None]:
        return [WindowSample(0.0, 1.0, (5.0,), 0)], None

    async def level() -> tuple[list[WindowSample], None]:
        collector = asyncio.ensure_future(_forever())
        try:
            return await watched(measured(), Completions(), None, 1.0, guard=collector)
        finally:
            collector.cancel()

    assert asyncio.run(level()) == ([WindowSample(0.0, 1.0, (5.0,), 0)], None)
