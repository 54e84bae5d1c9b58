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

from blip_triton_bench.servers.container import CONTAINER_LABEL, docker_available

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


def processes_mentioning(text: str) -> list[str]:
    listed = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True)
    return [line for line in listed.stdout.splitlines() if "pgrep" not in line]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server", "signal_number"),
    [("local", signal.SIGINT), ("local", signal.SIGTERM), ("container", signal.SIGINT)],
    ids=["local-SIGINT", "local-SIGTERM", "container-SIGINT"],
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
            "--variant", "base_model_cpu", "--concurrency", "1:6", "--window-s", "2", "--warmup-s", "1",
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
    assert "KeyboardInterrupt" in text, text[-3000:]  # SIGTERM is handled as an interrupt too
    # The levels measured before the signal are in the report it still wrote.
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["levels"], text[-3000:]
    assert processes_mentioning(str(basetemp)) == []  # no tritonserver serving from this run's directories
    if server == "container":
        assert our_containers() - before == set()  # the run's own container is gone
