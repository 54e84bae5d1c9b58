"""A Model-Analyzer-style batching and instance sweep: a grid of Triton config knobs, one config per point,
and the report that names the throughput / p99 frontier and the best config under a latency budget.

Pure machinery: nothing here starts a server or sends a request; the suite stages the points and measures them.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from blip_triton_bench.host.files import write_text_atomic
from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel, LoadSettings
from blip_triton_bench.model.workload import ModelInputs
from blip_triton_bench.servers.base import ModelLoad, RunningServer, ServerStartError

if TYPE_CHECKING:
    from blip_triton_bench.load.workers import WorkerPool

logger = logging.getLogger(__name__)

#: The onnxruntime backend's threads per model instance; 0 in the grid leaves the parameter out, i.e. ONNX
#: Runtime's default (one thread per physical core, for every instance).
THREAD_PARAMETER = "intra_op_thread_count"
#: preferred_batch_size grid value: the powers of two up to max_batch_size (for 8: 1, 2, 4, 8, as
#: base_model_cpu ships). With 1 among the preferred sizes Triton sends whatever is queued at once, so the
#: queue delay then never applies; "none" (no preferred size: Triton forms the largest batch it can, waiting
#: up to the queue delay) is what Triton's docs recommend unless a preferred size is measurably faster.
AUTO = "auto"
NO_PREFERRED = "none"

#: Triton names a model by its repository folder; keep to characters every filesystem and URL accepts.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class SweepError(ValueError):
    """A --sweep-grid spec, grid or sweep result the sweep cannot use; the message names the field and the fix."""


# ------------------------------------------------------------------------------------------ the grid

PreferredSizes = str | tuple[int, ...]  # AUTO, or the sizes themselves (() = no preferred size)


def _invalid_value(key: str, value: object) -> str | None:
    """Why `value` cannot be a value of grid field `key` (None when it can)."""
    if key == "preferred_batch_size":
        if value == AUTO:
            return None
        if not isinstance(value, tuple) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            return f"{value!r} is neither '{AUTO}' nor a tuple of batch sizes"
        if any(size < 1 for size in value):
            return f"preferred batch sizes must be at least 1, got {'|'.join(map(str, value))}"
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{value!r} is not a whole number"
    minimum = 1 if key == "instance_count" else 0
    if value < minimum:
        return f"{value} is below {minimum}" + (" (Triton needs at least one instance)" if minimum else "")
    return None


@dataclass(frozen=True)
class SweepGrid:
    """The values each knob takes; a sweep is their cartesian product, invalid and duplicate points dropped."""

    max_batch_size: tuple[int, ...] = (1, 8)
    preferred_batch_size: tuple[PreferredSizes, ...] = ((),)
    max_queue_delay_microseconds: tuple[int, ...] = (2000,)
    instance_count: tuple[int, ...] = (1, 2)
    intra_op_thread_count: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        for knob in fields(self):
            values = getattr(self, knob.name)
            if not values:
                raise SweepError(f"sweep grid field '{knob.name}' has no value; give at least one")
            for value in values:
                reason = _invalid_value(knob.name, value)
                if reason:
                    raise SweepError(f"sweep grid field '{knob.name}': {reason}")

    @property
    def size(self) -> int:
        """Combinations before invalid and duplicate ones are dropped."""
        return math.prod(len(getattr(self, knob.name)) for knob in fields(self))


GRID_KEYS = tuple(knob.name for knob in fields(SweepGrid))

#: Every point costs a model load plus a few load levels of minutes each, and the product grows fast (three
#: values per knob is 243 configs), so the default asks two questions only: does dynamic batching up to 8 pay
#: (max_batch_size 1 vs 8), and do two instances beat one? One intra-op thread per instance keeps 2 instances
#: x 1 thread within the 2 cores of the host this suite is sized for (ONNX Runtime's default, a thread per
#: core in each instance, would put 4 spinning threads on 2 cores). No preferred batch size, so that the 2 ms
#: queue delay applies at all (with base_model_cpu's 1|2|4|8 Triton sends whatever is queued at once); 2 ms is
#: small beside a BLIP-base request on CPU (hundreds of ms) and lets concurrent requests meet in one batch.
#: 4 configs: mbs1_i1, mbs1_i2, mbs8_i1, mbs8_i2.
DEFAULT_GRID = SweepGrid()


def _parse_int(spec: str, key: str, token: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise SweepError(
            f"--sweep-grid {spec!r}: {key} value {token!r} is not a whole number; write e.g. {key}=1,2"
        ) from None


def _parse_preferred(spec: str, token: str) -> PreferredSizes:
    if token.lower() == AUTO:
        return AUTO
    if token.lower() == NO_PREFERRED:
        return ()
    parts = [part.strip() for part in token.split("|")]
    if any(not part for part in parts):
        raise SweepError(
            f"--sweep-grid {spec!r}: preferred_batch_size value {token!r} has an empty size; separate sizes "
            "with '|', e.g. preferred_batch_size=2|4,auto"
        )
    sizes = []
    for part in parts:
        try:
            sizes.append(int(part))
        except ValueError:
            raise SweepError(
                f"--sweep-grid {spec!r}: preferred_batch_size value {token!r}: {part!r} is not a whole number; "
                f"use '{AUTO}', '{NO_PREFERRED}' or sizes separated by '|', e.g. 2|4"
            ) from None
    return tuple(sorted(set(sizes)))


def parse_grid(specs: Sequence[str]) -> SweepGrid:
    """The grid of repeatable `--sweep-grid KEY=V1,V2` specs; keys not given keep DEFAULT_GRID's values."""
    given: dict[str, tuple] = {}
    for spec in specs:
        key, separator, text = (part.strip() for part in spec.partition("="))
        if not separator or not key:
            raise SweepError(
                f"--sweep-grid {spec!r}: expected KEY=V1,V2,... e.g. instance_count=1,2; keys: {', '.join(GRID_KEYS)}"
            )
        if key not in GRID_KEYS:
            raise SweepError(f"--sweep-grid {spec!r}: unknown key '{key}'; use one of {', '.join(GRID_KEYS)}")
        if key in given:
            raise SweepError(
                f"--sweep-grid {spec!r}: {key} is given twice; put all its values in one spec, e.g. {key}=1,2"
            )
        tokens = [token.strip() for token in text.split(",")]
        if any(not token for token in tokens):
            raise SweepError(
                f"--sweep-grid {spec!r}: {key} has an empty value; list values separated by commas, e.g. {key}=1,2"
            )
        if key == "preferred_batch_size":
            values = [_parse_preferred(spec, token) for token in tokens]
        else:
            values = [_parse_int(spec, key, token) for token in tokens]
        for value in values:
            reason = _invalid_value(key, value)
            if reason:
                raise SweepError(f"--sweep-grid {spec!r}: {key} {reason}; give values the field accepts")
        given[key] = tuple(dict.fromkeys(values))  # a value listed twice is one point, not two
    return replace(DEFAULT_GRID, **given)


# ------------------------------------------------------------------------------------------ the points


@dataclass(frozen=True, eq=False)  # identity equality: a config protobuf is not hashable
class SweepPoint:
    """One config of the sweep: the knob values and the ModelConfig that carries them."""

    name: str
    max_batch_size: int
    dynamic_batching: bool  # False for max_batch_size 0 or 1, where there is nothing to batch
    preferred_batch_size: tuple[int, ...]  # () when none is set
    max_queue_delay_microseconds: int  # 0 without dynamic batching
    instance_count: int  # per instance group of the base config
    intra_op_thread_count: int  # 0: ONNX Runtime's default
    config: model_config_pb2.ModelConfig

    @property
    def knobs(self) -> dict[str, str]:
        """The knob values as the CSV and the markdown table write them."""
        return {
            "max_batch_size": str(self.max_batch_size),
            "preferred_batch_size": (
                ("|".join(map(str, self.preferred_batch_size)) or NO_PREFERRED) if self.dynamic_batching else "-"
            ),
            "max_queue_delay_microseconds": str(self.max_queue_delay_microseconds) if self.dynamic_batching else "-",
            "instance_count": str(self.instance_count),
            "intra_op_thread_count": str(self.intra_op_thread_count) if self.intra_op_thread_count else "default",
        }


def _powers_of_two_up_to(limit: int) -> tuple[int, ...]:
    return tuple(2**exponent for exponent in range(limit.bit_length()) if 2**exponent <= limit)


def point_name(
    base_name: str,
    max_batch_size: int,
    preferred: tuple[int, ...] | None,
    queue_delay_us: int,
    instances: int,
    threads: int,
) -> str:
    """e.g. `base_model_cpu__mbs8_q2000_pnone_i2_t1`; `preferred=None`: no dynamic batching (no q, p parts)."""
    batching = ""
    if preferred is not None:
        batching = f"_q{queue_delay_us}_p{'-'.join(map(str, preferred)) or NO_PREFERRED}"
    return f"{base_name}__mbs{max_batch_size}{batching}_i{instances}_t{threads}"


def _point_config(
    base_config: model_config_pb2.ModelConfig,
    name: str,
    max_batch_size: int,
    preferred: tuple[int, ...] | None,
    queue_delay_us: int,
    instances: int,
    threads: int,
) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(base_config)
    config.name = name
    config.max_batch_size = max_batch_size  # dims stay: above 0, Triton adds the batch dimension itself
    if preferred is None:
        config.ClearField("dynamic_batching")
    else:
        batching = config.dynamic_batching  # the base's other batching fields (priorities, policies) stay
        batching.SetInParent()
        del batching.preferred_batch_size[:]
        batching.preferred_batch_size.extend(preferred)
        batching.max_queue_delay_microseconds = queue_delay_us
    if not config.instance_group:
        config.instance_group.add()  # kind KIND_AUTO, as Triton reads a config without instance_group
    for group in config.instance_group:
        group.count = instances  # kind, gpus and the rest of the group are the base's
    if threads:
        config.parameters[THREAD_PARAMETER].string_value = str(threads)
    elif THREAD_PARAMETER in config.parameters:
        del config.parameters[THREAD_PARAMETER]
    return config


def as_given_point(base_name: str, base_config: model_config_pb2.ModelConfig) -> SweepPoint:
    """The swept variant's own config, unchanged but for its name: measured beside the grid, as Model Analyzer
    measures the default config, so the sweep's winner is never worse than what is deployed (under the budget)."""
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(base_config)
    config.name = f"{base_name}__as_given"
    batching = config.dynamic_batching if config.HasField("dynamic_batching") else None
    threads = config.parameters[THREAD_PARAMETER].string_value if THREAD_PARAMETER in config.parameters else ""
    return SweepPoint(
        name=config.name,
        max_batch_size=config.max_batch_size,
        dynamic_batching=batching is not None,
        preferred_batch_size=tuple(batching.preferred_batch_size) if batching is not None else (),
        max_queue_delay_microseconds=batching.max_queue_delay_microseconds if batching is not None else 0,
        instance_count=max((group.count for group in config.instance_group), default=0) or 1,
        intra_op_thread_count=int(threads) if threads.isdigit() else 0,
        config=config,
    )


def sweep_points(base_name: str, base_config: model_config_pb2.ModelConfig, grid: SweepGrid) -> list[SweepPoint]:
    """Every valid, distinct point of `grid` applied to a copy of `base_config`, in grid order.

    Dropped: a preferred batch size above max_batch_size. Collapsed: with max_batch_size 0 or 1 the queue delay
    and preferred sizes mean nothing, so those points are one point without dynamic batching.
    """
    if not _MODEL_NAME.match(base_name):
        raise SweepError(f"base model name {base_name!r} is not a valid model folder name; use letters, digits, _ . -")
    scheduling = base_config.WhichOneof("scheduling_choice")
    if scheduling not in (None, "dynamic_batching"):
        raise SweepError(
            f"{base_name}: the config uses {scheduling}; the sweep sets dynamic_batching, so sweep a stateless "
            "model (one with dynamic_batching or no scheduling field)"
        )
    points: list[SweepPoint] = []
    seen: set[str] = set()
    dropped: list[str] = []
    for max_batch_size, preferred_value, queue_delay_us, instances, threads in itertools.product(
        grid.max_batch_size,
        grid.preferred_batch_size,
        grid.max_queue_delay_microseconds,
        grid.instance_count,
        grid.intra_op_thread_count,
    ):
        preferred: tuple[int, ...] | None = None
        if max_batch_size > 1:
            preferred = _powers_of_two_up_to(max_batch_size) if preferred_value == AUTO else tuple(preferred_value)
            too_large = [size for size in preferred if size > max_batch_size]
            if too_large:
                dropped.append(
                    f"preferred_batch_size {'|'.join(map(str, preferred))} with max_batch_size {max_batch_size}"
                )
                continue
        else:
            queue_delay_us = 0
        name = point_name(base_name, max_batch_size, preferred, queue_delay_us, instances, threads)
        if name in seen:
            continue  # the name carries every knob, so one name is one config
        seen.add(name)
        config = _point_config(base_config, name, max_batch_size, preferred, queue_delay_us, instances, threads)
        points.append(
            SweepPoint(
                name=name,
                max_batch_size=max_batch_size,
                dynamic_batching=preferred is not None,
                preferred_batch_size=preferred or (),
                max_queue_delay_microseconds=queue_delay_us,
                instance_count=instances,
                intra_op_thread_count=threads,
                config=config,
            )
        )
    if base_config.max_batch_size > 0 and any(point.max_batch_size == 0 for point in points):
        logger.warning(
            "sweep of %s: max_batch_size 0 serves tensors of exactly the config's dims, without the batch "
            "dimension %s's model and requests have; expect those points to fail to load",
            base_name,
            base_name,
        )
    if dropped:
        logger.info("sweep of %s: dropped %s (preferred sizes above max_batch_size)", base_name, "; ".join(dropped))
    if not points:
        raise SweepError(
            f"every point of the sweep grid of {base_name} is invalid ({'; '.join(dict.fromkeys(dropped))}): "
            "give preferred_batch_size values no larger than max_batch_size, or preferred_batch_size=auto"
        )
    return points


def config_text(config: model_config_pb2.ModelConfig) -> str:
    """The config in protobuf text format, as config.pbtxt holds it."""
    return text_format.MessageToString(config)


def write_config(config: model_config_pb2.ModelConfig, path: Path) -> None:
    write_text_atomic(path, config_text(config))


# ------------------------------------------------------------------------------------------ the results


@dataclass(frozen=True)
class SweepMeasurement:
    """One swept config measured at one load level."""

    point_name: str
    level_id: str  # LoadLevel.level_id, e.g. "concurrency=4"
    level_value: float  # requests in flight, or requests per second offered
    throughput_infer_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    stable: bool
    errors: int
    mode: str = CONCURRENCY  # blip_triton_bench.load.engine's CONCURRENCY or REQUEST_RATE

    @property
    def usable(self) -> bool:
        """Stable, error-free and with numbers: a point the frontier and the choice may rest on."""
        return (
            self.stable
            and self.errors == 0
            and math.isfinite(self.throughput_infer_per_s)
            and math.isfinite(self.latency_p99_ms)
        )


def _sort_key(measurement: SweepMeasurement) -> tuple:
    return (
        measurement.throughput_infer_per_s,
        measurement.latency_p99_ms,
        measurement.point_name,
        measurement.level_value,
    )


def pareto_frontier(measurements: Iterable[SweepMeasurement]) -> list[SweepMeasurement]:
    """Usable measurements no other beats on both throughput (higher) and p99 (lower), by throughput ascending.

    Two measurements with the same throughput and p99 are both on the frontier: neither dominates the other.
    """
    usable = [m for m in measurements if m.usable]

    def dominated(m: SweepMeasurement) -> bool:
        return any(
            other.throughput_infer_per_s >= m.throughput_infer_per_s
            and other.latency_p99_ms <= m.latency_p99_ms
            and (other.throughput_infer_per_s > m.throughput_infer_per_s or other.latency_p99_ms < m.latency_p99_ms)
            for other in usable
        )

    return sorted((m for m in usable if not dominated(m)), key=_sort_key)


def best_under_budget(
    measurements: Iterable[SweepMeasurement], latency_budget_ms: float | None
) -> SweepMeasurement | None:
    """The highest-throughput usable measurement with p99 <= budget (any p99 when None); ties: lower p99.

    None when no usable measurement fits.
    """
    if latency_budget_ms is not None and not latency_budget_ms > 0:
        raise SweepError(f"--latency-budget-ms {latency_budget_ms}: the p99 budget must be a positive number of ms")
    fitting = [
        m for m in measurements if m.usable and (latency_budget_ms is None or m.latency_p99_ms <= latency_budget_ms)
    ]
    if not fitting:
        return None
    return min(fitting, key=lambda m: (-m.throughput_infer_per_s, m.latency_p99_ms, m.point_name, m.level_value))


def ordered_measurements(
    points: Sequence[SweepPoint], measurements: Sequence[SweepMeasurement]
) -> list[SweepMeasurement]:
    """Config by config in sweep order, each config's levels ascending; every measurement must name a point."""
    order = {point.name: index for index, point in enumerate(points)}
    unknown = sorted({m.point_name for m in measurements} - order.keys())
    if unknown:
        raise SweepError(
            f"measurements name {', '.join(unknown)}, which are not among the swept points; pass the points the "
            "measurements were taken of"
        )
    return sorted(measurements, key=lambda m: (order[m.point_name], m.mode, m.level_value))


# ------------------------------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class SweepFailure:
    """A point the sweep could not finish (its load, its output check or a level raised): the cause, and how
    many of its levels were measured before it (those stay in the report)."""

    point_name: str
    cause: str  # the exception's type and message, e.g. "ServerStartError: Triton failed to load model ..."
    levels_measured: int = 0

    @property
    def headline(self) -> str:
        """The cause's first line: a server's load error carries its log lines after it."""
        return self.cause.splitlines()[0] if self.cause else ""


@dataclass
class SweepResult:
    """What the sweep has so far: measurements of the points that ran, and the points that failed."""

    measurements: list[SweepMeasurement] = field(default_factory=list)
    failures: list[SweepFailure] = field(default_factory=list)


def run_sweep(
    points: Sequence[SweepPoint],
    measure_point: Callable[[SweepPoint], Iterable[SweepMeasurement]],
    on_progress: Callable[[SweepResult], None],
) -> SweepResult:
    """Measure each point in turn; `on_progress` sees the result after every point (it writes the report, so a
    fault later in an hour-long sweep keeps what was measured). A point that raises is a SweepFailure and the
    sweep goes on: one config that does not load says nothing about the next."""
    result = SweepResult()
    for point in points:
        measured = 0
        try:
            for measurement in measure_point(point):
                result.measurements.append(measurement)
                measured += 1
        except Exception as error:  # not BaseException: Ctrl-C still stops the sweep
            result.failures.append(SweepFailure(point.name, f"{type(error).__name__}: {error}", measured))
        on_progress(result)
    return result


def point_measurements(
    point: SweepPoint,
    server: RunningServer,
    repository_root: Path,
    model_files: Sequence[Path],
    model_filename: str,
    inputs: ModelInputs,
    check_outputs: Callable[[str, ModelInputs], None],
    levels: Sequence[LoadLevel],
    load: LoadSettings,
    on_load: Callable[[str, ModelLoad | ServerStartError], None],
    workers: WorkerPool | None = None,
) -> Iterator[SweepMeasurement]:
    """Stage and load `point`, check its outputs (a point whose outputs `check_outputs` rejects is not worth
    timing), then measure it at every level (from `workers` when given), unloading it after; a failed load is
    passed to `on_load` too."""
    from blip_triton_bench.load.engine import measure_level
    from blip_triton_bench.repository.variants import stage_generated

    stage_generated(repository_root, point.config, list(model_files), model_filename)
    try:
        loaded = server.load_model(point.name)
    except ServerStartError as error:
        on_load(point.name, error)
        raise
    on_load(point.name, loaded)
    try:
        check_outputs(point.name, inputs)
        for level in levels:
            summary = measure_level(server.endpoints.grpc_url, point.name, inputs, level, load, workers=workers).summary
            yield SweepMeasurement(
                point_name=point.name,
                level_id=level.level_id,
                level_value=level.value,
                throughput_infer_per_s=summary.throughput_infer_per_s,
                latency_p50_ms=summary.latency_p50_ms,
                latency_p99_ms=summary.latency_p99_ms,
                stable=summary.stable,
                errors=summary.errors,
                mode=level.mode,
            )
    finally:
        server.unload_model(point.name)
