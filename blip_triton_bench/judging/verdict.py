"""The regression verdict: one measured number against its baseline, judged against tolerance and noise.

Pure functions over plain numbers; the message is what a person reads when a perf test passes or fails.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from blip_triton_bench.judging.stats import detectable_change_pct

#: A change smaller than perf_analyzer's own stability threshold (10%: the variation it accepts between
#: windows of one stable run) cannot be told apart from run-to-run noise, so it is never a regression.
DEFAULT_TOLERANCE_PCT = 10.0
#: A p99 over fewer requests than this is one of the few slowest samples, i.e. mostly its own noise: such
#: a p99 is reported and compared, but its verdict is at most inconclusive, never a failure.
MIN_REQUESTS_FOR_P99_VERDICT = 100
#: Below MIN_REQUESTS_FOR_P99_VERDICT a p99 is judged by how many requests exceed its limit (p99_exceedance): if the
#: p99 were within the limit, each request would exceed it with probability at most 1 %; a count of exceedances that
#: such a p99 gives with probability under this (99 % confidence, MLPerf LoadGen's early-stopping level) is a
#: regression. Requests are not fully independent (a pause slows a few in a row), hence the stricter level.
P99_EXCEEDANCE_P = 0.01
#: A multi-run verdict calls a slowdown significant below this one-sided Mann-Whitney p-value (95 % confidence).
SIGNIFICANCE_P = 0.05
#: Runs with per-window values a baseline needs before its throughput is judged by the test rather than by the
#: single-run rule: 3 windows against 3 can never reach p < 0.05 (the exact test's smallest p is 1/20).
MIN_RUNS_FOR_TEST = 2


class VerdictStatus(StrEnum):
    PASS = "pass"
    IMPROVED = "improved"  # better beyond the tolerance: passes, and the baseline is worth re-recording
    INCONCLUSIVE = "inconclusive"  # worse beyond the tolerance, but within the spread (or not significant)
    REGRESSION = "regression"  # worse beyond the tolerance and beyond the spread: the test fails


@dataclass(frozen=True)
class GatedMetric:
    """A metric the verdict gates on, which direction is good, and which stored spread measures its noise."""

    name: str
    higher_is_better: bool
    spread_metric: str


GATED_METRICS = (
    GatedMetric("throughput_infer_per_s", higher_is_better=True, spread_metric="throughput_spread_pct"),
    GatedMetric("latency_p99_ms", higher_is_better=False, spread_metric="p99_spread_pct"),
    # start-up numbers (the "startup" level): each repeated a few times, spread across the repeats
    GatedMetric("cold_start_s", higher_is_better=False, spread_metric="cold_start_spread_pct"),
    GatedMetric("model_load_s", higher_is_better=False, spread_metric="model_load_spread_pct"),
    GatedMetric("first_request_ms", higher_is_better=False, spread_metric="first_request_spread_pct"),
    # caption numbers (the "caption" level, genai-perf's names): spread across the repeated captions
    GatedMetric("caption_ms", higher_is_better=False, spread_metric="caption_spread_pct"),
    GatedMetric("time_to_first_token_ms", higher_is_better=False, spread_metric="time_to_first_token_spread_pct"),
    GatedMetric("inter_token_latency_ms", higher_is_better=False, spread_metric="inter_token_latency_spread_pct"),
    # caption load levels: spread across the level's windows
    GatedMetric(
        "output_token_throughput_per_s", higher_is_better=True, spread_metric="output_token_throughput_spread_pct"
    ),
    # capacity at an SLO (suite/test_capacity.py): its spread is the search's bracket, met rate to missed rate
    GatedMetric("capacity_per_s", higher_is_better=True, spread_metric="capacity_spread_pct"),
)
HIGHER_IS_BETTER = {metric.name: metric.higher_is_better for metric in GATED_METRICS} | {
    "latency_avg_ms": False,
    "latency_p50_ms": False,
    "latency_p90_ms": False,
    "latency_p95_ms": False,
    "steady_request_ms": False,
    "caption_throughput_per_s": True,
}


@dataclass(frozen=True)
class Verdict:
    """One metric judged.

    `change_pct` is the plain signed relative change, (measured - baseline) / baseline x 100: negative
    when the number went down, whatever the metric (a throughput drop and a latency improvement are both
    negative). `worsening_pct` turns it into the bad direction: positive means worse.
    """

    metric: str
    baseline: float
    measured: float
    change_pct: float
    spread_pct: float
    tolerance_pct: float
    higher_is_better: bool
    status: VerdictStatus
    message: str
    #: one-sided Mann-Whitney U p-value of "worse than the baseline runs"; NaN when no test was made
    p_value: float = math.nan
    #: the smallest slowdown this run could detect (stats.detectable_change_pct, never below the tolerance);
    #: NaN when this run kept too few windows to say
    detectable_pct: float = math.nan
    baseline_runs: int = 1
    #: Why the rule is not valid for this measurement (a p99 over too few requests), where it is not: such a verdict
    #: is reported, never failed on, and counted as not judged in what the run proved
    ungated_because: str = ""

    @property
    def gated(self) -> bool:
        return not self.ungated_because

    @property
    def worsening_pct(self) -> float:
        return -self.change_pct if self.higher_is_better else self.change_pct

    @property
    def failed(self) -> bool:
        return self.status is VerdictStatus.REGRESSION


def _direction(metric_name: str, higher_is_better: bool | None) -> bool:
    if higher_is_better is not None:
        return higher_is_better
    try:
        return HIGHER_IS_BETTER[metric_name]
    except KeyError:
        raise ValueError(f"no known direction for metric {metric_name!r}; pass higher_is_better explicitly") from None


def compare(
    metric_name: str,
    baseline_value: float,
    measured_value: float,
    spread_pct: float,
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
    higher_is_better: bool | None = None,
) -> Verdict:
    """Judge `measured_value` against `baseline_value`.

    A regression is a change in the bad direction beyond `tolerance_pct` AND larger than `spread_pct`
    (the run's noise, see stats.LevelSummary). Worse beyond the tolerance but within the spread is
    inconclusive: the run was too noisy to tell. Better beyond the tolerance is an improvement. A spread
    above the tolerance is called out in the message whatever the outcome, because such a run cannot
    see regressions smaller than its spread. `higher_is_better` defaults to the metric's known direction.
    """
    higher_is_better = _direction(metric_name, higher_is_better)
    if not (math.isfinite(baseline_value) and baseline_value > 0):
        change_pct = math.nan
        status = VerdictStatus.INCONCLUSIVE
        outcome = (
            f"INCONCLUSIVE: the baseline value {baseline_value} cannot anchor a relative change; "
            "re-record it with --update-baselines"
        )
    elif not (math.isfinite(measured_value) and math.isfinite(spread_pct)):
        change_pct = (measured_value - baseline_value) / baseline_value * 100.0
        status = VerdictStatus.INCONCLUSIVE
        outcome = "INCONCLUSIVE: nothing usable was measured (no request completed in a window)"
    else:
        change_pct = (measured_value - baseline_value) / baseline_value * 100.0
        status, outcome = _judge(change_pct, spread_pct, tolerance_pct, higher_is_better)
    message = (
        f"{metric_name}: baseline {baseline_value:.2f}, measured {measured_value:.2f} ({change_pct:+.1f}%), "
        f"tolerance {tolerance_pct:g}%, run spread {spread_pct:.1f}% -> {outcome}"
    )
    return Verdict(
        metric=metric_name,
        baseline=baseline_value,
        measured=measured_value,
        change_pct=change_pct,
        spread_pct=spread_pct,
        tolerance_pct=tolerance_pct,
        higher_is_better=higher_is_better,
        status=status,
        message=message,
    )


def _judge(
    change_pct: float, spread_pct: float, tolerance_pct: float, higher_is_better: bool
) -> tuple[VerdictStatus, str]:
    worsening_pct = -change_pct if higher_is_better else change_pct
    size_pct = abs(change_pct)
    noisy_note = (
        f" (note: run spread {spread_pct:.1f}% exceeds the {tolerance_pct:g}% tolerance, so a change smaller "
        f"than {spread_pct:.1f}% cannot be seen in this run)"
        if spread_pct > tolerance_pct
        else ""
    )
    if worsening_pct > tolerance_pct:
        if size_pct > spread_pct:
            return VerdictStatus.REGRESSION, "REGRESSION"
        return VerdictStatus.INCONCLUSIVE, (
            f"INCONCLUSIVE: the run was too noisy to tell (spread {spread_pct:.1f}% exceeds the "
            f"{size_pct:.1f}% change); rerun on a quieter host or with longer measurement windows"
        )
    if -worsening_pct > tolerance_pct:
        maybe_noise = (
            f" (the run spread {spread_pct:.1f}% is as large as the change, so it may be noise)"
            if spread_pct >= size_pct
            else ""
        )
        return VerdictStatus.IMPROVED, f"IMPROVED{maybe_noise}; if expected, record it with --update-baselines"
    return VerdictStatus.PASS, f"pass{noisy_note}"


def compare_level(
    baseline_metrics: Mapping[str, float],
    measured_metrics: Mapping[str, float],
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
    measured_windows: Sequence[float] = (),
    baseline_windows: Sequence[Sequence[float]] = (),
    measured_latencies_ms: Sequence[float] = (),
) -> list[Verdict]:
    """Judge every gated metric present in both mappings (a level of a Baseline vs LevelSummary.metrics()).

    A p99 over fewer than MIN_REQUESTS_FOR_P99_VERDICT requests is judged by p99_exceedance when this run's
    `measured_latencies_ms` (the requests the p99 was taken over) are given, else reported and never failed on.

    The noise used is the larger of this run's spread and the spread stored with the baseline: noise in
    either run can produce an apparent change. `measured_windows` are this run's per-window throughputs and
    `baseline_windows` the baseline runs' (one sequence per run). With at least MIN_RUNS_FOR_TEST baseline
    runs that kept windows, throughput is judged by `compare_distribution`; otherwise by the single-run rule.
    With 2 or more measured windows the throughput verdict also states the smallest slowdown it could detect.
    """
    verdicts = []
    runs_with_windows = [tuple(run) for run in baseline_windows if len(run) > 0]
    for gated in GATED_METRICS:
        if gated.name not in baseline_metrics or gated.name not in measured_metrics:
            continue
        if gated.name == "throughput_infer_per_s" and len(runs_with_windows) >= MIN_RUNS_FOR_TEST and measured_windows:
            verdicts.append(compare_distribution(gated.name, runs_with_windows, measured_windows, tolerance_pct))
            continue
        spreads = [metrics.get(gated.spread_metric, 0.0) for metrics in (measured_metrics, baseline_metrics)]
        spread = math.nan if any(math.isnan(value) for value in spreads) else max(spreads)
        verdict = compare(
            gated.name,
            baseline_metrics[gated.name],
            measured_metrics[gated.name],
            spread,
            tolerance_pct,
            gated.higher_is_better,
        )
        requests = measured_metrics.get("request_count", math.inf)
        if gated.name == "latency_p99_ms" and requests < MIN_REQUESTS_FOR_P99_VERDICT:
            if measured_latencies_ms:
                verdict = p99_exceedance(verdict, measured_latencies_ms)
            else:
                verdict = _too_few_for_p99(verdict, int(requests))
        if gated.name == "throughput_infer_per_s" and len(measured_windows) >= 2:
            pooled = [value for run in runs_with_windows for value in run]
            verdict = _with_power(verdict, detectable_change_pct(measured_windows, pooled, verdict.baseline))
        verdicts.append(verdict)
    return verdicts


def compare_distribution(
    metric_name: str,
    baseline_runs: Sequence[Sequence[float]],
    measured_windows: Sequence[float],
    tolerance_pct: float = DEFAULT_TOLERANCE_PCT,
    higher_is_better: bool | None = None,
) -> Verdict:
    """Judge this run's per-window values against a baseline of several runs (google-benchmark's compare.py way).

    Baseline = the median of all baseline windows pooled; measured = the median of this run's windows. A
    regression needs both: the median moved in the bad direction by more than `tolerance_pct` (the smallest
    effect that matters) AND a one-sided Mann-Whitney U test of this run's windows against the pooled baseline
    windows (alternative: this run is worse) gives p < SIGNIFICANCE_P. Worse beyond the tolerance but not
    significant is inconclusive; better beyond the tolerance is an improvement. The message carries the p-value
    and the smallest slowdown this run could detect (stats.detectable_change_pct, at least the tolerance).
    Pooling treats windows as independent; drift between the baseline's runs widens the pooled sample, which is
    what makes a baseline taken over several host states tolerant to this run landing in either.
    """
    higher_is_better = _direction(metric_name, higher_is_better)
    pooled = [float(value) for run in baseline_runs for value in run]
    measured = [float(value) for value in measured_windows]
    if not pooled or not measured:
        raise ValueError("compare_distribution needs baseline and measured windows")
    baseline_value = statistics.median(pooled)
    measured_value = statistics.median(measured)
    spread_pct = (max(pooled) - min(pooled)) / baseline_value * 100.0 if baseline_value > 0 else math.nan
    runs = len(baseline_runs)
    if not (math.isfinite(baseline_value) and baseline_value > 0):
        verdict = compare(metric_name, baseline_value, measured_value, 0.0, tolerance_pct, higher_is_better)
        return replace(verdict, baseline_runs=runs)
    change_pct = (measured_value - baseline_value) / baseline_value * 100.0
    worsening_pct = -change_pct if higher_is_better else change_pct
    # "less": this run's values tend to be smaller than the baseline's, the bad direction for a throughput.
    alternative = "less" if higher_is_better else "greater"
    from scipy.stats import mannwhitneyu  # here, not at import: options.py imports this module into every pytest

    p_value = float(mannwhitneyu(measured, pooled, alternative=alternative).pvalue)
    if worsening_pct > tolerance_pct:
        if p_value < SIGNIFICANCE_P:
            status, outcome = VerdictStatus.REGRESSION, "REGRESSION"
        else:
            status, outcome = (
                VerdictStatus.INCONCLUSIVE,
                (
                    f"INCONCLUSIVE: worse beyond the tolerance but not significant (p {p_value:.3f} >= "
                    f"{SIGNIFICANCE_P:g}); rerun on a quieter host, or with longer measurement windows"
                ),
            )
    elif -worsening_pct > tolerance_pct:
        status, outcome = VerdictStatus.IMPROVED, "IMPROVED; if expected, record it with --update-baselines"
    else:
        status, outcome = VerdictStatus.PASS, "pass"
    windows = len(pooled)
    message = (
        f"{metric_name}: baseline {baseline_value:.2f} (median of {runs} runs, {windows} windows), measured "
        f"{measured_value:.2f} ({change_pct:+.1f}%, {len(measured)} windows), tolerance {tolerance_pct:g}%, "
        f"Mann-Whitney U one-sided p {p_value:.3f} -> {outcome}"
    )
    verdict = Verdict(
        metric=metric_name,
        baseline=baseline_value,
        measured=measured_value,
        change_pct=change_pct,
        spread_pct=spread_pct,
        tolerance_pct=tolerance_pct,
        higher_is_better=higher_is_better,
        status=status,
        message=message,
        p_value=p_value,
        baseline_runs=runs,
    )
    return _with_power(verdict, detectable_change_pct(measured, pooled, baseline_value))


def _with_power(verdict: Verdict, noise_detectable_pct: float) -> Verdict:
    """State the smallest slowdown the verdict could have flagged: the noise bound, or the tolerance when larger
    (nothing under the tolerance is ever a regression)."""
    if math.isnan(noise_detectable_pct):
        return verdict
    detectable = max(noise_detectable_pct, verdict.tolerance_pct)
    return replace(verdict, detectable_pct=detectable, message=f"{verdict.message}; detects >= {detectable:.1f}%")


def exceedances_for_regression(requests: int, p: float = P99_EXCEEDANCE_P) -> int:
    """The fewest of `requests` that must exceed a p99 limit before the p99 is over it at confidence 1 - `p`: the
    smallest k with P(Binomial(requests, 1 %) >= k) < p."""
    from scipy.stats import binom

    k = 1
    while k <= requests and binom.sf(k - 1, requests, 0.01) >= p:
        k += 1
    return k


def p99_exceedance(verdict: Verdict, latencies_ms: Sequence[float]) -> Verdict:
    """Judge a p99 over few requests by a bound valid at that count. The limit is the baseline p99 worsened by the
    tolerance; k of the n requests exceeded it. Were the p99 within the limit, k would be Binomial(n, 1 %) at most,
    so a k that such a p99 reaches with probability under P99_EXCEEDANCE_P is a REGRESSION. Otherwise the point
    estimate decides between pass, improved and (worse beyond the tolerance, yet not enough exceedances)
    inconclusive. The message says how many exceedances would have failed it, and that a p99 judged by its value
    needs MIN_REQUESTS_FOR_P99_VERDICT requests."""
    from scipy.stats import binom

    n = len(latencies_ms)
    limit_ms = verdict.baseline * (1.0 + verdict.tolerance_pct / 100.0)
    exceeded = sum(1 for latency in latencies_ms if latency > limit_ms)
    p_value = float(binom.sf(exceeded - 1, n, 0.01)) if exceeded else 1.0
    needed = exceedances_for_regression(n)
    bound = (
        f"{exceeded} of {n} requests above the limit {limit_ms:.2f} ms (baseline p99 + {verdict.tolerance_pct:g}%); "
        f"a p99 within it gives that many with p {p_value:.3g}"
    )
    if needed > n:
        return _too_few_for_p99(verdict, n)  # not even every request above the limit would be significant
    if p_value < P99_EXCEEDANCE_P:
        status, outcome = VerdictStatus.REGRESSION, "REGRESSION"
    elif verdict.status is VerdictStatus.REGRESSION:
        status, outcome = (
            VerdictStatus.INCONCLUSIVE,
            (f"INCONCLUSIVE: worse beyond the tolerance, but a regression needs >= {needed} of {n} above the limit"),
        )
    else:
        status, outcome = verdict.status, f"{verdict.status.value} (a regression needs >= {needed} of {n} above it)"
    message = (
        f"{verdict.metric}: baseline {verdict.baseline:.2f}, measured {verdict.measured:.2f} "
        f"({verdict.change_pct:+.1f}%) over {n} requests, judged by exceedances: {bound} -> {outcome}; a p99 judged "
        f"by its value needs {MIN_REQUESTS_FOR_P99_VERDICT} requests"
    )
    return replace(verdict, status=status, message=message, p_value=p_value)


def _too_few_for_p99(verdict: Verdict, requests: int) -> Verdict:
    note = f" (p99 of {requests} requests, fewer than {MIN_REQUESTS_FOR_P99_VERDICT}: reported, never failed on)"
    status = VerdictStatus.INCONCLUSIVE if verdict.status is VerdictStatus.REGRESSION else verdict.status
    return replace(
        verdict,
        status=status,
        message=verdict.message.replace("REGRESSION", "INCONCLUSIVE") + note,
        ungated_because=f"a p99 of {requests} requests: {MIN_REQUESTS_FOR_P99_VERDICT} are needed to judge one",
    )


def usable_tolerance(value: float) -> bool:
    return math.isfinite(value) and 0 < value < 100


def tolerance_error(where: str, value: object) -> str:
    """Why a tolerance cannot be used: it must be a finite percent above 0 and below 100 (nan compares false with
    everything and 100 % lets any slowdown pass: both would switch the gate off without a word)."""
    return (
        f"{where} {value!r}: a tolerance must be a number of percent above 0 and below 100 (e.g. 10); "
        "nan, inf, 0 or 100 and above would turn the regression gate off"
    )
