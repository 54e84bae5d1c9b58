"""Before vs after in one run: both repositories' variant served by the same server, each level measured in
alternating rounds, and a paired significance test of after against before.

Why paired rounds: the host drifts between speeds from one run to the next (issue 15 measured 1.28 vs 1.41
infer/s for unchanged runs), so a stored number, or even a distribution of stored runs, mixes the change with
the drift. Rounds of before and after taken back to back see the same host state; the ratio after/before of
each pair cancels the drift, and the test is made on those ratios (Chromium's Pinpoint interleaves the same
way; google-benchmark's compare.py tests with Mann-Whitney, which treats the samples as unpaired).

The order inside each pair alternates (before-after, then after-before, ...), so a trend within a pair
favours neither side. Pure statistics in `judge_ab`; `alternate_rounds` runs the rounds, of inference requests
(`request_round`) or of streamed captions (`caption_round`); ab_sides.py says where each side is served.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as scipy_stats

from blip_triton_bench.captioning.load import CaptionRequest, caption_request_alone, measure_caption_level
from blip_triton_bench.judging.verdict import SIGNIFICANCE_P, VerdictStatus
from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel, LoadSettings, measure_level
from blip_triton_bench.model.workload import ModelInputs
from blip_triton_bench.repository.variants import Variant
from blip_triton_bench.runs.ab_sides import ABSide, ReferenceRepository, ReferenceServer
from blip_triton_bench.servers.base import RunningServer, ServerStartError

if TYPE_CHECKING:
    from blip_triton_bench.load.workers import WorkerPool

#: The smallest change an A/B run calls a regression unless --tolerance-pct says otherwise. Lower than the
#: stored-baseline tolerance (10 %, which has to absorb the host's drift between runs): pairing cancels that
#: drift, so a change half as large is both detectable and worth a failure here.
DEFAULT_AB_MIN_EFFECT_PCT = 5.0
#: Fewer pairs can never reach p < 0.05 one-sided with the signed-rank test (its smallest p is 1 / 2^n).
MIN_AB_ROUNDS = 5
THROUGHPUT_UNIT = "infer/s"
CAPTION_THROUGHPUT_UNIT = "output tokens/s"


@dataclass(frozen=True)
class ABVerdict:
    """After against before for one level. Percentages are of throughput (higher is better): `effect_pct`
    negative means after is slower."""

    before_per_round: tuple[float, ...]  # throughput of each before round (in `unit`), in round order
    after_per_round: tuple[float, ...]
    effect_pct: float  # geometric mean of after/before over the pairs, minus 1, in %
    ci_low_pct: float  # its 95 % confidence interval (t interval on the log ratios)
    ci_high_pct: float
    p_value: float  # one-sided Wilcoxon signed-rank test of the log ratios: "after is slower"
    detectable_pct: float  # the smallest slowdown these pairs could tell from none (CI half-width, >= min effect)
    min_effect_pct: float
    status: VerdictStatus
    message: str
    unit: str = THROUGHPUT_UNIT

    @property
    def rounds(self) -> int:
        return len(self.before_per_round)

    @property
    def failed(self) -> bool:
        return self.status is VerdictStatus.REGRESSION

    def to_dict(self) -> dict[str, object]:
        return {
            "unit": self.unit,
            "before_per_round": list(self.before_per_round),
            "after_per_round": list(self.after_per_round),
            "effect_pct": self.effect_pct,
            "ci95_pct": [self.ci_low_pct, self.ci_high_pct],
            "p_value": self.p_value,
            "detectable_pct": self.detectable_pct,
            "min_effect_pct": self.min_effect_pct,
            "status": self.status.value,
            "message": self.message,
        }


def judge_ab(
    before: Sequence[float], after: Sequence[float], min_effect_pct: float, unit: str = THROUGHPUT_UNIT
) -> ABVerdict:
    """Judge paired rounds (before[i] and after[i] measured back to back) of a throughput in `unit`.

    REGRESSION: after is slower by more than `min_effect_pct` (the geometric-mean ratio) AND the one-sided
    Wilcoxon signed-rank test of log(after/before) gives p < 0.05. Slower beyond the minimum but not significant:
    INCONCLUSIVE. Faster beyond the minimum and significant the other way: IMPROVED. Otherwise PASS.
    """
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"judge_ab needs paired rounds, at least 2 (got {len(before)} before, {len(after)} after)")
    if min(before) <= 0 or min(after) <= 0:
        raise ValueError(f"every round must have completed requests ({unit} above 0)")
    logs = np.log(np.asarray(after, dtype=float) / np.asarray(before, dtype=float))
    mean, n = float(np.mean(logs)), len(logs)
    half_width = float(scipy_stats.t.ppf(0.975, n - 1) * np.std(logs, ddof=1) / math.sqrt(n))
    effect, low, high = (100.0 * (math.exp(x) - 1.0) for x in (mean, mean - half_width, mean + half_width))
    slower_p = _signed_rank_p(logs, "less")
    faster_p = _signed_rank_p(logs, "greater")
    detectable = max(100.0 * (1.0 - math.exp(-half_width)), min_effect_pct)
    if -effect > min_effect_pct:
        status = VerdictStatus.REGRESSION if slower_p < SIGNIFICANCE_P else VerdictStatus.INCONCLUSIVE
    elif effect > min_effect_pct and faster_p < SIGNIFICANCE_P:
        status = VerdictStatus.IMPROVED
    else:
        status = VerdictStatus.PASS
    outcome = {
        VerdictStatus.REGRESSION: "REGRESSION",
        VerdictStatus.INCONCLUSIVE: (
            f"INCONCLUSIVE: slower beyond {min_effect_pct:g}% but not significant (p {slower_p:.3f}); "
            "raise --ab-rounds or --window-s"
        ),
        VerdictStatus.IMPROVED: "IMPROVED",
        VerdictStatus.PASS: "pass",
    }[status]
    message = (
        f"after vs before, throughput over {n} interleaved rounds: {effect:+.1f}% "
        f"(95% CI {low:+.1f}% to {high:+.1f}%; before median {np.median(before):.2f}, after median "
        f"{np.median(after):.2f} {unit}), Wilcoxon signed-rank one-sided p {slower_p:.3g}, minimum effect "
        f"{min_effect_pct:g}% -> {outcome}; detects >= {detectable:.1f}%"
    )
    return ABVerdict(
        before_per_round=tuple(float(v) for v in before),
        after_per_round=tuple(float(v) for v in after),
        effect_pct=effect,
        ci_low_pct=low,
        ci_high_pct=high,
        p_value=slower_p,
        detectable_pct=detectable,
        min_effect_pct=min_effect_pct,
        status=status,
        message=message,
        unit=unit,
    )


def _signed_rank_p(logs: np.ndarray, alternative: str) -> float:
    if not np.any(logs != 0):
        return 1.0  # identical pairs: no evidence either way
    return float(scipy_stats.wilcoxon(logs, alternative=alternative, zero_method="zsplit").pvalue)


@dataclass(frozen=True)
class ABLevel:
    """One level measured both ways: the verdict and each side's p99 latency (of a request, or of a whole
    caption) over all its rounds."""

    variant: str
    level: LoadLevel
    verdict: ABVerdict
    before_p99_ms: float
    after_p99_ms: float

    @property
    def level_id(self) -> str:
        return self.level.level_id

    def to_dict(self) -> dict[str, object]:
        return {
            "variant": self.variant,
            "level": self.level_id,
            "before_p99_ms": self.before_p99_ms,
            "after_p99_ms": self.after_p99_ms,
            **self.verdict.to_dict(),
        }


@dataclass(frozen=True)
class SideRounds:
    """One side's rounds: the throughput of each, in round order, and the latencies of all they completed."""

    per_round: list[float]
    latencies_ms: list[float]

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else math.nan


class ABRoundFailed(RuntimeError):
    """A round's requests failed or came back wrong: no verdict on speed is given for wrong answers."""


def round_settings(load: LoadSettings) -> LoadSettings:
    """A round: the level's warm-up, then 2 windows, no stability rule (the pairs are the repeated measurement)."""
    return replace(load, max_windows=2, stability_windows=2, stability_pct=100.0)


def round_throughput(level: LoadLevel, latencies_ms: Sequence[float], duration_s: float) -> float:
    """A round's infer/s. Closed loop: Little's law, concurrency / mean latency, which is what completions per
    second converge to with no think time, but continuous: a round of BLIP-base at c=1 holds ~7 requests, and
    completions / duration could only read 6/6 or 7/6 of a request per second. Open loop: completions per second
    (the offered rate bounds it; a slowdown shows as the rate no longer achieved)."""
    if not latencies_ms:
        return 0.0
    if level.mode == CONCURRENCY:
        return level.value / (float(np.mean(latencies_ms)) / 1000.0)
    return len(latencies_ms) / duration_s


#: One round of one side: its throughput and the latencies it completed.
RoundMeasure = Callable[[ABSide], tuple[float, list[float]]]


def alternate_rounds(before: ABSide, after: ABSide, rounds: int, measure: RoundMeasure) -> tuple[SideRounds, ...]:
    """`rounds` pairs, the order inside each pair alternating (before-after, then after-before, ...), so a trend
    within a pair favours neither side."""
    sides = {before: SideRounds([], []), after: SideRounds([], [])}
    for index in range(rounds):
        for side in (before, after) if index % 2 == 0 else (after, before):
            throughput, latencies_ms = measure(side)
            sides[side].per_round.append(throughput)
            sides[side].latencies_ms.extend(latencies_ms)
    return sides[before], sides[after]


def request_round(
    inputs: ModelInputs,
    level: LoadLevel,
    load: LoadSettings,
    liveness: Callable[[], str | None] | None,
    workers: WorkerPool | None = None,
) -> RoundMeasure:
    """A round of inference requests at `level` (from `workers` when given): infer/s and request latencies. Raises
    load.LevelAborted as a level does when a server goes away."""
    settings = round_settings(load)

    def measure(side: ABSide) -> tuple[float, list[float]]:
        url = side.url(load.protocol)
        windows = measure_level(url, side.model, inputs, level, side.keyed(settings), liveness, workers).windows
        completed = [latency for window in windows for latency in window.latencies_ms]
        return round_throughput(level, completed, sum(window.duration_s for window in windows)), completed

    return measure


def caption_round(requests: dict[ABSide, CaptionRequest], level: LoadLevel, load: LoadSettings) -> RoundMeasure:
    """A round of streamed captions at `level` (gRPC): output tokens/s and caption latencies. Each side's captions
    must come back as that side's own caption of the image alone; a failed or different one fails the level."""
    settings = round_settings(load)

    def measure(side: ABSide) -> tuple[float, list[float]]:
        measurement = measure_caption_level(side.url("grpc"), requests[side], level, side.keyed(settings))
        if errors := measurement.errors:
            raise ABRoundFailed(f"{len(errors)} caption(s) of {side.model} failed in a round; the first: {errors[0]}")
        captions = measurement.captions
        if not captions:
            raise ABRoundFailed(f"no caption of {side.model} ended in a round's windows; lengthen --window-s")
        throughput = measurement.metrics()["output_token_throughput_per_s"]
        return throughput, [record.latency_ms for record in captions]

    return measure


class ABRun:
    """The session's A/B comparison: each level of each selected variant (and each caption level of each
    captioner) measured against its 'before' side (a ReferenceRepository or a ReferenceServer), prepared on first
    use."""

    def __init__(
        self,
        server: RunningServer,
        before: ReferenceRepository | ReferenceServer,
        inputs: ModelInputs,
        load: LoadSettings,
        rounds: int,
        min_effect_pct: float,
        workers: WorkerPool | None = None,
    ) -> None:
        self.workers = workers
        self.server = server
        self.before = before
        self.inputs = inputs
        self.load = load
        self.rounds = rounds
        self.min_effect_pct = min_effect_pct
        self.results: list[ABLevel] = []
        self._prepared: dict[str, ABSide | ServerStartError] = {}

    def before_side(self, variant: Variant) -> ABSide:
        """Prepared once per variant; a failure fails every level of the variant with the same error."""
        if variant.name not in self._prepared:
            try:
                self._prepared[variant.name] = self.before.prepare(variant)
            except ServerStartError as error:
                self._prepared[variant.name] = error
        prepared = self._prepared[variant.name]
        if isinstance(prepared, ServerStartError):
            raise prepared
        return prepared

    def liveness(self) -> str | None:
        return self.server.liveness() or self.before.liveness()

    def run_level(self, variant: Variant, level: LoadLevel) -> ABLevel:
        before, after = self.before_side(variant), ABSide(self.server, variant.name)
        measure = request_round(self.inputs, level, self.load, self.liveness, self.workers)
        return self._judged(variant, level, *alternate_rounds(before, after, self.rounds, measure), THROUGHPUT_UNIT)

    def run_caption_level(self, variant: Variant, level: LoadLevel, pixel_values: np.ndarray, tokens: int) -> ABLevel:
        """A caption load level both ways. Each side's captions are checked against its own caption of the image
        alone (a change may change the caption; this compares speed, and correctness has its own tests)."""
        before, after = self.before_side(variant), ABSide(self.server, variant.name)
        requests = {
            side: caption_request(side, pixel_values, tokens, self.load.request_timeout_s) for side in (before, after)
        }
        measure = caption_round(requests, level, self.load)
        rounds = alternate_rounds(before, after, self.rounds, measure)
        return self._judged(variant, level, *rounds, CAPTION_THROUGHPUT_UNIT)

    def _judged(self, variant: Variant, level: LoadLevel, before: SideRounds, after: SideRounds, unit: str) -> ABLevel:
        verdict = judge_ab(before.per_round, after.per_round, self.min_effect_pct, unit)
        result = ABLevel(variant.name, level, verdict, before.p99_ms, after.p99_ms)
        self.results.append(result)
        return result


def caption_request(side: ABSide, pixel_values: np.ndarray, tokens: int, timeout_s: float) -> CaptionRequest:
    """What every caption of a side asks for, with the tokens it must come back with: the side's caption alone."""
    return caption_request_alone(
        side.url("grpc"), side.model, pixel_values, tokens, side.server.request_headers("grpc"), timeout_s
    )
