"""Writes the run's report: results.json, results.csv, report.md and the plots, and the sweep's own report;
every file atomically, so a reader (or an interrupted run) never sees half of one."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2

from blip_triton_bench.host.files import write_text_atomic
from blip_triton_bench.judging.efficiency import InProcessReference
from blip_triton_bench.report.plots import (
    plot_frontier,
    plot_levels,
    plot_resources,
)
from blip_triton_bench.report.selection import serving_efficiency
from blip_triton_bench.report.text import (
    CSV_COLUMNS,
    budget_text,
    csv_row,
    csv_text,
    efficiency_table,
    failure_text,
    markdown_table,
    resource_notes,
    startup_table,
    sweep_csv,
    sweep_markdown,
    winner_sentence,
)
from blip_triton_bench.runs.perf import STARTUP_LEVEL, JudgedLevel, JudgedNumbers, PerfRun
from blip_triton_bench.runs.sweep import (
    SweepFailure,
    SweepMeasurement,
    SweepPoint,
    best_under_budget,
    config_text,
    ordered_measurements,
    pareto_frontier,
)

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
