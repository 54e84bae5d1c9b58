"""The suite run as a user types it, in a subprocess: each run in its own report, baseline and temp folders, and
what a test asks of a finished or running one (its output, results.json, its tritonserver, its leftovers).

Shared by the end-to-end and fault tests (test_fault_injection.py, test_load_workers_end_to_end.py,
test_load_cluster.py) and by the recorded tiny baseline store in conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from blip_triton_bench.servers.leftovers import SYSTEM_SHM_DIR

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SEED_REPOSITORY = REPOSITORY_ROOT / "model_repository"
SEED_CONFIG = SEED_REPOSITORY / "base_model_cpu" / "config.pbtxt"
VARIANT = "base_model_cpu"
PERF_TEST = f"suite/test_perf.py::test_throughput_and_latency[{VARIANT}-concurrency=2]"
#: The level of a run nothing interrupts: 0.5 s warm-up and windows of 1 s (the tiny model answers over 100 requests a
#: window on 2 cores, so each p99 is gated); 30 % stability and up to 10 windows, so a level ends stable and is
#: recorded; a 50 % tolerance, so a run judged against the recorded store fails only for a real slowdown.
QUICK_LEVEL = ("--concurrency", "2", "--window-s", "1", "--warmup-s", "0.5", "--max-windows", "10",
               "--stability-percentage", "30", "--tolerance-pct", "50")  # fmt: skip
#: The level of a run that must record a baseline: QUICK_LEVEL, but a level whose windows vary up to 5x is still
#: taken as stable. Only stable levels are recorded, and beside another test a window can vary by over 30 % (seen in
#: CI: 31.7 %, nothing recorded, and a test of what recording keeps had nothing to keep). These runs check what is
#: recorded and kept, not how fast.
RECORDING_LEVEL = (*QUICK_LEVEL[:-4], "--stability-percentage", "400", "--tolerance-pct", "50")
#: The level of a run a fault interrupts: at least 1 s warm-up and 3 windows of 3 s, so a fault injected once the
#: level's first requests are answered (RunningSuite.wait_for_perf_level) lands inside it.
FAULT_LEVEL = ("--concurrency", "2", "--window-s", "3", "--warmup-s", "1", "--max-windows", "10",
               "--stability-percentage", "30", "--tolerance-pct", "50")  # fmt: skip
RUN_TIMEOUT_S = 600
#: How long a wait for an event of the run may take before the test fails: a hang guard, not a speed check.
EVENT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class SuiteRun:
    """One finished pytest process and where its files went."""

    pid: int
    returncode: int
    output: str
    report_dir: Path
    basetemp: Path

    def results(self) -> dict:
        return json.loads((self.report_dir / "results.json").read_text())

    def section(self, title: str) -> dict:
        return self.results()["sections"][title]


class Suite:
    """Runs the suite as a user would, each run in its own folders under `root`."""

    def __init__(
        self,
        root: Path,
        repository: Path = SEED_REPOSITORY,
        cache_dir: Path | None = None,
        level: tuple[str, ...] = QUICK_LEVEL,
    ) -> None:
        self.root = root
        self.repository = repository
        self.cache_dir = cache_dir
        self.level = level
        self.runs = 0

    @property
    def baseline_dir(self) -> Path:
        return self.root / "baselines"

    @property
    def measure_lock_file(self) -> Path:
        return self.root / "measure.lock"

    def command(self, *extra: str, report_dir: Path, basetemp: Path) -> list[str]:
        cache = (f"--cache-dir={self.cache_dir}",) if self.cache_dir is not None else ()
        return [
            sys.executable, "-u", "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEs",
            "--model", "tiny", "--server", "local", *cache,
            f"--model-repository={self.repository}", "--variant", "base_model_cpu",
            f"--baseline-dir={self.baseline_dir}", f"--report-dir={report_dir}", f"--basetemp={basetemp}",
            # the runs of one Suite share a measurement lock; other tests' runs, measuring beside it, do not
            f"--measure-lock-file={self.measure_lock_file}",
            *self.level, *extra,
        ]  # fmt: skip

    @contextlib.contextmanager
    def started(self, *extra: str) -> Iterator[RunningSuite]:
        self.runs += 1
        report_dir, basetemp = self.root / f"report-{self.runs}", self.root / f"tmp-{self.runs}"
        log = self.root / f"pytest-{self.runs}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                self.command(*extra, report_dir=report_dir, basetemp=basetemp),
                cwd=REPOSITORY_ROOT,
                env={key: value for key, value in os.environ.items() if key != "CI"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        running = RunningSuite(process, log, report_dir, basetemp)
        try:
            yield running
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    def run(self, *extra: str) -> SuiteRun:
        with self.started(*extra) as running:
            return running.finish()


@dataclass
class RunningSuite:
    process: subprocess.Popen
    log: Path
    report_dir: Path
    basetemp: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, happened: Callable[[], bool], what: str, timeout_s: float = EVENT_TIMEOUT_S) -> None:
        """Poll `happened` until it is true; fail naming `what` if pytest ends first or the hang guard runs out."""
        deadline = time.monotonic() + timeout_s
        while not happened():
            if self.process.poll() is not None:
                raise AssertionError(f"pytest ended before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout_s:.0f} s:\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def wait_for(self, pattern: str, timeout_s: float = EVENT_TIMEOUT_S) -> None:
        self.wait_until(lambda: re.search(pattern, self.output()) is not None, repr(pattern), timeout_s)

    def wait_for_perf_level(self) -> None:
        """Return once the perf level is under way: its test has started (pytest -v prints the test id before its
        set-up) and the server has answered an inference of the variant since. Only the level sends those then: the
        correctness tests ran before the id appeared, and the client ceiling is measured after the level, on a model
        of its own."""
        self.wait_for(re.escape(PERF_TEST))
        counts: list[int] = []

        def answered_once_more() -> bool:
            count = self.answered_inferences()
            if count is not None:
                counts.append(count)
            return len(counts) > 1 and counts[-1] > counts[0]

        self.wait_until(answered_once_more, f"inference of {VARIANT} answered after {PERF_TEST} started")

    def answered_inferences(self) -> int | None:
        """The inferences of the variant the run's tritonserver has answered so far; None while there is no server,
        or it does not serve the variant yet."""
        ports = []
        for process in server_processes(self.basetemp):
            with contextlib.suppress(psutil.Error):
                if process.name() == "tritonserver":
                    ports += [arg.split("=", 1)[1] for arg in process.cmdline() if arg.startswith("--http-port=")]
        if len(ports) != 1:
            return None
        client = triton_http.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        try:
            statistics = client.get_inference_statistics(VARIANT)["model_stats"]
        except (InferenceServerException, OSError):
            return None
        finally:
            client.close()
        return sum(int(version["inference_stats"]["success"]["count"]) for version in statistics)

    def tritonserver(self) -> psutil.Process:
        (server,) = [p for p in server_processes(self.basetemp) if p.name() == "tritonserver"]
        return server

    def finish(self) -> SuiteRun:
        self.process.wait(timeout=RUN_TIMEOUT_S)
        return SuiteRun(self.process.pid, self.process.returncode, self.output(), self.report_dir, self.basetemp)


def server_processes(basetemp: Path) -> list[psutil.Process]:
    """tritonserver and its Python backend stubs started for a run: their command lines name its basetemp."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(basetemp) in part for part in process.info["cmdline"] or ()):
                found.append(process)
    return found


def shm_regions_of(pid: int) -> list[str]:
    return sorted(name for name in os.listdir(SYSTEM_SHM_DIR) if name.startswith(f"blip-bench-{pid}-"))


def assert_no_leftovers(run: SuiteRun, cache_dir: Path | None = None) -> None:
    """Nothing of the run is alive or left in /dev/shm; no export work folder stays in the cache."""
    deadline = time.monotonic() + 10.0  # stubs notice their server is gone on their own, within seconds
    while (alive := server_processes(run.basetemp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"left running: {[p.info['cmdline'][:2] for p in alive]}"
    assert shm_regions_of(run.pid) == [], "shared-memory regions left in /dev/shm"
    if cache_dir is not None:
        assert list(cache_dir.glob("*/.tmp-*")) == [], "export work folders left in the cache"


def baseline_files(store: Path) -> dict[Path, bytes]:
    """The store's files and their bytes; writers' lock files (baselines.lock_path) hold nothing and are left out."""
    if not store.exists():
        return {}
    return {path: path.read_bytes() for path in sorted(store.rglob("*")) if path.is_file() and path.suffix != ".lock"}


def copy_recorded_baselines(store: Path, destination: Path) -> Path:
    """A copy of conftest's recorded store at `destination` (a Suite's baseline_dir), to judge against or spoil."""
    shutil.copytree(store, destination)
    return destination
