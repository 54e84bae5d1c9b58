"""The report's PNG plots: levels (throughput vs concurrency, latency vs throughput), accuracy vs speed, and the
sweep's frontier; each file written atomically, as every file of the report is."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from blip_triton_bench.captioning.load import CAPTION_CONCURRENCY, CaptionLevelMeasurement
from blip_triton_bench.load.engine import CONCURRENCY
from blip_triton_bench.report.selection import VariantSummary
from blip_triton_bench.runs.ab import ABLevel
from blip_triton_bench.runs.perf import JudgedLevel
from blip_triton_bench.runs.sweep import SweepMeasurement


def pyplot():
    """matplotlib's pyplot on the file-only backend (never a window).

    A Ctrl-C during matplotlib's first import (the sweep draws after every point) can leave half-initialised
    matplotlib modules in sys.modules, and the report written after the interrupt would fail on them: those are
    forgotten and imported afresh, once."""
    try:
        return _agg_pyplot()
    except (AttributeError, ImportError):
        for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
            del sys.modules[name]
        return _agg_pyplot()


def _agg_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    """savefig to a temp file beside `path`, then rename: a reader never sees half a PNG."""
    plt = pyplot()
    # A name of this call's own: two runs writing one report folder never write into each other's temp file.
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.png", dir=path.parent)
    os.close(handle)
    temp = Path(name)
    try:
        figure.savefig(temp, dpi=110)
        temp.replace(path)
    finally:
        plt.close(figure)
        temp.unlink(missing_ok=True)
    return path


def plot_levels(results: Sequence[JudgedLevel], directory: Path) -> list[Path]:
    """Throughput vs concurrency and p99 latency vs throughput, one line per variant, baselines dashed."""
    plt = pyplot()
    closed = [j for j in results if j.measurement.level.mode == CONCURRENCY]
    if not closed:
        return []
    variants = list(dict.fromkeys(j.variant for j in closed))
    figure_tp, axis_tp = plt.subplots(figsize=(7, 4.5))
    figure_lat, axis_lat = plt.subplots(figsize=(7, 4.5))
    for index, variant in enumerate(variants):
        color = f"C{index}"
        points = sorted((j for j in closed if j.variant == variant), key=lambda j: j.measurement.level.value)
        levels = [j.measurement.level.value for j in points]
        throughput = [j.measurement.summary.throughput_infer_per_s for j in points]
        p99 = [j.measurement.summary.latency_p99_ms for j in points]
        spread = [
            t * j.measurement.summary.throughput_spread_pct / 200.0 for t, j in zip(throughput, points, strict=True)
        ]
        axis_tp.errorbar(levels, throughput, yerr=spread, marker="o", color=color, capsize=3, label=variant)
        axis_lat.plot(throughput, p99, marker="o", color=color, label=variant)
        with_baseline = [j for j in points if j.baseline_metrics]
        if with_baseline:
            axis_tp.plot(
                [j.measurement.level.value for j in with_baseline],
                [j.baseline_metrics["throughput_infer_per_s"] for j in with_baseline],
                linestyle="--",
                marker="x",
                color=color,
                label=f"{variant} baseline",
            )
            axis_lat.plot(
                [j.baseline_metrics["throughput_infer_per_s"] for j in with_baseline],
                [j.baseline_metrics["latency_p99_ms"] for j in with_baseline],
                linestyle="--",
                marker="x",
                color=color,
                label=f"{variant} baseline",
            )
        for j in points:
            if not j.measurement.summary.stable:
                axis_tp.annotate("unstable", (j.measurement.level.value, j.measurement.summary.throughput_infer_per_s))
    from matplotlib.ticker import MaxNLocator

    axis_tp.xaxis.set_major_locator(MaxNLocator(integer=True))  # concurrency levels are whole numbers
    axis_tp.set_ylim(bottom=0)  # a drop reads as large as it is only from zero
    axis_lat.set_ylim(bottom=0)
    axis_tp.set(
        xlabel="concurrency (requests in flight)", ylabel="throughput (infer/s)", title="Throughput vs concurrency"
    )
    axis_lat.set(xlabel="throughput (infer/s)", ylabel="p99 latency (ms)", title="Latency vs throughput")
    paths = []
    for figure, axis, name in (
        (figure_tp, axis_tp, "throughput_vs_concurrency.png"),
        (figure_lat, axis_lat, "latency_vs_throughput.png"),
    ):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
        figure.tight_layout()
        paths.append(save_figure(figure, directory / name))
    return paths


#: The resource panels: (ResourceUsage field, axis label); GPU panels only when some level has GPU numbers.
SERVER_PANELS = (
    ("server_cpu_pct_mean", "server CPU (% of one core, mean)"),
    ("server_rss_mb_max", "server RAM (MB, max)"),
)
GPU_PANELS = (("gpu_util_pct_mean", "GPU utilization (%, mean)"), ("gpu_memory_mb_max", "GPU memory (MB, max)"))


def plot_resources(results: Sequence[JudgedLevel], directory: Path) -> Path | None:
    """Server CPU and RAM (and GPU utilisation and memory on GPU hosts) vs concurrency, one line per variant;
    None when no closed-loop level has any resource number (an external server, or nothing sampled)."""
    closed = [j for j in results if j.measurement.level.mode == CONCURRENCY and j.resources is not None]

    def has(name: str) -> bool:
        return any(getattr(j.resources, name) is not None for j in closed)

    panels = [panel for panel in (*SERVER_PANELS, *GPU_PANELS) if has(panel[0])]
    if not panels:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    variants = list(dict.fromkeys(j.variant for j in closed))
    for axis, (name, label) in zip(axes[0], panels, strict=True):
        for index, variant in enumerate(variants):
            points = sorted(
                (j for j in closed if j.variant == variant and getattr(j.resources, name) is not None),
                key=lambda j: j.measurement.level.value,
            )
            if points:
                axis.plot(
                    [j.measurement.level.value for j in points],
                    [getattr(j.resources, name) for j in points],
                    marker="o",
                    color=f"C{index}",
                    label=variant,
                )
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylim(bottom=0)
        axis.set(xlabel="concurrency (requests in flight)", ylabel=label)
        axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.suptitle("Server resource use vs concurrency (measured windows)")
    figure.tight_layout()
    return save_figure(figure, directory / "resources_vs_concurrency.png")


def plot_accuracy_vs_speed(summaries: Sequence[VariantSummary], directory: Path) -> Path | None:
    """Captions per second (x) against caption exact match with the FP32 teacher (y), one point per variant."""
    points = [
        item for item in summaries if item.captions_per_s is not None and item.caption_match_vs_teacher is not None
    ]
    if not points:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, item in enumerate(points):
        axis.scatter(item.captions_per_s, item.caption_match_vs_teacher * 100.0, color=f"C{index}", s=60)
        top1 = f", top-1 {item.top1_vs_teacher:.0%}" if item.top1_vs_teacher is not None else ""
        axis.annotate(
            f"{item.variant}{top1}",
            (item.captions_per_s, item.caption_match_vs_teacher * 100.0),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize="small",
        )
    axis.set_xscale("log")
    axis.set_ylim(-5, 105)
    axis.set(
        xlabel="captions per second (log scale; one caption at a time)",
        ylabel="caption exact match vs FP32 teacher (%)",
        title="Accuracy vs speed, per variant (same run)",
    )
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, directory / "accuracy_vs_speed.png")


def plot_frontier(
    path: Path, rows: Sequence[SweepMeasurement], frontier: Sequence[SweepMeasurement], winner, budget: float | None
) -> None:
    """p99 vs throughput for every measurement, the frontier as a line, the budget as a horizontal line."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    usable = [m for m in rows if m.usable]
    unusable = [m for m in rows if not m.usable and math.isfinite(m.latency_p99_ms)]
    axis.scatter(
        [m.throughput_infer_per_s for m in usable], [m.latency_p99_ms for m in usable], color="C0", label="stable"
    )
    if unusable:
        axis.scatter(
            [m.throughput_infer_per_s for m in unusable],
            [m.latency_p99_ms for m in unusable],
            color="C3",
            marker="x",
            label="unstable or with errors",
        )
    if frontier:
        axis.plot(
            [m.throughput_infer_per_s for m in frontier],
            [m.latency_p99_ms for m in frontier],
            color="C1",
            marker="o",
            label="frontier",
        )
        for m in frontier:
            short = m.point_name.split("__", 1)[-1]
            axis.annotate(
                f"{short} {m.level_id}",
                (m.throughput_infer_per_s, m.latency_p99_ms),
                xytext=(4, -10),
                textcoords="offset points",
                fontsize=6,
            )
    if winner is not None:
        axis.scatter(
            [winner.throughput_infer_per_s],
            [winner.latency_p99_ms],
            s=160,
            marker="*",
            color="C2",
            zorder=3,
            label="best",
        )
    if budget is not None:
        axis.axhline(budget, color="C7", linestyle="--", label=f"p99 budget {budget:g} ms")
    if not rows:
        axis.text(0.5, 0.5, "no measurement", transform=axis.transAxes, ha="center")
    axis.set_xlim(left=0)
    axis.set_ylim(bottom=0)
    axis.set(xlabel="throughput (infer/s)", ylabel="p99 latency (ms)", title="Sweep: p99 latency vs throughput")
    axis.grid(True, alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")
    figure.tight_layout()
    save_figure(figure, path)


def plot_ab(levels: Sequence[ABLevel], directory: Path) -> Path | None:
    """Before and after per level, one panel per unit (infer/s; output tokens/s for caption levels): every round's
    throughput as a point, each before/after pair joined by a line (the test is on those pairs), the medians as
    bars."""
    if not levels:
        return None
    by_unit: dict[str, list[ABLevel]] = {}
    for level in levels:
        by_unit.setdefault(level.verdict.unit, []).append(level)
    plt = pyplot()
    widths = [max(3.0, 2.2 * len(group)) for group in by_unit.values()]
    figure, axes = plt.subplots(1, len(by_unit), figsize=(max(6.0, sum(widths)), 4.5), squeeze=False)
    for axis, (unit, group) in zip(axes[0], by_unit.items(), strict=True):
        _ab_panel(axis, group, unit)
    figure.suptitle("Before vs after (interleaved rounds; lines join pairs)", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, directory / "ab_before_vs_after.png")


def _ab_panel(axis, levels: Sequence[ABLevel], unit: str) -> None:
    for index, level in enumerate(levels):
        before, after = level.verdict.before_per_round, level.verdict.after_per_round
        x_before, x_after = 3 * index, 3 * index + 1
        for pair_before, pair_after in zip(before, after, strict=True):
            axis.plot([x_before, x_after], [pair_before, pair_after], color="0.75", linewidth=0.8, zorder=1)
        axis.scatter([x_before] * len(before), before, color="C0", zorder=2, label="before" if index == 0 else None)
        axis.scatter([x_after] * len(after), after, color="C1", zorder=2, label="after" if index == 0 else None)
        for x, values in ((x_before, before), (x_after, after)):
            middle = sorted(values)[len(values) // 2]
            axis.hlines(middle, x - 0.3, x + 0.3, color="black", linewidth=2, zorder=3)
        axis.annotate(
            f"{level.verdict.effect_pct:+.1f}%\n{level.verdict.status.value}",
            (x_before + 0.5, max(max(before), max(after))),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axis.set_xticks([3 * i + 0.5 for i in range(len(levels))])
    axis.set_xticklabels([f"{level.variant}\n{level.level_id}" for level in levels], fontsize=8)
    axis.set_ylabel(f"{unit} per round")
    axis.legend()


def plot_caption_load(levels: Sequence[tuple[str, CaptionLevelMeasurement]], directory: Path) -> Path | None:
    """Closed-loop caption levels per captioner: output tokens/s against caption concurrency, and the inter-token
    latency and time to first token (p50) that came with it."""
    points: dict[str, list[tuple[float, dict[str, float]]]] = {}
    for captioner, measurement in levels:
        if measurement.level.mode == CAPTION_CONCURRENCY and measurement.captions:
            points.setdefault(captioner, []).append((measurement.level.value, measurement.metrics()))
    if not points:
        return None
    plt = pyplot()
    figure, (tokens_axis, latency_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for index, (captioner, rows) in enumerate(points.items()):
        rows.sort(key=lambda row: row[0])
        concurrency = [row[0] for row in rows]
        tokens_axis.plot(
            concurrency,
            [row[1]["output_token_throughput_per_s"] for row in rows],
            "o-",
            color=f"C{index}",
            label=captioner,
        )
        latency_axis.plot(
            concurrency,
            [row[1].get("inter_token_latency_ms", math.nan) for row in rows],
            "o-",
            color=f"C{index}",
            label=f"{captioner} inter-token",
        )
        latency_axis.plot(
            concurrency,
            [row[1]["time_to_first_token_ms"] for row in rows],
            "s--",
            color=f"C{index}",
            label=f"{captioner} first token",
        )
    tokens_axis.set_xlabel("caption concurrency")
    tokens_axis.set_ylabel("output tokens/s")
    tokens_axis.set_title("Caption throughput", fontsize=10)
    latency_axis.set_xlabel("caption concurrency")
    latency_axis.set_ylabel("ms (p50)")
    latency_axis.set_title("Token latency", fontsize=10)
    for axis in (tokens_axis, latency_axis):
        axis.legend(fontsize=8)
        axis.set_ylim(bottom=0)
    figure.tight_layout()
    return save_figure(figure, directory / "caption_load.png")
