"""Resource use of the server during a load level, as Model Analyzer reports it: CPU and RAM of the server's
processes (psutil, or Docker's stats for a container), GPU utilisation, memory and power (NVML).

A background thread takes a sample every SAMPLE_INTERVAL_S; the summary (mean and max per metric) is a pure
function of the samples that fall inside the level's measured windows, so it is tested on synthetic samples.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Model Analyzer's default monitoring interval is 1 s; half of it gives a 2 s window four samples.
SAMPLE_INTERVAL_S = 0.5
#: Memory in MB as nvidia-smi and Model Analyzer count it (MiB).
BYTES_PER_MB = 1024 * 1024


@dataclass(frozen=True)
class ProcessReading:
    """The server's processes at one instant: cumulative CPU seconds per process (or container), summed RSS."""

    cpu_s: Mapping[str, float]  # key: a process identity ("pid@create_time") or a container id
    rss_mb: float


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one instant, as NVML reports it."""

    util_pct: float
    memory_mb: float
    power_w: float


@dataclass(frozen=True)
class ResourceSample:
    """Everything read at `time_s` (time.perf_counter, the clock the load windows are stamped with)."""

    time_s: float
    process: ProcessReading | None
    gpus: tuple[GpuReading, ...] = ()


@dataclass(frozen=True)
class ResourceUsage:
    """A level's resource use over its measured windows; None where the metric was not available.

    CPU % is of one core, summed over the server's processes (as top and `docker stats` count it: 2 busy
    cores read 200 %). GPU utilisation is the mean over the server's GPUs; memory and power are their sums.
    """

    gpu_util_pct_mean: float | None
    gpu_util_pct_max: float | None
    gpu_memory_mb_max: float | None
    gpu_power_w_mean: float | None
    server_cpu_pct_mean: float | None
    server_cpu_pct_max: float | None
    server_rss_mb_max: float | None
    samples: int
    unavailable: tuple[str, ...] = ()  # why a metric is None, e.g. "GPU: NVML not available (...)"


# ------------------------------------------------------------------------------------------ aggregation


def cpu_percents(samples: Sequence[ResourceSample]) -> list[float]:
    """CPU % of each interval between consecutive samples: CPU seconds spent / wall seconds, over the processes
    present at both ends (a process that starts or exits mid-interval is not counted as a jump)."""
    readings = [s for s in samples if s.process is not None]
    percents = []
    for before, after in itertools.pairwise(readings):
        wall_s = after.time_s - before.time_s
        if wall_s <= 0:
            continue
        both = before.process.cpu_s.keys() & after.process.cpu_s.keys()
        spent_s = sum(max(0.0, after.process.cpu_s[key] - before.process.cpu_s[key]) for key in both)
        percents.append(100.0 * spent_s / wall_s)
    return percents


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _max(values: Sequence[float]) -> float | None:
    return max(values) if values else None


def summarize_resources(
    samples: Sequence[ResourceSample], start_s: float, end_s: float, unavailable: Sequence[str] = ()
) -> ResourceUsage:
    """Mean and max of each metric over the samples taken in [start_s, end_s] (the measured windows)."""
    inside = [s for s in samples if start_s <= s.time_s <= end_s]
    cpu = cpu_percents(inside)
    rss = [s.process.rss_mb for s in inside if s.process is not None]
    with_gpus = [s.gpus for s in inside if s.gpus]
    util = [sum(g.util_pct for g in gpus) / len(gpus) for gpus in with_gpus]
    memory = [sum(g.memory_mb for g in gpus) for gpus in with_gpus]
    power = [sum(g.power_w for g in gpus) for gpus in with_gpus]
    return ResourceUsage(
        gpu_util_pct_mean=_mean(util),
        gpu_util_pct_max=_max(util),
        gpu_memory_mb_max=_max(memory),
        gpu_power_w_mean=_mean(power),
        server_cpu_pct_mean=_mean(cpu),
        server_cpu_pct_max=_max(cpu),
        server_rss_mb_max=_max(rss),
        samples=len(inside),
        unavailable=tuple(unavailable),
    )


# ------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class ResourceSource:
    """What a running server lets the sampler read: its processes (None when they are out of reach, with the
    reason) and its GPUs (NVML indices; None: every GPU NVML sees; (): none)."""

    read_process: Callable[[], ProcessReading] | None
    gpu_indices: tuple[int, ...] | None = ()
    process_unavailable: str = "not measured"
    gpu_unavailable: str = "the server uses no GPU"


def process_tree_reader(pid: int) -> Callable[[], ProcessReading]:
    """The process `pid` and all its descendants (tritonserver and the Python backend stubs doing the work)."""
    import psutil

    root = psutil.Process(pid)

    def read() -> ProcessReading:
        cpu_s: dict[str, float] = {}
        rss_bytes = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    rss = process.memory_info().rss
                    key = f"{process.pid}@{process.create_time()}"  # a reused pid is another process
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue  # exited between listing and reading
            cpu_s[key] = times.user + times.system
            rss_bytes += rss
        return ProcessReading(cpu_s=cpu_s, rss_mb=rss_bytes / BYTES_PER_MB)

    return read


def docker_stats_reading(container_id: str, stats: Mapping[str, Any]) -> ProcessReading:
    """A container's cumulative CPU time and memory from the Docker stats API, memory counted as `docker stats`
    counts it: usage less the inactive page cache (cgroup v2 `inactive_file`, v1 `total_inactive_file`)."""
    cpu_ns = float(stats["cpu_stats"]["cpu_usage"]["total_usage"])
    memory = stats.get("memory_stats", {})
    detail = memory.get("stats", {})
    cache = detail.get("inactive_file", detail.get("total_inactive_file", 0))
    return ProcessReading(
        cpu_s={container_id: cpu_ns / 1e9}, rss_mb=max(0, memory.get("usage", 0) - cache) / BYTES_PER_MB
    )


def docker_stats_reader(container: Any) -> Callable[[], ProcessReading]:
    """Reads a docker-py Container: one-shot stats (no second sample, so one read takes milliseconds, not 1 s)."""

    def read() -> ProcessReading:
        return docker_stats_reading(container.id, container.stats(stream=False, one_shot=True))

    return read


def cuda_visible_indices(value: str | None) -> tuple[int, ...] | None:
    """CUDA_VISIBLE_DEVICES as NVML indices: unset (or UUIDs) -> every GPU, "" or "-1" -> none."""
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not parts or parts[0] == "-1":
        return ()
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        return None


class NvmlGpus:
    """NVML handles of the server's GPUs; `available` is False (with `reason`) on a host without a driver."""

    def __init__(self, indices: tuple[int, ...] | None, no_gpu_reason: str = "the server uses no GPU") -> None:
        self.reason = ""
        self._handles: list[Any] = []
        self._nvml: Any = None
        if indices == ():
            self.reason = f"GPU: {no_gpu_reason}"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as error:  # no library or no driver: a CPU host, not a failure
            self.reason = f"GPU: NVML not available ({error})"
            return
        self._nvml = pynvml
        try:
            count = pynvml.nvmlDeviceGetCount()
            wanted = range(count) if indices is None else [i for i in indices if i < count]
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in wanted]
        except pynvml.NVMLError as error:
            self.reason = f"GPU: NVML could not list the GPUs ({error})"
        if not self._handles and not self.reason:
            self.reason = "GPU: NVML sees none of the server's GPUs"

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def read(self) -> tuple[GpuReading, ...]:
        nvml = self._nvml
        return tuple(
            GpuReading(
                util_pct=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                memory_mb=nvml.nvmlDeviceGetMemoryInfo(handle).used / BYTES_PER_MB,
                power_w=nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # milliwatts
            )
            for handle in self._handles
        )

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None


# ------------------------------------------------------------------------------------------ the sampler


@dataclass
class ResourceSampler:
    """`with ResourceSampler(source) as sampler:` samples in a background thread until the block ends;
    `sampler.usage(start_s, end_s)` summarises the samples of that interval. A reading that fails (a process
    gone, Docker busy) is skipped and named in `unavailable`, never raised from the thread."""

    source: ResourceSource
    interval_s: float = SAMPLE_INTERVAL_S
    clock: Callable[[], float] = time.perf_counter
    samples: list[ResourceSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _gpus: NvmlGpus | None = None

    def __enter__(self) -> ResourceSampler:
        self._gpus = NvmlGpus(self.source.gpu_indices, self.source.gpu_unavailable)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()  # the last interval ends after the last window
        if self._gpus is not None:
            self._gpus.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        process = gpus = None
        try:
            if self.source.read_process is not None:
                process = self.source.read_process()
            if self._gpus is not None and self._gpus.available:
                gpus = self._gpus.read()
        except Exception as error:  # the server's processes are not ours to guarantee; skip this sample
            if not self.errors:
                logger.warning("resource sample failed: %s", error)
            self.errors.append(f"{type(error).__name__}: {error}")
            return
        self.samples.append(ResourceSample(time_s=self.clock(), process=process, gpus=gpus or ()))

    def unavailable(self) -> list[str]:
        reasons = []
        if self.source.read_process is None:
            reasons.append(f"server CPU/RAM: {self.source.process_unavailable}")
        if self._gpus is not None and self._gpus.reason:
            reasons.append(self._gpus.reason)
        if self.errors:
            reasons.append(f"{len(self.errors)} samples failed (first: {self.errors[0]})")
        return reasons

    def usage(self, start_s: float, end_s: float) -> ResourceUsage:
        return summarize_resources(self.samples, start_s, end_s, self.unavailable())
