"""A server that dies or hangs mid-level, on a real local Triton serving the tiny BLIP: the level ends at once
with the cause (the exit code, or the request timeout), not with a raw gRPC error after the window budget."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blip_triton_bench.judging.baselines import BaselineStore
from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel, LoadSettings
from blip_triton_bench.model.workload import build_inputs
from blip_triton_bench.repository.variants import Variant, discover_variants, stage_repository
from blip_triton_bench.runs.perf import PerfRun, PerfSettings, VariantStopped
from blip_triton_bench.servers.local import LocalProvider, LocalServer
from tests.test_baselines import fingerprint  # noqa: F401  (a fixture)

pytestmark = pytest.mark.faults

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
VARIANT = "base_model_cpu"
REQUEST_TIMEOUT_S = 2.0
#: Windows of 20 s, at least 3 of them: a level that waited for its windows would last a minute or more after a fault.
#: A level that ends at once costs none of that, so the long windows cost the test nothing when it passes.
SETTINGS = LoadSettings(window_s=20.0, warmup_s=0.5, max_windows=6, min_requests_per_window=1)
FAULT_AFTER_S = 1.5
#: What "at once" allows (a liveness check, the workers' cancellation, closing the client: about 1 s on a quiet host):
#: a third of what a level that waited would take, so a busy host's slowness never decides the test, and a level
#: that waited out its windows always fails it.
MARGIN_S = 20.0


@pytest.fixture(scope="module")
def staged_root(tiny_artifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    exported = tiny_artifacts.teacher_export  # the session's one tiny export
    return stage_repository([variant()], lambda _v: exported.artifact_files, tmp_path_factory.mktemp("repo") / "r").root


@pytest.fixture
def server(staged_root: Path, tmp_path: Path) -> Iterator[LocalServer]:
    """A server of its own per test: each test kills or stops it."""
    with LocalProvider(tmp_path / "server").start(staged_root) as running:
        running.load_model(VARIANT)
        yield running


def variant() -> Variant:
    (found,) = [v for v in discover_variants(REPOSITORY) if v.name == VARIANT]
    return found


def perf_run(server: LocalServer, tiny_model, store: Path, fingerprint, load: LoadSettings) -> PerfRun:  # noqa: F811
    return PerfRun(
        settings=PerfSettings(load=load.keyed_for(server), concurrency="2", request_rate=None, tolerance_pct=None),
        store=BaselineStore(store),
        fingerprint=fingerprint,
        url=server.endpoints.grpc_url,
        inputs=build_inputs(tiny_model.description, batch_size=1, sequence_length=16),
        ceiling=lambda: None,
        server=server,
    )


def stopped_by(run: PerfRun, fault: threading.Timer) -> tuple[str, float]:
    """Run concurrency=2 while `fault` fires; the VariantStopped message and seconds from the fault to the end."""
    fault.start()
    try:
        with pytest.raises(VariantStopped) as stopped:
            run.run_level(variant(), LoadLevel(CONCURRENCY, 2))
        ended = time.monotonic()
    finally:
        fault.join()
    return str(stopped.value), ended - fault.fired_at


class Fault(threading.Timer):
    def __init__(self, pid: int, signum: signal.Signals) -> None:
        super().__init__(FAULT_AFTER_S, self._send, (pid, signum))

    def _send(self, pid: int, signum: signal.Signals) -> None:
        self.fired_at = time.monotonic()
        os.kill(pid, signum)


def test_a_killed_server_stops_the_variant_at_once_naming_its_exit_code(
    server: LocalServer,
    tiny_model,
    tmp_path: Path,
    fingerprint,  # noqa: F811
) -> None:
    run = perf_run(server, tiny_model, tmp_path / "baselines", fingerprint, SETTINGS)
    message, after_s = stopped_by(run, Fault(server.process.pid, signal.SIGKILL))

    assert message.startswith(
        f"tritonserver killed by signal 9 (SIGKILL) during {VARIANT} concurrency=2; last log lines:\n"
    )
    assert "UNAVAILABLE" not in message
    assert after_s < MARGIN_S, f"the level went on {after_s:.1f} s after the server died"
    stopped_earlier = re.escape(f"{VARIANT} stopped earlier: tritonserver killed by signal 9 (SIGKILL)")
    with pytest.raises(VariantStopped, match=f"^{stopped_earlier}") as later:
        run.run_level(variant(), LoadLevel(CONCURRENCY, 3))  # the variant's next level is not measured
    assert not later.value.first


def test_a_hung_server_ends_the_level_after_the_request_timeout(
    server: LocalServer,
    tiny_model,
    tmp_path: Path,
    fingerprint,  # noqa: F811
) -> None:
    load = LoadSettings(**{**SETTINGS.__dict__, "request_timeout_s": REQUEST_TIMEOUT_S})
    run = perf_run(server, tiny_model, tmp_path / "baselines", fingerprint, load)
    try:
        message, after_s = stopped_by(run, Fault(server.process.pid, signal.SIGSTOP))
    finally:
        os.kill(server.process.pid, signal.SIGCONT)  # so the fixture can stop it

    assert message.startswith(
        f"requests timed out: no answer within {REQUEST_TIMEOUT_S:g} s (--request-timeout-s), though the server "
        f"process is still there (hung or overloaded) during {VARIANT} concurrency=2"
    )
    assert after_s < REQUEST_TIMEOUT_S + MARGIN_S, f"the level went on {after_s:.1f} s after the server hung"
