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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from blip_triton_bench.host.files import CacheWriteError
from blip_triton_bench.host.hardware import HostInfo
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
    with_composing_models,
)
from blip_triton_bench.servers.base import RunKey, RunningServer, ServerProvider, ServerStartError, ServerUsageError
from blip_triton_bench.servers.choice import ServerChoice, ServerChoiceError, choose_server
from blip_triton_bench.servers.supervised import SupervisedServer
from blip_triton_bench.session import BenchSession

if TYPE_CHECKING:
    from blip_triton_bench.load.workers import WorkerPool
    from blip_triton_bench.model.artifacts import ModelArtifacts
    from blip_triton_bench.model.export import ExportedModel
    from blip_triton_bench.model.source import LoadedModel, ModelDescription
    from blip_triton_bench.runs.ab import ABRun
    from blip_triton_bench.runs.perf import JudgedLevel, PerfRun


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

    def selected(self, role: str = LOGITS_ROLE) -> list[Variant]:
        return [variant for variant in self.variants if variant.role == role]

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


def server_failure(doing: str, error: ServerStartError) -> RunEnded:
    """A server that could not start: the user's fix for ServerUsageError (a port in use, an option), else the host's."""
    return RunEnded(f"{doing}: {error}", usage=isinstance(error, ServerUsageError))


def describe_model(options: BenchOptions) -> ModelDescription:
    from blip_triton_bench.model.source import ModelSourceError, ModelSpec, describe_model

    try:
        return describe_model(ModelSpec(options.model))
    except ModelSourceError as error:
        raise RunEnded(str(error), usage=True) from None


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
    session.notes.append(
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
    session.notes.append(f"staged repository: {staged.root} ({', '.join(v.name for v in variants)})")
    session.notes.extend(staged.notes)
    return staged


@contextlib.contextmanager
def measurement_lock(options: BenchOptions, say: Callable[[str], None], session: BenchSession) -> Iterator[None]:
    """The host-wide measurement lock (host/measure_lock.py), held until the block ends; `say` tells the terminal
    whom the run waits for."""
    from blip_triton_bench.host.measure_lock import OFF, MeasureLockError, acquire, default_lock_path

    if options.measure_lock == OFF:
        session.notes.append("measurement lock: off (--measure-lock off): other runs may measure meanwhile")
        yield
        return
    try:
        held = acquire(options.measure_lock_file or default_lock_path(), options.measure_lock, say)
    except MeasureLockError as error:
        raise RunEnded(str(error), usage=True) from None
    session.notes.append(held.describe())
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
def main_server(
    plan: RunPlan, host: HostInfo, repository_root: Path, work_dir: Path, session: BenchSession
) -> Iterator[RunningServer]:
    """The server under test, supervised (a death mid-run is noticed and, where the suite owns it, replaced), kept
    in the session while it runs."""
    choice = plan.server_choice
    session.notes.append(f"server provider: {choice.kind} ({choice.reason})")
    prepared = server_provider(choice, plan.options, host, work_dir)
    session.notes.extend(prepared.notes)
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(SupervisedServer(prepared.provider, repository_root))
        except ServerStartError as error:
            raise server_failure(f"could not start Triton ({prepared.provider.name})", error) from None
        description = server.describe()
        session.notes.append(
            f"server: {description.provider} Triton {description.triton_version} at http {server.endpoints.http_url}, "
            f"grpc {server.endpoints.grpc_url}"
        )
        if note := server.fingerprint_note():
            session.notes.append(note)
        session.server = server
        stack.callback(setattr, session, "server", None)
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
        session.notes.append(f"load side: {pool.describe()}: {workers}")
        yield pool


def perf_run(
    plan: RunPlan,
    host: HostInfo,
    server: RunningServer,
    repository_root: Path,
    exported: ExportedModel,
    description: ModelDescription,
    session: BenchSession,
    *,
    workers: WorkerPool | None,
    pytest_args: tuple[str, ...],
    say: Callable[[str], None],
) -> PerfRun:
    """The run's perf run: baseline store, fingerprint, BLIP-sized inputs built once, the client ceiling; each
    judged level's progress line goes to `say`."""
    from blip_triton_bench.host.software import speed_software
    from blip_triton_bench.judging.baselines import BaselineStore, Fingerprint
    from blip_triton_bench.model.workload import build_inputs
    from blip_triton_bench.report.text import progress_line
    from blip_triton_bench.runs.perf import CeilingProbe, PerfRun, PerfSettings

    options = plan.options
    settings = PerfSettings.from_options(options, server.restricted_api_headers())
    url = server.endpoints.grpc_url if settings.load.protocol == "grpc" else server.endpoints.http_url
    inputs = build_inputs(description, 1, settings.sequence_length)
    served = server.describe()

    def progress(judged: JudgedLevel) -> None:
        say(progress_line(judged))

    run = PerfRun(
        settings=settings,
        store=BaselineStore(options.baseline_dir),
        fingerprint=Fingerprint.from_parts(
            host, served, options.model, exported.parameter_count, settings.load.protocol
        ),
        url=url,
        inputs=inputs,
        ceiling=CeilingProbe(
            server=server,
            repository_root=repository_root,
            image_size=description.image_size,
            vocab_size=description.vocab_size,
            url=url,
            inputs=inputs,
            settings=settings,
            notes=session.notes,
            model_name=options.ceiling_model,
            workers=workers,
        ),
        pytest_args=pytest_args,
        progress=progress,
        resources=server.resource_source(),
        server=server,
        workers=workers,
        software=speed_software(served.triton_version, options.opset),
        replayed=frozenset(plan.reference) if options.replay_baselines else frozenset(),
    )
    session.perf = run
    return run


@contextlib.contextmanager
def ab_run(
    plan: RunPlan,
    host: HostInfo,
    server: RunningServer,
    staged: StagedRepository,
    description: ModelDescription,
    session: BenchSession,
    *,
    artifacts: ModelArtifacts,
    workers: WorkerPool | None,
) -> Iterator[ABRun]:
    """The before-vs-after comparison: --reference-repository's variants (with their `artifacts`) staged
    beside the selected ones, or the same variants on a reference server (--reference-triton-url,
    --reference-triton-image) started here and stopped when the block ends."""
    from blip_triton_bench.model.workload import build_inputs
    from blip_triton_bench.runs.ab import DEFAULT_AB_MIN_EFFECT_PCT, ABRun
    from blip_triton_bench.runs.ab_sides import ReferenceRepository, ReferenceServer
    from blip_triton_bench.runs.perf import PerfSettings

    options = plan.options
    settings = PerfSettings.from_options(options, server.restricted_api_headers())
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
            before = ReferenceServer(reference, {variant.name: variant for variant in plan.staged})
            session.notes.append(
                f"A/B reference server: Triton {reference.describe().triton_version} at {reference.endpoints.http_url}"
            )
        tolerance = options.tolerance_pct
        run = ABRun(
            server=server,
            before=before,
            inputs=build_inputs(description, 1, settings.sequence_length),
            load=settings.load,
            rounds=options.ab_rounds,
            min_effect_pct=tolerance if tolerance is not None else DEFAULT_AB_MIN_EFFECT_PCT,
            workers=workers,
        )
        session.ab = run
        session.notes.append(
            f"A/B: after = this run's server and {options.model_repository}, before = "
            f"{options.ab_reference}; {run.rounds} interleaved rounds per level, minimum effect "
            f"{run.min_effect_pct:g}%"
        )
        yield run
