"""Capacity at an SLO: the highest request rate a served variant sustains within its service-level objective, found
as perf_analyzer's --binary-search finds a latency threshold: bracket by doubling or halving, then bisect.

Each probe is an open-loop level measured as every load level is (warm-up, windows, the stability rule); it meets
when it is stable and met the SLO. The answer is the bracket: the highest rate met and the lowest rate missed
above it, so its width is the search's own uncertainty.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blip_triton_bench.judging.slo import CONFIDENCE, SLOResult
from blip_triton_bench.load.engine import CONCURRENCY, MAX_REQUEST_RATE, REQUEST_RATE, LoadLevel
from blip_triton_bench.repository.variants import Variant
from blip_triton_bench.runs.perf import JudgedLevel, PerfRun, variant_service_level

#: The level id a capacity is stored and judged under: one per SLO, since a capacity under another SLO is another
#: number.
CAPACITY_LEVEL_PREFIX = "capacity"
#: Bisection stops once the highest rate met and the lowest missed are this close (missed / met - 1): under the
#: 10 % perf_analyzer accepts between windows of one stable level, a narrower bracket is mostly noise.
DEFAULT_PRECISION_PCT = 5.0
#: At most this many probes: doubling from a start within 2^6 of the answer, then bisection down to the precision.
MAX_PROBES = 14
#: Halving stops this far below the start: a variant that misses its SLO at 1/64 of its serial rate misses it
#: at any rate worth serving.
MAX_HALVINGS = 6
#: Why a search stops rising where the client ceiling is not known.
LOAD_GENERATOR_LIMIT = f"the most the load generator offers ({MAX_REQUEST_RATE:g} requests/s)"


def capacity_level_id(slo_text: str) -> str:
    return f"{CAPACITY_LEVEL_PREFIX}[{slo_text}]"


@dataclass(frozen=True)
class Probe:
    """One rate tried: whether it met the SLO (stable, and every target within its limit), and why in words."""

    rate_per_s: float
    met: bool
    why: str
    achieved_per_s: float = math.nan
    slo: SLOResult | None = None


@dataclass(frozen=True)
class CapacityResult:
    """The search's answer. `capacity_per_s` is the highest rate met (None: not even the lowest tried);
    `missed_per_s` the lowest rate missed above it (None: the search stopped at a limit first, `limited_by`)."""

    slo: str
    capacity_per_s: float | None
    missed_per_s: float | None
    probes: tuple[Probe, ...]
    limited_by: str = ""

    @property
    def bracketed(self) -> bool:
        return self.capacity_per_s is not None and self.missed_per_s is not None

    @property
    def bracket_pct(self) -> float:
        """How far apart the rate met and the rate missed are, in % of the rate met: the answer's uncertainty."""
        if not self.bracketed:
            return math.nan
        return (self.missed_per_s / self.capacity_per_s - 1.0) * 100.0

    @property
    def settled(self) -> bool:
        """The probe at the capacity met the SLO at the confidence slo.CONFIDENCE states (not only as measured)."""
        met = self.probe_at(self.capacity_per_s)
        return met is not None and met.slo is not None and met.slo.settled

    def probe_at(self, rate_per_s: float | None) -> Probe | None:
        return next((probe for probe in self.probes if probe.rate_per_s == rate_per_s), None)

    def metrics(self) -> dict[str, float]:
        """What a baseline stores (bracketed searches only): the capacity, gated as throughput is, and the bracket's
        width as its spread, so a change within the search's own uncertainty is never a regression."""
        return {
            "capacity_per_s": float(self.capacity_per_s),
            "capacity_spread_pct": self.bracket_pct,
            "capacity_missed_per_s": float(self.missed_per_s),
            "capacity_probes": float(len(self.probes)),
        }

    def describe(self) -> str:
        tried = ", ".join(f"{p.rate_per_s:.3g}/s {'met' if p.met else 'missed'}" for p in self.probes)
        if self.capacity_per_s is None:
            return f"no rate tried met the SLO {self.slo}: {self.limited_by} (tried {tried})"
        confidence = (
            f"met at {CONFIDENCE:.0%} confidence"
            if self.settled
            else f"met as measured, not at {CONFIDENCE:.0%} confidence"
        )
        if not self.bracketed:
            return (
                f"at least {self.capacity_per_s:.3g} requests/s within the SLO {self.slo} ({confidence}); no upper "
                f"bound: {self.limited_by} (tried {tried})"
            )
        return (
            f"{self.capacity_per_s:.3g} requests/s within the SLO {self.slo} ({confidence}); "
            f"{self.missed_per_s:.3g}/s missed it (+{self.bracket_pct:.1f}%) (tried {tried})"
        )


def search_capacity(
    measure: Callable[[float], Probe],
    start_per_s: float,
    slo_text: str,
    max_per_s: float = MAX_REQUEST_RATE,
    max_reason: str = LOAD_GENERATOR_LIMIT,
    precision_pct: float = DEFAULT_PRECISION_PCT,
    max_probes: int = MAX_PROBES,
) -> CapacityResult:
    """Bracket the highest rate that meets the SLO by doubling from `start_per_s` (or halving, when the start
    misses), then bisect until the bracket is within `precision_pct` or `max_probes` are spent. `measure(rate)`
    measures one open-loop level; the search never asks for more than `max_per_s` (`max_reason` says why)."""
    if not (math.isfinite(start_per_s) and start_per_s > 0):
        raise ValueError(f"a capacity search starts at a rate above 0 requests/s, not {start_per_s}")
    probes: list[Probe] = []

    def probe(rate: float) -> Probe:
        """Measure at `rate`; the probe's own rate (the level as measured, rounded as levels are) is the one kept."""
        result = measure(rate)
        probes.append(result)
        return result

    def answer(met: float | None, missed: float | None, limited_by: str = "") -> CapacityResult:
        return CapacityResult(slo_text, met, missed, tuple(probes), limited_by)

    rate = min(start_per_s, max_per_s)
    met_rate: float | None = None
    missed_rate: float | None = None
    first = probe(rate)
    if first.met:
        met_rate = first.rate_per_s
        while missed_rate is None:
            if rate >= max_per_s:
                return answer(met_rate, None, f"{max_reason} met it")
            if len(probes) >= max_probes:
                return answer(met_rate, None, f"{max_probes} probes spent doubling")
            rate = min(rate * 2.0, max_per_s)
            doubled = probe(rate)
            if doubled.met:
                met_rate = doubled.rate_per_s
            else:
                missed_rate = doubled.rate_per_s
    else:
        missed_rate = first.rate_per_s
        for _ in range(MAX_HALVINGS):
            rate /= 2.0
            halved = probe(rate)
            if halved.met:
                met_rate = halved.rate_per_s
                break
            missed_rate = halved.rate_per_s
        if met_rate is None:
            return answer(
                None, missed_rate, f"it missed even at {rate:.3g} requests/s, 1/{2**MAX_HALVINGS} of the start"
            )
    while missed_rate / met_rate - 1.0 > precision_pct / 100.0 and len(probes) < max_probes:
        middle = probe(math.sqrt(met_rate * missed_rate))  # bisect in log space: brackets are ratios
        if middle.met:
            met_rate = middle.rate_per_s
        else:
            missed_rate = middle.rate_per_s
    return answer(met_rate, missed_rate)


def start_rate_per_s(results: Sequence[JudgedLevel], variant: str) -> float:
    """Where a search starts: the highest throughput the variant reached at a concurrency level of this run (what
    it serves when kept busy, so the capacity is near), else 1 request/s."""
    reached = [
        judged.measurement.summary.throughput_infer_per_s
        for judged in results
        if judged.variant == variant and judged.measurement.level.mode == CONCURRENCY and not judged.capacity_probe
    ]
    best = max(reached, default=0.0)
    return best if best > 0 else 1.0


def probe_from_level(judged: JudgedLevel) -> Probe:
    """A measured open-loop level as a probe: met when stable and within every target of the SLO."""
    measurement, slo = judged.measurement, judged.slo
    summary = measurement.summary
    achieved = measurement.achieved_rate_per_s or math.nan
    if slo is None:
        return Probe(measurement.level.value, False, "no SLO target applies to a request level", achieved)
    if not summary.stable:
        return Probe(measurement.level.value, False, f"unstable: {summary.stability_reason}", achieved, slo)
    return Probe(measurement.level.value, slo.met, slo.describe(), achieved, slo)


def search_variant_capacity(
    run: PerfRun, variant: Variant, start_per_s: float, ceiling_per_s: float | None = None
) -> CapacityResult:
    """Search `variant`'s capacity at its SLO on the run's server. Probes are measured as request-rate levels are and
    held to the SLO only (PerfRun.probe_level): never judged against a baseline, never in the run's results. The
    client ceiling, when known, bounds the search: beyond it the load generator, not the server, is measured."""
    service_level = variant_service_level(variant, run.settings)
    if service_level is None:
        raise ValueError(f"{variant.name} has no SLO to search a capacity at")
    max_per_s, max_reason = MAX_REQUEST_RATE, LOAD_GENERATOR_LIMIT
    if ceiling_per_s is not None and ceiling_per_s < max_per_s:
        max_per_s, max_reason = ceiling_per_s, f"the client ceiling ({ceiling_per_s:.3g} requests/s)"

    def measure(rate: float) -> Probe:
        return probe_from_level(run.probe_level(variant, LoadLevel(REQUEST_RATE, round(rate, 6))))

    return search_capacity(measure, start_per_s, service_level.text, max_per_s, max_reason)
