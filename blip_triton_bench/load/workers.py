"""Load from several client processes (--load-workers N): a level's concurrency, or its request rate, split across
load workers, each with its own client in a process of its own; every request's raw timing comes back to this
process, which merges them and cuts the windows exactly as it does for its own requests (no percentile of
percentiles). Workers run here (WorkerProcesses) or on a Ray cluster's nodes (load_cluster.RayWorkers).

Clocks: every worker's timings are moved onto this process's clock by an offset measured before each level, the
way NTP does it: the smallest of several round trips bounds the offset's error by half that round trip. On one
host the offset is ~0 (time.perf_counter is CLOCK_MONOTONIC, one clock for every process).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import math
import multiprocessing
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

from blip_triton_bench.host.interrupts import die_with_parent
from blip_triton_bench.judging.stats import ServerStatistics, WindowSample
from blip_triton_bench.load.engine import (
    CONCURRENCY,
    DRAIN_TIMEOUT_S,
    Completions,
    LevelAborted,
    LoadLevel,
    LoadSettings,
    LoopEnd,
    WorkerShare,
    drain_in_flight,
    keep_in_flight,
    measure_windows,
    open_inferer,
    open_loop_in_flight_cap,
    output_slots,
    send_on_schedule,
    watched,
)
from blip_triton_bench.load.shared_memory import NONE
from blip_triton_bench.model.workload import ModelInputs

#: How often the coordinator collects each worker's completed requests.
COLLECT_INTERVAL_S = 0.1
#: A worker that has reported nothing for this long past a window's end is taken for stuck, and fails the level.
CATCH_UP_TIMEOUT_S = 30.0
#: How long a worker may take to connect (and register its shared-memory regions) before its level starts.
START_TIMEOUT_S = 120.0
#: Round trips per clock offset measurement: the one with the shortest round trip is used.
CLOCK_PINGS = 8

Record = tuple[float, float, bool]  # (latency reference, completed, succeeded), as load.Completions holds them


class WorkerDied(RuntimeError):
    """A load worker is gone or stopped answering; the message names it."""

    usage_error: bool = False  # True: the fix is the user's (a node's software), and the run exits as a usage error


@dataclass(frozen=True)
class WorkerBatch:
    """What a worker completed since its last batch, on its own clock."""

    records: tuple[Record, ...]
    failure_kinds: frozenset[str]
    last_failure: str
    watermark_s: float  # every request the worker completed before this instant is in this batch or an earlier one


@dataclass(frozen=True)
class WorkerEnd:
    unfinished: int  # requests still in flight when the worker stopped (open loop)
    held_sends: int = 0  # open loop: sends that waited for the worker's in-flight cap
    in_flight_cap: int | None = None  # open loop: that cap


def split_level(level: LoadLevel, workers: int) -> list[LoadLevel]:
    """Each worker's share: the concurrency dealt out as evenly as whole requests allow (a worker with none is
    not used), or the rate divided evenly."""
    if level.mode == CONCURRENCY:
        total = int(level.value)
        counts = [total // workers + (1 if index < total % workers else 0) for index in range(workers)]
        return [LoadLevel(CONCURRENCY, count) for count in counts if count > 0]
    return [LoadLevel(level.mode, level.value / workers) for _ in range(workers)]


class LoadWorker:
    """One worker's share of a level, run by an event loop in a thread of its own, so that whatever hosts it (a
    worker process, a Ray actor) can answer `drain` while its requests are in flight."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: str | None = None
        self._done = Completions()
        self._reported = 0
        self._abort = False
        self._unfinished = 0
        self._in_flight_cap: int | None = None

    def start(self, url: str, model_name: str, inputs: ModelInputs, share: LoadLevel, settings: LoadSettings) -> None:
        """Connect, then start sending; returns once requests are going out (RuntimeError if the client failed)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("this load worker is already running a level")
        self._reset()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._run(url, model_name, inputs, share, settings)),
            name="load-worker",
            daemon=True,
        )
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the client did not connect within {START_TIMEOUT_S:g} s")
        if self._error is not None:
            raise RuntimeError(self._error)

    async def _run(
        self, url: str, model_name: str, inputs: ModelInputs, share: LoadLevel, settings: LoadSettings
    ) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with open_inferer(url, model_name, inputs, settings, output_slots(share)) as inferer:
                self._ready.set()
                if share.mode == CONCURRENCY:
                    tasks = keep_in_flight(inferer.infer, int(share.value), self._done, self._stopping)
                    await self._stopping.wait()
                    for task in tasks if self._abort else ():
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    return
                in_flight: set[asyncio.Task] = set()
                self._in_flight_cap = open_loop_in_flight_cap(share.value)
                sending = asyncio.create_task(
                    send_on_schedule(inferer.infer, share.value, settings, self._done, in_flight, self._in_flight_cap)
                )
                await self._stopping.wait()
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
                self._unfinished = len(in_flight)
                await drain_in_flight(in_flight, self._abort)
        except Exception as error:  # reported to the coordinator, which fails the level with it
            self._error = f"{type(error).__name__}: {error}"
        finally:
            self._ready.set()

    async def _take(self) -> WorkerBatch:
        """Run on the worker's own loop, between two of its steps: no completion is stamped but not yet stored."""
        records = tuple(self._done.records[self._reported :])
        self._reported += len(records)
        kinds, self._done.failure_kinds = frozenset(self._done.failure_kinds), set()
        return WorkerBatch(records, kinds, self._done.last_failure, time.perf_counter())

    def drain(self) -> WorkerBatch:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"its load loop ended: {self._error or 'no level running'}")
        return asyncio.run_coroutine_threadsafe(self._take(), self._loop).result(CATCH_UP_TIMEOUT_S)

    def stop(self, abort: bool) -> WorkerEnd:
        """Stop sending; wait for requests in flight unless `abort` (the server is gone or hung)."""
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._abort = abort
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(DRAIN_TIMEOUT_S + 10.0)
        return WorkerEnd(self._unfinished, self._done.held_sends, self._in_flight_cap)

    @staticmethod
    def clock() -> float:
        return time.perf_counter()


class WorkerPool(abc.ABC):
    """Load workers kept for a session, each asked to run its share of one level at a time. `call(index, method,
    *args)` runs a LoadWorker method in worker `index` and returns its result, or raises WorkerDied."""

    kind: str = "abstract"

    def __init__(self, names: Sequence[str], hosts: Sequence[str]) -> None:
        self.names = list(names)
        self.worker_hosts = list(hosts)

    @property
    def size(self) -> int:
        return len(self.names)

    @property
    def host_count(self) -> int:
        return len(set(self.worker_hosts))

    def describe(self) -> str:
        return f"{self.size} load worker(s) ({self.kind}) on {self.host_count} host(s)"

    @abc.abstractmethod
    def call(self, index: int, method: str, *args: object, timeout_s: float = CATCH_UP_TIMEOUT_S) -> object:
        """Run LoadWorker.`method` in worker `index`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop every worker; nothing is left running."""

    def check_server_url(self, url: str) -> None:  # noqa: B027 (a hook: workers on this host have nothing to check)
        """WorkerDied when some worker cannot reach a server at `url`, before any load is sent to it."""

    def clock_offset_s(self, index: int) -> tuple[float, float]:
        """(worker clock - this clock, its uncertainty), from the shortest of CLOCK_PINGS round trips."""
        best = (math.inf, 0.0)
        for _ in range(CLOCK_PINGS):
            sent = time.perf_counter()
            remote = float(self.call(index, "clock"))
            received = time.perf_counter()
            round_trip = received - sent
            if round_trip < best[0]:
                best = (round_trip, remote - (sent + received) / 2)
        return best[1], best[0] / 2

    def measure(
        self,
        url: str,
        model_name: str,
        inputs: ModelInputs,
        level: LoadLevel,
        settings: LoadSettings,
        liveness: Callable[[], str | None] | None,
    ) -> Coroutine[Any, Any, tuple[list[WindowSample], ServerStatistics | None, LoopEnd, list[WorkerShare]]]:
        """load.LevelSplit's: the level run between this pool's workers (measure_with_workers)."""
        return measure_with_workers(self, url, model_name, inputs, level, settings, liveness)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(connection: Connection) -> None:
    """A worker process: LoadWorker methods on request over `connection`, until told to exit or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the coordinator stops us
    die_with_parent()
    worker = LoadWorker()
    while True:
        try:
            method, args = connection.recv()
        except EOFError:
            return
        if method == "exit":
            return
        try:
            connection.send(("ok", getattr(worker, method)(*args)))
        except Exception as error:
            connection.send(("error", f"{type(error).__name__}: {error}"))


class WorkerProcesses(WorkerPool):
    """Load workers as processes on this host (spawned: a fork would copy this process's gRPC state)."""

    kind = "processes"

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._connections: list[Connection] = []
        for index in range(count):
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(child,), name=f"blip-load-worker-{index}", daemon=True)
            process.start()
            child.close()
            self._processes.append(process)
            self._connections.append(parent)
        super().__init__([f"{i} (pid {p.pid})" for i, p in enumerate(self._processes)], [_HOST] * count)

    def call(self, index: int, method: str, *args: object, timeout_s: float = CATCH_UP_TIMEOUT_S) -> object:
        process, connection = self._processes[index], self._connections[index]
        try:
            connection.send((method, args))
            if not connection.poll(timeout_s):
                raise WorkerDied(f"load worker {self.names[index]} did not answer {method} within {timeout_s:g} s")
            status, value = connection.recv()
        except (EOFError, OSError):
            process.join(1.0)
            raise WorkerDied(f"load worker {self.names[index]} exited with code {process.exitcode}") from None
        if status == "error":
            raise WorkerDied(f"load worker {self.names[index]}: {value}")
        return value

    def close(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(("exit", ()))
        for process in self._processes:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
        for connection in self._connections:
            connection.close()


_HOST = socket.gethostname()


@dataclass
class _Collected:
    """The coordinator's view of its workers during a level."""

    offsets_s: list[float]
    watermarks_s: list[float]
    completions_s: list[list[float]] = field(default_factory=list)  # per worker, this clock


async def measure_with_workers(
    pool: WorkerPool,
    url: str,
    model_name: str,
    inputs: ModelInputs,
    level: LoadLevel,
    settings: LoadSettings,
    liveness,
) -> tuple[list[WindowSample], ServerStatistics | None, LoopEnd, list[WorkerShare]]:
    """One level driven by the pool's workers: windows cut here from their merged raw timings, the server's
    statistics taken here around them. A worker that dies or stops reporting fails the level (LevelAborted naming
    it); every started worker is stopped whatever happens."""
    try:
        pool.check_server_url(url)
        shares = split_level(level, pool.size)
        used = range(len(shares))
        clocks = [await asyncio.to_thread(pool.clock_offset_s, index) for index in used]
        collected = _Collected([offset for offset, _ in clocks], [-math.inf] * len(shares), [[] for _ in shares])
        done = Completions()
        started: list[int] = []
        aborted = True
        async with open_inferer(url, model_name, inputs, replace(settings, shared_memory=NONE)) as statistics_client:
            try:
                for index, share in zip(used, shares, strict=True):
                    worker_settings = replace(settings, seed=settings.seed + index)
                    await asyncio.to_thread(
                        pool.call,
                        index,
                        "start",
                        url,
                        model_name,
                        inputs,
                        share,
                        worker_settings,
                        timeout_s=START_TIMEOUT_S,
                    )
                    started.append(index)
                collector = asyncio.create_task(_collect(pool, used, collected, done))

                async def caught_up(until_s: float) -> None:
                    deadline = time.perf_counter() + CATCH_UP_TIMEOUT_S
                    while min(collected.watermarks_s) < until_s:
                        if collector.done():
                            collector.result()  # raises the worker's death
                        if time.perf_counter() > deadline:
                            late = pool.names[collected.watermarks_s.index(min(collected.watermarks_s))]
                            raise WorkerDied(f"load worker {late} reported nothing for {CATCH_UP_TIMEOUT_S:g} s")
                        await asyncio.sleep(COLLECT_INTERVAL_S / 4)

                try:
                    measuring = measure_windows(statistics_client, done, settings, caught_up)
                    # the collector ends only by raising a worker's death: that ends the level at once
                    windows, server = await watched(
                        measuring, done, liveness, settings.request_timeout_s, guard=collector
                    )
                finally:
                    collector.cancel()
                    await asyncio.gather(collector, return_exceptions=True)
                aborted = False
            finally:
                ends = await asyncio.gather(
                    *(
                        asyncio.to_thread(pool.call, i, "stop", aborted, timeout_s=DRAIN_TIMEOUT_S + 15)
                        for i in started
                    ),
                    return_exceptions=True,
                )
        return windows, server, loop_end(ends), _delivered(pool, shares, clocks, collected, windows)
    except WorkerDied as died:
        raise LevelAborted(str(died)) from None


def _delivered(
    pool: WorkerPool,
    shares: Sequence[LoadLevel],
    clocks: Sequence[tuple[float, float]],
    collected: _Collected,
    windows: Sequence[WindowSample],
) -> list[WorkerShare]:
    """Each worker's share and what it completed inside the windows."""
    measured_s = sum(window.duration_s for window in windows)
    delivered = []
    for index, share in enumerate(shares):
        completed = in_windows(collected.completions_s[index], windows)
        delivered.append(
            WorkerShare(
                name=pool.names[index],
                host=pool.worker_hosts[index],
                level=share,
                completed=completed,
                infer_per_s=completed / measured_s if measured_s else math.nan,
                clock_offset_ms=clocks[index][0] * 1000.0,
                clock_uncertainty_ms=clocks[index][1] * 1000.0,
            )
        )
    return delivered


def loop_end(ends: Sequence[WorkerEnd | BaseException]) -> LoopEnd:
    """The level's LoopEnd from its workers' (a worker that failed to stop counts for nothing)."""
    stopped = [end for end in ends if isinstance(end, WorkerEnd)]
    caps = [end.in_flight_cap for end in stopped if end.in_flight_cap is not None]
    return LoopEnd(
        unfinished=sum(end.unfinished for end in stopped),
        held_sends=sum(end.held_sends for end in stopped),
        in_flight_cap=sum(caps) if caps else None,
    )


async def _collect(pool: WorkerPool, used: range, collected: _Collected, done: Completions) -> None:
    """Every COLLECT_INTERVAL_S: each worker's new completions, moved onto this clock and merged."""
    while True:
        for index in used:
            batch = await asyncio.to_thread(pool.call, index, "drain")
            offset = collected.offsets_s[index]
            records = [(reference - offset, completed - offset, ok) for reference, completed, ok in batch.records]
            done.merge(records, set(batch.failure_kinds), batch.last_failure)
            collected.completions_s[index].extend(completed for _, completed, ok in records if ok)
            collected.watermarks_s[index] = batch.watermark_s - offset
        await asyncio.sleep(COLLECT_INTERVAL_S)


def in_windows(completions_s: Sequence[float], windows: Sequence[WindowSample]) -> int:
    """How many of these completion times fall in a window, by the windows' own [start, end) rule."""
    return sum(
        1
        for moment in completions_s
        for window in windows
        if window.start_s <= moment < window.start_s + window.duration_s
    )
