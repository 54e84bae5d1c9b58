"""Start-up costs: cold start (provider start to ready), model load through the repository API, and the
first request after a load against steady state. Each is repeated; the spread across repeats is kept.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from blip_triton_bench.judging.stats import spread_pct
from blip_triton_bench.load.client import TritonInferClient
from blip_triton_bench.model.workload import ModelInputs
from blip_triton_bench.servers.base import RunningServer, ServerProvider

STEADY_REQUESTS = 5


@dataclass(frozen=True)
class ColdStart:
    provider: str
    ready_s: tuple[float, ...]  # one per repeat: start requested -> server ready

    def metrics(self) -> dict[str, float]:
        return {"cold_start_s": statistics.median(self.ready_s), "cold_start_spread_pct": spread_pct(self.ready_s)}


@dataclass(frozen=True)
class WarmUp:
    """Loads of one model and the requests right after each: what a scale-up or a redeploy costs."""

    model: str
    load_s: tuple[float, ...]
    first_request_ms: tuple[float, ...]
    steady_request_ms: float  # median of the requests after the first, over every repeat

    def metrics(self) -> dict[str, float]:
        return {
            "model_load_s": statistics.median(self.load_s),
            "model_load_spread_pct": spread_pct(self.load_s),
            "first_request_ms": statistics.median(self.first_request_ms),
            "first_request_spread_pct": spread_pct(self.first_request_ms),
            "steady_request_ms": self.steady_request_ms,
        }


def measure_cold_start(provider: ServerProvider, repository: Path, repeats: int) -> ColdStart:
    """Start a fresh server `repeats` times; time from asking to ready (stopping is not counted)."""
    ready = []
    for _ in range(repeats):
        started = time.monotonic()
        with provider.start(repository):
            ready.append(time.monotonic() - started)
    return ColdStart(provider=provider.name, ready_s=tuple(ready))


def _timed_request_ms(client: TritonInferClient, model: str, inputs: ModelInputs) -> float:
    started = time.perf_counter()
    client.infer(model, inputs)
    return (time.perf_counter() - started) * 1000.0


def measure_warm_up(server: RunningServer, model: str, inputs: ModelInputs, repeats: int) -> WarmUp:
    """Unload, load and query `model` `repeats` times; it is loaded again when this returns."""
    loads, firsts, steady = [], [], []
    with TritonInferClient.to_server(server) as client:
        for _ in range(repeats):
            server.unload_model(model)
            loads.append(server.load_model(model).load_s)
            firsts.append(_timed_request_ms(client, model, inputs))
            steady.extend(_timed_request_ms(client, model, inputs) for _ in range(STEADY_REQUESTS))
    return WarmUp(
        model=model,
        load_s=tuple(loads),
        first_request_ms=tuple(firsts),
        steady_request_ms=statistics.median(steady),
    )
