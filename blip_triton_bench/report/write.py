"""Writes the run's report: results.json, results.csv, report.md and the plots, and the sweep's own report;
every file atomically, so a reader (or an interrupted run) never sees half of one."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tritonclient.grpc import model_config_pb2

from blip_triton_bench.caption_latency import inter_token_floor_lines
from blip_triton_bench.efficiency import InProcessReference
from blip_triton_bench.files import write_text_atomic
from blip_triton_bench.perf import STARTUP_LEVEL, JudgedLevel, JudgedNumbers, PerfRun
from blip_triton_bench.report.plots import (
    plot_ab,
    plot_accuracy_vs_speed,
    plot_caption_load,
    plot_frontier,
    plot_levels,
    plot_resources,
)
from blip_triton_bench.report.text import (
    CSV_COLUMNS,
    ab_table,
    budget_text,
    capacity_table,
    caption_load_table,
    caption_ratio_lines,
    caption_scaling_lines,
    caption_table,
    choice_table,
    csv_row,
    csv_text,
    efficiency_table,
    failed_levels_table,
    failure_text,
    load_side_table,
    markdown_table,
    resource_notes,
    slo_rows,
    slo_table,
    startup_table,
    sweep_csv,
    sweep_markdown,
    throughput_ratio_lines,
    winner_sentence,
)
from blip_triton_bench.repository import LOGITS_ROLE
from blip_triton_bench.selection import serving_efficiency, summarize_variants
from blip_triton_bench.slo import CONFIDENCE
from blip_triton_bench.sweep import (
    SweepFailure,
    SweepMeasurement,
    SweepPoint,
    best_under_budget,
    config_text,
    ordered_measurements,
    pareto_frontier,
)

if TYPE_CHECKING:
    from blip_triton_bench.session import BenchSession

SWEEP_CSV = "sweep.csv"
SWEEP_MARKDOWN = "sweep.md"
SWEEP_PLOT = "sweep_frontier.png"
BEST_CONFIG = "best_config.pbtxt"


PROOF_SECTION = "What this run proved"
SLO_SECTION = "Service-level objective (--slo)"
CAPACITY_SECTION = "Capacity at the SLO"


@dataclass(frozen=True)
class ReportSection:
    """A titled part of report.md beyond the load levels, with the plots it refers to."""

    title: str
    markdown: str
    plots: tuple[Path, ...] = ()
    data: Any = None  # what results.json holds for it (dataclasses and plain values)
    in_summary: bool = True  # False: the terminal summary says it its own way (what the run proved, last)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and type(value).__module__ != "builtins":  # enums
        return value.value
    return value


def write_json(
    path: Path, metadata: Mapping[str, Any], results: Sequence[JudgedLevel], efficiencies, startup=(), sections=()
) -> None:
    document = {
        "metadata": _jsonable(metadata),
        "levels": [_jsonable(judged) for judged in results],
        "startup": [_jsonable(result) for result in startup],
        "serving_efficiency": [
            {
                **_jsonable(item),
                "ratio": item.ratio,
                "meets_minimum": item.meets_minimum,
                "batch1_cpu_ratio": item.batch1_cpu_ratio,
            }
            for item in efficiencies
        ],
        "sections": {
            section.title: {"markdown": section.markdown, "data": _jsonable(section.data)} for section in sections
        },
    }
    write_text_atomic(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, results: Sequence[JudgedLevel]) -> None:
    write_text_atomic(path, csv_text(CSV_COLUMNS, [csv_row(judged) for judged in results]))


def _level_tables(results: Sequence[JudgedLevel], efficiencies, startup: Sequence[JudgedNumbers]) -> tuple[str, str]:
    """The load-level table (with resource notes) and the serving-efficiency table (with start-up)."""
    table = markdown_table(results) if results else "(no load level measured)"
    if notes_on_resources := resource_notes(results):
        table += "\n\n" + "\n".join(f"- {note}" for note in notes_on_resources)
    efficiency = efficiency_table(efficiencies) if efficiencies else ""
    if any(result.level_id == STARTUP_LEVEL for result in startup):
        efficiency = "\n\n".join(part for part in (efficiency, startup_table(startup)) if part)
    return table, efficiency


def _summary_lines(table: str, efficiency: str, sections: Sequence[ReportSection]) -> list[str]:
    lines = [table, ""] + ([efficiency, ""] if efficiency else [])
    for section in sections:
        if section.in_summary:
            lines += [f"{section.title}:", section.markdown, ""]
    return lines


def report_lines(
    results: Sequence[JudgedLevel],
    in_process_infer_per_s: float | None,
    startup: Sequence[JudgedNumbers] = (),
    sections: Sequence[ReportSection] = (),
    in_process: Mapping[str, InProcessReference] | None = None,
    min_ratios: Mapping[str, float] | None = None,
) -> list[str]:
    """The terminal summary's tables, written nowhere: what a run still shows when its report cannot be written."""
    efficiencies = serving_efficiency(results, in_process_infer_per_s, in_process, min_ratios)
    return _summary_lines(*_level_tables(results, efficiencies, startup), sections)


def write_report(
    directory: Path,
    results: Sequence[JudgedLevel],
    in_process_infer_per_s: float | None,
    notes: Sequence[str],
    startup: Sequence[JudgedNumbers] = (),
    sections: Sequence[ReportSection] = (),
    in_process: Mapping[str, InProcessReference] | None = None,
    min_ratios: Mapping[str, float] | None = None,
) -> list[str]:
    """Write results.json, results.csv, report.md and the plots; return the lines for the terminal summary.

    `sections` (caption latency, pick-a-variant, sweep) follow the load-level tables in report.md, the terminal
    summary and results.json. `in_process_infer_per_s` is the CPU batch-1 reference; `in_process` the per-variant
    one at the batch the batcher formed, `min_ratios` the variants' bench_min_serving_efficiency.
    """
    directory.mkdir(parents=True, exist_ok=True)
    efficiencies = serving_efficiency(results, in_process_infer_per_s, in_process, min_ratios)
    table, efficiency = _level_tables(results, efficiencies, startup)
    write_json(directory / "results.json", {"notes": list(notes)}, results, efficiencies, startup, sections)
    write_csv(directory / "results.csv", results)
    plots = plot_levels(results, directory)
    if resources_plot := plot_resources(results, directory):
        plots.append(resources_plot)
    parts = ["# blip-triton-bench report", table] + (["## Serving efficiency", efficiency] if efficiency else [])
    parts += [f"![]({p.name})" for p in plots]
    for section in sections:
        parts += [f"## {section.title}", section.markdown, *[f"![]({p.name})" for p in section.plots]]
    write_text_atomic(directory / "report.md", "\n\n".join(parts) + "\n")
    names = [p.name for p in plots] + [p.name for section in sections for p in section.plots]
    lines = _summary_lines(table, efficiency, sections)
    return [*lines, f"report: {directory} ({', '.join(['results.json', 'results.csv', 'report.md', *names])})"]


def software_changed(perf: PerfRun) -> list[tuple[str, str, tuple[str, ...]]]:
    """(variant, level, changes) for each level judged against a baseline recorded under other software."""
    judged = [*perf.results, *perf.judged_numbers]
    return [(item.variant, item.level_id, item.software_changes) for item in judged if item.software_changes]


def session_sections(session: BenchSession, directory: Path | None) -> list[ReportSection]:
    """Caption latency, the pick-a-variant table and plot, and the sweep, from what the session's tests recorded.

    `directory` None: no plot is drawn (the report could not be written; the tables still reach the summary).
    """
    variants = session.variants
    summaries = summarize_variants(
        {variant.name: ("split" if variant.composing_models else variant.artifact) for variant in variants},
        session.perf.results if session.perf is not None else [],
        session.caption_latency,
        session.accuracy,
        session.caption_match,
        session.variant_bytes(),
        session.load_seconds(),
    )
    reference = next((v.name for v in variants if v.role == LOGITS_ROLE and v.artifact == "fp32"), None)
    caption_ratios = caption_ratio_lines(summaries, session.caption_latency, reference)
    sections = []
    if session.caption_latency:
        latencies = list(session.caption_latency.values())
        sections.append(
            ReportSection(
                "Caption latency (genai-perf metrics)",
                "\n\n".join(
                    [caption_table(latencies), *caption_ratios, *inter_token_floor_lines(session.caption_latency)]
                ),
                data=[
                    {"variant": item.variant, "way": item.way, "captions": len(item.captions), **item.metrics()}
                    for item in latencies
                ],
            )
        )
    if session.caption_load:
        plot = plot_caption_load(session.caption_load, directory) if directory is not None else None
        sections.append(
            ReportSection(
                "Caption load (genai-perf metrics)",
                "\n\n".join([caption_load_table(session.caption_load), *caption_scaling_lines(session.caption_load)]),
                plots=(plot,) if plot else (),
                data=[
                    {"captioner": captioner, "level": measurement.level.level_id, **measurement.metrics()}
                    for captioner, measurement in session.caption_load
                ],
            )
        )
    if summaries:
        plot = plot_accuracy_vs_speed(summaries, directory) if directory is not None else None
        sections.append(
            ReportSection(
                "Pick a variant",
                "\n\n".join([choice_table(summaries), *throughput_ratio_lines(summaries, reference), *caption_ratios]),
                plots=(plot,) if plot else (),
                data=summaries,
            )
        )
    if session.sweep_lines:
        sections.append(ReportSection("Batching and instance sweep", "\n".join(session.sweep_lines)))
    if session.disconnects:
        sections.append(
            ReportSection(
                "Clients that leave mid-caption (--disconnect-stress)",
                "\n".join(f"- {captioner}: {outcome.finding()}" for captioner, outcome in session.disconnects.items()),
                data=[
                    {"captioner": captioner, "finding": outcome.finding(), **outcome.to_dict()}
                    for captioner, outcome in session.disconnects.items()
                ],
            )
        )
    if session.interrupted_during is not None:
        sections.append(
            ReportSection(
                "Interrupted",
                f"Ctrl-C or SIGTERM ended the run during {session.interrupted_during}: what finished before it is in "
                "this report; what it interrupted is not.",
                data=[{"during": session.interrupted_during}],
            )
        )
    if session.server_deaths:
        sections.append(
            ReportSection(
                "Server crashes",
                "\n".join(f"- during {death.during}: {death.cause}" for death in session.server_deaths),
                data=[{"during": d.during, "cause": d.cause, "replaced": d.replaced} for d in session.server_deaths],
            )
        )
    if session.ab is not None and session.ab.results:
        ab_levels = session.ab.results
        plot = plot_ab(ab_levels, directory) if directory is not None else None
        sections.append(
            ReportSection(
                "Before vs after (A/B, one interleaved run)",
                ab_table(ab_levels),
                plots=(plot,) if plot else (),
                data=[level.to_dict() for level in ab_levels],
            )
        )
    if session.perf is not None and (held := slo_rows([*session.perf.results, *session.perf.judged_numbers])):
        sections.append(
            ReportSection(
                SLO_SECTION,
                slo_table(held)
                + "\n\nGoodput counts the requests (captions) that met every target themselves, per second of the "
                "judged windows; a level meets the SLO when each target's percentile, failed requests counted as over, "
                f"is within its limit. 'Not settled': the count of requests cannot show the answer at {CONFIDENCE:.0%} "
                "confidence.",
                data=[
                    {"variant": variant, "level": level, **dataclasses.asdict(result)}
                    for variant, level, result in held
                ],
            )
        )
    if session.capacity:
        sections.append(
            ReportSection(
                CAPACITY_SECTION,
                capacity_table(session.capacity)
                + "\n\nEach probe is an open-loop level at that request rate, measured as every level is; it meets when "
                "it is stable and within every target. The capacity is the highest rate met, the bracket how far above "
                "it the search saw a miss.",
                data=[{"variant": variant, **dataclasses.asdict(result)} for variant, result in session.capacity],
            )
        )
    if session.perf is not None and any(judged.measurement.load_workers for judged in session.perf.results):
        sections.append(ReportSection("Load side (--load-workers)", load_side_table(session.perf.results)))
    if session.perf is not None and session.perf.failed_levels:
        failed = session.perf.failed_levels
        sections.append(
            ReportSection("Levels not measured", failed_levels_table(failed), data=[f.to_dict() for f in failed])
        )
    if session.perf is not None and (changed := software_changed(session.perf)):
        sections.append(
            ReportSection(
                "Software changed since the baselines",
                "\n".join(f"- {variant} {level}: {'; '.join(changes)}" for variant, level, changes in changed)
                + "\n\nA change judged against these baselines may be the upgrade, not the repository.",
                data=[{"variant": v, "level": level, "changes": list(changes)} for v, level, changes in changed],
            )
        )
    if session.proof.findings:
        sections.append(
            ReportSection(PROOF_SECTION, session.proof.markdown(), data=session.proof.to_dicts(), in_summary=False)
        )
    return sections


# ------------------------------------------------------------------------------------------ the sweep


@dataclass(frozen=True)
class SweepReport:
    """What write_sweep_report wrote, the winner, and the lines for the terminal summary."""

    directory: Path
    csv_path: Path
    markdown_path: Path
    plot_path: Path
    best_config_path: Path | None  # None when no config fits the budget
    winner: SweepMeasurement | None
    winner_point: SweepPoint | None
    frontier: tuple[SweepMeasurement, ...]
    lines: list[str] = field(default_factory=list)


def write_sweep_report(
    directory: Path,
    base_name: str,
    points: Sequence[SweepPoint],
    measurements: Sequence[SweepMeasurement],
    latency_budget_ms: float | None,
    failures: Sequence[SweepFailure] = (),
) -> SweepReport:
    """Write sweep.csv, sweep.md, sweep_frontier.png and (when a config fits) best_config.pbtxt under `directory`.

    best_config.pbtxt is the winner's config named `base_name`, to replace the base variant's config.pbtxt.
    `failures` (points whose load, check or measurement raised) are listed in sweep.md and the summary lines.
    Called after every point of a sweep, so each call rewrites the files with everything measured so far.
    """
    rows = ordered_measurements(points, measurements)
    frontier = pareto_frontier(rows)
    winner = best_under_budget(rows, latency_budget_ms)
    winner_point = next((point for point in points if winner and point.name == winner.point_name), None)
    sentence = winner_sentence(winner, rows, latency_budget_ms)
    directory.mkdir(parents=True, exist_ok=True)

    csv_path, markdown_path, plot_path = directory / SWEEP_CSV, directory / SWEEP_MARKDOWN, directory / SWEEP_PLOT
    write_text_atomic(csv_path, sweep_csv(points, rows, frontier, winner))
    write_text_atomic(
        markdown_path, sweep_markdown(base_name, points, rows, frontier, winner, sentence, SWEEP_PLOT, failures)
    )
    plot_frontier(plot_path, rows, frontier, winner, latency_budget_ms)

    best_config_path: Path | None = directory / BEST_CONFIG
    if winner_point is not None:
        best = model_config_pb2.ModelConfig()
        best.CopyFrom(winner_point.config)
        best.name = base_name  # drops into the repository in place of the base variant's config.pbtxt
        # A comment (text_format reads it as one) so the file says where it came from once copied into place.
        header = (
            f"# {winner.point_name} of the batching sweep of {base_name}: {winner.throughput_infer_per_s:.2f} infer/s, "
            f"p99 {winner.latency_p99_ms:.1f} ms at {winner.level_id} ({budget_text(latency_budget_ms)})\n"
        )
        write_text_atomic(best_config_path, header + config_text(best))
    else:
        best_config_path.unlink(missing_ok=True)  # an earlier run's winner would read as this run's
        best_config_path = None

    unusable = sum(not m.usable for m in rows)
    lines = [
        f"- sweep of {base_name}: {len(points)} configs, {len(rows)} measurements"
        + (f" ({unusable} unstable or with errors, left out of the choice)" if unusable else ""),
        f"- {sentence}",
    ]
    lines += [f"- FAILED {failure_text(failure)}" for failure in failures]
    if frontier:
        lines.append(
            "- frontier: "
            + "; ".join(
                f"{m.point_name} at {m.level_id} ({m.throughput_infer_per_s:.2f} infer/s, p99 {m.latency_p99_ms:.1f} ms)"
                for m in frontier
            )
        )
    files = [SWEEP_CSV, SWEEP_MARKDOWN, SWEEP_PLOT] + ([BEST_CONFIG] if best_config_path else [])
    lines.append(f"- sweep report: {directory} ({', '.join(files)})")
    if best_config_path is not None:
        lines.append(
            f"- {best_config_path} is {winner.point_name}'s config named {base_name}: copy it over its config.pbtxt"
        )
    return SweepReport(
        directory=directory,
        csv_path=csv_path,
        markdown_path=markdown_path,
        plot_path=plot_path,
        best_config_path=best_config_path,
        winner=winner,
        winner_point=winner_point,
        frontier=tuple(frontier),
        lines=lines,
    )
