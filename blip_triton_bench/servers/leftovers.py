"""What a SIGKILLed session leaves behind, found and removed at the next start: containers, /dev/shm regions,
Python backend stubs and half-written cache entries whose owning process is gone.

Deciding is pure (names, labels and the set of live pids in, names out); only `remove_leftovers` touches anything.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip_triton_bench.host.files import host_tag

SYSTEM_SHM_DIR = Path("/dev/shm")  # where POSIX shm_open names appear as files on Linux

#: /dev/shm names the suite creates: its own regions (`blip-bench-<pid>-<token>-...`, shared_memory.level_tag) and
#: the Python backend's of a local server, whose prefix the provider sets to `blip-bench-<pid>-triton-` (Triton's
#: default, `triton_python_backend_shm_region_<uuid>`, says nothing about who made it).
#: Every region this suite creates starts with this, so a leftover in /dev/shm or on a server says whose it is.
SHM_PREFIX = "blip-bench"
SHM_NAME = re.compile(re.escape(SHM_PREFIX) + r"-(?P<pid>\d+)-.+")
#: produce_directory's work folders: `.tmp-<key>@<host>-pid<pid>-<mkdtemp's random suffix>` beside the cache entry
#: (files.work_dir_prefix). The host matters on a cache shared between machines: a pid means nothing elsewhere.
TEMP_DIR_NAME = re.compile(r"\.tmp-.+@(?P<host>[^@/]+)-pid(?P<pid>\d+)-[a-z0-9_]+")
#: Container labels (servers/container.py sets them): who started it, on which host; a pid means nothing elsewhere.
OWNER_PID_LABEL = "blip-triton-bench.owner-pid"
OWNER_HOST_LABEL = "blip-triton-bench.owner-host"
STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class ContainerInfo:
    container_id: str
    labels: Mapping[str, str]


def pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _owner_pid(pattern: re.Pattern[str], name: str) -> int | None:
    match = pattern.fullmatch(name)
    return int(match["pid"]) if match else None


def stale_shm_names(names: Iterable[str], live_pids: Collection[int]) -> list[str]:
    """/dev/shm names of ours whose owning process is not in `live_pids`; every other name is left alone."""
    return sorted(name for name in names if (pid := _owner_pid(SHM_NAME, name)) is not None and pid not in live_pids)


def stale_temp_dirs(names: Iterable[str], live_pids: Collection[int], host: str) -> list[str]:
    """produce_directory work folders (by name) made on `host` by a process not in `live_pids`. One made on another
    host sharing the cache, or named by an older suite (no host), cannot be judged from here and is kept."""
    stale = []
    for name in names:
        match = TEMP_DIR_NAME.fullmatch(name)
        if match and match["host"] == host and int(match["pid"]) not in live_pids:
            stale.append(name)
    return sorted(stale)


def stale_containers(containers: Iterable[ContainerInfo], host: str, live_pids: Collection[int]) -> list[str]:
    """Ids of our containers started on `host` by a process not in `live_pids`. One without owner labels (started
    by an older suite) or from another host cannot be judged from here and is kept."""
    stale = []
    for container in containers:
        pid_text = container.labels.get(OWNER_PID_LABEL, "")
        if container.labels.get(OWNER_HOST_LABEL) == host and pid_text.isdigit() and int(pid_text) not in live_pids:
            stale.append(container.container_id)
    return stale


def stale_stub_pids(command_lines: Mapping[int, Sequence[str]], live_pids: Collection[int]) -> list[int]:
    """Python backend stubs of a killed session (pid -> command line). A stub's third argument is its /dev/shm
    region, named after the session that started its server; it outlives that server when the server is killed
    (it is not told), so a stub whose session is gone is stale. Stubs of other servers are left alone."""
    stale = []
    for pid, command in command_lines.items():
        if len(command) < 3 or Path(command[0]).name != STUB_NAME:
            continue
        owner = _owner_pid(SHM_NAME, command[2])
        if owner is not None and owner not in live_pids:
            stale.append(pid)
    return sorted(stale)


def owner_pids(pattern: re.Pattern[str], names: Iterable[str]) -> set[int]:
    return {pid for name in names if (pid := _owner_pid(pattern, name)) is not None}


def live_among(pids: Iterable[int]) -> set[int]:
    return {pid for pid in pids if pid_is_alive(pid)}


def remove_stale_shm(shm_dir: Path) -> list[str]:
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    lines = []
    for name in stale_shm_names(names, live_among(owner_pids(SHM_NAME, names))):
        try:
            (shm_dir / name).unlink()
        except OSError as error:
            lines.append(f"could not remove stale shared memory {shm_dir / name}: {error}")
            continue
        lines.append(f"removed stale shared memory {shm_dir / name} (its process is gone)")
    return lines


def remove_stale_stubs() -> list[str]:
    import psutil

    command_lines = {}
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == STUB_NAME and process.info["cmdline"]:
            command_lines[process.pid] = process.info["cmdline"]
    owners = owner_pids(SHM_NAME, [command[2] for command in command_lines.values() if len(command) > 2])
    lines = []
    for pid in stale_stub_pids(command_lines, live_among(owners)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        except PermissionError as error:
            lines.append(f"could not stop stale Python backend stub {pid}: {error}")
            continue
        lines.append(f"stopped stale Python backend stub {pid} (the session that started its server is gone)")
    return lines


def remove_stale_temp_dirs(cache_dir: Path, host: str) -> list[str]:
    """This host's work folders directly under the cache's subfolders (exports/, students/, stub-envs/), where
    produce_directory puts them beside the entry it produces."""
    candidates = [path for path in cache_dir.glob("*/.tmp-*") if path.is_dir()] if cache_dir.is_dir() else []
    names = [path.name for path in candidates]
    stale = set(stale_temp_dirs(names, live_among(owner_pids(TEMP_DIR_NAME, names)), host))
    lines = []
    for path in candidates:
        if path.name in stale:
            shutil.rmtree(path, ignore_errors=True)
            lines.append(f"removed the work folder of a killed export {path} (its process is gone)")
    return lines


def remove_stale_containers(client: Any, host: str) -> list[str]:
    """Our labelled containers whose owner is gone (docker-py client); Docker errors are a line, not a failure."""
    import docker
    import requests

    from blip_triton_bench.servers.docker_engine import CONTAINER_LABEL

    try:
        found = client.containers.list(all=True, filters={"label": CONTAINER_LABEL})
        infos = [ContainerInfo(container.id, container.labels or {}) for container in found]
        pids = {int(info.labels[OWNER_PID_LABEL]) for info in infos if info.labels.get(OWNER_PID_LABEL, "").isdigit()}
        stale = set(stale_containers(infos, host, live_among(pids)))
        lines = []
        for container in found:
            if container.id in stale:
                container.remove(force=True)
                pid = container.labels.get(OWNER_PID_LABEL)
                lines.append(
                    f"removed stale container {container.id[:12]} (label {CONTAINER_LABEL}; pid {pid} is gone)"
                )
        return lines
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        return [f"could not look for stale {CONTAINER_LABEL} containers: {error}"]


def remove_session_leftovers(cache_dir: Path, server_kind: str) -> list[str]:
    """At session start: this host's /dev/shm and `cache_dir`, and Docker's containers when this run uses Docker."""
    client = None
    if server_kind == "container":
        from blip_triton_bench.servers.base import ServerStartError
        from blip_triton_bench.servers.docker_engine import engine_client

        try:
            client = engine_client()
        except ServerStartError:
            client = None  # the provider says so itself when it starts
    try:
        return remove_leftovers(SYSTEM_SHM_DIR, cache_dir, client, socket.gethostname())
    finally:
        if client is not None:
            client.close()


def remove_leftovers(shm_dir: Path, cache_dir: Path, docker_client: Any | None, host: str) -> list[str]:
    """Containers first: one sharing the host's IPC namespace holds /dev/shm regions until it is gone."""
    lines = remove_stale_containers(docker_client, host) if docker_client is not None else []
    lines += remove_stale_stubs() + remove_stale_shm(shm_dir) + remove_stale_temp_dirs(cache_dir, host_tag(host))
    return lines  # the session prints them in its header
