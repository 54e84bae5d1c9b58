"""Load generation against a served model: closed-loop concurrency and open-loop request rate, in windows.

Produces per-window samples and the server's own statistics for the same interval; statistics and the
verdict over those samples live in blip_triton_bench/judging/stats.py and blip_triton_bench/judging/verdict.py.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import Any, Protocol

import aiohttp
import numpy as np
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from blip_triton_bench.host.interrupts import run_cancelled_by_signals
from blip_triton_bench.judging.stats import (
    DEFAULT_MAX_WINDOWS,
    DEFAULT_STABILITY_PCT,
    DEFAULT_STABILITY_WINDOWS,
    LevelSummary,
    ServerStatistics,
    Stability,
    WindowSample,
    assess_stability,
    needs_more_windows,
    summarize_level,
)
from blip_triton_bench.load.client import DEFAULT_REQUEST_TIMEOUT_S
from blip_triton_bench.load.shared_memory import (
    NONE,
    LevelRegions,
    check_reachable,
    level_regions,
    level_tag,
    plan_regions,
    resolve_output_shape,
    shared_memory_kind,
)
from blip_triton_bench.model.workload import ModelInputs

logger = logging.getLogger(__name__)

OUTPUT_NAME = "logits"
CONCURRENCY = "concurrency"
#: A window waiting for --min-requests-per-window requests ends anyway after this many times --window-s.
MAX_WINDOW_STRETCH = 10
#: Gaps drawn at a time by arrival_gaps (an open loop draws more as its level goes on).
ARRIVAL_CHUNK = 4096
#: How long an overloaded open-loop level may take to drain its queued requests before the next level.
DRAIN_TIMEOUT_S = 120.0
REQUEST_RATE = "request_rate"
#: An open-loop level starts with output regions for one second of requests (at most this many) and adds more
#: only when more requests than that are in flight at once.
MAX_INITIAL_OPEN_LOOP_SLOTS = 64
#: An open loop keeps at most this many seconds of its requests in flight (and at least MIN_OPEN_LOOP_IN_FLIGHT):
#: past that a send waits for one to end. Its latency still counts from its scheduled time, so the wait shows as
#: the queue it is; without a bound, a host that cannot keep up (a busy client building BLIP-sized requests, or a
#: slow server) piles up unsent requests until the client holds gigabytes and no window completes a request.
OPEN_LOOP_BACKLOG_S = 2.0
MIN_OPEN_LOOP_IN_FLIGHT = 16
#: At most this many levels per range: each level is measured for at least --stability-windows windows of
#: --window-s (15 s by default) after a warm-up, so 64 levels is already a quarter of an hour per variant and a
#: longer range is a typo (`1:2000000` would allocate two million levels before measuring any).
MAX_LEVELS = 64
#: Requests kept in flight by the one asyncio client: each holds its own output (logits at sequence 16 are ~2 MB,
#: so 4096 is ~8 GB of client memory), and past this the client, not the server, is what is measured.
MAX_CONCURRENCY = 4096
#: Requests per second offered by the one asyncio client, for the same reason: a higher rate measures the client.
MAX_REQUEST_RATE = 10_000.0


#: After a request fails for want of a connection, its worker waits this long (doubling up to the most) before
#: the next: a gone server refuses in microseconds, and a tight loop would only fill the windows with errors.
CONNECTION_BACKOFF_S = (0.1, 2.0)
#: Between two liveness checks while requests keep failing.
LIVENESS_INTERVAL_S = 0.5
#: Failures that are the transport's, not the model's: the server may be gone (gRPC status names; aiohttp's).
CONNECTION_FAILURE, TIMEOUT_FAILURE, SERVER_FAILURE = "connection", "timeout", "server"
GRPC_CONNECTION_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")
GRPC_TIMEOUT_STATUS = "StatusCode.DEADLINE_EXCEEDED"


class LoadSpecError(ValueError):
    """A malformed --concurrency / --request-rate range."""


class LevelAborted(RuntimeError):
    """A level stopped before its windows ended: the server is gone, or requests timed out. The message is the
    cause in a few words (`tritonserver exited with code -9`), for the caller to place in its own context."""


@dataclass(frozen=True)
class LoadSettings:
    """How each load level is measured (perf_analyzer's defaults where it has one)."""

    protocol: str = "grpc"
    window_s: float = 5.0
    min_requests_per_window: int = 10
    warmup_s: float = 2.0
    max_windows: int = DEFAULT_MAX_WINDOWS
    stability_windows: int = DEFAULT_STABILITY_WINDOWS
    stability_pct: float = DEFAULT_STABILITY_PCT
    arrival: str = "constant"  # request-rate mode: "constant" or "poisson"
    seed: int = 0
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    shared_memory: str = NONE  # perf_analyzer's --shared-memory: none, system or cuda
    #: sent with every request and shared-memory registration: the run's key (servers.base.RunKey.headers_for),
    #: keyed by protocol name; empty for a server whose APIs are open (an external one)
    restricted_api_headers: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def headers_for_restricted_apis(self) -> Mapping[str, str] | None:
        return self.restricted_api_headers.get(self.protocol)

    def stream_headers(self) -> Mapping[str, str] | None:
        """What a caption stream (always gRPC) carries."""
        return self.restricted_api_headers.get("grpc")

    def keyed_for(self, server: KeyedServer) -> LoadSettings:
        """These settings with `server`'s key on every request and registration."""
        return replace(self, restricted_api_headers=server.restricted_api_headers())


class KeyedServer(Protocol):
    """A server whose restricted APIs take a key (servers.base.RunningServer): its headers, by protocol name."""

    def restricted_api_headers(self) -> dict[str, dict[str, str]]: ...


@dataclass(frozen=True)
class LoadLevel:
    """One point of a sweep: N requests kept in flight, or R requests per second offered."""

    mode: str  # CONCURRENCY or REQUEST_RATE
    value: float

    @property
    def level_id(self) -> str:
        value = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.mode}={value}"


@dataclass(frozen=True)
class WorkerShare:
    """One worker's part of a level, and what it delivered over the measured windows."""

    name: str
    host: str
    level: LoadLevel
    completed: int = 0  # successful requests that completed inside the level's windows
    infer_per_s: float = math.nan  # those, per second of window
    clock_offset_ms: float = 0.0
    clock_uncertainty_ms: float = 0.0


@dataclass(frozen=True)
class LevelMeasurement:
    level: LoadLevel
    windows: tuple[WindowSample, ...]
    stability: Stability
    summary: LevelSummary
    server: ServerStatistics | None
    offered_rate_per_s: float | None = None  # request-rate mode
    achieved_rate_per_s: float | None = None  # completions per second over the measured windows
    unfinished_requests: int = 0  # requests still in flight when measurement stopped
    load_workers: tuple[WorkerShare, ...] = ()  # with --load-workers: who sent what, and what each delivered
    arrival: str | None = None  # request-rate mode: how sends were spaced (--request-distribution)
    #: each request's tensors and their shapes (--sequence-length sets input_ids' and attention_mask's second dim)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: open loop: sends that waited because open_loop_in_flight_cap requests were in flight (the schedule slipped)
    held_sends: int = 0
    in_flight_cap: int | None = None


def parse_range(text: str, option: str, maximum: float = math.inf) -> list[float]:
    """perf_analyzer's `start:end:step` syntax (end inclusive; `N` alone is one level), at most MAX_LEVELS levels
    of at most `maximum` each."""
    try:
        parts = [float(part) for part in text.split(":")]
    except ValueError:
        raise LoadSpecError(f"{option} {text!r}: expected start:end:step numbers, e.g. 1:4:1") from None
    if len(parts) == 1:
        parts = [parts[0], parts[0], 1.0]
    elif len(parts) == 2:
        parts.append(1.0)
    start, end, step = parts if len(parts) == 3 else (None, None, None)
    if start is None or not all(map(math.isfinite, parts)) or start <= 0 or end < start or step <= 0:
        raise LoadSpecError(f"{option} {text!r}: need 0 < start <= end and step > 0 (start:end:step)")
    if end > maximum:
        limit = _shown(maximum)
        raise LoadSpecError(f"{option} {text!r}: {_shown(end)} is above the limit of {limit}; use {limit} or less")
    count = math.floor((end - start) / step + 1e-9) + 1
    if count > MAX_LEVELS:
        raise LoadSpecError(
            f"{option} {text!r}: {count} levels, more than the limit of {MAX_LEVELS} per run (each is measured for "
            "several windows); use a larger step or a shorter range"
        )
    return [round(start + i * step, 6) for i in range(count)]


def _shown(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def concurrency_levels(text: str, option: str = "--concurrency") -> list[LoadLevel]:
    values = parse_range(text, option, MAX_CONCURRENCY)
    if any(not value.is_integer() for value in values):
        raise LoadSpecError(f"{option} {text!r}: concurrency levels must be whole numbers")
    return [LoadLevel(CONCURRENCY, int(value)) for value in values]


def request_rate_levels(text: str, option: str = "--request-rate") -> list[LoadLevel]:
    return [LoadLevel(REQUEST_RATE, value) for value in parse_range(text, option, MAX_REQUEST_RATE)]


# ------------------------------------------------------------------------------------------ the client


class AsyncInferer:
    """One asyncio client with the request's inputs encoded once; `await infer()` sends one request.

    After `use_shared_memory(regions)` the inputs are references into the level's input region and each request
    borrows an output region (a slot) for as long as it is in flight.
    """

    def __init__(
        self,
        url: str,
        protocol: str,
        model_name: str,
        inputs: ModelInputs,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.model_name = model_name
        self.protocol = protocol
        self._timeout_s = timeout_s
        self._headers = dict(headers) if headers else None  # the run's key, where the server restricts inference
        self._module = grpc_aio if protocol == "grpc" else http_aio
        if protocol == "grpc":
            self.client: Any = grpc_aio.InferenceServerClient(url)
        else:
            # HTTP's per-request `timeout` is a server-side queue timeout in whole microseconds (a float is
            # rejected: "Unable to parse 'timeout'"); the client-side limit is the session's total timeout.
            self.client = http_aio.InferenceServerClient(url, conn_timeout=timeout_s)
        self._inputs = []
        for name, array in inputs.as_dict().items():
            triton_input = self._module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            triton_input.set_data_from_numpy(array)
            self._inputs.append(triton_input)
        self._outputs = [self._module.InferRequestedOutput(OUTPUT_NAME)]
        self._regions: LevelRegions | None = None
        self._slot_outputs: dict[int, list[Any]] = {}

    async def output_metadata(self) -> tuple[list[int], str]:
        """The model's OUTPUT_NAME shape (-1 where dynamic) and Triton datatype, as its metadata states them."""
        if self.protocol == "grpc":
            metadata = await self.client.get_model_metadata(
                self.model_name, as_json=True, client_timeout=self._timeout_s
            )
        else:
            metadata = await self.client.get_model_metadata(self.model_name)
        for output in metadata["outputs"]:
            if output["name"] == OUTPUT_NAME:
                return [int(dim) for dim in output["shape"]], output["datatype"]
        raise LoadSpecError(f"model {self.model_name} has no output {OUTPUT_NAME!r}")

    def use_shared_memory(self, regions: LevelRegions) -> None:
        """Send every request's inputs as references into `regions`' input region."""
        plan = regions.plan
        self._inputs = []
        for placement in plan.inputs:
            triton_input = self._module.InferInput(placement.name, list(placement.shape), placement.datatype)
            triton_input.set_shared_memory(plan.input_region, placement.byte_size, placement.offset)
            self._inputs.append(triton_input)
        self._regions = regions
        self._slot_outputs = {}

    def _outputs_into(self, slot: int) -> list[Any]:
        if slot not in self._slot_outputs:
            plan = self._regions.plan
            output = self._module.InferRequestedOutput(OUTPUT_NAME)
            output.set_shared_memory(plan.output_region(slot), plan.output_byte_size)
            self._slot_outputs[slot] = [output]
        return self._slot_outputs[slot]

    async def _send(self, outputs: list[Any]) -> Any:
        if self.protocol == "grpc":
            return await self.client.infer(
                self.model_name, self._inputs, outputs=outputs, client_timeout=self._timeout_s, headers=self._headers
            )
        return await self.client.infer(self.model_name, self._inputs, outputs=outputs, headers=self._headers)

    async def infer(self) -> None:
        if self._regions is None:
            await self._send(self._outputs)
            return
        slot = await self._regions.acquire()
        try:
            await self._send(self._outputs_into(slot))
        finally:
            self._regions.release(slot)

    async def infer_output(self) -> np.ndarray:
        """One request, and the logits it returned (read back from its output region under shared memory)."""
        if self._regions is None:
            return (await self._send(self._outputs)).as_numpy(OUTPUT_NAME)
        slot = await self._regions.acquire()
        try:
            await self._send(self._outputs_into(slot))
            return self._regions.read_output(slot)
        finally:
            self._regions.release(slot)

    async def statistics(self) -> dict[str, Any]:
        if self.protocol == "grpc":
            return await self.client.get_inference_statistics(
                self.model_name, as_json=True, client_timeout=self._timeout_s
            )
        return await self.client.get_inference_statistics(self.model_name)

    async def close(self) -> None:
        await self.client.close()


@contextlib.asynccontextmanager
async def open_inferer(
    url: str, model_name: str, inputs: ModelInputs, settings: LoadSettings, slots: int = 1
) -> AsyncIterator[AsyncInferer]:
    """An AsyncInferer for one level; with settings.shared_memory, its regions live exactly as long as it does."""
    kind = shared_memory_kind(settings.shared_memory)
    if kind is not None:
        check_reachable(settings.shared_memory, url)
    inferer = AsyncInferer(
        url, settings.protocol, model_name, inputs, settings.request_timeout_s, settings.headers_for_restricted_apis()
    )
    try:
        if kind is None:
            yield inferer
            return
        arrays = inputs.as_dict()
        model_shape, datatype = await inferer.output_metadata()
        batch_size, sequence_length = inputs.input_ids.shape
        output_shape = resolve_output_shape(model_shape, batch_size, sequence_length, model_name)
        plan = plan_regions(level_tag(), arrays, OUTPUT_NAME, output_shape, triton_to_np_dtype(datatype))
        headers = settings.headers_for_restricted_apis()
        async with level_regions(kind, inferer.client, plan, arrays, slots, headers) as regions:
            inferer.use_shared_memory(regions)
            yield inferer
    finally:
        await inferer.close()


def _model_stats(raw: dict[str, Any]) -> dict[str, Any]:
    return raw["model_stats"][0]  # one model was asked for; staged repositories serve one version


def _ns(section: dict[str, Any], name: str) -> int:
    return int(section.get(name, {}).get("ns", 0))


def _count(section: dict[str, Any], name: str) -> int:
    """A statistic's count; absent means 0 (Triton's JSON leaves out zero values, e.g. before the first success)."""
    return int(section.get(name, {}).get("count", 0))


def statistics_delta(before: dict[str, Any], after: dict[str, Any]) -> ServerStatistics:
    """The server's view of the interval between two statistics snapshots of one model."""
    first, last = _model_stats(before), _model_stats(after)
    success = _count(last.get("inference_stats", {}), "success") - _count(first.get("inference_stats", {}), "success")

    def per_request_ms(name: str) -> float:
        delta_ns = _ns(last.get("inference_stats", {}), name) - _ns(first.get("inference_stats", {}), name)
        return delta_ns / success / 1e6 if success else 0.0

    def executions(stats: dict[str, Any]) -> dict[int, int]:
        return {
            int(entry["batch_size"]): int(entry.get("compute_infer", {}).get("count", 0))
            for entry in stats.get("batch_stats", [])
        }

    before_batches, after_batches = executions(first), executions(last)
    formed = {size: count - before_batches.get(size, 0) for size, count in after_batches.items()}
    return ServerStatistics(
        inference_count=int(last.get("inference_count", 0)) - int(first.get("inference_count", 0)),
        execution_count=int(last.get("execution_count", 0)) - int(first.get("execution_count", 0)),
        success_count=success,
        queue_ms=per_request_ms("queue"),
        compute_input_ms=per_request_ms("compute_input"),
        compute_infer_ms=per_request_ms("compute_infer"),
        compute_output_ms=per_request_ms("compute_output"),
        executions_by_batch_size={size: count for size, count in sorted(formed.items()) if count > 0},
    )


# ------------------------------------------------------------------------------------------ the loops


@dataclass
class Completions:
    """Completed requests in completion order: (latency reference time, completion time, succeeded), and the
    failures the watchdog has not looked at yet."""

    records: list[tuple[float, float, bool]] = field(default_factory=list)
    held_sends: int = 0  # open loop: sends that waited for the in-flight cap
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    failure_kinds: set[str] = field(default_factory=set)
    last_failure: str = ""

    def merge(self, records: Sequence[tuple[float, float, bool]], failure_kinds: set[str], last_failure: str) -> None:
        """Add another client's completions (load workers), keeping completion order; its failures wake the
        watchdog as this process's own do."""
        for record in records:
            bisect.insort(self.records, record, key=itemgetter(1))
        if failure_kinds:
            self.failure_kinds |= failure_kinds
            self.last_failure = last_failure
            self.failed.set()

    def window(self, start: float, end: float, first_index: int) -> tuple[WindowSample, int]:
        """The sample of requests completed in [start, end), scanning from `first_index`; returns the next index."""
        latencies, errors, index = [], 0, first_index
        while index < len(self.records) and self.records[index][1] < end:
            reference, completed, succeeded = self.records[index]
            if completed >= start:
                if succeeded:
                    latencies.append((completed - reference) * 1000.0)
                else:
                    errors += 1
            index += 1
        return WindowSample(start_s=start, duration_s=end - start, latencies_ms=tuple(latencies), errors=errors), index


def failure_kind(error: BaseException) -> str:
    """CONNECTION_FAILURE, TIMEOUT_FAILURE or SERVER_FAILURE (the server answered with an error)."""
    if isinstance(error, InferenceServerException):
        status = str(error.status())
        if status == GRPC_TIMEOUT_STATUS:
            return TIMEOUT_FAILURE
        return CONNECTION_FAILURE if status in GRPC_CONNECTION_STATUSES else SERVER_FAILURE
    return TIMEOUT_FAILURE if isinstance(error, TimeoutError) else CONNECTION_FAILURE


async def _timed_request(infer: Callable[[], Awaitable[None]], reference: float, done: Completions) -> str | None:
    """One request, recorded; the kind of its failure, or None when it succeeded."""
    try:
        await infer()
        kind = None
    except (InferenceServerException, aiohttp.ClientError, TimeoutError, OSError) as error:
        logger.debug("request failed: %s", error)
        kind = failure_kind(error)
        done.failure_kinds.add(kind)
        done.last_failure = str(error) or type(error).__name__
        done.failed.set()
    done.records.append((reference, time.perf_counter(), kind is None))
    return kind


async def _watch(done: Completions, liveness: Callable[[], str | None] | None, timeout_s: float) -> None:
    """Raise LevelAborted when failed requests mean the level cannot go on: the server is gone (its provider says
    how), or requests time out. A server that answers with errors is left to the level's own error count."""
    while True:
        await done.failed.wait()
        done.failed.clear()
        kinds, done.failure_kinds = done.failure_kinds, set()
        cause = await asyncio.to_thread(liveness) if liveness is not None else None
        if cause is not None:
            raise LevelAborted(cause)
        if TIMEOUT_FAILURE in kinds:
            raise LevelAborted(
                f"requests timed out: no answer within {timeout_s:g} s (--request-timeout-s), though the server "
                "process is still there (hung or overloaded)"
            )
        await asyncio.sleep(LIVENESS_INTERVAL_S)


async def watched(
    measuring: Awaitable,
    done: Completions,
    liveness: Callable[[], str | None] | None,
    timeout_s: float,
    guard: asyncio.Future | None = None,
):
    """`measuring`'s result, unless the watchdog stops the level first (LevelAborted). A statistics call that
    fails because the server went away is reported as the server's end too. `guard`, when given, is a task that
    ends only by raising why the level cannot go on (the load workers' collector raises a worker's death): its end
    ends the level at once, where a window waiting for completions only it merges would wait out its stretch."""
    measure = asyncio.ensure_future(measuring)
    watchdog = asyncio.ensure_future(_watch(done, liveness, timeout_s))
    try:
        await asyncio.wait({measure, watchdog, *([guard] if guard else [])}, return_when=asyncio.FIRST_COMPLETED)
        if watchdog.done():
            watchdog.result()  # raises LevelAborted
        if guard is not None and guard.done() and not measure.done():
            guard.result()  # raises its cause
            raise RuntimeError("the level's guard ended without a cause")
        try:
            return measure.result()
        except (InferenceServerException, aiohttp.ClientError, TimeoutError, OSError) as error:
            cause = await asyncio.to_thread(liveness) if liveness is not None else None
            if cause is None and failure_kind(error) == TIMEOUT_FAILURE:
                cause = f"the server's statistics did not come within {timeout_s:g} s (--request-timeout-s)"
            if cause is not None:
                raise LevelAborted(cause) from None
            raise
    finally:
        for task in (measure, watchdog):
            task.cancel()
        await asyncio.gather(measure, watchdog, return_exceptions=True)


async def measure_windows(
    inferer: AsyncInferer,
    done: Completions,
    settings: LoadSettings,
    caught_up: Callable[[float], Awaitable[None]] | None = None,
) -> tuple[list[WindowSample], ServerStatistics | None]:
    """After warm-up: windows until stable or max_windows, with statistics snapshots around them. `caught_up(t)`
    returns once every request completed before t is in `done` (load workers report theirs in batches)."""
    await asyncio.sleep(settings.warmup_s)
    before = await inferer.statistics()
    windows: list[WindowSample] = []
    index = len(done.records)
    while True:
        start = time.perf_counter()
        await asyncio.sleep(settings.window_s)
        # perf_analyzer's measurement-request-count: a window also lasts until it holds enough requests, so a
        # slow model's throughput is not quantised to 1/window_s steps (bounded, for a server that stalls).
        while (
            len(done.records) - index < settings.min_requests_per_window
            and time.perf_counter() - start < settings.window_s * MAX_WINDOW_STRETCH
        ):
            await asyncio.sleep(min(0.05, settings.window_s))
        end = time.perf_counter()
        if caught_up is not None:
            await caught_up(end)
        sample, index = done.window(start, end, index)
        windows.append(sample)
        if not needs_more_windows([*windows], settings.max_windows, settings.stability_windows, settings.stability_pct):
            break
    after = await inferer.statistics()
    return windows, statistics_delta(before, after)


def keep_in_flight(
    infer: Callable[[], Awaitable[None]], concurrency: int, done: Completions, stopping: asyncio.Event
) -> list[asyncio.Task]:
    """The closed loop's request tasks: each sends its next request as soon as its last one ends, until
    `stopping` is set."""

    async def worker() -> None:
        backoff_s = CONNECTION_BACKOFF_S[0]
        while not stopping.is_set():
            if await _timed_request(infer, time.perf_counter(), done) == CONNECTION_FAILURE:
                await asyncio.sleep(backoff_s)  # a refused connection returns at once: no tight loop
                backoff_s = min(backoff_s * 2, CONNECTION_BACKOFF_S[1])
            else:
                backoff_s = CONNECTION_BACKOFF_S[0]

    return [asyncio.create_task(worker()) for _ in range(concurrency)]


async def _closed_loop(inferer: AsyncInferer, concurrency: int, settings: LoadSettings, liveness):
    done = Completions()
    stopping = asyncio.Event()
    workers = keep_in_flight(inferer.infer, concurrency, done, stopping)
    aborted = True
    try:
        measuring = measure_windows(inferer, done, settings)
        windows, server = await watched(measuring, done, liveness, settings.request_timeout_s)
        aborted = False
    finally:
        stopping.set()
        if aborted:  # requests to a gone or hung server are not waited for
            for task in workers:
                task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return windows, server, LoopEnd()


def arrival_gaps_s(rate_per_s: float, count: int, arrival: str, seed: int | np.random.Generator) -> np.ndarray:
    """Gaps between scheduled sends: constant 1/rate, or exponential with mean 1/rate (Poisson arrivals)."""
    if arrival == "constant":
        return np.full(count, 1.0 / rate_per_s)
    if arrival == "poisson":
        return np.random.default_rng(seed).exponential(1.0 / rate_per_s, size=count)
    raise LoadSpecError(f"--request-distribution {arrival!r}: use constant or poisson")


def arrival_gaps(rate_per_s: float, arrival: str, seed: int) -> Iterator[float]:
    """arrival_gaps_s without an end, from one seeded stream: a dispatcher sends until its level ends, never stops
    because its schedule ran out (a window that waits for --min-requests-per-window outlasts --window-s)."""
    rng = np.random.default_rng(seed)
    while True:
        yield from arrival_gaps_s(rate_per_s, ARRIVAL_CHUNK, arrival, rng).tolist()


def open_loop_in_flight_cap(rate_per_s: float) -> int:
    """The most requests an open loop at `rate_per_s` keeps in flight: OPEN_LOOP_BACKLOG_S of them."""
    return max(MIN_OPEN_LOOP_IN_FLIGHT, math.ceil(rate_per_s * OPEN_LOOP_BACKLOG_S))


async def send_on_schedule(
    infer: Callable[[], Awaitable[None]],
    rate_per_s: float,
    settings: LoadSettings,
    done: Completions,
    in_flight: set[asyncio.Task],
    max_in_flight: int | None = None,
) -> None:
    """The open loop's dispatcher: requests sent at `rate_per_s` (constant or Poisson gaps, seeded by
    settings.seed) regardless of completions, each one's latency counted from its *scheduled* time. With
    `max_in_flight` (default open_loop_in_flight_cap) requests in flight, a send waits for one to end."""
    cap = open_loop_in_flight_cap(rate_per_s) if max_in_flight is None else max_in_flight
    scheduled = time.perf_counter()
    for gap in arrival_gaps(rate_per_s, settings.arrival, settings.seed):  # until the level cancels it
        scheduled += gap
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= cap:
            done.held_sends += 1
            while len(in_flight) >= cap:
                await asyncio.wait(set(in_flight), return_when=asyncio.FIRST_COMPLETED)
        # A late dispatcher still stamps the scheduled time: a slow server cannot hide its queue.
        task = asyncio.create_task(_timed_request(infer, scheduled, done))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        # Let the request go out (and completions be stamped) before the next send: a dispatcher behind its
        # schedule would otherwise only create tasks until it caught up, and the windows would see nothing end.
        await asyncio.sleep(0)


@dataclass(frozen=True)
class LoopEnd:
    """How a level's load loop ended: requests still in flight when measuring stopped, and (open loop) the sends
    that waited for the in-flight cap, and that cap."""

    unfinished: int = 0
    held_sends: int = 0
    in_flight_cap: int | None = None


async def drain_in_flight(in_flight: set[asyncio.Task], aborted: bool) -> None:
    """Cancelling a client task does not take its request out of the server's queue: let them drain, or the next
    level would measure this level's backlog (not when the server is gone or hung)."""
    if in_flight and not aborted:
        await asyncio.wait(set(in_flight), timeout=DRAIN_TIMEOUT_S)
    for task in list(in_flight):
        task.cancel()
    await asyncio.gather(*in_flight, return_exceptions=True)


async def _open_loop(inferer: AsyncInferer, rate_per_s: float, settings: LoadSettings, liveness):
    """Requests sent on a schedule regardless of completions; latency counts from the *scheduled* time."""
    done = Completions()
    in_flight: set[asyncio.Task] = set()
    sending = asyncio.create_task(send_on_schedule(inferer.infer, rate_per_s, settings, done, in_flight))
    aborted = True
    try:
        measuring = measure_windows(inferer, done, settings)
        windows, server = await watched(measuring, done, liveness, settings.request_timeout_s)
        aborted = False
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        unfinished = len(in_flight)
        await drain_in_flight(in_flight, aborted)
    return windows, server, LoopEnd(unfinished, done.held_sends, open_loop_in_flight_cap(rate_per_s))


def output_slots(level: LoadLevel) -> int:
    """Output regions made before a level starts: one per request a closed loop keeps in flight; one second of
    requests for an open loop (bounded; more are added if more are in flight at once)."""
    if level.mode == CONCURRENCY:
        return int(level.value)
    return max(1, min(MAX_INITIAL_OPEN_LOOP_SLOTS, math.ceil(level.value)))


async def _run_level(
    url: str, model_name: str, inputs: ModelInputs, level: LoadLevel, settings: LoadSettings, liveness
):
    async with open_inferer(url, model_name, inputs, settings, output_slots(level)) as inferer:
        if level.mode == CONCURRENCY:
            return await _closed_loop(inferer, int(level.value), settings, liveness)
        return await _open_loop(inferer, float(level.value), settings, liveness)


class LevelSplit(Protocol):
    """Load workers that run a level between them (load_workers.WorkerPool, on this host or a Ray cluster)."""

    def measure(
        self,
        url: str,
        model_name: str,
        inputs: ModelInputs,
        level: LoadLevel,
        settings: LoadSettings,
        liveness: Callable[[], str | None] | None,
    ) -> Coroutine[Any, Any, tuple[list[WindowSample], ServerStatistics | None, LoopEnd, list[WorkerShare]]]:
        """The level's windows cut from the workers' merged timings, the server's statistics around them, how the
        loop ended, and each worker's share."""
        ...


def measure_level(
    url: str,
    model_name: str,
    inputs: ModelInputs,
    level: LoadLevel,
    settings: LoadSettings,
    liveness: Callable[[], str | None] | None = None,
    workers: LevelSplit | None = None,
) -> LevelMeasurement:
    """Measure one load level against `model_name` at `url` (gRPC or HTTP endpoint per settings.protocol), from
    this process's client, or split across `workers` (load_workers.WorkerPool) and merged here.

    When requests fail, `liveness` (a RunningServer's) is asked whether the server is still there; LevelAborted
    ends the level with its answer, or when requests time out, or when a load worker dies."""
    shares: tuple[WorkerShare, ...] = ()
    if workers is None:
        windows, server, end = run_cancelled_by_signals(_run_level(url, model_name, inputs, level, settings, liveness))
    else:
        measured = workers.measure(url, model_name, inputs, level, settings, liveness)
        windows, server, end, worker_shares = run_cancelled_by_signals(measured)
        shares = tuple(worker_shares)
    stability = assess_stability(windows, settings.stability_windows, settings.stability_pct)
    summary = summarize_level(windows, stability)
    used = [windows[i] for i in stability.window_indices] or windows
    completed = sum(len(w.latencies_ms) for w in used)
    duration = sum(w.duration_s for w in used)
    return LevelMeasurement(
        level=level,
        windows=tuple(windows),
        stability=stability,
        summary=summary,
        server=server,
        offered_rate_per_s=level.value if level.mode == REQUEST_RATE else None,
        achieved_rate_per_s=completed / duration if duration else 0.0,
        unfinished_requests=end.unfinished,
        load_workers=shares,
        arrival=settings.arrival if level.mode == REQUEST_RATE else None,
        input_shapes={name: tuple(int(d) for d in array.shape) for name, array in inputs.as_dict().items()},
        held_sends=end.held_sends,
        in_flight_cap=end.in_flight_cap,
    )
