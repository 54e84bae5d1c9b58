"""What the container provider asks Docker for, checked without a Docker engine: privileges, labels, the command."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from blip_triton_bench.servers.base import RunKey, ServerUsageError
from blip_triton_bench.servers.container import (
    CONTAINER_LABEL,
    RUN_LABEL,
    UNPRIVILEGED_USER,
    ContainerProvider,
    run_options,
)
from blip_triton_bench.servers.leftovers import OWNER_HOST_LABEL, OWNER_PID_LABEL

pytestmark = pytest.mark.unit

DOCKERFILE = Path(__file__).resolve().parents[1] / "server" / "Dockerfile"


def test_container_has_no_capabilities_and_cannot_gain_privileges() -> None:
    options = run_options("run1", "none", "1g", [], owner_pid=4242, owner_host="ci-7")
    assert options["cap_drop"] == ["ALL"]
    assert options["security_opt"] == ["no-new-privileges"]
    assert options["user"] == UNPRIVILEGED_USER  # also for NGC images, whose default user is root
    assert "privileged" not in options and "cap_add" not in options


def test_container_labels_name_its_run_owner_pid_and_host() -> None:
    labels = run_options("run1", "none", "1g", [], owner_pid=4242, owner_host="ci-7")["labels"]
    assert labels == {CONTAINER_LABEL: "1", RUN_LABEL: "run1", OWNER_PID_LABEL: "4242", OWNER_HOST_LABEL: "ci-7"}


def test_under_system_shared_memory_the_container_runs_as_the_regions_owner() -> None:
    options = run_options("run1", "system", "1g", [])
    assert options["ipc_mode"] == "host"
    assert re.fullmatch(r"\d+:\d+", options["user"])
    assert options["cap_drop"] == ["ALL"]


def test_cpu_image_runs_triton_as_a_non_root_user() -> None:
    users = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER ")]
    assert users, "server/Dockerfile sets no USER: Triton would run as root"
    assert users[-1].split(":")[0] not in ("0", "root")
    assert users[-1] == UNPRIVILEGED_USER  # the user every container is started as owns the image's files


def engine_at(base_url: str) -> SimpleNamespace:
    """Only what the choice of interface reads of a docker-py client: where its engine is."""
    return SimpleNamespace(api=SimpleNamespace(base_url=base_url))


def test_ports_are_published_on_loopback_and_a_remote_engine_needs_the_opt_in(tmp_path: Path) -> None:
    provider = ContainerProvider(tmp_path, image="any")
    assert provider._publish_address(engine_at("http+docker://localhost"), local_engine=True) == "127.0.0.1"
    with pytest.raises(ServerUsageError, match=r"on another host: .*Pass --publish-on-all-interfaces"):
        provider._publish_address(engine_at("http://10.0.0.5:2375"), local_engine=False)
    opted_in = ContainerProvider(tmp_path, image="any", publish_on_all_interfaces=True)
    assert opted_in._publish_address(engine_at("http://10.0.0.5:2375"), local_engine=False) == "0.0.0.0"


def test_container_command_restricts_inference_and_every_admin_api_to_the_runs_key(tmp_path: Path) -> None:
    key = RunKey("k3y")
    command = ContainerProvider(tmp_path, image="any", run_key=key).command()
    apis = "inference,model-repository,shared-memory,logging,trace"
    assert f"--http-restricted-api={apis}:blip-bench-run-key=k3y" in command
    assert f"--grpc-restricted-protocol={apis}:blip-bench-run-key=k3y" in command
    assert any(
        re.fullmatch(r"--backend-config=python,shm-region-prefix-name=blip-bench-\d+-triton-", a) for a in command
    )
    assert ContainerProvider(tmp_path, image="any").run_key != ContainerProvider(tmp_path, image="any").run_key
