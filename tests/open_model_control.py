"""A local Triton whose model-repository API is open to anyone, as on a server someone started by hand, and what
shows that a run loaded or unloaded a model there: the repository index and Triton's model-control log lines.

The local provider locks model control with a per-run key, so against its servers a check that "the suite loaded
nothing" could never fail: a load without the key is refused before Triton logs or changes anything.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import tritonclient.http as triton_http

from blip_triton_bench.servers.base import RunKey
from blip_triton_bench.servers.local import LocalServer

#: The Triton sources whose log lines say a model was loaded, unloaded, or asked for and not found.
MODEL_CONTROL_SOURCES = ("model_lifecycle.cc", "model_repository_manager.cc")


class OpenModelControl(RunKey):
    """A key the server is never started with: LocalProvider(..., run_key=OpenModelControl("unused")) starts
    a server whose model-repository API needs no key, so a load or unload by anyone succeeds and shows."""

    def server_args(self) -> list[str]:
        return []


@dataclass(frozen=True)
class ModelControlTrace:
    """What a load, an unload or a failed attempt of either changes on a server."""

    states: dict[str, str]  # every model of its repository -> its state in the index ("" for never loaded)
    log_lines: tuple[str, ...]  # Triton's log lines about loading, unloading or finding models


def model_control_trace(server: LocalServer) -> ModelControlTrace:
    with contextlib.closing(triton_http.InferenceServerClient(server.endpoints.http_url)) as client:
        index = client.get_model_repository_index()
    lines = [line for line in server.log_text().splitlines() if any(s in line for s in MODEL_CONTROL_SOURCES)]
    return ModelControlTrace({model["name"]: model.get("state", "") for model in index}, tuple(lines))
