"""Before vs after in one run: both repositories' variant served by the same server, each level measured in
alternating rounds, and a paired significance test of after against before.

Why paired rounds: the host drifts between speeds from one run to the next (issue 15 measured 1.28 vs 1.41
infer/s for unchanged runs), so a stored number, or even a distribution of stored runs, mixes the change with
the drift. Rounds of before and after taken back to back see the same host state; the ratio after/before of
each pair cancels the drift, and the test is made on those ratios (Chromium's Pinpoint interleaves the same
way; google-benchmark's compare.py tests with Mann-Whitney, which treats the samples as unpaired).

The order inside each pair alternates (before-after, then after-before, ...), so a trend within a pair
favours neither side. Pure statistics in `judge_ab`; `measure_ab` runs the rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats
from tritonclient.grpc import model_config_pb2

from blip_triton_bench.load import CONCURRENCY, LoadLevel, LoadSettings, measure_level
from blip_triton_bench.repository import Variant, stage_generated
from blip_triton_bench.servers.base import RunningServer, ServerStartError
from blip_triton_bench.verdict import SIGNIFICANCE_P, VerdictStatus
from blip_triton_bench.workload import ModelInputs

#: The smallest change an A/B run calls a regression unless --tolerance-pct says otherwise. Lower than the
#: stored-baseline tolerance (10 %, which has to absorb the host's drift between runs): pairing cancels that
#: drift, so a change half as large is both detectable and worth a failure here.
DEFAULT_AB_MIN_EFFECT_PCT = 5.0
#: Fewer pairs can never reach p < 0.05 one-sided with the signed-rank test (its smallest p is 1 / 2^n).
MIN_AB_ROUNDS = 5
BEFORE_SUFFIX = "__before"


@dataclass(frozen=True)
class ABVerdict:
    """After against before for one level. Percentages are of throughput (higher is better): `effect_pct`
    negative means after is slower."""

    before_per_round: tuple[float, ...]  # infer/s of each before round, in round order
    after_per_round: tuple[float, ...]
    effect_pct: float  # geometric mean of after/before over the pairs, minus 1, in %
    ci_low_pct: float  # its 95 % confidence interval (t interval on the log ratios)
    ci_high_pct: float
    p_value: float  # one-sided Wilcoxon signed-rank test of the log ratios: "after is slower"
    detectable_pct: float  # the smallest slowdown these pairs could tell from none (CI half-width, >= min effect)
    min_effect_pct: float
    status: VerdictStatus
    message: str

    @property
    def rounds(self) -> int:
        return len(self.before_per_round)

    @property
    def failed(self) -> bool:
        return self.status is VerdictStatus.REGRESSION

    def to_dict(self) -> dict[str, object]:
        return {
            "before_infer_per_s_per_round": list(self.before_per_round),
            "after_infer_per_s_per_round": list(self.after_per_round),
            "effect_pct": self.effect_pct,
            "ci95_pct": [self.ci_low_pct, self.ci_high_pct],
            "p_value": self.p_value,
            "detectable_pct": self.detectable_pct,
            "min_effect_pct": self.min_effect_pct,
            "status": self.status.value,
            "message": self.message,
        }


def judge_ab(before: Sequence[float], after: Sequence[float], min_effect_pct: float) -> ABVerdict:
    """Judge paired rounds (before[i] and after[i] measured back to back).

    REGRESSION: after is slower by more than `min_effect_pct` (the geometric-mean ratio) AND the one-sided
    Wilcoxon signed-rank test of log(after/before) gives p < 0.05. Slower beyond the minimum but not significant:
    INCONCLUSIVE. Faster beyond the minimum and significant the other way: IMPROVED. Otherwise PASS.
    """
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"judge_ab needs paired rounds, at least 2 (got {len(before)} before, {len(after)} after)")
    if min(before) <= 0 or min(after) <= 0:
        raise ValueError("every round must have completed requests (infer/s above 0)")
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
        f"{np.median(after):.2f} infer/s), Wilcoxon signed-rank one-sided p {slower_p:.3g}, minimum effect "
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
    )


def _signed_rank_p(logs: np.ndarray, alternative: str) -> float:
    if not np.any(logs != 0):
        return 1.0  # identical pairs: no evidence either way
    return float(scipy_stats.wilcoxon(logs, alternative=alternative, zero_method="zsplit").pvalue)


@dataclass(frozen=True)
class ABLevel:
    """One level measured both ways: the verdict and each side's p99 over all its rounds' requests."""

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


@dataclass(frozen=True)
class ABSide:
    """Where one side of the comparison is served: an endpoint (of the protocol the run uses) and a model name."""

    url: str
    model: str


def measure_ab(
    before: ABSide,
    after: ABSide,
    inputs: ModelInputs,
    level: LoadLevel,
    load: LoadSettings,
    rounds: int,
    liveness: Callable[[], str | None] | None = None,
) -> tuple[list[float], list[float], float, float]:
    """Alternate rounds of `before` and `after` at `level`; per side, infer/s of each round and the p99 over all
    its requests. Raises load.LevelAborted as a level does when a server goes away."""
    per_round: dict[ABSide, list[float]] = {before: [], after: []}
    latencies: dict[ABSide, list[float]] = {before: [], after: []}
    settings = round_settings(load)
    for index in range(rounds):
        for side in (before, after) if index % 2 == 0 else (after, before):
            windows = measure_level(side.url, side.model, inputs, level, settings, liveness).windows
            completed = [latency for window in windows for latency in window.latencies_ms]
            per_round[side].append(round_throughput(level, completed, sum(window.duration_s for window in windows)))
            latencies[side].extend(completed)
    p99 = {side: float(np.percentile(values, 99)) if values else math.nan for side, values in latencies.items()}
    return per_round[before], per_round[after], p99[before], p99[after]


def protocol_url(server: RunningServer, protocol: str) -> str:
    return server.endpoints.grpc_url if protocol == "grpc" else server.endpoints.http_url


class ReferenceRepository:
    """'Before' = another repository's variant of the same name, staged beside it as `<name>__before` on the same
    server: what a config or model change is judged by."""

    def __init__(
        self,
        server: RunningServer,
        staged_root: Path,
        reference: Mapping[str, Variant],
        files_for: Callable[[Variant], Sequence[Path]],
        protocol: str,
    ) -> None:
        self.server = server
        self.staged_root = staged_root
        self.reference = reference
        self.files_for = files_for
        self.protocol = protocol

    def prepare(self, variant: Variant) -> ABSide:
        reference = self.reference[variant.name]
        config = model_config_pb2.ModelConfig()
        config.CopyFrom(reference.config)
        config.name = f"{reference.name}{BEFORE_SUFFIX}"
        if reference.own_model_files:
            files: Sequence[Path] = [path for path in reference.own_model_files if path.is_file()]
        else:
            files = self.files_for(reference)
        stage_generated(self.staged_root, config, files, reference.model_filename)
        self.server.load_model(config.name)
        return ABSide(protocol_url(self.server, self.protocol), config.name)

    def liveness(self) -> str | None:
        return None  # the same server as after's, which the run already watches


class ReferenceServer:
    """'Before' = the same variant on another server (an older Triton image, or a server at
    --reference-triton-url): what a server upgrade is judged by. A server the suite started gets the variant
    loaded; an external one must serve it already, configured as the repository says."""

    def __init__(self, server: RunningServer, protocol: str) -> None:
        self.server = server
        self.protocol = protocol

    def prepare(self, variant: Variant) -> ABSide:
        self.server.prepare_variant(variant)
        return ABSide(protocol_url(self.server, self.protocol), variant.name)

    def liveness(self) -> str | None:
        cause = self.server.liveness()
        return None if cause is None else f"the reference server: {cause}"


class ABRun:
    """The session's A/B comparison: each level of each selected variant measured against its 'before' side
    (a ReferenceRepository or a ReferenceServer), prepared on first use."""

    def __init__(
        self,
        server: RunningServer,
        before: ReferenceRepository | ReferenceServer,
        inputs: ModelInputs,
        load: LoadSettings,
        rounds: int,
        min_effect_pct: float,
    ) -> None:
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
        before = self.before_side(variant)
        after = ABSide(protocol_url(self.server, self.load.protocol), variant.name)
        before_rounds, after_rounds, before_p99, after_p99 = measure_ab(
            before, after, self.inputs, level, self.load, self.rounds, self.liveness
        )
        verdict = judge_ab(before_rounds, after_rounds, self.min_effect_pct)
        result = ABLevel(variant.name, level, verdict, before_p99, after_p99)
        self.results.append(result)
        return result


def reference_problem(variant: Variant, reference: Mapping[str, Variant], reference_root: Path) -> str | None:
    """Why `variant` cannot be compared with the reference repository; None when it can."""
    found = reference.get(variant.name)
    if found is None:
        return f"the reference repository {reference_root} has no variant {variant.name}: nothing to compare with"
    if found.role != variant.role:
        return f"{found.config_path} does not serve {variant.role} as {variant.config_path} does"
    if found.composing_models:
        return f"{found.config_path} calls other models; A/B compares single-model variants"
    return None
