"""Ctrl-C (SIGINT) or SIGTERM in the middle of a run of load levels leaves nothing running (no tritonserver process,
no container of ours) and still writes the report with the levels measured before it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blip_triton_bench.servers.docker_engine import CONTAINER_LABEL, docker_available

pytestmark = pytest.mark.faults

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def our_containers() -> set[str]:
    """Every container on the engine with the suite's label: this run's, and any another session left or runs."""
    listed = subprocess.run(
        ["docker", "ps", "-a", "-q", "--no-trunc", "--filter", f"label={CONTAINER_LABEL}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(listed.stdout.split())


def excerpt(output: str) -> str:
    """The part of a child's output a failure should show: from a crash's "Fatal Python error" (the crashing
    thread's stack, which the list of extension modules after it would push out of a plain tail), else the tail."""
    crash = output.find("Fatal Python error")
    return output[crash : crash + 6000] if crash >= 0 else output[-3000:]


def processes_mentioning(text: str) -> list[str]:
    listed = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True)
    return [line for line in listed.stdout.splitlines() if "pgrep" not in line]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server", "signal_number"),
    [
        pytest.param("local", signal.SIGINT, id="local-SIGINT"),
        pytest.param("local", signal.SIGTERM, id="local-SIGTERM"),
        # counts the engine's labelled containers: another test's would show
        pytest.param("container", signal.SIGINT, id="container-SIGINT", marks=pytest.mark.serial),
    ],
)
def test_a_signal_mid_level_leaves_no_server_behind_and_keeps_the_report(
    server: str, signal_number: signal.Signals, tmp_path: Path
) -> None:
    if server == "container" and not docker_available():
        pytest.skip("no Docker engine answers here: start one with server/docker_engine.sh to test this provider")
    basetemp = tmp_path / "basetemp"
    before = our_containers() if server == "container" else set()  # not this run's: it must leave them alone
    process = subprocess.Popen(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--model", "tiny", "--server", server,
            "--variant", "base_model_cpu", "--concurrency", "1:6", "--window-s", "1", "--warmup-s", "0.5",
            "--max-windows", "3",
            f"--basetemp={basetemp}", f"--report-dir={tmp_path / 'report'}", "suite/test_perf.py",
        ],
        cwd=REPOSITORY_ROOT,
        # unbuffered: the first [perf] line must reach us while the sweep runs, not in the final flush
        env={**{k: v for k, v in os.environ.items() if k != "CI"}, "PYTHONUNBUFFERED": "1"},
        # a shell's background job starts with SIGINT ignored, and Python then installs no KeyboardInterrupt
        # handler: give the child the default disposition, as a terminal's Ctrl-C would find it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    output = []
    try:
        deadline = time.monotonic() + 300
        for line in process.stdout:  # wait until the sweep is under way: one level measured
            output.append(line)
            if line.startswith("[perf]") or time.monotonic() > deadline:
                break
        assert any(line.startswith("[perf]") for line in output), "".join(output)[-3000:]
        if server == "container":
            assert our_containers() - before, "the sweep should be running in a container"
        process.send_signal(signal_number)
        output.append(process.communicate(timeout=180)[0])
    finally:
        if process.poll() is None:
            process.kill()
    text = "".join(output)
    assert "KeyboardInterrupt" in text, excerpt(text)  # SIGTERM is handled as an interrupt too
    # The levels measured before the signal are in the report it still wrote.
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["levels"], excerpt(text)
    assert processes_mentioning(str(basetemp)) == []  # no tritonserver serving from this run's directories
    if server == "container":
        assert our_containers() - before == set()  # the run's own container is gone


def start_suite(tmp_path: Path, *args: str) -> subprocess.Popen:
    """The suite as a terminal starts it (SIGINT at its default disposition), its output to tmp_path/pytest.log."""
    log = (tmp_path / "pytest.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--model", "tiny", "--server", "local",
         "--variant", "base_model_cpu", f"--basetemp={tmp_path / 'basetemp'}", f"--report-dir={tmp_path / 'report'}",
         *args],
        cwd=REPOSITORY_ROOT,
        env={**{k: v for k, v in os.environ.items() if k != "CI"}, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def wait_for(process: subprocess.Popen, happened, what: str, log: Path, timeout_s: float = 300.0) -> None:
    """Poll `happened` until true; fail naming `what` if the run ends first or the hang guard runs out."""
    deadline = time.monotonic() + timeout_s
    while not happened():
        assert process.poll() is None, f"pytest ended before {what}:\n{excerpt(log.read_text())}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s:\n{excerpt(log.read_text())}"
        time.sleep(0.05)


def test_sigterm_during_an_export_leaves_no_work_folder_and_no_partial_export(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    process = start_suite(tmp_path, f"--cache-dir={cache}", "suite/test_serving_correctness.py")
    try:
        wait_for(
            process, lambda: bool(list(cache.glob("exports/.tmp-*"))), "export work folder", tmp_path / "pytest.log"
        )
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    output = (tmp_path / "pytest.log").read_text()
    assert process.returncode == pytest.ExitCode.INTERRUPTED, excerpt(output)
    assert "KeyboardInterrupt" in output, excerpt(output)
    assert list(cache.glob("*/.tmp-*")) == [], "the interrupted export's work folder was left in the cache"
    kept = [p.name for p in (cache / "exports").iterdir() if not p.name.endswith(".lock")]  # a lock is no export
    assert kept == [], "an interrupted export was kept as if complete"
    assert processes_mentioning(str(tmp_path / "basetemp")) == []


def test_ctrl_c_mid_sweep_keeps_the_points_measured_in_its_report(tmp_path: Path) -> None:
    sweep_csv = tmp_path / "report" / "sweep" / "base_model_cpu" / "sweep.csv"
    process = start_suite(
        tmp_path, "--sweep-variant", "base_model_cpu", "--sweep-concurrency", "1", "--window-s", "1",
        "--warmup-s", "0.5", "--max-windows", "4", "suite/test_batching_sweep.py",
    )  # fmt: skip
    try:  # once the first point's row is written, the sweep is between points or measuring the next one
        wait_for(process, sweep_csv.is_file, "sweep report after the first point", tmp_path / "pytest.log")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    output = (tmp_path / "pytest.log").read_text()
    assert process.returncode == pytest.ExitCode.INTERRUPTED, excerpt(output)
    rows = sweep_csv.read_text().splitlines()[1:]
    assert rows and rows[0].startswith("base_model_cpu__as_given,1,"), sweep_csv.read_text()
    results = json.loads((tmp_path / "report" / "results.json").read_text())  # the run's own report, written too
    (interrupted,) = results["sections"]["Interrupted"]["data"]
    assert interrupted["during"] == "suite/test_batching_sweep.py::test_batching_and_instance_sweep[base_model_cpu]"
    assert processes_mentioning(str(tmp_path / "basetemp")) == []
