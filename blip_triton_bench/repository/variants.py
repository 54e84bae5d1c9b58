"""Model-repository variants: parse each config.pbtxt with Triton's schema, derive what it needs, stage it.

A variant's needs (GPUs, TensorRT, execution providers) come from its config, never from its name; staging
copies configs and links artifacts into a temporary repository and never writes into the source tree.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from blip_triton_bench.host.environment import ProviderProbe
from blip_triton_bench.host.files import link_or_copy

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.pbtxt"
ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"
DEFAULT_ONNX_FILENAME = "model.onnx"
#: The model file Triton looks for in a version folder when `default_model_filename` is unset, per backend or
#: platform (each backend's documentation). Only that file makes a folder "served with its own model".
DEFAULT_MODEL_FILENAMES = {
    "onnxruntime": DEFAULT_ONNX_FILENAME,
    "onnxruntime_onnx": DEFAULT_ONNX_FILENAME,
    "python": "model.py",
    "tensorrt": "model.plan",
    "tensorrt_plan": "model.plan",
    "pytorch": "model.pt",
    "pytorch_libtorch": "model.pt",
    "tensorflow": "model.savedmodel",
    "tensorflow_savedmodel": "model.savedmodel",
    "tensorflow_graphdef": "model.graphdef",
    "openvino": "model.xml",
}
STAGED_VERSION = "1"

#: Which of the suite's artifacts an ONNX variant is served with: `parameters { key: "bench_artifact" ... }`.
ARTIFACT_PARAMETER = "bench_artifact"
ARTIFACTS = {
    "fp32": "the float32 export of --model (the default)",
    "int8": "the export quantized to INT8 (dynamic, MatMul/Gemm weights)",
    "fp16": "the export converted to FP16 inside, FP32 inputs and outputs (for GPUs)",
    "student": "the float32 export of the distilled student (or --student PATH)",
    "vision_encoder": "the split captioner's vision encoder: pixel_values -> cross-attention keys/values",
    "text_decoder": "the split captioner's text decoder with a KV cache",
}
#: Parameters of a BLS model naming the models it calls (Triton has no dependency field for BLS, so the
#: suite reads the same parameters the model does, to stage and load them first).
COMPOSING_MODEL_PARAMETERS = ("vision_encoder_model", "text_decoder_model")

#: Roles, derived from a config's inputs and outputs: which tests apply to a variant.
LOGITS_ROLE = "logits"  # the monolithic signature: (pixel_values, input_ids, attention_mask) -> logits
CAPTIONER_ROLE = "captioner"  # pixel_values in, generated token_ids out (streamed when decoupled)
COMPONENT_ROLE = "component"  # anything else, e.g. a model a captioner calls

#: Accelerator names in `optimization.execution_accelerators` -> the ONNX Runtime provider that serves them.
ACCELERATOR_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


class ConfigError(ValueError):
    """A model repository or config.pbtxt the suite cannot use; the message names the file and the fix."""


@dataclass(frozen=True)
class Requirements:
    """What a variant's config asks of the machine that serves it."""

    gpu_count: int = 0  # GPUs that must exist (ids 0..n-1 named by instance groups)
    gpu_reasons: tuple[str, ...] = ()  # the config fields that asked for GPUs
    providers: tuple[tuple[str, str], ...] = ()  # (ONNX Runtime provider, config field that asked for it)

    @property
    def needs_tensorrt(self) -> bool:
        return any(provider == "TensorrtExecutionProvider" for provider, _ in self.providers)


@dataclass(frozen=True, eq=False)  # identity equality: a config protobuf is not hashable
class Variant:
    """One folder of a model repository, as Triton will read it."""

    name: str
    source_dir: Path
    config: model_config_pb2.ModelConfig
    requirements: Requirements
    own_model_files: tuple[Path, ...] = field(default=())  # artifacts the folder already ships

    @property
    def config_path(self) -> Path:
        return self.source_dir / CONFIG_FILENAME

    @property
    def serves_onnx(self) -> bool:
        return self.config.platform == ONNX_PLATFORM or self.config.backend == ONNX_BACKEND

    @property
    def model_filename(self) -> str:
        return own_model_filename(self.config) or DEFAULT_ONNX_FILENAME

    @property
    def runs_in_fp16(self) -> bool:
        """Served with the FP16 artifact, or an execution accelerator asked for FP16 (TensorRT's `precision_mode`)."""
        if self.artifact == "fp16":
            return True
        accelerators = self.config.optimization.execution_accelerators
        return any(
            accelerator.parameters.get("precision_mode", "").upper() == "FP16"
            for accelerator in [
                *accelerators.gpu_execution_accelerator,
                *accelerators.cpu_execution_accelerator,
            ]
        )

    @property
    def artifact(self) -> str:
        """Which of the suite's artifacts this variant is served with (see ARTIFACTS)."""
        parameter = self.config.parameters.get(ARTIFACT_PARAMETER)
        return parameter.string_value if parameter is not None else "fp32"

    @property
    def role(self) -> str:
        inputs = {tensor.name for tensor in self.config.input}
        outputs = {tensor.name for tensor in self.config.output}
        if {"pixel_values", "input_ids"} <= inputs and "logits" in outputs:
            return LOGITS_ROLE
        if "pixel_values" in inputs and "token_ids" in outputs:
            return CAPTIONER_ROLE
        return COMPONENT_ROLE

    @property
    def composing_models(self) -> tuple[str, ...]:
        """Models this one calls: ensemble steps and the BLS parameters in COMPOSING_MODEL_PARAMETERS."""
        names = [step.model_name for step in self.config.ensemble_scheduling.step]
        for key in COMPOSING_MODEL_PARAMETERS:
            parameter = self.config.parameters.get(key)
            if parameter is not None and parameter.string_value:
                names.append(parameter.string_value)
        return tuple(dict.fromkeys(names))

    @property
    def decoupled(self) -> bool:
        return self.config.model_transaction_policy.decoupled

    @property
    def marks(self) -> tuple[str, ...]:
        """pytest marker names implied by the config (`-m gpu` selects GPU variants)."""
        names = []
        if self.requirements.gpu_count >= 1:
            names.append("gpu")
        if self.requirements.gpu_count >= 2:
            names.append("multi_gpu")
        if self.requirements.needs_tensorrt:
            names.append("trt")
        return tuple(names)


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a config.pbtxt with Triton's own protobuf schema; errors carry file, line and reason."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the model configuration ({error.strerror})") from None
    try:
        text = data.decode("utf-8")  # what Triton reads it as, whatever this host's locale says
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"{path}: byte {error.start} (line {line}) is 0x{data[error.start]:02x}, not UTF-8 ({error.reason}); "
            "Triton reads config.pbtxt as UTF-8: save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        line, column = error.GetLine(), error.GetColumn()
        reason = str(error).split(" : ", 1)[-1] if line else str(error)
        out_of_range = _out_of_range_reason(text, line, column) if "Value out of range" in reason else None
        if out_of_range is not None:
            raise ConfigError(f"{path}:{line}:{column}: {out_of_range}") from None
        raise ConfigError(
            f"{path}:{line}:{column}: {reason} (the file must be a Triton ModelConfig in protobuf text "
            "format; see model_config.proto)"
        ) from None


def _out_of_range_reason(text: str, line: int, column: int) -> str | None:
    """Name the field and its type for protobuf's bare "Value out of range: -5" (a negative delay, a count past
    int32); None when the field before `column` cannot be told."""
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return None
    before, value = lines[line - 1][: column - 1], lines[line - 1][column - 1 :].split()[0:1]
    name = before.rstrip().removesuffix(":").rstrip()
    name = name[len(name.rstrip("abcdefghijklmnopqrstuvwxyz_0123456789")) :]
    field = _find_field(model_config_pb2.ModelConfig.DESCRIPTOR, name, set())
    if field is None or not value:
        return None
    unsigned = field.cpp_type in (field.CPPTYPE_UINT32, field.CPPTYPE_UINT64)
    bits = 64 if field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64) else 32
    kind = f"{'u' if unsigned else ''}int{bits}"
    fix = "it cannot be negative: use 0 or more" if unsigned else f"use a value that fits a signed {bits}-bit integer"
    return f"field '{name}' is {value[0]}, out of range for its type ({kind}): {fix}"


def _find_field(message, name: str, seen: set[str]):
    """The first field called `name` in ModelConfig or a message it holds (config field names are unique)."""
    if message.full_name in seen:
        return None
    seen.add(message.full_name)
    if name in message.fields_by_name:
        return message.fields_by_name[name]
    for candidate in message.fields:
        if candidate.message_type is not None:
            found = _find_field(candidate.message_type, name, seen)
            if found is not None:
                return found
    return None


#: More instances than this in one instance group is refused. Triton sets no limit, but each ONNX Runtime instance is
#: a session with its own copy of the weights (BLIP-base FP32: ~0.9 GB) and its own threads, and each Python instance a
#: stub process: 256 of them is ~230 GB of weights on one device, so a larger count is a typo, not a configuration.
MAX_INSTANCE_COUNT = 256
#: A tensor dimension above this is refused: Triton and ONNX Runtime take dims as int64, but no dimension of a BLIP
#: model comes near it (the largest is the 30524-token vocabulary) and one request's byte size would overflow.
MAX_DIM = 2**31 - 1


def value_problems(config: model_config_pb2.ModelConfig) -> list[str]:
    """Values Triton refuses at load (ValidateModelConfig: negative batch size, a dim below -1, a preferred batch
    size <= 0 or above max_batch_size) or that make no sense here (the bounds above); each names field and fix."""
    problems = []
    if config.max_batch_size < 0:
        problems.append(
            f"max_batch_size is {config.max_batch_size}; Triton refuses a negative batch size: use 0 (the model "
            "takes no batch dimension) or the largest batch it takes"
        )
    for index, group in enumerate(config.instance_group):
        if group.count < 0:
            problems.append(f"instance_group[{index}].count is {group.count}; use 1 or more instances (unset: 1)")
        elif group.count > MAX_INSTANCE_COUNT:
            problems.append(
                f"instance_group[{index}].count is {group.count}; at most {MAX_INSTANCE_COUNT} instances per group "
                f"(each holds its own copy of the model): use {MAX_INSTANCE_COUNT} or fewer"
            )
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for index, tensor in enumerate(tensors):
            for where, dims in (("dims", tensor.dims), ("reshape.shape", tensor.reshape.shape)):
                for position, dim in enumerate(dims):
                    if dim == -1 or 1 <= dim <= MAX_DIM:
                        continue
                    problems.append(
                        f"{kind}[{index}].{where}[{position}] is {dim}; a dimension is 1 to {MAX_DIM}, or -1 for "
                        "a variable size: fix the value"
                    )
    if config.HasField("dynamic_batching"):
        for index, size in enumerate(config.dynamic_batching.preferred_batch_size):
            if size <= 0:
                problems.append(
                    f"dynamic_batching.preferred_batch_size[{index}] is {size}; Triton refuses a preferred batch size "
                    "below 1: use 1 or more"
                )
            elif size > config.max_batch_size:
                problems.append(
                    f"dynamic_batching.preferred_batch_size[{index}] is {size}, above max_batch_size "
                    f"{config.max_batch_size}; Triton refuses it: lower it or raise max_batch_size"
                )
    return problems


def plain_name_problem(field_name: str, value: str) -> str | None:
    """Why `value` (a file or model name a config gives) is not one plain name inside its folder, or None."""
    if value in (".", "..") or any(character in value for character in ("/", "\\", "\0")):
        return (
            f"{field_name} is '{value}'; it must be one plain name inside the model's folder (no '/', '..' or "
            "absolute path): name a file in the version folder, e.g. 'model.onnx'"
        )
    return None


def path_problems(config: model_config_pb2.ModelConfig) -> list[str]:
    """Every name in the config that the suite or Triton turns into a path, checked to stay inside its folder: the
    model file names, and the models an ensemble or a BLS model calls (staged beside it by name)."""
    names = [("default_model_filename", config.default_model_filename)]
    names += [(f"cc_model_filenames['{key}']", value) for key, value in sorted(config.cc_model_filenames.items())]
    names += [
        (f"ensemble_scheduling.step[{index}].model_name", step.model_name)
        for index, step in enumerate(config.ensemble_scheduling.step)
    ]
    for key in COMPOSING_MODEL_PARAMETERS:
        parameter = config.parameters.get(key)
        if parameter is not None:
            names.append((f"parameters '{key}'", parameter.string_value))
    return [problem for field_name, value in names if value and (problem := plain_name_problem(field_name, value))]


def link_problems(folder: Path, inside: Path) -> list[str]:
    """Links under `folder` (itself included) that lead out of `inside`: staging would copy their targets into the
    served repository, and the server would read them."""
    boundary = inside.resolve()
    problems = []

    def check(path: Path) -> None:
        if path.is_symlink() and not path.resolve().is_relative_to(boundary):
            problems.append(
                f"{path} links to {path.resolve()}, outside {inside}; copy the file or folder in instead of linking it"
            )

    check(folder)
    for directory, subdirectories, filenames in os.walk(folder):  # does not descend into linked folders
        for name in [*subdirectories, *filenames]:
            check(Path(directory) / name)
    return problems


def derive_requirements(config: model_config_pb2.ModelConfig) -> Requirements:
    gpu_count = 0
    gpu_reasons: list[str] = []
    for index, group in enumerate(config.instance_group):
        if group.kind != model_config_pb2.ModelInstanceGroup.KIND_GPU:
            continue  # KIND_AUTO falls back to CPU on a host without GPUs, as Triton does
        ids = sorted(set(group.gpus))
        gpu_count = max(gpu_count, (max(ids) + 1) if ids else 1)
        where = f"gpus {ids}" if ids else "any GPU"
        gpu_reasons.append(f"instance_group[{index}] kind KIND_GPU on {where}")
    providers: list[tuple[str, str]] = []
    accelerators = config.optimization.execution_accelerators
    for field_name, entries in (
        ("gpu_execution_accelerator", accelerators.gpu_execution_accelerator),
        ("cpu_execution_accelerator", accelerators.cpu_execution_accelerator),
    ):
        for index, accelerator in enumerate(entries):
            provider = ACCELERATOR_PROVIDERS.get(accelerator.name.lower())
            if provider is None:
                raise ConfigError(
                    f"optimization.execution_accelerators.{field_name}[{index}] names '{accelerator.name}', "
                    f"which ONNX Runtime does not provide; use one of {', '.join(ACCELERATOR_PROVIDERS)}"
                )
            providers.append((provider, f"optimization.execution_accelerators.{field_name} '{accelerator.name}'"))
            if field_name == "gpu_execution_accelerator" and gpu_count == 0:
                gpu_count = 1
                gpu_reasons.append(f"{field_name} '{accelerator.name}'")
    return Requirements(gpu_count=gpu_count, gpu_reasons=tuple(gpu_reasons), providers=tuple(providers))


#: Providers whose name in onnxruntime's list proves nothing: TensorRT's libraries (libnvinfer) load only when a
#: session starts, and when they are missing ONNX Runtime logs an error and falls back to CUDA, so a TensorRT variant
#: would load "successfully" and be measured without TensorRT (seen on the GPU host: onnxruntime-gpu 1.31.1, no
#: libnvinfer.so.10). A session on a one-node model tells, in milliseconds.
PROBED_PROVIDERS = ("TensorrtExecutionProvider",)
#: How a reason names what a provider stands for.
PROVIDER_LABELS = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA"}


@dataclass(frozen=True)
class ServerProviders:
    """The ONNX Runtime providers the server side lists, and, where that runtime is this process's own, a probe of
    whether a listed provider really runs a session (None: trust the list, e.g. a container's runtime)."""

    listed: tuple[str, ...]
    runtime: str = "the server's onnxruntime"  # how a reason names it: "onnxruntime-gpu 1.31.1"
    probe: Callable[[str], ProviderProbe] | None = None


def provider_unmet_reason(
    provider: str, asked_by: str, listed: Sequence[str], runtime: str, probe: ProviderProbe | None
) -> str | None:
    """Why `provider` cannot serve a variant (None when it can): not listed, or listed but a probe session lost it.

    `probe` is None when no probe ran (a provider not in PROBED_PROVIDERS, or a runtime that is not this host's).
    """
    label = PROVIDER_LABELS.get(provider, provider)
    if provider not in listed:
        return f"needs ONNX Runtime's {provider} ({asked_by}); {runtime} has {', '.join(listed)}"
    if probe is not None and not probe.usable:
        return (
            f"needs {label} ({asked_by}): {provider} is listed by {runtime} but a session could not use it "
            f"({probe.detail})"
        )
    return None


def unmet_requirements(
    requirements: Requirements, gpu_count: int, server_providers: ServerProviders | None
) -> list[str]:
    """Why this host cannot serve the variant ([] when it can). `server_providers=None`: unknown, unchecked.

    A listed provider in PROBED_PROVIDERS is probed only here, so only when a selected variant asks for it.
    """
    reasons = []
    if requirements.gpu_count > gpu_count:
        plural = "s" if requirements.gpu_count > 1 else ""
        reasons.append(
            f"needs {requirements.gpu_count} GPU{plural} ({'; '.join(requirements.gpu_reasons)}), "
            f"this host has {gpu_count}"
        )
    if server_providers is not None:
        for provider, asked_by in requirements.providers:
            probe = None
            if (
                server_providers.probe is not None
                and provider in PROBED_PROVIDERS
                and provider in server_providers.listed
            ):
                probe = server_providers.probe(provider)
            reason = provider_unmet_reason(provider, asked_by, server_providers.listed, server_providers.runtime, probe)
            if reason is not None:
                reasons.append(reason)
    return reasons


def own_model_filename(config: model_config_pb2.ModelConfig) -> str | None:
    """The file Triton loads from a version folder; None for a backend this suite does not know (ensemble, custom)."""
    return (
        config.default_model_filename
        or DEFAULT_MODEL_FILENAMES.get(config.backend)
        or DEFAULT_MODEL_FILENAMES.get(config.platform)
    )


def _is_placeholder(path: Path) -> bool:
    """What keeps an empty version folder in git (`.gitkeep`, the seed's `dummy`): never a model file."""
    return path.name == "dummy" or path.name.startswith(".")


def _own_model_files(source_dir: Path, model_filename: str | None) -> tuple[Path, ...]:
    """Files in numeric version folders when one of them holds the model file (`model_filename`; any file other than a
    placeholder when the backend's file is unknown), so its external data comes along; () when none does."""
    version_dirs = sorted(p for p in source_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if model_filename is not None and not any((version_dir / model_filename).exists() for version_dir in version_dirs):
        return ()
    files = []
    for version_dir in version_dirs:
        files.extend(p for p in sorted(version_dir.rglob("*")) if p.is_file() and not _is_placeholder(p))
    return tuple(files)


def load_variant(source_dir: Path) -> Variant:
    config_path = source_dir / CONFIG_FILENAME
    links = link_problems(source_dir, source_dir)
    if links:
        raise ConfigError("\n".join(links))
    config = parse_config(config_path)
    if config.name and config.name != source_dir.name:
        raise ConfigError(
            f"{config_path}: field 'name' is '{config.name}' but the folder is '{source_dir.name}'; Triton "
            "requires them to match: rename one"
        )
    if not config.platform and not config.backend:
        raise ConfigError(f"{config_path}: neither 'platform' nor 'backend' is set; Triton cannot pick a backend")
    problems = [*value_problems(config), *path_problems(config)]
    if len(problems) == 1:
        raise ConfigError(f"{config_path}: {problems[0]}")
    if problems:
        raise ConfigError(f"{config_path}: {len(problems)} values to fix:\n" + "\n".join(f"  {p}" for p in problems))
    try:
        requirements = derive_requirements(config)
    except ConfigError as error:
        raise ConfigError(f"{config_path}: {error}") from None
    artifact = config.parameters.get(ARTIFACT_PARAMETER)
    if artifact is not None and artifact.string_value not in ARTIFACTS:
        raise ConfigError(
            f"{config_path}: parameters '{ARTIFACT_PARAMETER}' is '{artifact.string_value}'; use one of "
            + "; ".join(f"'{name}' ({meaning})" for name, meaning in ARTIFACTS.items())
        )
    return Variant(
        name=source_dir.name,
        source_dir=source_dir,
        config=config,
        requirements=requirements,
        own_model_files=_own_model_files(source_dir, own_model_filename(config)),
    )


def discover_variants(repository: Path) -> list[Variant]:
    """Every folder of `repository` that holds a config.pbtxt, in name order."""
    if not repository.is_dir():
        raise ConfigError(f"model repository {repository} does not exist or is not a directory (--model-repository)")
    folders = sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
    outside = [folder for folder in folders if not folder.resolve().is_relative_to(repository.resolve())]
    if outside:
        raise ConfigError(
            "\n".join(
                f"{folder} links to {folder.resolve()}, outside the model repository {repository}; copy the variant "
                "folder in instead of linking it"
                for folder in outside
            )
        )
    without_config = [p.name for p in folders if not (p / CONFIG_FILENAME).is_file()]
    if without_config:
        logger.warning("ignoring %s in %s: no %s", ", ".join(without_config), repository, CONFIG_FILENAME)
    variants = [load_variant(p) for p in folders if (p / CONFIG_FILENAME).is_file()]
    if not variants:
        raise ConfigError(f"model repository {repository} holds no variant: expected <name>/{CONFIG_FILENAME} folders")
    known = {variant.name for variant in variants}
    for variant in variants:
        missing = [name for name in variant.composing_models if name not in known]
        if missing:
            raise ConfigError(
                f"{variant.config_path}: calls {', '.join(missing)}, which {repository} does not hold; add "
                f"{' and '.join(f'{name}/{CONFIG_FILENAME}' for name in missing)} or fix the parameter naming it"
            )
    return variants


def with_composing_models(variants: Sequence[Variant], repository: Sequence[Variant]) -> list[Variant]:
    """`variants` plus every model they call, transitively, in repository order (what staging must hold)."""
    by_name = {variant.name: variant for variant in repository}
    wanted: set[str] = set()
    pending = [variant.name for variant in variants]
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(by_name[name].composing_models)
    return [variant for variant in repository if variant.name in wanted]


def select_variants(variants: Sequence[Variant], names: Sequence[str]) -> list[Variant]:
    """The variants named by `--variant` (all when none is named); an unknown name is a usage error."""
    if not names:
        return list(variants)
    known = {v.name: v for v in variants}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown --variant {', '.join(unknown)}; this repository has: {', '.join(sorted(known))}")
    return [known[n] for n in dict.fromkeys(names)]


@dataclass(frozen=True)
class StagedRepository:
    root: Path
    notes: tuple[str, ...]  # what a user should know about how variants were staged


def staged_path(target: Path, relative: Path, config_path: Path) -> Path:
    """`target / relative`, refused (ConfigError naming the config) when it would land outside `target`: the last
    guard for a variant that did not come through load_variant's checks."""
    path = Path(os.path.normpath(target / relative))
    if relative.is_absolute() or not path.is_relative_to(target):
        raise ConfigError(f"{config_path}: staging would write {relative} outside {target}; name a file inside it")
    return path


def stage_repository(
    variants: Sequence[Variant], artifacts_for: Callable[[Variant], Sequence[Path]], destination: Path
) -> StagedRepository:
    """Lay out `destination` as a Triton repository: each config plus its model files.

    A variant folder that ships its own model files is served with them (an ONNX one with a note saying so);
    an ONNX variant without one, and any other variant (a BLS model's generation settings), gets the files
    `artifacts_for(variant)` returns under version 1.
    """
    notes = []
    for variant in variants:
        target = destination / variant.name
        target.mkdir(parents=True, exist_ok=False)
        shutil.copyfile(variant.config_path, target / CONFIG_FILENAME)
        for path in variant.own_model_files:
            link_or_copy(path, staged_path(target, path.relative_to(variant.source_dir), variant.config_path))
        if variant.own_model_files and variant.serves_onnx:
            files = ", ".join(str(p.relative_to(variant.source_dir)) for p in variant.own_model_files)
            notes.append(f"{variant.name}: served with its own model files ({files}), not the suite's export")
            continue
        artifacts = artifacts_for(variant)
        for path in artifacts:
            name = variant.model_filename if variant.serves_onnx and path.name == DEFAULT_ONNX_FILENAME else path.name
            link_or_copy(path, staged_path(target, Path(STAGED_VERSION, name), variant.config_path))
        if not variant.own_model_files and not artifacts:
            notes.append(f"{variant.name}: no model files and not an ONNX variant; staged with its config only")
    return StagedRepository(root=destination, notes=tuple(notes))


def stage_generated(
    root: Path, config: model_config_pb2.ModelConfig, files: Sequence[Path], model_filename: str = DEFAULT_ONNX_FILENAME
) -> Path:
    """Add a generated variant (e.g. one point of a batching sweep) to a staged repository; returns its folder.

    Written as Triton reads it: `<name>/config.pbtxt` from the protobuf, the artifacts linked under version 1.
    """
    problems = [
        problem
        for field_name, value in (("name", config.name), ("default_model_filename", model_filename))
        if (problem := plain_name_problem(field_name, value))
    ]
    if problems or not config.name:
        raise ConfigError(f"generated variant '{config.name}': " + ("; ".join(problems) or "name is empty"))
    target = root / config.name
    if target.exists():
        raise ConfigError(f"{target} exists already: generated variant names must be unique in the repository")
    (target / STAGED_VERSION).mkdir(parents=True)
    (target / CONFIG_FILENAME).write_text(text_format.MessageToString(config))
    for path in files:
        link_or_copy(
            path, target / STAGED_VERSION / (model_filename if path.name == DEFAULT_ONNX_FILENAME else path.name)
        )
    return target


def with_callees(variant: Variant, repository: Mapping[str, Variant]) -> list[Variant]:
    """`variant` and every model it calls, callees first (the order they must load in), each once."""
    ordered: list[Variant] = []

    def visit(current: Variant) -> None:
        for name in current.composing_models:
            visit(repository[name])
        if current not in ordered:
            ordered.append(current)

    visit(variant)
    return ordered
