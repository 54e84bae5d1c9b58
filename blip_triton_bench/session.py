"""The run's record and its end: what the session's tests learned, the correctness gate, baselines and report.

One object per pytest session, as pytest-benchmark's BenchmarkSession: tests add to it, `finish()` records
baselines and writes the report (a failed write is a FinishOutcome, never a traceback), `summary_lines()` is
what the terminal summary prints. No pytest in here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from blip_triton_bench.judging.proof import RunProof
from blip_triton_bench.repository.variants import Variant
from blip_triton_bench.servers.base import ModelLoad, RunningServer, ServerStartError
from blip_triton_bench.servers.supervised import ServerDeath

if TYPE_CHECKING:  # torch, onnxruntime and matplotlib load only when a test needs them
    from collections.abc import Callable

    from blip_triton_bench.captioning.disconnects import AbandonOutcome
    from blip_triton_bench.captioning.latency import CaptionLatency
    from blip_triton_bench.captioning.load import CaptionLevelMeasurement
    from blip_triton_bench.judging.agreement import Agreement
    from blip_triton_bench.judging.efficiency import InProcessReference
    from blip_triton_bench.report.write import ReportSection
    from blip_triton_bench.runs.ab import ABRun
    from blip_triton_bench.runs.capacity import CapacityResult
    from blip_triton_bench.runs.perf import PerfRun

#: The key under which correctness outcomes of tests without a variant (export vs PyTorch) are kept.
EXPORT_GATE = ""
REPORT_DIR_FLAG = "--report-dir"


@dataclass(frozen=True)
class FinishOutcome:
    """What the run's end could not do, for the exit status: a run whose tests pass but whose baselines
    (asked for with --update-baselines) or report were not written must not look green to CI."""

    baselines_not_written: tuple[str, ...] = ()  # variants
    report_problem: str | None = None  # the summary's "report NOT WRITTEN" line
    server_deaths: int = 0  # a server that died mid-run fails the run, even where every test that ran passed
    unproven: tuple[str, ...] = ()  # with --require-judged: what the run selected and did not judge

    @property
    def failed(self) -> bool:
        return (
            bool(self.baselines_not_written)
            or self.report_problem is not None
            or self.server_deaths > 0
            or bool(self.unproven)
        )

    def reasons(self) -> list[str]:
        reasons = []
        if self.server_deaths:
            reasons.append(f"tritonserver died {self.server_deaths} time(s) during the run")
        if self.unproven:
            reasons.append(f"{len(self.unproven)} check(s) not judged (--require-judged)")
        if self.baselines_not_written:
            reasons.append(f"baselines not written for {', '.join(self.baselines_not_written)}")
        if self.report_problem is not None:
            reasons.append("the report was not written")
        return reasons


@dataclass
class BenchSession:
    """What this session learned that a person should read at the end, and what --update-baselines may store."""

    variants: list[Variant] = field(default_factory=list)  # the selected variants, in repository order
    #: every variant the server holds (the selected ones and the models they call), by name
    repository: dict[str, Variant] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    leftovers_removed: list[str] = field(default_factory=list)  # what a killed session left, removed at this start
    server: RunningServer | None = None
    server_deaths: list[ServerDeath] = field(default_factory=list)  # in the order they were noticed
    running_test: str | None = None  # the test in progress, if any
    interrupted_during: str | None = None  # the test Ctrl-C or SIGTERM ended the run in ("between tests" if none)
    disconnects: dict[str, AbandonOutcome] = field(default_factory=dict)  # captioner -> --disconnect-stress outcome
    model_loads: dict[str, ModelLoad | ServerStartError] = field(default_factory=dict)
    correctness: list[str] = field(default_factory=list)
    #: correctness outcomes per variant (EXPORT_GATE for tests without a variant, e.g. export vs PyTorch)
    correctness_passed: dict[str, list[bool]] = field(default_factory=dict)
    in_process_infer_per_s: float | None = None  # in-process CPU at batch 1 (suite/test_benchmarks.py)
    #: per variant: in-process on its own provider at the batch its batcher formed (suite/test_serving_efficiency.py)
    in_process: dict[str, InProcessReference] = field(default_factory=dict)
    #: per variant that sets bench_min_serving_efficiency: that minimum
    min_serving_efficiency: dict[str, float] = field(default_factory=dict)
    perf: PerfRun | None = None
    ab: ABRun | None = None  # --reference-repository's before-vs-after comparison
    baseline_lines: list[str] = field(default_factory=list)
    report_lines: list[str] = field(default_factory=list)
    #: per variant: its served logits against the FP32 teacher's on real images (test_accuracy)
    accuracy: dict[str, Agreement] = field(default_factory=dict)
    #: per variant: caption exact-match rate against the FP32 teacher's greedy captions
    caption_match: dict[str, float] = field(default_factory=dict)
    caption_latency: dict[str, CaptionLatency] = field(default_factory=dict)
    #: (captioner, level) measured by the caption load tests, in the order they ran
    caption_load: list[tuple[str, CaptionLevelMeasurement]] = field(default_factory=list)
    #: (variant, its capacity at its SLO) found by suite/test_capacity.py, in the order they ran
    capacity: list[tuple[str, CapacityResult]] = field(default_factory=list)
    artifact_bytes: dict[str, int] = field(default_factory=dict)
    sweep_lines: list[str] = field(default_factory=list)
    outcome: FinishOutcome = field(default_factory=FinishOutcome)
    proof: RunProof = field(default_factory=RunProof)  # what each suite test judged, or why not

    def record_correctness(self, variant: str | None, passed: bool) -> None:
        self.correctness_passed.setdefault(variant or EXPORT_GATE, []).append(passed)

    def correctness_gate(self, variant: str) -> str | None:
        """None when `variant` may record baselines, else why not."""
        export = self.correctness_passed.get(EXPORT_GATE, [])
        own = self.correctness_passed.get(variant, [])
        if not all(export):
            return "the export's correctness tests failed"
        if not own:
            return "its correctness tests did not run in this session (run them with the perf tests)"
        if not all(own):
            return "its correctness tests failed"
        return None

    def record_leftovers_removed(self, lines: list[str]) -> None:
        """What a killed session left behind, removed as this one started (the report header lists it)."""
        self.leftovers_removed = list(lines)

    def record_server(self, server: RunningServer | None) -> None:
        """The server under test while it runs (None once it is stopped): failures quote its log."""
        self.server = server

    def record_perf_run(self, run: PerfRun) -> None:
        self.perf = run

    def record_ab_run(self, run: ABRun) -> None:
        self.ab = run

    def record_in_process_speed(self, infer_per_s: float) -> None:
        """The in-process CPU reference at batch 1, that served throughput is compared with."""
        self.in_process_infer_per_s = infer_per_s

    def test_started(self, nodeid: str) -> None:
        self.running_test = nodeid

    def test_ended(self) -> None:
        self.running_test = None

    def record_interrupt(self) -> None:
        """Ctrl-C or SIGTERM ended the run: in the test that was running, else between tests."""
        self.interrupted_during = self.running_test or "between tests"

    def note(self, *lines: str) -> None:
        """Lines for the summary's notes (what was reused, started, skipped, measured on the side)."""
        self.notes.extend(lines)

    def record_correctness_line(self, line: str) -> None:
        """What a correctness check compared and how closely, for the report's correctness section."""
        self.correctness.append(line)

    def record_caption_match(self, variant: str, fraction: float) -> None:
        """The fraction of the images whose caption equalled the reference's (kept current as images are checked)."""
        self.caption_match[variant] = fraction

    def record_accuracy(self, variant: str, agreement: Agreement) -> None:
        self.accuracy[variant] = agreement

    def record_caption_latency(self, latency: CaptionLatency) -> None:
        """A captioner's (or the in-process decoder's) caption latency, under `latency.variant`."""
        self.caption_latency[latency.variant] = latency

    def record_caption_load(self, captioner: str, measurement: CaptionLevelMeasurement) -> None:
        self.caption_load.append((captioner, measurement))

    def record_in_process(self, variant: str, reference: InProcessReference, minimum: float | None) -> None:
        """The in-process speed `variant`'s served throughput is compared with, and its config's minimum ratio."""
        self.in_process[variant] = reference
        if minimum is not None:
            self.min_serving_efficiency[variant] = minimum

    def record_sweep_load(self, name: str, load: ModelLoad | ServerStartError) -> None:
        """A sweep point's load (each point is its own model, loaded once)."""
        self.model_loads[name] = load

    def record_sweep_lines(self, lines: list[str]) -> None:
        self.sweep_lines.extend(lines)

    def record_server_death(self, death: ServerDeath) -> None:
        self.server_deaths.append(death)
        self.outcome = dataclasses.replace(self.outcome, server_deaths=len(self.server_deaths))

    def record_capacity(self, variant: str, result: CapacityResult) -> None:
        self.capacity.append((variant, result))

    def record_disconnect_stress(self, captioner: str, outcome: AbandonOutcome) -> None:
        self.disconnects[captioner] = outcome

    def record_model_load(self, name: str, load: ModelLoad | ServerStartError) -> ModelLoad | ServerStartError:
        """Keep the first load of `name`: another parametrization asking again gets Triton's instant answer."""
        return self.model_loads.setdefault(name, load)

    def record_failed_load(self, name: str, error: ServerStartError) -> None:
        """`name` failed to load (replacing an earlier load of it): the correctness gate and report show why."""
        self.model_loads[name] = error

    def load_seconds(self) -> dict[str, float]:
        """Load time per model; a variant's includes the models it calls (a BLS captioner's encoder and decoder)."""
        loads = {name: load.load_s for name, load in self.model_loads.items() if isinstance(load, ModelLoad)}
        return loads | {
            variant.name: sum(loads.get(name, 0.0) for name in (*variant.composing_models, variant.name))
            for variant in self.variants
            if variant.name in loads
        }

    def record_artifact_bytes(self, name: str, size: int) -> None:
        """The bytes staged for model `name` (its own folder; variant_bytes adds the models it calls)."""
        self.artifact_bytes[name] = size

    def variant_bytes(self) -> dict[str, int]:
        """Bytes staged per variant, counting the models it calls."""
        sizes = dict(self.artifact_bytes)
        for variant in self.variants:
            sizes[variant.name] = sum(
                self.artifact_bytes.get(name, 0) for name in (*variant.composing_models, variant.name)
            )
        return sizes

    def finish(self, report_dir: Path, update_baselines: bool, require_judged: bool = False) -> FinishOutcome:
        """Record baselines (with --update-baselines, correctness permitting), then write the report, whatever
        happened to the baselines. Neither raises for a write that fails: the outcome and the summary say it. With
        `require_judged`, anything the run's tests did not judge fails the run."""
        unproven = tuple(self.proof.unproven()) if require_judged else ()
        self.outcome = dataclasses.replace(self.outcome, unproven=unproven)
        perf = self.perf
        measured = perf is not None and bool(perf.results or perf.judged_numbers or perf.failed_levels)
        recorded = (
            measured
            or (self.ab is not None and self.ab.results)
            or self.disconnects
            or self.accuracy
            or self.caption_latency
            or self.caption_load
            or self.capacity
            or self.sweep_lines
            or self.interrupted_during is not None
            or self.proof.findings
        )
        if not recorded:
            return self.outcome  # server deaths are in it already
        from blip_triton_bench.runs.perf import record_baselines

        not_written: tuple[str, ...] = ()
        if update_baselines and perf is not None:
            recording = record_baselines(perf, self.correctness_gate, self._keep_repository(perf))
            self.baseline_lines, not_written = list(recording.lines), recording.not_written
        self.outcome = FinishOutcome(
            baselines_not_written=not_written,
            report_problem=self._write_report(perf, report_dir),
            server_deaths=len(self.server_deaths),
            unproven=unproven,
        )
        return self.outcome

    def _keep_repository(self, perf: PerfRun) -> Callable[[str], list[str]] | None:
        """Keeps a recorded variant's folder, and those of the models it calls, in the store's recorded-repository/;
        None when the session was not told the repository (nothing to copy from)."""
        from blip_triton_bench.repository.recorded import keep_recorded, recorded_repository_path

        if not self.repository:
            return None
        root = recorded_repository_path(perf.store.root)
        return lambda name: keep_recorded(root, self.repository[name], self.repository)

    def _write_report(self, perf: PerfRun | None, report_dir: Path) -> str | None:
        """Write the report and keep its summary lines; on an OSError keep the tables and return what went wrong."""
        from blip_triton_bench.host.files import write_fix
        from blip_triton_bench.report.write import report_lines, write_report

        try:
            report_dir.mkdir(parents=True, exist_ok=True)
            self.report_lines = write_report(
                report_dir,
                perf.results if perf is not None else [],
                self.in_process_infer_per_s,
                self.notes,
                perf.judged_numbers if perf is not None else [],
                report_sections(self, report_dir),
                self.in_process,
                self.min_serving_efficiency,
            )
        except OSError as error:
            problem = (
                f"report NOT WRITTEN to {report_dir}: {error}; fix: {write_fix(error, report_dir, REPORT_DIR_FLAG)}"
            )
            tables = report_lines(
                perf.results if perf is not None else [],
                self.in_process_infer_per_s,
                perf.judged_numbers if perf is not None else [],
                report_sections(self, None),
                self.in_process,
                self.min_serving_efficiency,
            )
            self.report_lines = [*tables, problem]
            return problem
        return None

    def summary_lines(self) -> list[str]:
        """The terminal summary: notes, model loads, correctness, the report's tables, baselines recorded, and last
        what the run proved."""
        lines = list(self.notes)
        for name, load in self.model_loads.items():
            if isinstance(load, ModelLoad):
                lines.append(f"model load {name}: {load.load_s:.2f} s")
            else:
                lines.append(f"model load {name}: FAILED ({str(load).splitlines()[0]})")
        lines.extend(self.correctness)
        for captioner, outcome in self.disconnects.items():
            lines.append(f"disconnect survival, {captioner}: {outcome.finding()}")
        for death in self.server_deaths:
            replaced = "a fresh server took its place" if death.replaced else "not replaced; later tests skipped"
            lines.append(f"SERVER CRASH during {death.during}: {death.cause} ({replaced})")
        lines.extend(self.report_lines)
        if self.baseline_lines:
            lines.append("baselines (--update-baselines):")
            lines.extend(f"  {line}" for line in self.baseline_lines)
        lines.extend(self.proof.lines())
        if self.outcome.failed:
            lines.append(f"the run fails (exit status 1): {'; '.join(self.outcome.reasons())}")
        return lines


def report_sections(session: BenchSession, directory: Path | None) -> list[ReportSection]:
    """Caption latency, the pick-a-variant table and plot, and the sweep, from what the session's tests recorded.

    `directory` None: no plot is drawn (the report could not be written; the tables still reach the summary).
    """
    from blip_triton_bench.captioning.latency import inter_token_floor_lines
    from blip_triton_bench.judging.slo import CONFIDENCE
    from blip_triton_bench.report.plots import plot_ab, plot_accuracy_vs_speed, plot_caption_load
    from blip_triton_bench.report.selection import summarize_variants
    from blip_triton_bench.report.text import (
        ab_table,
        capacity_table,
        caption_load_table,
        caption_ratio_lines,
        caption_scaling_lines,
        caption_table,
        choice_table,
        failed_levels_table,
        load_side_table,
        slo_rows,
        slo_table,
        throughput_ratio_lines,
    )
    from blip_triton_bench.report.write import (
        CAPACITY_SECTION,
        PROOF_SECTION,
        SLO_SECTION,
        ReportSection,
        software_changed,
    )
    from blip_triton_bench.repository.variants import LOGITS_ROLE

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
