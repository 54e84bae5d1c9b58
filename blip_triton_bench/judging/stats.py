"""Statistics over the per-window samples of a load level: window summaries, stability, the level's result.

Pure functions over plain numbers (no pytest, Triton or Docker), following perf_analyzer's method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: perf_analyzer's defaults: `--stability-percentage 10` over the last 3 measurement windows.
DEFAULT_STABILITY_WINDOWS = 3
DEFAULT_STABILITY_PCT = 10.0
#: perf_analyzer's default `--max-trials`.
DEFAULT_MAX_WINDOWS = 10

REPORTED_PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class WindowSample:
    """What the load generator saw in one measurement window.

    `latencies_ms` has one entry per request that completed inside the window (perf_analyzer counts a
    request in the window where it ends); failed requests are only counted in `errors`. Each request is
    one inference (batch size 1), so requests per second is infer/sec.
    """

    start_s: float
    duration_s: float
    latencies_ms: tuple[float, ...]
    errors: int = 0

    def __post_init__(self) -> None:
        if not self.duration_s > 0:
            raise ValueError(f"a window must last longer than 0 s (got duration_s={self.duration_s})")
        if self.errors < 0:
            raise ValueError(f"errors cannot be negative (got {self.errors})")
        # Accept any sequence from the load loop but keep the frozen sample immutable and hashable.
        object.__setattr__(self, "latencies_ms", tuple(float(latency) for latency in self.latencies_ms))


@dataclass(frozen=True)
class WindowStats:
    """One window summarized. Latencies are NaN when no request completed in the window."""

    count: int
    errors: int
    throughput_infer_per_s: float
    latency_avg_ms: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p95_ms: float
    latency_p99_ms: float


@dataclass(frozen=True)
class Stability:
    """Whether a level's last windows agree, which windows were judged, and why, in words.

    Variation is perf_analyzer's measure: (max / min - 1) x 100 of the per-window values.
    """

    stable: bool
    window_indices: tuple[int, ...]
    reason: str
    throughput_variation_pct: float
    latency_variation_pct: float


@dataclass(frozen=True)
class LevelSummary:
    """The result of one load level (a concurrency or a request rate), from the windows stability used.

    Throughput is the median of the per-window throughputs; latencies are computed over all requests of
    those windows together. The run's own spread of a per-window value is

        spread_pct = (max - min) / median x 100

    over the used windows (0 with a single window): the width of the band the windows fell in, relative
    to the value reported. A change against a baseline smaller than this spread cannot be told from noise.
    """

    window_indices: tuple[int, ...]
    request_count: int
    errors: int
    throughput_infer_per_s: float
    latency_avg_ms: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    throughput_spread_pct: float
    p99_spread_pct: float
    stable: bool
    stability_reason: str
    #: the per-window throughputs of the used windows, in order: what a multi-run verdict tests and stores
    window_throughputs_infer_per_s: tuple[float, ...] = ()

    def metrics(self) -> dict[str, float]:
        """The numbers a baseline stores for this level, under the names the verdict compares."""
        return {
            "throughput_infer_per_s": self.throughput_infer_per_s,
            "latency_avg_ms": self.latency_avg_ms,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p90_ms": self.latency_p90_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "throughput_spread_pct": self.throughput_spread_pct,
            "p99_spread_pct": self.p99_spread_pct,
            "request_count": float(self.request_count),
        }


def latency_percentile(sorted_latencies_ms: np.ndarray, percentile: float) -> float:
    """perf_analyzer's percentile: the observed latency at rank round(p/100 x (n - 1)), halves rounded up.

    Chosen over numpy's default linear interpolation so that our p99 is the same number perf_analyzer
    prints for the same requests (users compare the two), and it is always a latency that was observed.
    """
    count = len(sorted_latencies_ms)
    if count == 0:
        return math.nan
    # Same expression as perf_analyzer's SummarizeLatency, so ranks at exact halves agree too.
    index = int((percentile / 100.0) * (count - 1) + 0.5)
    return float(sorted_latencies_ms[index])


def _latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    ordered = np.sort(np.asarray(latencies_ms, dtype=np.float64))
    summary = {"latency_avg_ms": float(ordered.mean()) if len(ordered) else math.nan}
    for percentile in REPORTED_PERCENTILES:
        summary[f"latency_p{percentile}_ms"] = latency_percentile(ordered, percentile)
    return summary


def summarize_window(sample: WindowSample) -> WindowStats:
    return WindowStats(
        count=len(sample.latencies_ms),
        errors=sample.errors,
        throughput_infer_per_s=len(sample.latencies_ms) / sample.duration_s,
        **_latency_summary(sample.latencies_ms),
    )


def _max_over_min(values: Sequence[float]) -> float:
    if any(math.isnan(value) for value in values):
        return math.nan
    low, high = min(values), max(values)
    if low <= 0:
        return 1.0 if high == low else math.inf
    return high / low


def variation_pct(values: Sequence[float]) -> float:
    """perf_analyzer's stability measure, (max / min - 1) x 100; infinite when only the minimum is 0."""
    return (_max_over_min(values) - 1.0) * 100.0


def spread_pct(values: Sequence[float]) -> float:
    """(max - min) / median x 100 of `values`: the run's own spread (see LevelSummary)."""
    finite = [value for value in values if math.isfinite(value)]
    if len(finite) != len(values):
        return math.nan
    median = float(np.median(finite))
    if median == 0:
        return 0.0 if max(finite) == min(finite) else math.inf
    return (max(finite) - min(finite)) / median * 100.0


@dataclass(frozen=True)
class WindowRates:
    """What the stability rule reads of one window, whatever the level measures: its throughput and its mean
    latency (NaN where nothing ended in it, which the rule reads as an empty window)."""

    throughput: float
    mean_latency_ms: float


@dataclass(frozen=True)
class StabilityTerms:
    """How the rule's reasons name a kind of level's throughput and latency, and the fix for an empty window."""

    throughput: str = "throughput"
    latency: str = "average latency"
    empty_window: str = "completed no request; lengthen the measurement window"


REQUEST_TERMS = StabilityTerms()


def stability_of(
    rates: Sequence[WindowRates],
    stability_windows: int = DEFAULT_STABILITY_WINDOWS,
    stability_pct: float = DEFAULT_STABILITY_PCT,
    terms: StabilityTerms = REQUEST_TERMS,
) -> Stability:
    """perf_analyzer's stability rule over the LAST `stability_windows` windows (earlier ones never count): one rule
    for request levels (infer/s, mean request latency) and caption levels (output tokens/s, mean caption latency).

    Stable when every one of them ended something and, for throughput and for mean latency alike,
    max / min <= 1 + stability_pct / 100 (perf_analyzer's IsInferWindowStable / IsLatencyWindowStable).
    With fewer windows than that the level is not stable yet; the indices are then all windows so far.
    """
    if stability_windows < 1:
        raise ValueError(f"stability_windows must be at least 1 (got {stability_windows})")
    first = max(0, len(rates) - stability_windows)
    indices = tuple(range(first, len(rates)))
    judged = [rates[index] for index in indices]
    throughputs = [window.throughput for window in judged]
    latencies = [window.mean_latency_ms for window in judged]
    throughput_variation = variation_pct(throughputs) if judged else math.nan
    latency_variation = variation_pct(latencies) if judged else math.nan

    def unstable(reason: str) -> Stability:
        return Stability(False, indices, reason, throughput_variation, latency_variation)

    if len(rates) < stability_windows:
        return unstable(f"only {len(rates)} window(s) measured; stability needs the last {stability_windows}")
    empty = [index for index, latency in zip(indices, latencies, strict=True) if not math.isfinite(latency)]
    if empty:
        return unstable(f"the window(s) at index {', '.join(map(str, empty))} {terms.empty_window}")
    span = f"across the last {stability_windows} windows (limit {stability_pct:g}%)"
    # perf_analyzer's comparison, max / min <= 1 + threshold, kept literally so the boundary agrees.
    limit_ratio = 1.0 + stability_pct / 100.0
    too_varied = [
        f"{name} varied {variation_pct(values):.1f}%"
        for name, values in ((terms.throughput, throughputs), (terms.latency, latencies))
        if not _max_over_min(values) <= limit_ratio
    ]
    if too_varied:
        return unstable(f"{' and '.join(too_varied)} {span}")
    return Stability(
        True,
        indices,
        f"{terms.throughput} varied {throughput_variation:.1f}% and {terms.latency} {latency_variation:.1f}% {span}",
        throughput_variation,
        latency_variation,
    )


class _RequestWindowRates(Sequence[WindowRates]):
    """A request level's windows as the stability rule reads them, each summarised only when the rule reads it
    (it reads the last `stability_windows`): infer/s and mean request latency; NaN latency for an empty window."""

    def __init__(self, windows: Sequence[WindowSample]) -> None:
        self._windows = windows

    def __len__(self) -> int:
        return len(self._windows)

    def __getitem__(self, index):  # type: ignore[override]  # only int indices are read
        summary = summarize_window(self._windows[index])
        return WindowRates(summary.throughput_infer_per_s, summary.latency_avg_ms if summary.count else math.nan)


def assess_stability(
    windows: Sequence[WindowSample],
    stability_windows: int = DEFAULT_STABILITY_WINDOWS,
    stability_pct: float = DEFAULT_STABILITY_PCT,
) -> Stability:
    """`stability_of` a request level's windows: infer/s and mean request latency; a window that completed no
    request is empty. Only the judged tail is summarised."""
    return stability_of(_RequestWindowRates(windows), stability_windows, stability_pct)


def needs_more_windows(
    windows: Sequence[WindowSample],
    max_windows: int = DEFAULT_MAX_WINDOWS,
    stability_windows: int = DEFAULT_STABILITY_WINDOWS,
    stability_pct: float = DEFAULT_STABILITY_PCT,
) -> bool:
    """For the load loop: measure another window while the level is unstable and `max_windows` allows."""
    if len(windows) >= max_windows:
        return False
    return not assess_stability(windows, stability_windows, stability_pct).stable


def summarize_level(windows: Sequence[WindowSample], stability: Stability) -> LevelSummary:
    """Summarize the windows `stability` judged (the last N), stable or not, as perf_analyzer reports them."""
    if not stability.window_indices:
        raise ValueError("no window was measured for this level")
    used = [windows[index] for index in stability.window_indices]
    per_window = [summarize_window(window) for window in used]
    all_latencies = [latency for window in used for latency in window.latencies_ms]
    throughputs = [s.throughput_infer_per_s for s in per_window]
    return LevelSummary(
        window_indices=stability.window_indices,
        request_count=len(all_latencies),
        errors=sum(window.errors for window in used),
        throughput_infer_per_s=float(np.median(throughputs)),
        **_latency_summary(all_latencies),
        throughput_spread_pct=spread_pct(throughputs),
        p99_spread_pct=spread_pct([s.latency_p99_ms for s in per_window]),
        stable=stability.stable,
        stability_reason=stability.reason,
        window_throughputs_infer_per_s=tuple(throughputs),
    )


#: z for a two-sided 95 % confidence interval: a difference inside +-1.96 standard errors cannot be told from 0.
Z_95 = 1.96


def detectable_change_pct(measured: Sequence[float], baseline: Sequence[float], baseline_center: float) -> float:
    """The smallest change of the mean that this pair of samples could tell from zero at 95 % confidence:

        detectable_pct = 1.96 x sqrt(s1^2 / n1 + s2^2 / n2) / baseline_center x 100

    s1, n1: the sample standard deviation and count of `measured` (this run's per-window values); s2, n2: those
    of `baseline` (the baseline's per-window values, all its runs pooled, so that drift between its runs counts
    as spread). A baseline with fewer than 2 values (a schema-1 file stores no windows) is taken to be as noisy
    as this run (s2 = s1, n2 = n1). NaN when `measured` has fewer than 2 values or the center is not positive.
    Windows are treated as independent samples, which consecutive windows on one host only approximately are.
    """
    if len(measured) < 2 or not (math.isfinite(baseline_center) and baseline_center > 0):
        return math.nan
    measured_sd, measured_n = float(np.std(measured, ddof=1)), len(measured)
    if len(baseline) >= 2:
        baseline_sd, baseline_n = float(np.std(baseline, ddof=1)), len(baseline)
    else:
        baseline_sd, baseline_n = measured_sd, measured_n
    standard_error = math.sqrt(measured_sd**2 / measured_n + baseline_sd**2 / baseline_n)
    return Z_95 * standard_error / baseline_center * 100.0


@dataclass(frozen=True)
class ServerStatistics:
    """Deltas of Triton's statistics API for one model over the measured interval."""

    inference_count: int
    execution_count: int
    success_count: int
    queue_ms: float  # averages per successful request
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    executions_by_batch_size: dict[int, int] = field(default_factory=dict)

    @property
    def average_batch_size(self) -> float:
        return self.inference_count / self.execution_count if self.execution_count else 0.0
