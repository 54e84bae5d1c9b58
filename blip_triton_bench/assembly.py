"""The run assembled from its options: every object the pytest layer hands out (the model and its export, the staged
repository, the servers, the load workers, the perf and A/B runs) is built here, each in one place and testable
without pytest; and what ends a whole run is one error, RunEnded, that says whether the fix is the user's.

The fixtures (blip_triton_bench.fixtures.plugin) call one function each and turn RunEnded into pytest's exit.
Heavy modules (torch, transformers, tritonclient's load side) are imported where they are used, so loading the
plugin stays fast for --collect-only and usage errors.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from blip_triton_bench.host.environment import installed_onnxruntime, onnxruntime_install_problem
from blip_triton_bench.host.files import CacheWriteError
from blip_triton_bench.host.hardware import GpuQueryError, HostInfo, missing_gpus, probe_host
from blip_triton_bench.host.interrupts import Interrupts as Interrupts
from blip_triton_bench.host.interrupts import signals_as_interrupt as signals_as_interrupt
from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel
from blip_triton_bench.options import BenchOptions, OptionError, check_options
from blip_triton_bench.repository.variants import (
    CAPTIONER_ROLE,
    LOGITS_ROLE,
    ConfigError,
    StagedRepository,
    Variant,
    discover_variants,
    select_variants,
    stage_repository,
    unmet_requirements,
    with_composing_models,
)
from blip_triton_bench.servers.base import RunKey, RunningServer, ServerProvider, ServerUsageError
from blip_triton_bench.servers.base import ServerStartError as ServerStartError
from blip_triton_bench.servers.choice import ServerChoice, ServerChoiceError, choose_server, server_execution_providers
from blip_triton_bench.servers.leftovers import remove_session_leftovers
from blip_triton_bench.servers.served import ServedVariant, serve
from blip_triton_bench.servers.supervised import ServerDeath, SupervisedServer
from blip_triton_bench.session import BenchSession

if TYPE_CHECKING:  # what the fixtures hand out, named here for them: the modules load where they are used
    from blip_triton_bench.load.workers import WorkerPool as WorkerPool
    from blip_triton_bench.model.artifacts import ModelArtifacts as ModelArtifacts
    from blip_triton_bench.model.export import ExportedModel as ExportedModel
    from blip_triton_bench.model.reference import ReferenceSessions as ReferenceSessions
    from blip_triton_bench.model.source import LoadedModel as LoadedModel
    from blip_triton_bench.model.source import ModelDescription as ModelDescription
    from blip_triton_bench.model.workload import ModelInputs
    from blip_triton_bench.runs.ab import ABRun as ABRun
    from blip_triton_bench.runs.perf import JudgedLevel, PerfSettings
    from blip_triton_bench.runs.perf import PerfRun as PerfRun


class RunEnded(Exception):
    """What ends the whole run before its tests can say anything: the message names the file, option or fix.
    `usage`: the fix is the user's (a bad option, model or lock file), so the run exits as a usage error; else
    the host failed (a full disk, a server that never became ready) and the run fails."""

    def __init__(self, message: str, *, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


#: How a skip reason names the variants of each role a test takes.
ROLE_NAMES = {LOGITS_ROLE: "logits model (one forward pass per request)", CAPTIONER_ROLE: "captioner"}


@dataclass(frozen=True)
class RunPlan:
    """What pytest_configure decided, read by every later hook and fixture."""

    options: BenchOptions
    repository: list[Variant]  # every variant of --model-repository, parsed once
    variants: list[Variant]  # what --variant selected
    staged: list[Variant]  # those plus the models they call: what the server holds
    server_choice: ServerChoice
    reference: dict[str, Variant] = field(default_factory=dict)  # --reference-repository's variants, by name

    @functools.cached_property
    def staged_by_name(self) -> dict[str, Variant]:
        return {variant.name: variant for variant in self.staged}

    @functools.cached_property
    def perf_settings(self) -> PerfSettings:
        """The options' perf settings without a server's key: what load levels and tolerances are read with."""
        from blip_triton_bench.runs.perf import PerfSettings

        return PerfSettings.from_options(self.options)

    def selected(self, role: str = LOGITS_ROLE) -> list[Variant]:
        return [variant for variant in self.variants if variant.role == role]

    def unmet_needs(self, host: HostInfo, variant: Variant) -> list[str]:
        """What `variant`, or a model it calls, needs and this run's server cannot give (GPUs, execution
        providers); empty when it can be served. An external server's GPUs are not this host's: only its own
        readiness check can tell."""
        providers = server_execution_providers(self.server_choice, host)
        gpu_count = host.gpu_count if self.server_choice.kind != "external" else 1 << 16
        reasons = unmet_requirements(variant.requirements, gpu_count, providers)
        for name in variant.composing_models:
            reasons += [
                f"calls {name}, which {why}"
                for why in unmet_requirements(self.staged_by_name[name].requirements, gpu_count, providers)
            ]
        return reasons

    def load_levels(self, variant: Variant) -> list[LoadLevel]:
        """`variant`'s load levels (its config's bench_* parameters over the options); a config whose levels or
        tolerance cannot be used ends the run as a usage error before anything is measured."""
        from blip_triton_bench.runs.perf import PerfConfigError, variant_levels, variant_tolerance_pct

        settings = self.perf_settings
        try:
            levels = variant_levels(variant, settings)
            variant_tolerance_pct(variant, settings)
        except PerfConfigError as error:
            raise RunEnded(str(error), usage=True) from None
        return list(levels)

    def caption_levels(self) -> list[LoadLevel]:
        """The caption load levels (--caption-concurrency, --caption-request-rate), the same for every captioner."""
        from blip_triton_bench.captioning.load import caption_levels

        return list(caption_levels(self.options.caption_concurrency, self.options.caption_request_rate))

    def reference_problem(self, variant: Variant) -> str | None:
        """Why `variant` cannot be compared with --reference-repository's (None: it can, or there is none)."""
        from blip_triton_bench.runs.ab_sides import reference_problem

        root = self.options.reference_repository
        if root is None or not (problem := reference_problem(variant, self.reference, root)):
            return None
        if self.options.replay_baselines:
            problem += "; record its baselines with --update-baselines to keep its configuration for a replay"
        return problem

    def none_selected(self, role: str) -> str:
        """Why no variant of `role` is under test: none in the repository, or --variant left them out."""
        kind = ROLE_NAMES[role]
        in_repository = [variant.name for variant in self.repository if variant.role == role]
        if not in_repository:
            return f"{self.options.model_repository} has no {kind}"
        chosen = " ".join(f"--variant {name}" for name in self.options.variants)
        return f"no {kind} selected: {chosen} leaves out {', '.join(in_repository)}"


def plan_run(options: BenchOptions, rootpath: Path, *, ci: bool) -> RunPlan:
    """Options, repository and server choice, each checked once, before anything is built: a bad one ends the run
    as a usage error."""
    try:
        repository = discover_variants(options.model_repository)
        variants = select_variants(repository, options.variants)
        check_options(options, repository, rootpath, ci=ci)
        choice = choose_server(options.server, options.triton_url, options.triton_image, options.gpus)
        reference = discover_variants(options.reference_repository) if options.reference_repository else []
    except (ConfigError, OptionError, ServerChoiceError) as error:
        raise RunEnded(str(error), usage=True) from None
    return RunPlan(
        options=options,
        repository=repository,
        variants=variants,
        staged=with_composing_models(variants, repository),
        server_choice=choice,
        reference={variant.name: variant for variant in reference},
    )


def level_order(level: object) -> tuple[bool, float]:
    """Where a load level runs among a variant's: concurrency levels first, each kind ascending. Anything else (an
    empty parameter set's placeholder) sorts first."""
    return (level.mode != CONCURRENCY, level.value) if isinstance(level, LoadLevel) else (False, 0.0)


@dataclass(frozen=True)
class RunContext:
    """What every part of a run is built from: its plan, this host, and the session that records what happens."""

    plan: RunPlan
    host: HostInfo
    session: BenchSession


@dataclass(frozen=True)
class Serving:
    """What a measuring run (perf, A/B, sweep) drives: the server under test, the repository staged on it, the
    model's shapes, the load workers (None: this process's own client), and what each request is: the options' load
    settings with the server's key, and BLIP-sized inputs built once."""

    server: RunningServer
    staged: StagedRepository
    description: ModelDescription
    workers: WorkerPool | None
    settings: PerfSettings
    inputs: ModelInputs


def serving(
    context: RunContext,
    server: RunningServer,
    staged: StagedRepository,
    description: ModelDescription,
    workers: WorkerPool | None,
) -> Serving:
    from blip_triton_bench.model.workload import build_inputs
    from blip_triton_bench.runs.perf import PerfSettings

    settings = PerfSettings.from_options(context.plan.options, server.restricted_api_headers())
    inputs = build_inputs(description, 1, settings.sequence_length)
    return Serving(server, staged, description, workers, settings, inputs)


def check_install() -> None:
    """Both ONNX Runtime builds installed (they own one import name), or neither: a usage error with the fix."""
    if problem := onnxruntime_install_problem(installed_onnxruntime()):
        raise RunEnded(problem, usage=True)


def checked_host(required_gpus: int) -> HostInfo:
    """This host, probed once. A host whose nvidia-smi fails is a usage error naming its message, never a host
    without GPUs (a GPU runner whose driver broke would skip every GPU variant and go green); with --require-gpus
    N, so is one with fewer than N GPUs."""
    try:
        host = probe_host()
    except GpuQueryError as error:
        raise RunEnded(f"the GPUs of this host cannot be listed: {error}", usage=True) from None
    if (problem := missing_gpus(required_gpus, host.gpus, shutil.which("nvidia-smi"))) is not None:
        raise RunEnded(problem, usage=True)
    return host


def open_session(plan: RunPlan) -> BenchSession:
    """The session that records the run, after removing what a killed session left on this host."""
    session = BenchSession(variants=plan.variants, repository=dict(plan.staged_by_name))
    session.record_leftovers_removed(remove_session_leftovers(plan.options.cache_dir, plan.server_choice.kind))
    return session


def record_server_death(session: BenchSession, during: str) -> ServerDeath | None:
    """Whether the session's server died; if so it is recorded once and replaced where the suite owns it."""
    server = session.server
    if not isinstance(server, SupervisedServer) or (cause := server.death()) is None:
        return None
    if any(not death.replaced for death in session.server_deaths):
        return None  # already told: an external server that stays gone
    death = server.account_for_death(cause, during=during)
    session.record_server_death(death)
    return death


def serve_variant(context: RunContext, variant: Variant, server: RunningServer) -> ServedVariant:
    """`variant` loaded (with the models it calls) on `server`, once per session; ServerStartError if it cannot."""
    return serve(variant, context.plan.staged_by_name, server, context.session)


@contextlib.contextmanager
def own_server(context: RunContext, repository_root: Path, work_dir: Path) -> Iterator[RunningServer]:
    """A server started for one test on the staged repository, stopped when the block ends; ServerStartError if it
    cannot start."""
    prepared = server_provider(context.plan.server_choice, context.plan.options, context.host, work_dir)
    with prepared.provider.start(repository_root) as server:
        yield server


def server_failure(doing: str, error: ServerStartError) -> RunEnded:
    """A server that could not start: the user's fix for ServerUsageError (a port in use, an option), else the host's."""
    return RunEnded(f"{doing}: {error}", usage=isinstance(error, ServerUsageError))


def describe_model(options: BenchOptions) -> ModelDescription:
    from blip_triton_bench.model.description_cache import cached_description
    from blip_triton_bench.model.source import ModelSourceError, ModelSpec

    try:
        return cached_description(ModelSpec(options.model), options.cache_dir)
    except ModelSourceError as error:
        raise RunEnded(str(error), usage=True) from None


def load_model(description: ModelDescription) -> LoadedModel:
    """The PyTorch model (seeded random weights for `tiny`/`base`, else the checkpoint): torch loads here."""
    from blip_triton_bench.model.source import load_model

    return load_model(description.spec)


def export_model(options: BenchOptions, loaded: LoadedModel, session: BenchSession) -> ExportedModel:
    """The FP32 export (from the cache when its content hash matches), noted in the run's summary."""
    from blip_triton_bench.model.export import ExportError, export_model

    try:
        exported = export_model(loaded, options.cache_dir, options.opset)
    except CacheWriteError as error:  # the host's disk, not the user's input
        raise RunEnded(str(error), usage=False) from None
    except ExportError as error:
        raise RunEnded(str(error), usage=True) from None
    state = "reused from cache" if exported.from_cache else "exported now"
    session.note(
        f"model {options.model}: {exported.parameter_count / 1e6:.1f}M parameters, ONNX opset "
        f"{exported.opset}, {exported.size_bytes / 1e6:.0f} MB, {state} (export took {exported.export_s:.1f} s) "
        f"at {exported.directory}"
    )
    return exported


def model_artifacts(options: BenchOptions, loaded: LoadedModel, exported: ExportedModel) -> ModelArtifacts:
    """The INT8, FP16, student and split artifacts, each built the first time a staged variant needs it."""
    from blip_triton_bench.model.artifacts import ModelArtifacts

    return ModelArtifacts(
        teacher=loaded,
        teacher_export=exported,
        cache_dir=options.cache_dir,
        opset=options.opset,
        student_source=options.student,
        distill_steps=options.distill_steps,
    )


def reference_sessions(artifacts: ModelArtifacts, session: BenchSession) -> ReferenceSessions:
    """In-process ONNX Runtime sessions of the artifacts, what served outputs are compared with."""
    from blip_triton_bench.model.reference import ReferenceSessions

    return ReferenceSessions(artifacts, session.notes)


def stage(
    variants: Sequence[Variant], artifacts: ModelArtifacts, scratch: Path, root: Path, session: BenchSession
) -> StagedRepository:
    """The variants staged under `root` with their artifacts (generated files under `scratch`); each variant's bytes
    and the staging notes go to the session."""
    try:
        staged = stage_repository(variants, lambda variant: artifacts.files_for(variant, scratch), root)
    except CacheWriteError as error:  # an INT8, FP16, split or student entry the cache could not take
        raise RunEnded(str(error), usage=False) from None
    for variant in variants:
        files = (staged.root / variant.name).rglob("*")
        session.record_artifact_bytes(variant.name, sum(path.stat().st_size for path in files if path.is_file()))
    session.note(f"staged repository: {staged.root} ({', '.join(v.name for v in variants)})")
    session.note(*staged.notes)
    return staged


@contextlib.contextmanager
def measurement_lock(options: BenchOptions, say: Callable[[str], None], session: BenchSession) -> Iterator[None]:
    """The host-wide measurement lock (host/measure_lock.py), held until the block ends; `say` tells the terminal
    whom the run waits for."""
    from blip_triton_bench.host.measure_lock import OFF, MeasureLockError, acquire, default_lock_path

    if options.measure_lock == OFF:
        session.note("measurement lock: off (--measure-lock off): other runs may measure meanwhile")
        yield
        return
    try:
        held = acquire(options.measure_lock_file or default_lock_path(), options.measure_lock, say)
    except MeasureLockError as error:
        raise RunEnded(str(error), usage=True) from None
    session.note(held.describe())
    try:
        yield
    finally:
        held.release()


@dataclass(frozen=True)
class PreparedProvider:
    provider: ServerProvider
    notes: list[str]


def server_provider(
    choice: ServerChoice,
    options: BenchOptions,
    host: HostInfo,
    work_dir: Path,
    *,
    reference: bool = False,
    run_key: RunKey | None = None,
) -> PreparedProvider:
    """The one factory of the run's servers: the main one (and a server of its own, a cold start's), or with
    `reference` the A/B 'before' server (external at --reference-triton-url, else a container of
    --reference-triton-image started with the main server's `run_key`). The CPU image is built where needed."""
    from blip_triton_bench.servers.choice import make_provider
    from blip_triton_bench.servers.image import ImageBuildError

    urls = (options.triton_url, options.triton_grpc_url)
    if reference:
        if options.reference_triton_url:
            choice = ServerChoice("external", f"--reference-triton-url {options.reference_triton_url}")
            urls = (options.reference_triton_url, options.reference_triton_grpc_url)
        elif choice.kind != "container":
            raise RunEnded(
                f"--reference-triton-image needs the container provider; this run uses {choice.kind} ({choice.reason})",
                usage=True,
            )
        else:
            choice = ServerChoice("container", "--reference-triton-image", options.reference_triton_image, choice.gpus)
    try:
        provider, notes = make_provider(
            choice,
            work_dir,
            options.server_timeout_s,
            host,
            options.cache_dir,
            *urls,
            shared_memory=options.shared_memory,
            triton_metrics_url=None if reference else options.triton_metrics_url,
            fingerprint_label=None if reference else options.fingerprint_label,
            publish_on_all_interfaces=options.publish_on_all_interfaces,
            run_key=run_key,
        )
    except ServerStartError as error:
        raise server_failure(f"could not prepare the {choice.kind} server", error) from None
    except ImageBuildError as error:
        raise RunEnded(f"could not prepare the {choice.kind} server: {error}", usage=False) from None
    return PreparedProvider(provider, notes)


@contextlib.contextmanager
def main_server(context: RunContext, repository_root: Path, work_dir: Path) -> Iterator[RunningServer]:
    """The server under test, supervised (a death mid-run is noticed and, where the suite owns it, replaced), kept
    in the session while it runs."""
    plan, host, session = context.plan, context.host, context.session
    choice = plan.server_choice
    session.note(f"server provider: {choice.kind} ({choice.reason})")
    prepared = server_provider(choice, plan.options, host, work_dir)
    session.note(*prepared.notes)
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(SupervisedServer(prepared.provider, repository_root))
        except ServerStartError as error:
            raise server_failure(f"could not start Triton ({prepared.provider.name})", error) from None
        description = server.describe()
        session.note(
            f"server: {description.provider} Triton {description.triton_version} at http {server.endpoints.http_url}, "
            f"grpc {server.endpoints.grpc_url}"
        )
        if note := server.fingerprint_note():
            session.note(note)
        session.record_server(server)
        stack.callback(session.record_server, None)
        yield server


@contextlib.contextmanager
def worker_pool(options: BenchOptions, session: BenchSession) -> Iterator[WorkerPool | None]:
    """--load-workers / --load-cluster: the run's load workers (processes here, or Ray actors), stopped when the
    block ends whatever happened; None: every level is driven by this process's own client."""
    from blip_triton_bench.load.workers import WorkerDied, WorkerProcesses

    if options.load_workers == 1 and options.load_cluster is None:
        yield None
        return
    try:
        if options.load_cluster is not None:
            from blip_triton_bench.load.cluster import RayWorkers

            pool: WorkerPool = RayWorkers(options.load_cluster, options.load_workers)
        else:
            pool = WorkerProcesses(options.load_workers)
    except WorkerDied as error:
        raise RunEnded(f"could not start the load workers: {error}", usage=error.usage_error) from None
    with pool:
        workers = ", ".join(f"{name} on {host}" for name, host in zip(pool.names, pool.worker_hosts, strict=True))
        session.note(f"load side: {pool.describe()}: {workers}")
        yield pool


def perf_run(
    context: RunContext,
    serving: Serving,
    exported: ExportedModel,
    *,
    pytest_args: tuple[str, ...],
    say: Callable[[str], None],
) -> PerfRun:
    """The run's perf run: baseline store, fingerprint, BLIP-sized inputs built once, the client ceiling; each
    judged level's progress line goes to `say`."""
    from blip_triton_bench.host.software import speed_software
    from blip_triton_bench.judging.baselines import BaselineStore, Fingerprint
    from blip_triton_bench.report.text import progress_line
    from blip_triton_bench.runs.ceiling_cache import CEILING_CACHE_FILE, CeilingCache
    from blip_triton_bench.runs.perf import CeilingProbe, PerfRun

    plan, host, session = context.plan, context.host, context.session
    server, description, workers, options = serving.server, serving.description, serving.workers, plan.options
    settings, inputs = serving.settings, serving.inputs
    url = server.endpoints.grpc_url if settings.load.protocol == "grpc" else server.endpoints.http_url
    served = server.describe()

    def progress(judged: JudgedLevel) -> None:
        say(progress_line(judged))

    fingerprint = Fingerprint.from_parts(host, served, options.model, exported.parameter_count, settings.load.protocol)
    run = PerfRun(
        settings=settings,
        store=BaselineStore(options.baseline_dir),
        fingerprint=fingerprint,
        url=url,
        inputs=inputs,
        ceiling=CeilingProbe(
            server=server,
            repository_root=serving.staged.root,
            image_size=description.image_size,
            vocab_size=description.vocab_size,
            url=url,
            inputs=inputs,
            settings=settings,
            notes=session.notes,
            model_name=options.ceiling_model,
            workers=workers,
            cache=CeilingCache(options.cache_dir / CEILING_CACHE_FILE),
            fingerprint_key=fingerprint.key(),
        ),
        pytest_args=pytest_args,
        progress=progress,
        resources=server.resource_source(),
        server=server,
        workers=workers,
        software=speed_software(served.triton_version, options.opset),
        replayed=frozenset(plan.reference) if options.replay_baselines else frozenset(),
    )
    session.record_perf_run(run)
    return run


@contextlib.contextmanager
def ab_run(context: RunContext, serving: Serving, artifacts: ModelArtifacts) -> Iterator[ABRun]:
    """The before-vs-after comparison: --reference-repository's variants (with their `artifacts`) staged
    beside the selected ones, or the same variants on a reference server (--reference-triton-url,
    --reference-triton-image) started here and stopped when the block ends."""
    from blip_triton_bench.runs.ab import DEFAULT_AB_MIN_EFFECT_PCT, ABRun
    from blip_triton_bench.runs.ab_sides import ReferenceRepository, ReferenceServer

    plan, host, session, options = context.plan, context.host, context.session, context.plan.options
    server, staged = serving.server, serving.staged
    with contextlib.ExitStack() as stack:
        if options.reference_repository is not None:
            scratch = Path(staged.root).parent / "reference-generated"
            scratch.mkdir(exist_ok=True)
            before: ReferenceRepository | ReferenceServer = ReferenceRepository(
                server, staged.root, plan.reference, functools.partial(artifacts.files_for, scratch=scratch)
            )
        else:
            prepared = server_provider(
                plan.server_choice,
                options,
                host,
                Path(staged.root).parent / "reference-server",
                reference=True,
                run_key=server.run_key,
            )
            try:
                reference = stack.enter_context(prepared.provider.start(staged.root))
            except ServerStartError as error:
                raise server_failure(
                    f"could not start the A/B reference server ({prepared.provider.name})", error
                ) from None
            before = ReferenceServer(reference, plan.staged_by_name)
            session.note(
                f"A/B reference server: Triton {reference.describe().triton_version} at {reference.endpoints.http_url}"
            )
        tolerance = options.tolerance_pct
        run = ABRun(
            server=server,
            before=before,
            inputs=serving.inputs,
            load=serving.settings.load,
            rounds=options.ab_rounds,
            min_effect_pct=tolerance if tolerance is not None else DEFAULT_AB_MIN_EFFECT_PCT,
            workers=serving.workers,
        )
        session.record_ab_run(run)
        session.note(
            f"A/B: after = this run's server and {options.model_repository}, before = "
            f"{options.ab_reference}; {run.rounds} interleaved rounds per level, minimum effect "
            f"{run.min_effect_pct:g}%"
        )
        yield run
