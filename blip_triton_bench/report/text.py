"""Every table and line a person reads: load levels, serving efficiency, start-up, captions, pick-a-variant,
the sweep, and the CSV rows, from the run's data; one verdict text and one CSV column list for all of them."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence

from blip_triton_bench.captioning.latency import CaptionLatency, speedup
from blip_triton_bench.captioning.load import CAPTION_CONCURRENCY, CaptionLevelMeasurement
from blip_triton_bench.judging.slo import SLOResult
from blip_triton_bench.load.engine import CONCURRENCY, OPEN_LOOP_BACKLOG_S, LevelMeasurement
from blip_triton_bench.report.selection import ServingEfficiency, VariantSummary
from blip_triton_bench.runs.ab import ABLevel
from blip_triton_bench.runs.capacity import CapacityResult
from blip_triton_bench.runs.perf import STARTUP_LEVEL, FailedLevel, JudgedLevel, JudgedNumbers
from blip_triton_bench.runs.sweep import SweepFailure, SweepMeasurement, SweepPoint
from blip_triton_bench.servers.resources import ResourceUsage

#: Resource use per level under Model Analyzer's names (perf_analyzer has none): CPU as a mean over the measured
#: windows, memory as its peak, GPU utilisation and power as means.
RESOURCE_CSV_COLUMNS = (
    "CPU Utilization (%)",
    "RAM Usage (MB)",
    "GPU Utilization (%)",
    "GPU Memory Usage (MB)",
    "GPU Power Usage (W)",
)

#: perf_analyzer's CSV column names where one exists (latencies in microseconds, as it writes them).
CSV_COLUMNS = (
    "Variant",
    "Concurrency",
    "Request Rate",
    "Inferences/Second",
    "Server Queue",
    "Server Compute Input",
    "Server Compute Infer",
    "Server Compute Output",
    "p50 latency",
    "p90 latency",
    "p95 latency",
    "p99 latency",
    "Avg latency",
    "Errors",
    "Stable",
    "Avg Batch Size",
    "Baseline Inferences/Second",
    "Baseline p99 latency",
    "Verdict",
    *RESOURCE_CSV_COLUMNS,
)

#: The sweep's CSV: the level columns it measures, then the knobs, then where the point stands.
SWEEP_MEASURED_COLUMNS = (
    "Variant",
    "Concurrency",
    "Request Rate",
    "Inferences/Second",
    "p50 latency",
    "p99 latency",
    "Errors",
)
SWEEP_CSV_COLUMNS = (
    *(column for column in CSV_COLUMNS if column in SWEEP_MEASURED_COLUMNS),
    "max_batch_size",
    "preferred_batch_size",
    "max_queue_delay_microseconds",
    "instance_count",
    "intra_op_thread_count",
    "Stable",
    "On Frontier",
    "Best",
)


def usec(ms: float | None) -> str:
    """Milliseconds as perf_analyzer's CSV writes latencies: whole microseconds, empty when unknown."""
    return "" if ms is None or math.isnan(ms) else str(round(ms * 1000.0))


def level_cells(mode: str, value: float) -> dict[str, str]:
    """The Concurrency / Request Rate cells of a row: one is filled, as perf_analyzer does."""
    if mode == CONCURRENCY:
        return {"Concurrency": str(int(value)) if float(value).is_integer() else f"{value:g}", "Request Rate": ""}
    return {"Concurrency": "", "Request Rate": f"{value:g}"}


def csv_text(columns: Sequence[str], rows: Sequence[Mapping[str, str]]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()


def verdict_text(judged: JudgedLevel | JudgedNumbers) -> str:
    """One verdict text for every table: the worst metric's status and change against the baseline."""
    if isinstance(judged, JudgedLevel) and judged.capacity_probe:
        return "a capacity search's probe: held to the SLO only"
    if judged.baseline_metrics is None:
        return "no baseline"
    if not judged.verdicts:
        return "no comparable metric"
    worst = max(judged.verdicts, key=lambda verdict: verdict.worsening_pct)
    statuses = {verdict.status.value for verdict in judged.verdicts}
    status = next((name for name in ("regression", "inconclusive", "improved") if name in statuses), "pass")
    tested = "".join(f", p {v.p_value:.3f}" for v in judged.verdicts if v is worst and not math.isnan(v.p_value))
    # A pass means little when the run could only have seen a slowdown far beyond the tolerance: say how far.
    power = "".join(
        f"; detects >= {v.detectable_pct:.1f}%" for v in judged.verdicts if not math.isnan(v.detectable_pct)
    )
    return f"{status} ({worst.metric} {worst.change_pct:+.1f}%{tested}){power}"


def csv_row(judged: JudgedLevel) -> dict[str, str]:
    measurement, summary = judged.measurement, judged.measurement.summary
    server = measurement.server
    baseline = judged.baseline_metrics or {}
    return {
        "Variant": judged.variant,
        **level_cells(measurement.level.mode, measurement.level.value),
        "Inferences/Second": f"{summary.throughput_infer_per_s:.4f}",
        "Server Queue": usec(server.queue_ms) if server else "",
        "Server Compute Input": usec(server.compute_input_ms) if server else "",
        "Server Compute Infer": usec(server.compute_infer_ms) if server else "",
        "Server Compute Output": usec(server.compute_output_ms) if server else "",
        "p50 latency": usec(summary.latency_p50_ms),
        "p90 latency": usec(summary.latency_p90_ms),
        "p95 latency": usec(summary.latency_p95_ms),
        "p99 latency": usec(summary.latency_p99_ms),
        "Avg latency": usec(summary.latency_avg_ms),
        "Errors": str(summary.errors),
        "Stable": "yes" if summary.stable else "no",
        "Avg Batch Size": f"{server.average_batch_size:.2f}" if server else "",
        "Baseline Inferences/Second": f"{baseline['throughput_infer_per_s']:.4f}" if baseline else "",
        "Baseline p99 latency": usec(baseline.get("latency_p99_ms")) if baseline else "",
        "Verdict": verdict_text(judged),
        **resource_cells(judged.resources),
    }


def _number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def resource_cells(usage: ResourceUsage | None) -> dict[str, str]:
    """The resource columns of a CSV row; empty where the metric was not available."""
    if usage is None:
        return dict.fromkeys(RESOURCE_CSV_COLUMNS, "")
    return {
        "CPU Utilization (%)": _number(usage.server_cpu_pct_mean),
        "RAM Usage (MB)": _number(usage.server_rss_mb_max),
        "GPU Utilization (%)": _number(usage.gpu_util_pct_mean),
        "GPU Memory Usage (MB)": _number(usage.gpu_memory_mb_max),
        "GPU Power Usage (W)": _number(usage.gpu_power_w_mean),
    }


def resources_cell(usage: ResourceUsage | None) -> str:
    """The levels table's compact resource column, e.g. `CPU 182% 412 MB; GPU 73% 2100 MB 180 W`."""
    if usage is None:
        return "-"
    parts = []
    if usage.server_cpu_pct_mean is not None or usage.server_rss_mb_max is not None:
        cpu = f"{usage.server_cpu_pct_mean:.0f}%" if usage.server_cpu_pct_mean is not None else "?%"
        rss = f"{usage.server_rss_mb_max:.0f} MB" if usage.server_rss_mb_max is not None else "? MB"
        parts.append(f"CPU {cpu} {rss}")
    if usage.gpu_util_pct_mean is not None:
        parts.append(
            f"GPU {usage.gpu_util_pct_mean:.0f}% {_number(usage.gpu_memory_mb_max, 0)} MB "
            f"{_number(usage.gpu_power_w_mean, 0)} W"
        )
    return "; ".join(parts) or "n/a"


def resource_notes(results: Sequence[JudgedLevel]) -> list[str]:
    """Why resource metrics are missing (external server, no NVML), once per reason, for under the table."""
    reasons = dict.fromkeys(
        reason for judged in results if judged.resources is not None for reason in judged.resources.unavailable
    )
    return [f"Resource use not measured: {reason}" for reason in reasons]


def batches_formed(judged: JudgedLevel) -> str:
    """e.g. `1x40 2x12`: batch size x executions the dynamic batcher formed during the measured windows."""
    server = judged.measurement.server
    if server is None or not server.executions_by_batch_size:
        return "-"
    return " ".join(f"{size}x{count}" for size, count in server.executions_by_batch_size.items())


def held_sends_note(measurement: LevelMeasurement) -> str:
    return (
        f"{measurement.held_sends} sends waited with {measurement.in_flight_cap} requests in flight (the open loop's "
        f"cap, {OPEN_LOOP_BACKLOG_S:g} s of its rate): the schedule slipped; their latency counts from it"
    )


def markdown_table(results: Sequence[JudgedLevel]) -> str:
    lines = [
        "| variant | level | infer/s | p50 ms | p99 ms | batches formed (size x count) | vs baseline "
        "| server CPU (mean) RAM (max); GPU util mem power | notes |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for judged in results:
        summary = judged.measurement.summary
        notes = []
        if not summary.stable:
            notes.append(f"UNSTABLE: {summary.stability_reason}")
        if summary.errors:
            notes.append(f"{summary.errors} errors")
        if judged.near_ceiling:
            notes.append(f"near client ceiling ({judged.ceiling_infer_per_s:.1f} infer/s)")
        if judged.measurement.offered_rate_per_s is not None:
            notes.append(
                f"offered {judged.measurement.offered_rate_per_s:g}/s, achieved {judged.measurement.achieved_rate_per_s:.2f}/s"
            )
        if judged.measurement.held_sends:
            notes.append(held_sends_note(judged.measurement))
        lines.append(
            f"| {judged.variant} | {judged.measurement.level.level_id} | {summary.throughput_infer_per_s:.2f} | "
            f"{summary.latency_p50_ms:.1f} | {summary.latency_p99_ms:.1f} | {batches_formed(judged)} | "
            f"{verdict_text(judged)} | {resources_cell(judged.resources)} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def efficiency_table(efficiencies: Sequence[ServingEfficiency]) -> str:
    """Best served infer/s against in-process ONNX Runtime at the batch the batcher formed (the variant's own
    provider), its bench_min_serving_efficiency, and against in-process CPU at batch 1."""
    lines = [
        "| variant | best served infer/s (level) | batches formed there (size x count) | in-process infer/s at the "
        "formed batch (provider) | served / in-process | min (bench_min_serving_efficiency) | in-process CPU batch 1 "
        "infer/s | served / CPU batch 1 |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for item in efficiencies:
        formed = " ".join(f"{size}x{count}" for size, count in item.batches_formed.items()) or "-"
        reference = item.in_process
        at_batch = (
            f"{reference.infer_per_s:.2f} at batch {reference.batch_size} ({reference.provider})"
            if reference
            else "not measured"
        )
        if item.min_ratio is None:
            minimum = "- (reported only)"
        else:
            outcome = {True: "met", False: "BELOW", None: "not checked"}[item.meets_minimum]
            minimum = f"{item.min_ratio:g}: {outcome}"
        batch1 = f"{item.batch1_cpu_infer_per_s:.2f}" if item.batch1_cpu_infer_per_s else "not measured"
        lines.append(
            f"| {item.variant} | {item.best_infer_per_s:.2f} ({item.best_level}) | {formed} | {at_batch} | "
            f"{_cell(item.ratio, '.2f')} | {minimum} | {batch1} | {_cell(item.batch1_cpu_ratio, '.2f')} |"
        )
    return "\n".join(lines)


def ab_table(levels: Sequence[ABLevel]) -> str:
    """One row per level compared: each side's median throughput over its rounds (infer/s, or output tokens/s for a
    caption level), the paired change and its 95 % interval, the test's p, what the run could detect, each side's
    p99 latency (of a request, or of a caption), and the verdict."""
    lines = [
        "| variant | level | rounds | before | after | change (95% CI) | p (one-sided) | detects >= |"
        " p99 ms before / after | verdict |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for level in levels:
        verdict = level.verdict
        lines.append(
            f"| {level.variant} | {level.level_id} | {verdict.rounds} | "
            f"{statistics.median(verdict.before_per_round):.2f} {verdict.unit} | "
            f"{statistics.median(verdict.after_per_round):.2f} {verdict.unit} | {verdict.effect_pct:+.1f}% "
            f"({verdict.ci_low_pct:+.1f}% to {verdict.ci_high_pct:+.1f}%) | {verdict.p_value:.3g} | "
            f"{verdict.detectable_pct:.1f}% | {level.before_p99_ms:.1f} / {level.after_p99_ms:.1f} | "
            f"{verdict.status.value.upper()} |"
        )
    return "\n".join(lines)


def load_side_table(results: Sequence[JudgedLevel]) -> str:
    """Levels driven by load workers: each worker's share, where it ran, what it delivered inside the windows, and
    its clock offset from the coordinator (with the offset's uncertainty, half the best round trip)."""
    lines = [
        "| variant | level | worker | host | share | completed | infer/s | clock offset ms |",
        "| --- | --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    for judged in results:
        shares = judged.measurement.load_workers
        for share in shares:
            lines.append(
                f"| {judged.variant} | {judged.level_id} | {share.name} | {share.host} | {share.level.level_id} | "
                f"{share.completed} | {share.infer_per_s:.2f} | {share.clock_offset_ms:+.3f} "
                f"± {share.clock_uncertainty_ms:.3f} |"
            )
        if shares:
            merged = sum(len(window.latencies_ms) for window in judged.measurement.windows)
            workers = sum(share.completed for share in shares)
            lines.append(
                f"| {judged.variant} | {judged.level_id} | all, merged | | | {merged} (workers: {workers}) | | |"
            )
    return "\n".join(lines)


def failed_levels_table(failed: Sequence[FailedLevel]) -> str:
    """One row per level without a measurement and its cause's first line (results.json keeps the log lines)."""
    lines = ["| variant | level | cause |", "| --- | --- | --- |"]
    for level in failed:
        cause = level.cause.splitlines()[0].replace("|", "\\|")
        lines.append(f"| {level.variant} | {level.level_id} | {cause} |")
    return "\n".join(lines)


def startup_table(results: Sequence[JudgedNumbers]) -> str:
    lines = [
        "| variant | cold start s | model load s | first request ms | steady request ms | vs baseline |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for result in results:
        if result.level_id != STARTUP_LEVEL:
            continue
        metrics = result.metrics
        versus = verdict_text(result)
        lines.append(
            f"| {result.variant} | {metrics.get('cold_start_s', math.nan):.2f} | {metrics['model_load_s']:.2f} | "
            f"{metrics['first_request_ms']:.1f} | {metrics['steady_request_ms']:.1f} | {versus} |"
        )
    return "\n".join(lines)


def progress_line(judged: JudgedLevel) -> str:
    """One line per measured level, printed while a long sweep runs."""
    summary = judged.measurement.summary
    stable = f"stable over windows {list(summary.window_indices)}" if summary.stable else "UNSTABLE"
    slo = ""
    if judged.slo is not None:
        verdict = "SLO met" if judged.slo.met else "SLO MISSED"
        slo = f"; {verdict}, goodput {judged.slo.goodput_per_s:.2f}/s"
    return (
        f"[perf] {judged.variant} {judged.measurement.level.level_id}: {summary.throughput_infer_per_s:.2f} infer/s, "
        f"p50 {summary.latency_p50_ms:.1f} ms, p99 {summary.latency_p99_ms:.1f} ms, {len(judged.measurement.windows)} "
        f"windows, {stable}; {verdict_text(judged)}{slo}"
    )


def capacity_table(found: Sequence[tuple[str, CapacityResult]]) -> str:
    """One row per variant searched: its capacity at the SLO, the rate that missed, and how the search went."""
    lines = [
        "| variant | SLO | capacity requests/s | missed at requests/s | bracket | settled | probes | how |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for variant, result in found:
        capacity = _cell(result.capacity_per_s, ".3g")
        missed = _cell(result.missed_per_s, ".3g")
        bracket = f"+{result.bracket_pct:.1f}%" if result.bracketed else "-"
        settled = "yes" if result.settled else "no"
        lines.append(
            f"| {variant} | {result.slo} | {capacity} | {missed} | {bracket} | {settled} | {len(result.probes)} | "
            f"{result.describe()} |"
        )
    return "\n".join(lines)


def slo_rows(results: Sequence[JudgedLevel | JudgedNumbers]) -> list[tuple[str, str, SLOResult]]:
    """(variant, level, result) for every level judged against an SLO, request levels and caption levels alike."""
    return [(item.variant, item.level_id, item.slo) for item in results if item.slo is not None]


def slo_table(rows: Sequence[tuple[str, str, SLOResult]]) -> str:
    """One row per level held to an SLO: goodput beside throughput, and each target's percentile against its limit."""
    lines = [
        "| variant | level | SLO | goodput/s | good of all | met | targets |",
        "| --- | --- | --- | ---: | ---: | --- | --- |",
    ]
    for variant, level_id, result in rows:
        met = ("met" if result.met else "MISSED") + ("" if result.settled else " (not settled)")
        targets = "; ".join(target.describe() for target in result.targets)
        if result.not_applicable:
            targets += f"; not measured at this level: {', '.join(result.not_applicable)}"
        lines.append(
            f"| {variant} | {level_id} | {result.slo} | {result.goodput_per_s:.2f} {result.unit} | "
            f"{result.good} of {result.requests} | {met} | {targets} |"
        )
    return "\n".join(lines)


def caption_table(latencies: Sequence[CaptionLatency]) -> str:
    lines = [
        "| variant | way | tokens | ms per caption (spread) | time to first token ms | inter-token latency ms | tokens/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for latency in latencies:
        metrics = latency.metrics()
        itl = metrics.get("inter_token_latency_ms")
        lines.append(
            f"| {latency.variant} | {latency.way} | {latency.output_tokens} | {metrics['caption_ms']:.1f} "
            f"({metrics['caption_spread_pct']:.0f}%) | {metrics['time_to_first_token_ms']:.1f} | "
            f"{'-' if itl is None else f'{itl:.1f}'} | {metrics['output_token_throughput_per_s']:.2f} |"
        )
    return "\n".join(lines)


def caption_load_table(levels: Sequence[tuple[str, CaptionLevelMeasurement]]) -> str:
    """One row per captioner and caption load level: genai-perf's numbers, percentiles over every caption."""
    lines = [
        "| captioner | level | output tokens/s (spread) | captions/s | time to first token ms p50 / p90 / p99 | "
        "inter-token latency ms p50 / p90 / p99 | request latency ms p50 / p90 / p99 | captions | windows |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for captioner, measurement in levels:
        metrics = measurement.metrics()

        def percentiles(name: str, metrics: dict[str, float] = metrics) -> str:
            keys = (f"{name}_ms", f"{name}_p90_ms", f"{name}_p99_ms")
            return " / ".join(_cell(metrics.get(key), ".1f") for key in keys)

        stable = "stable" if measurement.stability.stable else "unstable"
        lines.append(
            f"| {captioner} | {measurement.level.level_id} | {metrics['output_token_throughput_per_s']:.1f} "
            f"({metrics['output_token_throughput_spread_pct']:.0f}%) | {metrics['caption_throughput_per_s']:.2f} | "
            f"{percentiles('time_to_first_token')} | {percentiles('inter_token_latency')} | {percentiles('caption')} | "
            f"{int(metrics['caption_count'])} | {len(measurement.judged)} of {len(measurement.windows)}, {stable} |"
        )
    return "\n".join(lines)


def caption_scaling_lines(levels: Sequence[tuple[str, CaptionLevelMeasurement]]) -> list[str]:
    """Per captioner: output tokens/s at its highest closed-loop concurrency over concurrency 1 (same run)."""
    by_captioner: dict[str, dict[float, float]] = {}
    for captioner, measurement in levels:
        if measurement.level.mode == CAPTION_CONCURRENCY:
            tokens = measurement.metrics()["output_token_throughput_per_s"]
            by_captioner.setdefault(captioner, {})[measurement.level.value] = tokens
    lines = []
    for captioner, tokens_at in by_captioner.items():
        highest = max(tokens_at)
        if 1 in tokens_at and highest > 1 and tokens_at[1] > 0:
            lines.append(
                f"{captioner}: {tokens_at[highest] / tokens_at[1]:.2f}x the output tokens/s at caption concurrency "
                f"{highest:g} as at 1 (same run; in-flight batching shares each decoder step)"
            )
    return lines


def _cell(value: float | None, form: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, form)


def choice_table(summaries: Sequence[VariantSummary]) -> str:
    lines = [
        "| variant | artifact | best infer/s (level) | p99 ms there | ms per caption | top-1 vs FP32 | cosine vs FP32 "
        "| caption match vs FP32 | artifact MB | load s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for item in summaries:
        best = f"{item.best_infer_per_s:.2f} ({item.best_level})" if item.best_infer_per_s is not None else "-"
        lines.append(
            f"| {item.variant} | {item.artifact} | {best} | {_cell(item.p99_ms_at_best, '.1f')} | "
            f"{_cell(item.caption_ms, '.0f')} | {_cell(item.top1_vs_teacher, '.1%')} | "
            f"{_cell(item.cosine_vs_teacher, '.4f')} | {_cell(item.caption_match_vs_teacher, '.0%')} | "
            f"{_cell(item.artifact_mb, '.0f')} | {_cell(item.load_s, '.2f')} |"
        )
    return "\n".join(lines)


def _reference_summary(summaries: Sequence[VariantSummary], reference: str | None) -> VariantSummary | None:
    return next((item for item in summaries if item.variant == reference), None) if reference else None


def throughput_ratio_lines(summaries: Sequence[VariantSummary], reference: str | None) -> list[str]:
    """Same-run throughput ratios against the FP32 reference variant (best levels)."""
    base = _reference_summary(summaries, reference)
    if base is None:
        return []
    return [
        f"{item.variant} vs {base.variant}: {item.best_infer_per_s / base.best_infer_per_s:.2f}x infer/s "
        f"(best levels, same run)"
        for item in summaries
        if item.variant != base.variant and item.best_infer_per_s and base.best_infer_per_s
    ]


def caption_ratio_lines(
    summaries: Sequence[VariantSummary], caption_latency: Mapping[str, CaptionLatency], reference: str | None
) -> list[str]:
    """Same-run caption latency ratios against the FP32 reference variant, for every way of captioning."""
    base = _reference_summary(summaries, reference)
    if base is None or base.variant not in caption_latency:
        return []
    lines = []
    for item in summaries:
        if item.variant == base.variant or item.variant not in caption_latency:
            continue
        try:
            ratio = speedup(caption_latency[item.variant], caption_latency[base.variant])
        except ValueError as error:
            lines.append(str(error))
            continue
        lines.append(
            f"{item.variant} vs {base.variant}: captions {ratio:.2f}x faster "
            f"({caption_latency[item.variant].output_tokens} tokens, medians, same run)"
        )
    return lines


# ------------------------------------------------------------------------------------------ the sweep


def budget_text(latency_budget_ms: float | None) -> str:
    return "no p99 budget (the fastest)" if latency_budget_ms is None else f"p99 <= {latency_budget_ms:g} ms"


def sweep_csv(points: Sequence[SweepPoint], rows: Sequence[SweepMeasurement], frontier, winner) -> str:
    by_name = {point.name: point for point in points}
    on_frontier = {id(m) for m in frontier}
    return csv_text(
        SWEEP_CSV_COLUMNS,
        [
            {
                "Variant": m.point_name,
                **level_cells(m.mode, m.level_value),
                "Inferences/Second": f"{m.throughput_infer_per_s:.4f}",
                "p50 latency": usec(m.latency_p50_ms),
                "p99 latency": usec(m.latency_p99_ms),
                "Errors": str(m.errors),
                **by_name[m.point_name].knobs,
                "Stable": "yes" if m.stable else "no",
                "On Frontier": "yes" if id(m) in on_frontier else "no",
                "Best": "yes" if m is winner else "no",
            }
            for m in rows
        ],
    )


def winner_sentence(winner: SweepMeasurement | None, rows: Sequence[SweepMeasurement], budget: float | None) -> str:
    """One sentence: the best config under the budget, or why none fits."""
    if winner is not None:
        return (
            f"best under {budget_text(budget)}: {winner.point_name} at {winner.level_id}: "
            f"{winner.throughput_infer_per_s:.2f} infer/s, p99 {winner.latency_p99_ms:.1f} ms"
        )
    usable = [m for m in rows if m.usable]
    if not usable:
        return (
            f"no config fits {budget_text(budget)}: none of the {len(rows)} measurements was stable and error-free; "
            "best_config.pbtxt not written"
        )
    lowest = min(usable, key=lambda m: (m.latency_p99_ms, -m.throughput_infer_per_s))
    return (
        f"no config fits {budget_text(budget)}: the lowest stable p99 was {lowest.latency_p99_ms:.1f} ms "
        f"({lowest.point_name} at {lowest.level_id}); best_config.pbtxt not written (raise --latency-budget-ms)"
    )


def failure_text(failure: SweepFailure) -> str:
    """`name: cause (after N levels measured)`, the cause's first line only."""
    after = f" (after {failure.levels_measured} level(s) measured, kept above)" if failure.levels_measured else ""
    return f"{failure.point_name}: {failure.headline}{after}"


def sweep_markdown(
    base_name: str,
    points: Sequence[SweepPoint],
    rows: Sequence[SweepMeasurement],
    frontier,
    winner,
    sentence: str,
    sweep_plot_name: str,
    failures: Sequence[SweepFailure] = (),
) -> str:
    by_name = {point.name: point for point in points}
    on_frontier = {id(m) for m in frontier}
    lines = [
        f"# Batching and instance sweep of {base_name}",
        "",
        sentence,
        "",
        "| config | level | max_batch_size | preferred | queue delay us | instances | threads | infer/s | p50 ms "
        "| p99 ms | notes |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in rows:
        knobs = by_name[m.point_name].knobs
        notes = []
        if m is winner:
            notes.append("**best**")
        if id(m) in on_frontier:
            notes.append("frontier")
        if not m.stable:
            notes.append("UNSTABLE")
        if m.errors:
            notes.append(f"{m.errors} errors")
        lines.append(
            f"| {m.point_name} | {m.level_id} | {knobs['max_batch_size']} | {knobs['preferred_batch_size']} | "
            f"{knobs['max_queue_delay_microseconds']} | {knobs['instance_count']} | {knobs['intra_op_thread_count']} | "
            f"{m.throughput_infer_per_s:.2f} | {m.latency_p50_ms:.1f} | {m.latency_p99_ms:.1f} | {', '.join(notes)} |"
        )
    if failures:
        lines += ["", "Failed (left out of the choice):", ""]
        lines += [f"- {failure_text(failure)}" for failure in failures]
    done = {m.point_name for m in rows} | {failure.point_name for failure in failures}
    unmeasured = [point.name for point in points if point.name not in done]
    if unmeasured:
        lines += ["", f"Not measured: {', '.join(unmeasured)}."]
    lines += [
        "",
        "Frontier: the stable, error-free measurements no other beats on both throughput and p99. Threads "
        "'default' is ONNX Runtime's own choice; instances are per instance group of the base config.",
        "",
        f"![]({sweep_plot_name})",
    ]
    return "\n".join(lines) + "\n"
