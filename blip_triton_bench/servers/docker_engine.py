"""The Docker engine the container provider and the leftover scan talk to: whether one answers, a client for it, and
the label every container of the suite carries."""

from __future__ import annotations

import os

import docker
import docker.errors
import requests.exceptions

from blip_triton_bench.servers.base import ServerStartError

#: Every container the suite starts carries this label, so leftovers are easy to find:
#: `docker ps -a --filter label=blip-triton-bench`.
CONTAINER_LABEL = "blip-triton-bench"
DOCKER_PING_TIMEOUT_S = 2.0
DOCKER_API_TIMEOUT_S = 120.0
NO_ENGINE_HINT = (
    "Start one with `server/docker_engine.sh` (installs docker.io and starts dockerd), or run Triton without "
    "Docker with `--server local`"
)


def docker_available(timeout_s: float = DOCKER_PING_TIMEOUT_S) -> bool:
    """True when a Docker engine answers a ping within `timeout_s` (DOCKER_HOST or the default socket)."""
    try:
        client = docker.from_env(timeout=timeout_s)
    except docker.errors.DockerException:  # also raised when the engine does not answer the version probe
        return False
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        return False
    finally:
        client.close()


def engine_client() -> docker.DockerClient:
    """A client of the engine at DOCKER_HOST (or the default socket) that answered a ping; ServerStartError if none."""
    where = os.environ.get("DOCKER_HOST", "the default socket unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=DOCKER_API_TIMEOUT_S)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        raise ServerStartError(f"no Docker engine answers at {where} ({error}). {NO_ENGINE_HINT}") from None
    return client
