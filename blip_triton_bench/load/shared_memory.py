"""Shared-memory inputs and outputs for the load generator, as perf_analyzer's `--shared-memory none|system|cuda`.

A level writes its inputs once into one registered region and gives each in-flight request slot its own output
region; every region is unregistered and destroyed when the level ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from blip_triton_bench.servers.leftovers import SHM_PREFIX

#: What a restricted API wants beside the request (servers.base.RunKey.headers_for); None for an open server.
Headers = Mapping[str, str] | None

logger = logging.getLogger(__name__)

NONE, SYSTEM, CUDA = "none", "system", "cuda"
SHARED_MEMORY_MODES = (NONE, SYSTEM, CUDA)
LOCAL_HOST_NAMES = ("localhost",)


class SharedMemoryError(RuntimeError):
    """Shared memory cannot be used as asked: says which mode, what is missing and what to do."""


# ------------------------------------------------------------------------------------ pure bookkeeping


@dataclass(frozen=True)
class TensorPlacement:
    """Where one input tensor lies in the level's input region."""

    name: str
    shape: tuple[int, ...]
    datatype: str  # Triton's name, e.g. "FP32"
    offset: int
    byte_size: int


@dataclass(frozen=True)
class RegionPlan:
    """The regions of one level: one input region holding every input back to back, one output region per slot.

    Names are unique per level (`tag`), so a region a crashed run left registered never collides with this one.
    """

    tag: str
    inputs: tuple[TensorPlacement, ...]
    output_name: str
    output_shape: tuple[int, ...]
    output_datatype: str
    output_byte_size: int

    @property
    def input_region(self) -> str:
        return f"{self.tag}-inputs"

    @property
    def input_byte_size(self) -> int:
        return sum(placement.byte_size for placement in self.inputs)

    def output_region(self, slot: int) -> str:
        return f"{self.tag}-{self.output_name}-{slot}"


def level_tag(pid: int | None = None, token: str | None = None) -> str:
    """`blip-bench-<pid>-<random>`: unique per level and per process, and a valid shm_open key once `/`-prefixed."""
    return f"{SHM_PREFIX}-{os.getpid() if pid is None else pid}-{token or uuid.uuid4().hex[:12]}"


def resolve_output_shape(
    model_shape: Sequence[int], batch_size: int, sequence_length: int, model: str
) -> tuple[int, ...]:
    """The model's output shape (metadata, -1 for dynamic dims) for one request: the first dynamic dim is the
    batch, the second the sequence, as in logits [B, S, V]."""
    fill = [batch_size, sequence_length]
    resolved = []
    for dim in model_shape:
        if dim >= 0:
            resolved.append(int(dim))
        elif fill:
            resolved.append(fill.pop(0))
        else:
            raise SharedMemoryError(
                f"model {model}: output shape {list(model_shape)} has more dynamic dims than batch and sequence; "
                "cannot size its shared-memory output region (use --shared-memory none)"
            )
    return tuple(resolved)


def plan_regions(
    tag: str,
    inputs: Mapping[str, np.ndarray],
    output_name: str,
    output_shape: Sequence[int],
    output_dtype: np.dtype,
) -> RegionPlan:
    placements, offset = [], 0
    for name, array in inputs.items():
        placements.append(
            TensorPlacement(name, tuple(array.shape), np_to_triton_dtype(array.dtype), offset, array.nbytes)
        )
        offset += array.nbytes
    dtype = np.dtype(output_dtype)
    return RegionPlan(
        tag=tag,
        inputs=tuple(placements),
        output_name=output_name,
        output_shape=tuple(output_shape),
        output_datatype=np_to_triton_dtype(dtype),
        output_byte_size=math.prod(output_shape) * dtype.itemsize,
    )


def is_loopback(url: str) -> bool:
    """True when a tritonclient `host:port` URL names this host (127.0.0.0/8, ::1 or localhost)."""
    host = url.removeprefix("http://").removeprefix("https://").removeprefix("grpc://")
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    host = host.strip("[]")
    if host.lower() in LOCAL_HOST_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(mode: str, url: str) -> None:
    """Shared memory is memory of this host: the server must run on it."""
    if mode != NONE and not is_loopback(url):
        raise SharedMemoryError(
            f"--shared-memory {mode} needs the server on this host, but it is at {url}; point --triton-url at "
            "127.0.0.1 (or localhost) on the server's host, or use --shared-memory none"
        )


def check_options(mode: str, server: str, triton_url: str | None, triton_grpc_url: str | None) -> None:
    """Usage errors of --shared-memory that need no server: an external server elsewhere, cuda without a GPU."""
    if mode == NONE:
        return
    if server in ("external", "auto") and triton_url:
        for url in (triton_url, triton_grpc_url or triton_url):
            check_reachable(mode, url)
    if mode == CUDA:
        problem = cuda_unavailable()
        if problem:
            raise SharedMemoryError(f"--shared-memory cuda needs a GPU and cuda-python: {problem}")


def cuda_unavailable() -> str | None:
    """Why CUDA shared memory cannot work on this host, or None when it can."""
    try:
        import cuda.bindings.runtime as cudart
        from tritonclient.utils import cuda_shared_memory  # noqa: F401  (raises RuntimeError without cuda-python)
    except (ImportError, RuntimeError):
        return (
            "the cuda-python package is not installed (pip install 'tritonclient[cuda]'); or use --shared-memory system"
        )
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or count < 1:
        return "this host has no CUDA device the runtime can use; use --shared-memory system"
    return None


# ------------------------------------------------------------------------------------ the two kinds


class SharedMemoryKind(Protocol):
    """How one kind of region is made, filled, read, registered and released (system or CUDA)."""

    mode: str

    def create(self, name: str, byte_size: int) -> Any: ...

    def write(self, handle: Any, arrays: Sequence[np.ndarray]) -> None: ...

    def read(self, handle: Any, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray: ...

    def destroy(self, handle: Any) -> None: ...

    async def register(self, client: Any, name: str, handle: Any, byte_size: int, headers: Headers = None) -> None: ...

    async def unregister(self, client: Any, name: str, headers: Headers = None) -> None: ...

    async def registered_names(self, client: Any, headers: Headers = None) -> list[str]: ...


def _status_names(status: Any) -> list[str]:
    """Region names from a status answer: gRPC's as_json {"regions": {name: ...}} or HTTP's [{"name": ...}]."""
    if isinstance(status, dict):
        return list(status.get("regions", {}))
    return [region["name"] for region in status]


def _is_grpc(client: Any) -> bool:
    return type(client).__module__.startswith("tritonclient.grpc")


class SystemSharedMemory:
    """POSIX shared memory (/dev/shm) through tritonclient.utils.shared_memory."""

    mode = SYSTEM

    def __init__(self) -> None:
        import tritonclient.utils.shared_memory as shm

        self._shm = shm

    @staticmethod
    def key(name: str) -> str:
        return f"/{name}"

    def create(self, name: str, byte_size: int) -> Any:
        return self._shm.create_shared_memory_region(name, self.key(name), byte_size, create_only=True)

    def write(self, handle: Any, arrays: Sequence[np.ndarray]) -> None:
        self._shm.set_shared_memory_region(handle, list(arrays))

    def read(self, handle: Any, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
        # a copy: a view would keep the mapping exported and make destroy() fail
        return np.array(self._shm.get_contents_as_numpy(handle, dtype, list(shape)), copy=True)

    def destroy(self, handle: Any) -> None:
        self._shm.destroy_shared_memory_region(handle)

    async def register(self, client: Any, name: str, handle: Any, byte_size: int, headers: Headers = None) -> None:
        await client.register_system_shared_memory(name, self.key(name), byte_size, headers=headers)

    async def unregister(self, client: Any, name: str, headers: Headers = None) -> None:
        await client.unregister_system_shared_memory(name, headers=headers)

    async def registered_names(self, client: Any, headers: Headers = None) -> list[str]:
        if _is_grpc(client):
            return _status_names(await client.get_system_shared_memory_status(headers=headers, as_json=True))
        return _status_names(await client.get_system_shared_memory_status(headers=headers))


class CudaSharedMemory:
    """GPU memory shared through CUDA IPC handles (tritonclient.utils.cuda_shared_memory, needs cuda-python)."""

    mode = CUDA

    def __init__(self, device_id: int = 0) -> None:
        problem = cuda_unavailable()
        if problem:
            raise SharedMemoryError(f"--shared-memory cuda needs a GPU and cuda-python: {problem}")
        import tritonclient.utils.cuda_shared_memory as cudashm

        self._shm = cudashm
        self.device_id = device_id

    def create(self, name: str, byte_size: int) -> Any:
        return self._shm.create_shared_memory_region(name, byte_size, self.device_id)

    def write(self, handle: Any, arrays: Sequence[np.ndarray]) -> None:
        self._shm.set_shared_memory_region(handle, list(arrays))

    def read(self, handle: Any, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
        return self._shm.get_contents_as_numpy(handle, dtype, list(shape))  # already a host copy

    def destroy(self, handle: Any) -> None:
        self._shm.destroy_shared_memory_region(handle)

    async def register(self, client: Any, name: str, handle: Any, byte_size: int, headers: Headers = None) -> None:
        raw = self._shm.get_raw_handle(handle)
        await client.register_cuda_shared_memory(name, raw, self.device_id, byte_size, headers=headers)

    async def unregister(self, client: Any, name: str, headers: Headers = None) -> None:
        await client.unregister_cuda_shared_memory(name, headers=headers)

    async def registered_names(self, client: Any, headers: Headers = None) -> list[str]:
        if _is_grpc(client):
            return _status_names(await client.get_cuda_shared_memory_status(headers=headers, as_json=True))
        return _status_names(await client.get_cuda_shared_memory_status(headers=headers))


def shared_memory_kind(mode: str) -> SharedMemoryKind | None:
    """The strategy for `mode`; None for "none" (tensors travel in the request and response)."""
    if mode == NONE:
        return None
    if mode == SYSTEM:
        return SystemSharedMemory()
    if mode == CUDA:
        return CudaSharedMemory()
    raise SharedMemoryError(f"--shared-memory {mode!r}: use one of {', '.join(SHARED_MEMORY_MODES)}")


# ------------------------------------------------------------------------------------ one level's regions


class LevelRegions:
    """The registered regions of one level. Output slots are handed out and returned; a missing slot is
    created (and registered) on demand, which only an open loop whose in-flight count keeps growing needs."""

    def __init__(
        self,
        kind: SharedMemoryKind,
        client: Any,
        plan: RegionPlan,
        stack: contextlib.AsyncExitStack,
        headers: Headers = None,
    ):
        self.kind = kind
        self.plan = plan
        self._client = client
        self._headers = headers
        self._stack = stack
        self._handles: dict[str, Any] = {}
        self._free: list[int] = []
        self.slot_count = 0

    async def _region(self, name: str, byte_size: int, fill: Callable[[Any], None] | None = None) -> Any:
        handle = self.kind.create(name, byte_size)
        self._stack.callback(self.kind.destroy, handle)  # LIFO: unregistered on the server first, then destroyed
        if fill is not None:
            fill(handle)
        await self.kind.register(self._client, name, handle, byte_size, self._headers)
        self._stack.push_async_callback(self._unregister, name)
        self._handles[name] = handle
        return handle

    async def _unregister(self, name: str) -> None:
        try:
            await self.kind.unregister(self._client, name, self._headers)
        except InferenceServerException as error:  # keep releasing the others; the region is destroyed anyway
            logger.warning("could not unregister shared-memory region %s: %s", name, error)

    async def add_slots(self, count: int) -> None:
        for _ in range(count):
            # the index is taken before the await: two requests that find no free slot at once get one each
            slot = self.slot_count
            self.slot_count += 1
            await self._region(self.plan.output_region(slot), self.plan.output_byte_size)
            self._free.append(slot)

    async def acquire(self) -> int:
        if not self._free:
            await self.add_slots(1)
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def read_output(self, slot: int) -> np.ndarray:
        plan = self.plan
        handle = self._handles[plan.output_region(slot)]
        return self.kind.read(handle, triton_to_np_dtype(plan.output_datatype), plan.output_shape)

    def names(self) -> list[str]:
        return list(self._handles)


def shared_memory_refusal(mode: str, tag: str, said: str) -> str:
    """Why the server would not take a level's regions, and the fix: a restricted API wants a key the run does not
    have; anything else means the server does not share this host's memory."""
    if "restricted" in said:
        return (
            f"--shared-memory {mode}: the server restricts its shared-memory API ({said}). The suite sends its "
            "run's key only to servers it started; against another server use --shared-memory none"
        )
    return (
        f"--shared-memory {mode}: the server could not use region {tag}: {said}. The server must share this "
        "host's memory: run it with --server local, or in a container started with --ipc=host"
    )


@contextlib.asynccontextmanager
async def level_regions(
    kind: SharedMemoryKind,
    client: Any,
    plan: RegionPlan,
    inputs: Mapping[str, np.ndarray],
    slots: int,
    headers: Headers = None,
) -> AsyncIterator[LevelRegions]:
    """Create, fill and register the input region and `slots` output regions; always release them all on exit.
    `headers` carry the run's key to a server whose shared-memory API is restricted (servers.base.RunKey)."""
    async with contextlib.AsyncExitStack() as stack:
        regions = LevelRegions(kind, client, plan, stack, headers)
        try:
            await regions._region(
                plan.input_region, plan.input_byte_size, lambda handle: kind.write(handle, list(inputs.values()))
            )
            await regions.add_slots(slots)
        except InferenceServerException as error:
            raise SharedMemoryError(shared_memory_refusal(kind.mode, plan.tag, error.message() or "")) from None
        yield regions
