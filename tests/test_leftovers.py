"""Leftovers of a SIGKILLed session: what counts as stale (pure, fixed inputs) and one cleanup on real files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from blip_triton_bench.host.files import host_tag, produce_directory, work_dir_prefix
from blip_triton_bench.load.shared_memory import level_tag
from blip_triton_bench.servers.leftovers import (
    OWNER_HOST_LABEL,
    OWNER_PID_LABEL,
    TEMP_DIR_NAME,
    ContainerInfo,
    remove_leftovers,
    stale_containers,
    stale_shm_names,
    stale_stub_pids,
    stale_temp_dirs,
)
from blip_triton_bench.servers.local import shm_prefix_setting


def dead_pid() -> int:
    """A pid that just exited (and was reaped): no process has it."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.unit
def test_only_our_shm_names_with_a_gone_pid_are_stale() -> None:
    names = [
        "blip-bench-100-0123456789ab-input",  # suite's region, owner gone
        "blip-bench-200-0123456789ab-output-3",  # suite's region, owner alive
        "blip-bench-100-triton-eeec5eec-ddd3-45a7-a71b-6c78fe9d3061",  # a killed local server's Python backend
        "triton_python_backend_shm_region_1a395faa-86f4",  # Triton's default name: whose, nobody can say
        "blip-bench-notapid-x",
        "sem.blip-bench-100-x",
        "pulse-shm-100",
    ]
    assert stale_shm_names(names, live_pids={200}) == [
        "blip-bench-100-0123456789ab-input",
        "blip-bench-100-triton-eeec5eec-ddd3-45a7-a71b-6c78fe9d3061",
    ]


@pytest.mark.unit
def test_names_the_suite_and_the_server_create_are_recognised() -> None:
    # What shared_memory.py and the local provider's prefix really produce, not a hand-written copy.
    region = f"{level_tag(pid=100)}-input"
    python_backend = shm_prefix_setting(pid=100).split("=", 1)[1] + "eeec5eec-ddd3-45a7-a71b-6c78fe9d3061"
    assert stale_shm_names([region, python_backend], live_pids=set()) == sorted([region, python_backend])


@pytest.mark.unit
def test_only_this_hosts_work_folders_with_a_gone_pid_are_stale() -> None:
    names = [
        ".tmp-3f9a0c12@ci-7-pid100-k2_x9abc",  # this host, its process gone: stale
        ".tmp-3f9a0c12@ci-7-pid200-zz81q0aa",  # this host, alive
        ".tmp-3f9a0c12@ci-8-pid100-p0q1r2s3",  # another host sharing the cache: its pid 100 is not ours
        ".tmp-3f9a0c12-pid100-k2_x9abc",  # an older suite's name, no host: cannot be judged
        ".tmp-3f9a0c12-q8x7",
        "base-3f9a0c12",
    ]
    assert stale_temp_dirs(names, live_pids={200}, host="ci-7") == [".tmp-3f9a0c12@ci-7-pid100-k2_x9abc"]


@pytest.mark.unit
def test_a_work_folder_names_this_host_as_a_file_name_can() -> None:
    assert host_tag("build/host 7") == "build_host_7"
    assert work_dir_prefix("abc") == f".tmp-abc@{host_tag()}-pid{os.getpid()}-"
    assert TEMP_DIR_NAME.fullmatch(work_dir_prefix("abc") + "x1y2z3")["host"] == host_tag()


@pytest.mark.unit
def test_only_this_hosts_containers_with_a_gone_owner_are_stale() -> None:
    containers = [
        ContainerInfo("gone", {OWNER_PID_LABEL: "100", OWNER_HOST_LABEL: "ci-7"}),
        ContainerInfo("alive", {OWNER_PID_LABEL: "200", OWNER_HOST_LABEL: "ci-7"}),
        ContainerInfo("other-host", {OWNER_PID_LABEL: "100", OWNER_HOST_LABEL: "ci-8"}),
        ContainerInfo("older-suite", {}),  # no owner label: cannot be judged, kept
    ]
    assert stale_containers(containers, "ci-7", live_pids={200}) == ["gone"]


@pytest.mark.faults
def test_cleanup_removes_a_killed_sessions_shm_and_work_folder_and_keeps_live_ones(tmp_path: Path) -> None:
    shm_dir, cache = Path("/dev/shm"), tmp_path / "cache"
    gone = dead_pid()
    stale_region = shm_dir / f"{level_tag(pid=gone)}-input"
    live_region = shm_dir / f"{level_tag()}-input"  # this process's: alive
    stale_region.write_bytes(b"x")
    live_region.write_bytes(b"x")
    # A real produce_directory work folder of this process (the name it really uses), then one of a dead pid.
    seen = []
    produce_directory(cache / "exports" / "entry", "key1", lambda work: seen.append(work.name), lambda d: True)
    assert seen and f"-pid{os.getpid()}-" in seen[0]
    stale_work = cache / "exports" / seen[0].replace(f"-pid{os.getpid()}-", f"-pid{gone}-")
    live_work = cache / "exports" / f"{work_dir_prefix('key2')}abc123"
    elsewhere = cache / "exports" / f".tmp-key3@another-host-pid{gone}-abc123"  # in progress on another machine
    stale_work.mkdir()
    (stale_work / "model.onnx").write_bytes(b"half")
    live_work.mkdir()
    elsewhere.mkdir()
    try:
        lines = remove_leftovers(shm_dir, cache, None, socket.gethostname())
        assert not stale_region.exists() and not stale_work.exists()
        assert live_region.exists() and live_work.exists() and (cache / "exports" / "entry").is_dir()
        assert elsewhere.exists()
        assert f"removed stale shared memory {stale_region} (its process is gone)" in lines
        assert f"removed the work folder of a killed export {stale_work} (its process is gone)" in lines
    finally:
        for path in (stale_region, live_region):
            path.unlink(missing_ok=True)


@pytest.mark.unit
def test_stubs_of_a_killed_session_are_stale_and_other_servers_stubs_are_not() -> None:
    stub = "/tmp/x/backends/python/triton_python_backend_stub"
    command_lines = {
        11: [stub, "/repo/m/1/model.onnx", "blip-bench-100-triton-8000-0d5e", "67108864", "67108864", "7"],
        12: [stub, "/repo/m/1/model.onnx", "blip-bench-200-triton-8001-1a2b", "67108864", "67108864", "8"],
        13: [stub, "/repo/m/1/model.py", "triton_python_backend_shm_region_5f1c", "1048576", "1048576", "9"],
        14: ["/usr/bin/python3", "-c", "blip-bench-100-triton-8000-0d5e"],
        15: [stub],
    }
    assert stale_stub_pids(command_lines, live_pids={200}) == [11]
    assert stale_stub_pids(command_lines, live_pids={100, 200}) == []
