"""A session's performance run: per-variant load levels, the client ceiling, baseline lookup and verdicts.

Holds what the perf tests measured so the report and `--update-baselines` can use it at session end;
everything numeric is delegated to blip_triton_bench/load/engine.py, blip_triton_bench/judging/stats.py and blip_triton_bench/judging/verdict.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from blip_triton_bench.host.files import write_fix
from blip_triton_bench.host.software import software_changes
from blip_triton_bench.judging.baselines import (
    DIR_FLAG,
    Baseline,
    BaselineError,
    BaselineStore,
    Fingerprint,
    record_command,
)
from blip_triton_bench.judging.proof import Judgement, verdict_outcome
from blip_triton_bench.judging.slo import (
    REQUEST_QUANTITIES,
    RequestOutcome,
    ServiceLevel,
    SLOError,
    SLOResult,
    config_service_level,
    judge_level,
    parse_slo,
    window_outcomes,
)
from blip_triton_bench.judging.verdict import (
    DEFAULT_TOLERANCE_PCT,
    Verdict,
    compare_level,
    tolerance_error,
    usable_tolerance,
)
from blip_triton_bench.load.ceiling import CEILING_MODEL_NAME, NEAR_CEILING_FRACTION
from blip_triton_bench.load.engine import (
    CONCURRENCY,
    LevelAborted,
    LevelMeasurement,
    LoadLevel,
    LoadSettings,
    concurrency_levels,
    measure_level,
    request_rate_levels,
)
from blip_triton_bench.model.workload import ModelInputs
from blip_triton_bench.options import BenchOptions
from blip_triton_bench.repository.variants import Variant
from blip_triton_bench.runs.ceiling_cache import CeilingCache, RememberedCeiling, ceiling_key
from blip_triton_bench.servers.base import RunningServer, ServerStartError
from blip_triton_bench.servers.resources import ResourceSampler, ResourceSource, ResourceUsage

if TYPE_CHECKING:
    from blip_triton_bench.load.workers import WorkerPool

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = "1:4:1"  # the seed's perf_analyzer --concurrency-range
#: Per-variant settings ride in the variant's own config.pbtxt `parameters`, so another repository of
#: configs carries its own; Triton hands unknown parameters to the backend, which ignores these.
CONCURRENCY_PARAMETER = "bench_concurrency"
REQUEST_RATE_PARAMETER = "bench_request_rate"
TOLERANCE_PARAMETER = "bench_tolerance_pct"
#: The least served / in-process throughput ratio the variant must reach (suite/test_serving_efficiency.py).
MIN_EFFICIENCY_PARAMETER = "bench_min_serving_efficiency"


class UnstableMeasurement(UserWarning):
    """A level never met perf_analyzer's stability criterion within --max-windows: reported, never recorded."""


class RecordedOverRegression(UserWarning):
    """--update-baselines recorded numbers that the previous baseline calls a regression."""


class PerfConfigError(ValueError):
    """A per-variant bench_* parameter that cannot be used."""


class VariantStopped(RuntimeError):
    """A level ended early (the server is gone, or requests timed out), so the variant's other levels are not
    measured. `first` is False for those other levels: the first one's message already said why."""

    def __init__(self, message: str, first: bool = True) -> None:
        super().__init__(message)
        self.first = first


#: Log lines quoted when a level stops because the server went away (they usually say why it did).
STOPPED_LOG_LINES = 20


def stopped_message(cause: str, variant: str, level_id: str, log_tail: str) -> str:
    """`tritonserver exited with code -9 during base_model_cpu concurrency=2; last log lines: ...`"""
    message = f"{cause} during {variant} {level_id}"
    return f"{message}; last log lines:\n{log_tail}" if log_tail.strip() else message


@dataclass(frozen=True)
class FailedLevel:
    """A level that has no measurement: it stopped because the server went away or hung, or it was not measured
    because an earlier level of its variant had stopped. Reported beside the measured ones."""

    variant: str
    level_id: str
    cause: str  # first line: the reason; the rest, when any, the server's last log lines

    def to_dict(self) -> dict[str, str]:
        return {"variant": self.variant, "level": self.level_id, "cause": self.cause}


@dataclass(frozen=True)
class PerfSettings:
    load: LoadSettings
    concurrency: str | None  # --concurrency: overrides every variant's own range
    request_rate: str | None  # --request-rate: open-loop levels (none unless asked for)
    tolerance_pct: float | None  # --tolerance-pct: overrides every variant's own tolerance
    sequence_length: int = 16
    update_baselines: bool = False
    require_baselines: bool = False
    baseline_runs: int = 1  # --baseline-runs: how many recorded runs a level's baseline keeps
    slo: str | None = None  # --slo: overrides every variant's own bench_slo

    @classmethod
    def from_options(
        cls, options: BenchOptions, restricted_api_headers: Mapping[str, Mapping[str, str]] | None = None
    ) -> PerfSettings:
        """The run's settings; `restricted_api_headers` (RunningServer.restricted_api_headers) let shared-memory
        registration through to a server started with the run's key."""
        return cls(
            load=LoadSettings(
                restricted_api_headers=dict(restricted_api_headers or {}),
                protocol=options.protocol,
                window_s=options.window_s,
                min_requests_per_window=options.min_requests_per_window,
                warmup_s=options.warmup_s,
                max_windows=options.max_windows,
                stability_pct=options.stability_pct,
                arrival=options.request_distribution,
                shared_memory=options.shared_memory,
                request_timeout_s=options.request_timeout_s,
            ),
            concurrency=options.concurrency,
            request_rate=options.request_rate,
            tolerance_pct=options.tolerance_pct,
            sequence_length=options.sequence_length,
            update_baselines=options.update_baselines,
            require_baselines=options.require_baselines,
            baseline_runs=options.baseline_runs,
            slo=options.slo,
        )


def bench_parameter(variant: Variant, key: str) -> str | None:
    parameter = variant.config.parameters.get(key)
    return parameter.string_value if parameter is not None else None


def variant_levels(variant: Variant, settings: PerfSettings) -> list[LoadLevel]:
    """Concurrency levels (closed loop), then request-rate levels (open loop) when any are asked for. A range that
    cannot be used is named where it was set: the option, or the variant's parameter."""
    concurrency, concurrency_source = _range_text(variant, settings.concurrency, "--concurrency", CONCURRENCY_PARAMETER)
    rate, rate_source = _range_text(variant, settings.request_rate, "--request-rate", REQUEST_RATE_PARAMETER)
    try:
        levels = concurrency_levels(concurrency or DEFAULT_CONCURRENCY, concurrency_source)
        if rate:
            levels += request_rate_levels(rate, rate_source)
    except ValueError as error:
        raise PerfConfigError(f"{variant.config_path}: {error}") from None
    return levels


def _range_text(variant: Variant, given: str | None, option: str, parameter: str) -> tuple[str | None, str]:
    """The level range and what set it: the option when given, else the variant's parameter (None: neither)."""
    if given:
        return given, option
    return bench_parameter(variant, parameter), f"parameters '{parameter}'"


def variant_tolerance_pct(variant: Variant, settings: PerfSettings) -> float:
    if settings.tolerance_pct is not None:
        return settings.tolerance_pct
    text = bench_parameter(variant, TOLERANCE_PARAMETER)
    if text is None:
        return DEFAULT_TOLERANCE_PCT
    try:
        tolerance = float(text)
    except ValueError:
        tolerance = math.nan
    if not usable_tolerance(tolerance):
        raise PerfConfigError(tolerance_error(f"{variant.config_path}: parameters '{TOLERANCE_PARAMETER}'", text))
    return tolerance


def variant_service_level(variant: Variant, settings: PerfSettings) -> ServiceLevel | None:
    """--slo, else the variant's bench_slo parameter, else None (no SLO: levels report no goodput)."""
    if settings.slo is not None:
        return parse_slo(settings.slo)
    try:
        return config_service_level(variant)
    except SLOError as error:
        raise PerfConfigError(str(error)) from None


def variant_min_serving_efficiency(variant: Variant) -> float | None:
    """The config's bench_min_serving_efficiency, a ratio > 0; None when the variant only reports its ratio."""
    text = bench_parameter(variant, MIN_EFFICIENCY_PARAMETER)
    if text is None:
        return None
    try:
        minimum = float(text)
    except ValueError:
        minimum = math.nan
    if not minimum > 0 or math.isinf(minimum):
        raise PerfConfigError(
            f"{variant.config_path}: parameters '{MIN_EFFICIENCY_PARAMETER}' is {text!r}; it must be a ratio above 0 "
            '(served infer/s over in-process infer/s, e.g. "0.8")'
        )
    return minimum


@dataclass(frozen=True)
class JudgedLevel:
    """One measured level with what the baseline says about it."""

    variant: str
    measurement: LevelMeasurement
    tolerance_pct: float
    baseline_path: Path
    baseline_metrics: dict[str, float] | None  # None: no baseline recorded for this level
    verdicts: tuple[Verdict, ...]
    ceiling_infer_per_s: float | None
    resources: ResourceUsage | None = None  # None: not sampled (no resource source was given)
    #: what decided speed and differs from what the baseline was recorded under ("onnxruntime 1.31.1 -> 1.32.0")
    software_changes: tuple[str, ...] = ()
    slo: SLOResult | None = None  # None: no SLO was given for the variant, or none of its targets applies
    capacity_probe: bool = False  # measured by a capacity search (PerfRun.probe_level), judged only against the SLO

    @property
    def level_id(self) -> str:
        return self.measurement.level.level_id

    @property
    def near_ceiling(self) -> bool:
        if not self.ceiling_infer_per_s:
            return False
        return self.measurement.summary.throughput_infer_per_s >= NEAR_CEILING_FRACTION * self.ceiling_infer_per_s

    @property
    def failed_verdicts(self) -> list[Verdict]:
        return [verdict for verdict in self.verdicts if verdict.failed]


STARTUP_LEVEL = "startup"


@dataclass(frozen=True)
class JudgedNumbers:
    """Numbers measured once, not window by window, with the baseline's verdicts (PerfRun.judge_measured_numbers):
    start-up (cold start, model load, first request) under level "startup", caption latency under "caption", a
    caption load level under its own id, a capacity under "capacity[<slo>]"."""

    variant: str
    metrics: dict[str, float]
    tolerance_pct: float
    baseline_path: Path
    baseline_metrics: dict[str, float] | None
    verdicts: tuple[Verdict, ...]
    level_id: str = STARTUP_LEVEL
    software_changes: tuple[str, ...] = ()  # as JudgedLevel's
    slo: SLOResult | None = None  # a caption load level against the SLO, as JudgedLevel's

    @property
    def failed_verdicts(self) -> list[Verdict]:
        return [verdict for verdict in self.verdicts if verdict.failed]


def measured_interval_s(measurement: LevelMeasurement) -> tuple[float, float]:
    """From the first measured window's start to the last one's end (time.perf_counter seconds)."""
    if not measurement.windows:
        return (0.0, -1.0)  # nothing was measured: an empty interval
    last = measurement.windows[-1]
    return measurement.windows[0].start_s, last.start_s + last.duration_s


def missing_baseline_message(
    variant: str, level_id: str, path: Path, pytest_args: list[str], not_used: Sequence[str] = ()
) -> str:
    """`not_used`: why baselines of this variant recorded on another CPU feature set were not compared."""
    why = "".join(f"; {reason}" for reason in not_used)
    return (
        f"no baseline for {variant} {level_id} on this machine ({path}){why}; "
        f"record one with: {record_command(pytest_args)}"
    )


@dataclass
class PerfRun:
    """Accumulates the session's measurements; created once per session by the plugin."""

    settings: PerfSettings
    store: BaselineStore
    fingerprint: Fingerprint
    url: str
    inputs: ModelInputs
    ceiling: Callable[[], float | None]  # the load generator's ceiling, measured on first use
    pytest_args: tuple[str, ...] = ()  # the command line, repeated in "record one with: ..." messages
    progress: Callable[[JudgedLevel], None] = lambda _judged: None
    resources: ResourceSource | None = None  # what the resource sampler reads of the server; None: no sampling
    server: RunningServer | None = None  # asked whether it is alive when requests fail; None: not asked
    workers: WorkerPool | None = None  # --load-workers: the load split across them; None: this process's client
    #: what decides this run's speed besides the hardware (software.speed_software): stored with each baseline run,
    #: compared with the stored one at judging time
    software: dict[str, str] = field(default_factory=dict)
    #: --replay-baselines: the variants the recorded repository holds, whose levels it judges side by side
    replayed: frozenset[str] = frozenset()
    results: list[JudgedLevel] = field(default_factory=list)
    stopped: dict[str, str] = field(default_factory=dict)  # variant -> why its levels stopped
    # variant -> the server generation it stopped on: a server that died and was replaced since serves it again
    stopped_on: dict[str, int] = field(default_factory=dict)
    failed_levels: list[FailedLevel] = field(default_factory=list)
    judged_numbers: list[JudgedNumbers] = field(default_factory=list)
    _baselines: dict[str, Baseline | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Numbers measured through shared memory are only compared with numbers measured the same way; the
        # mode comes with the load settings, so the fingerprint takes it from there.
        if self.fingerprint.shared_memory != self.settings.load.shared_memory:
            self.fingerprint = replace(self.fingerprint, shared_memory=self.settings.load.shared_memory)
        if self.workers is not None:  # named in the fingerprint (and so in a recorded baseline), not keyed
            self.fingerprint = replace(self.fingerprint, load_side=self.workers.describe())

    def baseline_for(self, variant: str) -> Baseline | None:
        """The stored baseline (read once per variant; a corrupt file raises BaselineError every time)."""
        if variant not in self._baselines:
            self._baselines[variant] = self.store.load(self.fingerprint, self.fingerprint.model_id, variant)
        return self._baselines[variant]

    def baseline_path(self, variant: str) -> Path:
        return self.store.path_for(self.fingerprint, self.fingerprint.model_id, variant)

    def _server_generation(self) -> int:
        """How many times the session's server was replaced after dying (0 for one that cannot be)."""
        return int(getattr(self.server, "generation", 0))

    def run_level(self, variant: Variant, level: LoadLevel) -> JudgedLevel:
        """Measure and judge one level; VariantStopped when this level, or an earlier one of the variant, ended
        because the server went away or stopped answering."""
        baseline = self.baseline_for(variant.name)  # fail on a corrupt file before spending time measuring
        measurement, resources = self._measure_or_stop(variant, level)
        stored = baseline.levels.get(level.level_id) if baseline is not None else None
        tolerance = variant_tolerance_pct(variant, self.settings)
        stored_windows = [run.window_throughputs_infer_per_s for run in baseline.runs[level.level_id]] if stored else []
        verdicts = (
            compare_level(
                stored,
                measurement.summary.metrics(),
                tolerance,
                measured_windows=measurement.summary.window_throughputs_infer_per_s,
                baseline_windows=stored_windows,
                measured_latencies_ms=[
                    latency
                    for index in measurement.summary.window_indices
                    for latency in measurement.windows[index].latencies_ms
                ],
            )
            if stored
            else []
        )
        judged = JudgedLevel(
            variant=variant.name,
            measurement=measurement,
            tolerance_pct=tolerance,
            baseline_path=self.baseline_path(variant.name),
            baseline_metrics=dict(stored) if stored else None,
            verdicts=tuple(verdicts),
            ceiling_infer_per_s=self.ceiling() if level.mode == CONCURRENCY else None,
            resources=resources,
            software_changes=self._software_changes(baseline, level.level_id) if stored else (),
            slo=self.level_slo(variant, measurement),
        )
        self.results.append(judged)
        self.progress(judged)
        return judged

    def _measure_or_stop(self, variant: Variant, level: LoadLevel) -> tuple[LevelMeasurement, ResourceUsage | None]:
        """_measure; a level that ends because the server went away or hung stops the variant (VariantStopped)."""
        if variant.name in self.stopped and self.stopped_on.get(variant.name) != self._server_generation():
            del self.stopped[variant.name]  # its server died and a fresh one took its place: measure again
        if variant.name in self.stopped:
            earlier = f"{variant.name} stopped earlier: {self.stopped[variant.name]}"
            self.failed_levels.append(FailedLevel(variant.name, level.level_id, f"not measured: {earlier}"))
            raise VariantStopped(earlier, first=False)
        try:
            return self._measure(variant.name, level)
        except LevelAborted as aborted:
            tail = self.server.log_tail(STOPPED_LOG_LINES) if self.server is not None else ""
            self.stopped[variant.name] = stopped_message(str(aborted), variant.name, level.level_id, tail)
            self.stopped_on[variant.name] = self._server_generation()
            self.failed_levels.append(FailedLevel(variant.name, level.level_id, self.stopped[variant.name]))
            raise VariantStopped(self.stopped[variant.name]) from None

    def probe_level(self, variant: Variant, level: LoadLevel) -> JudgedLevel:
        """Measure a level only to hold it to the variant's SLO (a capacity search's probe): judged against no
        baseline, and kept out of the run's results, so no probe's rate is ever recorded as a level of its own."""
        measurement, resources = self._measure_or_stop(variant, level)
        probe = JudgedLevel(
            variant=variant.name,
            measurement=measurement,
            tolerance_pct=variant_tolerance_pct(variant, self.settings),
            baseline_path=self.baseline_path(variant.name),
            baseline_metrics=None,
            verdicts=(),
            ceiling_infer_per_s=None,
            resources=resources,
            slo=self.level_slo(variant, measurement),
            capacity_probe=True,
        )
        self.progress(probe)  # a search takes minutes on a slow variant: each probe is a line as it ends
        return probe

    def level_slo(self, variant: Variant, measurement: LevelMeasurement) -> SLOResult | None:
        """A request level's judged windows against the variant's SLO."""
        used = [measurement.windows[index] for index in measurement.summary.window_indices]
        duration_s = sum(window.duration_s for window in used)
        return self.service_level_result(variant, window_outcomes(used), duration_s, REQUEST_QUANTITIES, "requests")

    def service_level_result(
        self,
        variant: Variant,
        outcomes: Sequence[RequestOutcome],
        duration_s: float,
        quantities: frozenset[str],
        unit: str,
    ) -> SLOResult | None:
        """Requests (or captions) of one level against the variant's SLO; None without an SLO or an applicable
        target."""
        service_level = variant_service_level(variant, self.settings)
        if service_level is None:
            return None
        return judge_level(service_level, outcomes, duration_s, quantities, unit)

    def _measure(self, model_name: str, level: LoadLevel) -> tuple[LevelMeasurement, ResourceUsage | None]:
        """measure_level with the server's resources sampled throughout; only the samples inside the measured
        windows (warm-up and drain excluded) are summarised, by the windows' own perf_counter stamps."""
        liveness = self.server.liveness if self.server is not None else None
        workers = self.workers
        if self.resources is None:
            return measure_level(self.url, model_name, self.inputs, level, self.settings.load, liveness, workers), None
        with ResourceSampler(self.resources) as sampler:
            measurement = measure_level(self.url, model_name, self.inputs, level, self.settings.load, liveness, workers)
        return measurement, sampler.usage(*measured_interval_s(measurement))

    def _software_changes(self, baseline: Baseline | None, level_id: str) -> tuple[str, ...]:
        runs = baseline.runs.get(level_id, ()) if baseline is not None else ()
        return software_changes([run.software for run in runs], self.software)

    def judge_measured_numbers(
        self,
        variant: Variant,
        metrics: dict[str, float],
        level_id: str = STARTUP_LEVEL,
        slo: SLOResult | None = None,
    ) -> JudgedNumbers:
        """Judge numbers measured once, not window by window (start-up, caption latency, a caption load level, a
        capacity), against the baseline's numbers of the level `level_id`, each within the variant's tolerance; `slo`:
        a caption load level's result against the SLO, kept beside its numbers."""
        baseline = self.baseline_for(variant.name)
        stored = baseline.levels.get(level_id) if baseline is not None else None
        tolerance = variant_tolerance_pct(variant, self.settings)
        result = JudgedNumbers(
            variant=variant.name,
            metrics=dict(metrics),
            tolerance_pct=tolerance,
            baseline_path=self.baseline_path(variant.name),
            baseline_metrics=dict(stored) if stored else None,
            verdicts=tuple(compare_level(stored, metrics, tolerance)) if stored else (),
            level_id=level_id,
            software_changes=self._software_changes(baseline, level_id) if stored else (),
            slo=slo,
        )
        self.judged_numbers.append(result)
        return result

    def recordable_levels(self, variant: str) -> dict[str, dict[str, float]]:
        """Stable, error-free levels of `variant`, and its start-up numbers: what --update-baselines may store."""
        levels = {
            judged.measurement.level.level_id: judged.measurement.summary.metrics()
            for judged in self.results
            if judged.variant == variant and judged.measurement.summary.stable and not judged.measurement.summary.errors
        }
        for result in self.judged_numbers:
            if result.variant == variant:
                levels[result.level_id] = dict(result.metrics)
        return levels

    def recordable_windows(self, variant: str) -> dict[str, tuple[float, ...]]:
        """The per-window throughputs of the levels `recordable_levels` stores (start-up numbers have none)."""
        return {
            judged.measurement.level.level_id: judged.measurement.summary.window_throughputs_infer_per_s
            for judged in self.results
            if judged.variant == variant and judged.measurement.summary.stable and not judged.measurement.summary.errors
        }

    def variants_measured(self) -> list[str]:
        names = [judged.variant for judged in self.results] + [result.variant for result in self.judged_numbers]
        return list(dict.fromkeys(names))


NO_CEILING_ON_EXTERNAL = (
    "client ceiling not measured: --server external does not load models; name one with --ceiling-model NAME"
)
#: The ceiling is measured with short windows at a concurrency high enough to saturate the client.
CEILING_CONCURRENCY = 8
CEILING_WINDOW_S = 2.0


def measure_ceiling(
    server: RunningServer,
    model_name: str,
    url: str,
    inputs: ModelInputs,
    settings: PerfSettings,
    workers: WorkerPool | None = None,
) -> LevelMeasurement:
    """Requests/s the load generator (this process, or its `workers`, each at CEILING_CONCURRENCY) sustains against
    the trivial model: the most any level could show. A server the suite does not own must already serve it
    (ServerStartError otherwise)."""
    if not server.is_model_ready(model_name):
        if not server.loads_models:
            raise ServerStartError(f"--ceiling-model {model_name} is not ready on {server.endpoints.http_url}")
        server.load_model(model_name)
    load = replace(settings.load, window_s=min(settings.load.window_s, CEILING_WINDOW_S), warmup_s=1.0, max_windows=5)
    level = LoadLevel(CONCURRENCY, CEILING_CONCURRENCY * (workers.size if workers is not None else 1))
    return measure_level(url, model_name, inputs, level, load, workers=workers)


@dataclass
class CeilingProbe:
    """The client ceiling, measured on first use against a trivial BLIP-shaped model staged beside the variants
    (so a session whose levels are all skipped never pays for it), then remembered; a note says what it was."""

    server: RunningServer
    repository_root: Path
    image_size: int
    vocab_size: int
    url: str
    inputs: ModelInputs
    settings: PerfSettings
    notes: list[str]
    model_name: str | None = None  # --ceiling-model: a model already served; None: stage the trivial one
    workers: WorkerPool | None = None  # --load-workers: the ceiling of the load side the levels use
    #: ceilings measured by earlier runs on this host, and the key of this run's (host, server, protocol: the
    #: baseline fingerprint's key); None: always measured
    cache: CeilingCache | None = None
    fingerprint_key: str = ""
    _measured: list[float | None] = field(default_factory=list)

    def __call__(self) -> float | None:
        if not self._measured:
            self._measured.append(self._recalled() or self._measured_and_remembered())
        return self._measured[0]

    def _side(self) -> str:
        return "one client process" if self.workers is None else self.workers.describe()

    def _key(self) -> str:
        shapes = {name: tuple(array.shape) for name, array in self.inputs.as_dict().items()}
        model = self.model_name or f"{CEILING_MODEL_NAME}({self.image_size}, {self.vocab_size})"
        return ceiling_key(self.fingerprint_key, model, shapes, self._side(), self.settings.load.shared_memory)

    def _recalled(self) -> float | None:
        if self.cache is None:
            return None
        remembered = self.cache.recall(self._key())
        if remembered is None:
            return None
        self.notes.append(remembered.recalled_note(self.cache.clock(), self.cache.path))
        return remembered.infer_per_s

    def _measured_and_remembered(self) -> float | None:
        ceiling, note = self._measure()
        self.notes.append(note)
        if ceiling is not None and self.cache is not None:
            self.cache.remember(self._key(), RememberedCeiling(ceiling, self.cache.clock(), note))
        return ceiling

    def _measure(self) -> tuple[float | None, str]:
        """The ceiling and a note saying what it was, or None and a note saying why it was not measured (never a
        failed level)."""
        from blip_triton_bench.load.ceiling import stage_ceiling_model

        if self.model_name is None and not self.server.loads_models:
            return None, NO_CEILING_ON_EXTERNAL
        name = self.model_name or stage_ceiling_model(self.repository_root, self.image_size, self.vocab_size)
        try:
            measurement = measure_ceiling(self.server, name, self.url, self.inputs, self.settings, self.workers)
        except (ServerStartError, LevelAborted) as error:
            return None, f"client ceiling not measured: {str(error).splitlines()[0]}"
        ceiling = measurement.summary.throughput_infer_per_s
        return ceiling, (
            f"load generator ceiling ({self.settings.load.protocol}, BLIP-sized payloads, {name}, {self._side()}): "
            f"{ceiling:.1f} infer/s"
            + "".join(
                f"; worker {share.name} on {share.host}: {share.infer_per_s:.1f} infer/s at {share.level.level_id}"
                for share in measurement.load_workers
            )
        )


@dataclass(frozen=True)
class BaselineRecording:
    """What --update-baselines did: lines for the summary, and the variants whose file could not be written."""

    lines: tuple[str, ...]
    not_written: tuple[str, ...] = ()


def not_recorded_line(variant: str, cause: str, fix: str) -> str:
    return f"{variant}: NOT RECORDED: {cause}; fix: {fix}"


def record_baselines(
    run: PerfRun,
    correctness_gate: Callable[[str], str | None],
    keep_repository: Callable[[str], Sequence[str]] | None = None,
) -> BaselineRecording:
    """Store the stable levels of every variant whose correctness passed, each on its own: a file that cannot be
    written (BaselineError, OSError) is a NOT RECORDED line for its variant and the others are still stored.
    `keep_repository(variant)` keeps a copy of what was recorded (recorded_repository.keep_recorded) and names the
    models copied; a copy that fails is a line of its own, and the numbers stay recorded."""
    lines, not_written = [], []
    command = record_command(list(run.pytest_args))
    for variant in run.variants_measured():
        refused = correctness_gate(variant)
        if refused is not None:
            lines.append(f"{variant}: not recorded: {refused}")
            continue
        levels = run.recordable_levels(variant)
        skipped = sorted({j.measurement.level.level_id for j in run.results if j.variant == variant} - set(levels))
        if skipped:
            lines.append(f"{variant}: not recorded (unstable or with errors): {', '.join(skipped)}")
        if not levels:
            continue
        path = run.baseline_path(variant)
        try:
            recorded = Baseline.create(
                run.fingerprint,
                variant,
                command,
                levels,
                window_throughputs=run.recordable_windows(variant),
                software=run.software,
            )
            changes = run.store.save(recorded, overwrite_corrupt=True, max_runs=run.settings.baseline_runs)
        except BaselineError as error:
            not_written.append(variant)
            lines.append(not_recorded_line(variant, f"{error.path}: {error.problem}", error.fix))
            continue
        except OSError as error:
            not_written.append(variant)
            lines.append(
                not_recorded_line(variant, f"cannot write {path} ({error})", write_fix(error, path.parent, DIR_FLAG))
            )
            continue
        lines.append(f"{variant} -> {path}")
        lines.extend(f"  {change}" for change in changes)
        if keep_repository is not None:
            lines.append(kept_line(variant, keep_repository))
    return BaselineRecording(tuple(lines), tuple(not_written))


def kept_line(variant: str, keep_repository: Callable[[str], Sequence[str]]) -> str:
    try:
        kept = keep_repository(variant)
    except OSError as error:
        return f"  its configuration was NOT kept for --replay-baselines ({error}); the numbers are recorded"
    return f"  configuration kept for --replay-baselines: {', '.join(kept)}"


REPLAYED = "judged side by side against the recorded repository by --replay-baselines (suite/test_ab.py)"


def report_replayed(judged: JudgedLevel, judgement: Judgement) -> None:
    """Under --replay-baselines, a level of a variant the recorded repository holds is judged by the A/B test; its
    stored-number change is reported beside it, and fails nothing: that number moves with the host's drift. A
    baseline recorded under other software is not sent here: the replay runs on this run's server and runtime."""
    if judged.baseline_metrics is None:
        judgement.measured(judged.level_id, f"no stored numbers for this machine; {REPLAYED}")
        return
    for verdict in judged.verdicts:
        judgement.measured(
            f"{judged.level_id} {verdict.metric}",
            f"{verdict.change_pct:+.1f} % against the stored numbers, which drift with the host; {REPLAYED}",
        )


def record_judgement(judged: JudgedLevel | JudgedNumbers, judgement: Judgement, unstable_because: str = "") -> None:
    """Each gated metric's verdict as judged; one whose rule does not hold for this measurement (a p99 over too few
    requests), or a pass on a level whose windows never settled, as not judged: neither could have failed."""
    if isinstance(judged, JudgedLevel) and not judged.measurement.summary.stable:
        unstable_because = judged.measurement.summary.stability_reason or "its windows never settled"
    for verdict in judged.verdicts:
        part = f"{judged.level_id} {verdict.metric}"
        if not verdict.gated:
            judgement.not_judged(part, verdict.ungated_because)
        elif unstable_because and not verdict.failed:
            judgement.not_judged(part, f"an unstable level: {unstable_because}")
        else:
            changed = f"; {software_note(judged.software_changes)}" if judged.software_changes else ""
            judgement.judged(
                part,
                verdict_outcome(verdict.status.value),
                f"{verdict.change_pct:+.1f} % against its baseline{changed}",
            )
    if not judged.verdicts:
        judgement.not_judged(judged.level_id, "its baseline holds none of the metrics this level is judged on")


def software_note(changes: Sequence[str]) -> str:
    """What a verdict says where the baseline was recorded under other software: the change may be the upgrade."""
    return f"the baseline was recorded under other software ({'; '.join(changes)}): the change may be that upgrade"
