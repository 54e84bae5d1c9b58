"""Service-level objectives: per-request latency targets, whether a load level met them, and its goodput.

`--slo latency_p99_ms=2000,ttft_p99_ms=300` names, per target, a quantity each request has (its latency; for a
caption also its time to first token and its inter-token latency), a percentile and a limit. A level meets the SLO
when every target that applies to it has its percentile, over the level's requests, within the limit; a failed
request counts as over every limit. Goodput is genai-perf's: the requests (captions) per second that met every
applicable target themselves. Pure code over plain numbers: no pytest, Triton or load generation in here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import binom

from blip_triton_bench.judging.stats import WindowSample, latency_percentile

if TYPE_CHECKING:
    from blip_triton_bench.repository.variants import Variant

#: What a target can name, and what each is in words. Request latency is the time from sending (or, open loop,
#: the scheduled send) to the answer; for a caption, to its last token.
LATENCY, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY = "latency", "ttft", "itl"
QUANTITIES = {
    LATENCY: "request latency",
    TIME_TO_FIRST_TOKEN: "time to first token",
    INTER_TOKEN_LATENCY: "inter-token latency",
}
#: What a logits request has: one answer, so no first token and no gaps between tokens.
REQUEST_QUANTITIES = frozenset({LATENCY})
CAPTION_QUANTITIES = frozenset(QUANTITIES)
#: A target is shown met (or missed) when a percentile at its limit would give the exceedances counted with
#: probability under 1 - CONFIDENCE: the binomial bound MLPerf LoadGen's early stopping uses, one-sided.
CONFIDENCE = 0.95
#: The per-variant SLO in a config.pbtxt's `parameters`, as bench_tolerance_pct is (--slo overrides it).
SLO_PARAMETER = "bench_slo"

_TARGET_KEY = re.compile(r"(?P<quantity>[a-z]+)_p(?P<percentile>\d+(?:\.\d+)?)_ms")


class SLOError(ValueError):
    """A malformed --slo (or bench_slo) text; the message names the target and the fix."""


@dataclass(frozen=True)
class Target:
    """`percentile` % of requests must have `quantity` at most `limit_ms`."""

    quantity: str
    percentile: float
    limit_ms: float

    @property
    def key(self) -> str:
        return f"{self.quantity}_p{self.percentile:g}_ms"

    @property
    def allowed_fraction_over(self) -> float:
        return 1.0 - self.percentile / 100.0


@dataclass(frozen=True)
class ServiceLevel:
    targets: tuple[Target, ...]

    @property
    def text(self) -> str:
        return ",".join(f"{target.key}={target.limit_ms:g}" for target in self.targets)


def _example() -> str:
    return "e.g. latency_p99_ms=2000,ttft_p99_ms=300"


def _target(item: str, where: str) -> Target:
    key, equals, value = item.partition("=")
    key, value = key.strip(), value.strip()
    match = _TARGET_KEY.fullmatch(key)
    if not equals or match is None or match["quantity"] not in QUANTITIES:
        names = ", ".join(f"{name}_pNN_ms" for name in QUANTITIES)
        raise SLOError(
            f"{where}: {item.strip()!r} is not a target; write NAME=MILLISECONDS with NAME one of {names} ({_example()})"
        )
    percentile = float(match["percentile"])
    if not 0 < percentile < 100:
        raise SLOError(
            f"{where}: {key} asks for percentile {match['percentile']}; use one above 0 and below 100 (p50, p99, p99.9)"
        )
    try:
        limit_ms = float(value)
    except ValueError:
        limit_ms = math.nan
    if not (math.isfinite(limit_ms) and limit_ms > 0):
        raise SLOError(f"{where}: {key}={value!r}; the limit must be a number of milliseconds above 0 ({_example()})")
    return Target(match["quantity"], percentile, limit_ms)


def parse_slo(text: str, where: str = "--slo") -> ServiceLevel:
    """`key=ms` targets separated by commas; each key at most once. `where` names the option or config field."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise SLOError(f"{where} {text!r}: no target given ({_example()})")
    targets = [_target(item, where) for item in items]
    keys = [target.key for target in targets]
    if duplicated := sorted({key for key in keys if keys.count(key) > 1}):
        raise SLOError(f"{where}: {', '.join(duplicated)} given twice; give each target once")
    return ServiceLevel(tuple(targets))


def config_service_level(variant: Variant) -> ServiceLevel | None:
    """The variant's own bench_slo parameter as an SLO (SLOError naming its config file and field); None without one."""
    parameter = variant.config.parameters.get(SLO_PARAMETER)
    if parameter is None:
        return None
    return parse_slo(parameter.string_value, f"{variant.config_path}: parameters '{SLO_PARAMETER}'")


@dataclass(frozen=True)
class RequestOutcome:
    """One request (or caption) as the SLO sees it: whether it succeeded, and its quantities in ms (a caption of one
    token has no inter-token latency)."""

    succeeded: bool
    values_ms: Mapping[str, float]


def window_outcomes(windows: Sequence[WindowSample]) -> list[RequestOutcome]:
    """A request level's windows as outcomes: each completed request's latency, and each failed one."""
    outcomes = [RequestOutcome(True, {LATENCY: latency}) for window in windows for latency in window.latencies_ms]
    failed = sum(window.errors for window in windows)
    return outcomes + [RequestOutcome(False, {}) for _ in range(failed)]


def requests_to_show_met(target: Target) -> int:
    """The fewest requests that can show a target met at CONFIDENCE, with none of them over the limit."""
    return math.ceil(math.log(1.0 - CONFIDENCE) / math.log(1.0 - target.allowed_fraction_over))


@dataclass(frozen=True)
class TargetResult:
    """One target over a level's requests: the measured percentile (failed requests counted as infinitely late),
    how many were over the limit, whether it was met, and whether that answer holds at CONFIDENCE."""

    target: Target
    requests: int
    over_limit: int
    measured_ms: float
    met: bool
    settled: bool
    requests_to_show_met: int

    def describe(self) -> str:
        target = self.target
        measured = f"{self.measured_ms:.1f} ms" if math.isfinite(self.measured_ms) else "a failed request"
        verdict = "met" if self.met else "MISSED"
        if self.settled:
            how = f"at {CONFIDENCE:.0%} confidence"
        elif self.met:
            how = f"as measured; {CONFIDENCE:.0%} confidence needs >= {self.requests_to_show_met} requests, none over"
        else:
            how = f"as measured, not at {CONFIDENCE:.0%} confidence"
        return (
            f"{target.key} {measured} vs {target.limit_ms:g} ms: {verdict} {how} "
            f"({self.over_limit} of {self.requests} over)"
        )


def judge_target(target: Target, outcomes: Sequence[RequestOutcome]) -> TargetResult:
    values = [
        outcome.values_ms[target.quantity] if outcome.succeeded else math.inf
        for outcome in outcomes
        if not outcome.succeeded or target.quantity in outcome.values_ms
    ]
    n = len(values)
    over = sum(1 for value in values if value > target.limit_ms)
    measured = latency_percentile(np.sort(np.asarray(values, dtype=np.float64)), target.percentile)
    met = n > 0 and measured <= target.limit_ms
    alpha, edge = 1.0 - CONFIDENCE, target.allowed_fraction_over
    # Were the percentile exactly at the limit, each request would be over it with probability `edge`.
    shown_met = n > 0 and float(binom.cdf(over, n, edge)) < alpha
    shown_missed = n > 0 and over > 0 and float(binom.sf(over - 1, n, edge)) < alpha
    return TargetResult(
        target=target,
        requests=n,
        over_limit=over,
        measured_ms=measured,
        met=met,
        settled=(met and shown_met) or (not met and shown_missed),
        requests_to_show_met=requests_to_show_met(target),
    )


@dataclass(frozen=True)
class SLOResult:
    """A level against the SLO: each applicable target's result, the targets that do not apply to this kind of
    level, and its goodput (requests that met every applicable target, per second of the judged windows)."""

    slo: str
    unit: str  # "requests" or "captions"
    targets: tuple[TargetResult, ...]
    not_applicable: tuple[str, ...]
    requests: int
    good: int
    duration_s: float
    goodput_per_s: float

    @property
    def met(self) -> bool:
        return all(result.met for result in self.targets)

    @property
    def settled(self) -> bool:
        """The answer holds at CONFIDENCE: every target shown met, or one shown missed."""
        if self.met:
            return all(result.settled for result in self.targets)
        return any(result.settled and not result.met for result in self.targets)

    def describe(self) -> str:
        verdict = "met the SLO" if self.met else "MISSED the SLO"
        confidence = f" at {CONFIDENCE:.0%} confidence" if self.settled else " as measured (not settled)"
        goodput = f"goodput {self.goodput_per_s:.2f} {self.unit}/s ({self.good} of {self.requests} {self.unit} good)"
        return f"{verdict}{confidence}; {goodput}: " + "; ".join(result.describe() for result in self.targets)


def judge_level(
    service_level: ServiceLevel,
    outcomes: Sequence[RequestOutcome],
    duration_s: float,
    quantities: Iterable[str],
    unit: str,
) -> SLOResult | None:
    """The level's requests against the SLO; None when no target applies to what this kind of level measures."""
    measured = frozenset(quantities)
    applicable = [target for target in service_level.targets if target.quantity in measured]
    if not applicable:
        return None
    results = tuple(judge_target(target, outcomes) for target in applicable)
    good = sum(
        1
        for outcome in outcomes
        if outcome.succeeded and all(outcome.values_ms.get(t.quantity, -math.inf) <= t.limit_ms for t in applicable)
    )
    return SLOResult(
        slo=service_level.text,
        unit=unit,
        targets=results,
        not_applicable=tuple(target.key for target in service_level.targets if target.quantity not in measured),
        requests=len(outcomes),
        good=good,
        duration_s=duration_s,
        goodput_per_s=good / duration_s if duration_s > 0 else 0.0,
    )
