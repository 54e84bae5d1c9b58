"""A variant loaded on a running server, and the one way to get there: load what it calls, then itself.

Used by the plugin's fixtures for every variant, and by nothing that needs pytest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from blip_triton_bench.repository.variants import Variant
from blip_triton_bench.servers.base import ModelLoad, RunningServer, ServerStartError


class ModelLoadRecord(Protocol):
    """Where a run keeps each model's load (runs.session.BenchSession)."""

    def record_model_load(self, name: str, load: ModelLoad | ServerStartError) -> ModelLoad | ServerStartError:
        """Keep `load` unless `name` was loaded before; return the load kept."""
        ...

    def record_failed_load(self, name: str, error: ServerStartError) -> None:
        """`name` failed to load: later asks see this error."""
        ...


@dataclass(frozen=True)
class ServedVariant:
    """A variant loaded on the running server, ready for requests."""

    variant: Variant
    server: RunningServer
    load: ModelLoad

    @property
    def name(self) -> str:
        return self.variant.name


def serve(
    variant: Variant, staged: Mapping[str, Variant], server: RunningServer, session: ModelLoadRecord
) -> ServedVariant:
    """Load the models `variant` calls, then `variant` (Triton loads neither for a BLS model); its load time
    counts them all. On an external server nothing is loaded: each must be ready as the repository says.
    A failed load is recorded in the session, then raised (ServerStartError)."""
    load_s = 0.0
    for name in (*variant.composing_models, variant.name):
        try:
            load = server.prepare_variant(staged[name])
        except ServerStartError as error:
            session.record_failed_load(name, error)
            raise
        first = session.record_model_load(name, load)
        load_s += (first if isinstance(first, ModelLoad) else load).load_s
    return ServedVariant(variant=variant, server=server, load=ModelLoad(name=variant.name, load_s=load_s))
