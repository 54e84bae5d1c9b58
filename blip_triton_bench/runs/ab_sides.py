"""Where each side of a before-vs-after run is served: 'after' is the run's own server and repository; 'before' is
the reference repository's variant staged beside it under another name (ReferenceRepository), or the same variant
on another server (ReferenceServer). A variant that calls other models (an ensemble, a BLS captioner) brings them
along on the 'before' side, renamed with it, so each side runs only its own models."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2

from blip_triton_bench.load.engine import LoadSettings
from blip_triton_bench.repository.variants import COMPOSING_MODEL_PARAMETERS, Variant, stage_generated, with_callees
from blip_triton_bench.servers.base import RunningServer

BEFORE_SUFFIX = "__before"


@dataclass(frozen=True)
class ABSide:
    """One side of the comparison: the server it is served by and the model name there."""

    server: RunningServer
    model: str

    def url(self, protocol: str) -> str:
        endpoints = self.server.endpoints
        return endpoints.grpc_url if protocol == "grpc" else endpoints.http_url

    def keyed(self, load: LoadSettings) -> LoadSettings:
        """`load` with this side's server's key on every request (a reference server has a key of its own where it
        was not started with the run's)."""
        return load.keyed_for(self.server)


def renamed_config(variant: Variant, suffix: str) -> model_config_pb2.ModelConfig:
    """`variant`'s config under `name + suffix`, calling the models it calls under their names + `suffix`: ensemble
    steps and the BLS parameters that name a model (COMPOSING_MODEL_PARAMETERS)."""
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(variant.config)
    config.name = f"{variant.name}{suffix}"
    for step in config.ensemble_scheduling.step:
        step.model_name = f"{step.model_name}{suffix}"
    for key in COMPOSING_MODEL_PARAMETERS:
        if key in config.parameters and config.parameters[key].string_value:
            config.parameters[key].string_value = f"{config.parameters[key].string_value}{suffix}"
    return config


def reference_problem(variant: Variant, reference: Mapping[str, Variant], reference_root: Path) -> str | None:
    """Why `variant` cannot be compared with the reference repository; None when it can."""
    found = reference.get(variant.name)
    if found is None:
        return f"the reference repository {reference_root} has no variant {variant.name}: nothing to compare with"
    if found.role != variant.role:
        return f"{found.config_path} does not serve {variant.role} as {variant.config_path} does"
    return None  # the models it calls are there: discover_variants refuses a repository without them


class ReferenceRepository:
    """'Before' = another repository's variant of the same name, staged beside it as `<name>__before` on the same
    server, with the models it calls renamed alike: what a config or model change is judged by."""

    def __init__(
        self,
        server: RunningServer,
        staged_root: Path,
        reference: Mapping[str, Variant],
        files_for: Callable[[Variant], Sequence[Path]],
    ) -> None:
        self.server = server
        self.staged_root = staged_root
        self.reference = reference
        self.files_for = files_for
        self._staged: set[str] = set()  # callees shared by two variants are staged and loaded once

    def prepare(self, variant: Variant) -> ABSide:
        for model in with_callees(self.reference[variant.name], self.reference):
            config = renamed_config(model, BEFORE_SUFFIX)
            if config.name in self._staged:
                continue
            stage_generated(self.staged_root, config, self._files(model), model.model_filename)
            self.server.load_model(config.name)
            self._staged.add(config.name)
        return ABSide(self.server, f"{variant.name}{BEFORE_SUFFIX}")

    def _files(self, model: Variant) -> list[Path]:
        """As stage_repository serves a variant: the files it ships, and the suite's artifacts unless it is an ONNX
        variant that ships its own model (a BLS model ships model.py and gets its generation settings)."""
        own = [path for path in model.own_model_files if path.is_file()]
        return own if own and model.serves_onnx else [*own, *self.files_for(model)]

    def liveness(self) -> str | None:
        return None  # the same server as after's, which the run already watches


class ReferenceServer:
    """'Before' = the same variant on another server (an older Triton image, or a server at
    --reference-triton-url): what a server upgrade is judged by. A server the suite started gets the variant and
    the models it calls loaded; an external one must serve them already, configured as the repository says."""

    def __init__(self, server: RunningServer, staged: Mapping[str, Variant]) -> None:
        self.server = server
        self.staged = staged

    def prepare(self, variant: Variant) -> ABSide:
        for model in with_callees(variant, self.staged):
            self.server.prepare_variant(model)
        return ABSide(self.server, variant.name)

    def liveness(self) -> str | None:
        cause = self.server.liveness()
        return None if cause is None else f"the reference server: {cause}"
