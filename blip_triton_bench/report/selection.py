"""The data behind the pick-a-variant and serving-efficiency tables: per variant, its speed beside what it
costs in accuracy against the FP32 teacher, and its best served throughput beside in-process ONNX Runtime
(on its own provider at the batch size its dynamic batcher formed, and on the CPU at batch 1).

Reads what the session's tests recorded; measures and renders nothing (blip_triton_bench.report renders).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from blip_triton_bench.captioning.latency import CaptionLatency
from blip_triton_bench.judging.efficiency import InProcessReference
from blip_triton_bench.runs.perf import JudgedLevel


@dataclass(frozen=True)
class VariantSummary:
    variant: str
    artifact: str
    best_infer_per_s: float | None  # best stable-or-not level of this run (None: no load level measured)
    best_level: str | None
    p99_ms_at_best: float | None
    caption_ms: float | None  # median ms per caption of --caption-tokens tokens
    caption_way: str | None
    top1_vs_teacher: float | None
    cosine_vs_teacher: float | None
    caption_match_vs_teacher: float | None
    artifact_mb: float | None
    load_s: float | None

    @property
    def captions_per_s(self) -> float | None:
        return None if self.caption_ms is None else 1000.0 / self.caption_ms


def summarize_variants(
    artifacts: Mapping[str, str],
    results: Sequence[JudgedLevel],
    caption_latency: Mapping[str, CaptionLatency],
    accuracy: Mapping[str, object],
    caption_match: Mapping[str, float],
    artifact_bytes: Mapping[str, int],
    load_s: Mapping[str, float],
) -> list[VariantSummary]:
    """One summary per variant in `artifacts` (name -> artifact kind) that any test measured."""
    summaries = []
    for name, artifact in artifacts.items():
        levels = [judged for judged in results if judged.variant == name]
        best = max(levels, key=lambda judged: judged.measurement.summary.throughput_infer_per_s, default=None)
        latency = caption_latency.get(name)
        agreement = accuracy.get(name)
        if best is None and latency is None and agreement is None and name not in caption_match:
            continue
        summaries.append(
            VariantSummary(
                variant=name,
                artifact=artifact,
                best_infer_per_s=best.measurement.summary.throughput_infer_per_s if best else None,
                best_level=best.measurement.level.level_id if best else None,
                p99_ms_at_best=best.measurement.summary.latency_p99_ms if best else None,
                caption_ms=latency.metrics()["caption_ms"] if latency else None,
                caption_way=latency.way if latency else None,
                top1_vs_teacher=getattr(agreement, "top1", None),
                cosine_vs_teacher=getattr(agreement, "cosine_mean", None),
                caption_match_vs_teacher=caption_match.get(name),
                artifact_mb=artifact_bytes[name] / 1e6 if name in artifact_bytes else None,
                load_s=load_s.get(name),
            )
        )
    return summaries


def best_levels(results: Sequence[JudgedLevel]) -> dict[str, JudgedLevel]:
    """Each variant's level of highest served throughput (the first measured of a tie), in order of measurement."""
    best: dict[str, JudgedLevel] = {}
    for judged in results:
        current = best.get(judged.variant)
        if current is None or (
            judged.measurement.summary.throughput_infer_per_s > current.measurement.summary.throughput_infer_per_s
        ):
            best[judged.variant] = judged
    return best


@dataclass(frozen=True)
class ServingEfficiency:
    """A variant's best served throughput beside in-process ONNX Runtime on the same machine, same run: on the
    variant's own provider at the batch size its dynamic batcher formed there, and on the CPU at batch 1."""

    variant: str
    best_infer_per_s: float
    best_level: str
    batches_formed: dict[int, int]  # batch size -> executions at the best level
    in_process: InProcessReference | None  # None: suite/test_serving_efficiency.py did not run for it
    min_ratio: float | None  # the config's bench_min_serving_efficiency; None: only reported
    batch1_cpu_infer_per_s: float | None  # suite/test_benchmarks.py's in-process reference (CPU, batch 1)

    @property
    def ratio(self) -> float | None:
        if self.in_process is None or not self.in_process.infer_per_s:
            return None
        return self.best_infer_per_s / self.in_process.infer_per_s

    @property
    def batch1_cpu_ratio(self) -> float | None:
        if not self.batch1_cpu_infer_per_s:
            return None
        return self.best_infer_per_s / self.batch1_cpu_infer_per_s

    @property
    def meets_minimum(self) -> bool | None:
        """None when there is no minimum or nothing to hold it to."""
        if self.min_ratio is None or self.ratio is None:
            return None
        return self.ratio >= self.min_ratio


def serving_efficiency(
    results: Sequence[JudgedLevel],
    batch1_cpu_infer_per_s: float | None,
    in_process: Mapping[str, InProcessReference] | None = None,
    min_ratios: Mapping[str, float] | None = None,
) -> list[ServingEfficiency]:
    in_process, min_ratios = in_process or {}, min_ratios or {}
    return [
        ServingEfficiency(
            variant=variant,
            best_infer_per_s=judged.measurement.summary.throughput_infer_per_s,
            best_level=judged.measurement.level.level_id,
            batches_formed=dict(judged.measurement.server.executions_by_batch_size)
            if judged.measurement.server
            else {},
            in_process=in_process.get(variant),
            min_ratio=min_ratios.get(variant),
            batch1_cpu_infer_per_s=batch1_cpu_infer_per_s,
        )
        for variant, judged in best_levels(results).items()
    ]
