"""What the container provider asks Docker for, checked without a Docker engine: privileges, labels, the command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from blip_triton_bench.leftovers import OWNER_HOST_LABEL, OWNER_PID_LABEL
from blip_triton_bench.servers.base import ModelControlKey
from blip_triton_bench.servers.container import CONTAINER_LABEL, RUN_LABEL, ContainerProvider, run_options

pytestmark = pytest.mark.unit

DOCKERFILE = Path(__file__).resolve().parents[1] / "server" / "Dockerfile"


def test_container_has_no_capabilities_and_cannot_gain_privileges() -> None:
    options = run_options("run1", "none", "1g", [], owner_pid=4242, owner_host="ci-7")
    assert options["cap_drop"] == ["ALL"]
    assert options["security_opt"] == ["no-new-privileges"]
    assert "user" not in options  # the image's own unprivileged USER
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


def test_container_command_restricts_model_control_to_the_sessions_key(tmp_path: Path) -> None:
    key = ModelControlKey("k3y")
    command = ContainerProvider(tmp_path, image="any", model_control=key).command()
    assert "--http-restricted-api=model-repository:blip-bench-model-control=k3y" in command
    assert "--grpc-restricted-protocol=model-repository:blip-bench-model-control=k3y" in command
    assert any(
        re.fullmatch(r"--backend-config=python,shm-region-prefix-name=blip-bench-\d+-triton-", a) for a in command
    )
    assert (
        ContainerProvider(tmp_path, image="any").model_control != ContainerProvider(tmp_path, image="any").model_control
    )
