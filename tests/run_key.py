"""Load settings for the tests' own levels against a server a provider started: with the run's key
(servers.base.RunKey), which that server requires for inference, shared memory, model control, logging and tracing,
as the suite's perf run sends it."""

from __future__ import annotations

from dataclasses import replace

from blip_triton_bench.load.engine import LoadSettings
from blip_triton_bench.servers.base import RunningServer


def keyed(settings: LoadSettings, server: RunningServer) -> LoadSettings:
    """`settings` with `server`'s key on every request."""
    return replace(settings, restricted_api_headers=server.restricted_api_headers())
