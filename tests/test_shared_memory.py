"""--shared-memory: the region bookkeeping, the usage errors, and a real level through system shared memory.

The end-to-end tests serve the client-ceiling model (BLIP's exact inputs and 1x16x30524 logits, next to no
arithmetic) on the local Triton, over gRPC and HTTP, and check that nothing is left registered or in /dev/shm.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http

from blip_triton_bench.load.ceiling import stage_ceiling_model
from blip_triton_bench.load.engine import (
    CONCURRENCY,
    REQUEST_RATE,
    LoadLevel,
    LoadSettings,
    measure_level,
    open_inferer,
)
from blip_triton_bench.load.shared_memory import (
    SharedMemoryError,
    check_options,
    check_reachable,
    is_loopback,
    level_tag,
    plan_regions,
    resolve_output_shape,
    shared_memory_kind,
)
from blip_triton_bench.model.workload import ModelInputs
from blip_triton_bench.servers.leftovers import SHM_PREFIX, SYSTEM_SHM_DIR
from blip_triton_bench.servers.local import LocalProvider, LocalServer

IMAGE_SIZE, VOCAB, SEQUENCE = 384, 30524, 16
SYSTEM = LoadSettings(window_s=0.5, warmup_s=0.2, max_windows=3, min_requests_per_window=1, shared_memory="system")


def blip_inputs() -> ModelInputs:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(1, SEQUENCE), dtype=np.int64)
    pixels = rng.standard_normal((1, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    return ModelInputs(pixels, ids, np.ones_like(ids))


# ------------------------------------------------------------------------------------ pure bookkeeping


@pytest.mark.unit
def test_plan_puts_the_inputs_back_to_back_and_sizes_outputs_from_the_model_shape() -> None:
    arrays = blip_inputs().as_dict()
    shape = resolve_output_shape([-1, -1, VOCAB], 1, SEQUENCE, "m")
    plan = plan_regions("blip-bench-1-abc", arrays, "logits", shape, np.dtype(np.float32))
    assert [(p.name, p.offset, p.byte_size, p.datatype) for p in plan.inputs] == [
        ("pixel_values", 0, 3 * 384 * 384 * 4, "FP32"),
        ("input_ids", 3 * 384 * 384 * 4, 16 * 8, "INT64"),
        ("attention_mask", 3 * 384 * 384 * 4 + 16 * 8, 16 * 8, "INT64"),
    ]
    assert plan.input_byte_size == 1_769_728  # the 1.77 MB a BLIP request carries
    assert plan.output_shape == (1, 16, VOCAB)
    assert plan.output_byte_size == 1 * 16 * VOCAB * 4
    assert plan.input_region == "blip-bench-1-abc-inputs"
    assert [plan.output_region(slot) for slot in (0, 1)] == ["blip-bench-1-abc-logits-0", "blip-bench-1-abc-logits-1"]


@pytest.mark.unit
def test_output_shape_needs_every_dynamic_dim_resolvable() -> None:
    assert resolve_output_shape([4, -1, 8], 2, 3, "m") == (4, 2, 8)
    with pytest.raises(SharedMemoryError, match=r"model m: output shape \[-1, -1, -1\]"):
        resolve_output_shape([-1, -1, -1], 1, 16, "m")


@pytest.mark.unit
def test_level_tags_are_unique_and_say_whose_they_are() -> None:
    tags = {level_tag() for _ in range(100)}
    assert len(tags) == 100
    assert level_tag(pid=42, token="abc") == f"{SHM_PREFIX}-42-abc"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("127.0.0.1:8001", True),
        ("localhost:8000", True),
        ("http://127.0.0.2:8000", True),
        ("[::1]:8001", True),
        ("10.0.0.5:8001", False),
        ("triton.internal:8000", False),
    ],
)
def test_loopback_urls(url: str, local: bool) -> None:
    assert is_loopback(url) is local


@pytest.mark.unit
def test_a_server_on_another_host_is_refused_before_anything_is_created() -> None:
    with pytest.raises(SharedMemoryError, match=r"--shared-memory system needs the server on this host.*10\.0\.0\.5"):
        check_options("system", "external", "10.0.0.5:8000", None)
    with pytest.raises(SharedMemoryError, match="needs the server on this host"):
        check_options("system", "auto", "127.0.0.1:8000", "10.0.0.5:8001")
    check_options("system", "external", "localhost:8000", None)
    check_options("system", "local", "10.0.0.5:8000", None)  # --server local ignores --triton-url
    check_options("none", "external", "10.0.0.5:8000", None)
    with pytest.raises(SharedMemoryError):
        asyncio.run(_one_output("10.0.0.5:8001", "grpc", "any", SYSTEM))


@pytest.mark.unit
def test_cuda_without_a_gpu_says_so() -> None:
    try:
        shared_memory_kind("cuda")
    except SharedMemoryError as error:
        assert str(error).startswith("--shared-memory cuda needs a GPU")
        with pytest.raises(SharedMemoryError, match="--shared-memory cuda needs a GPU"):
            check_options("cuda", "local", None, None)
    else:
        pytest.skip("this host can use CUDA shared memory")


# ------------------------------------------------------------------------------------ a real server


#: A model with BLIP's inputs and logits that takes SLOW_S per request: a request still in flight when its level
#: ends, so the level's regions are unregistered while the server holds one.
SLOW_MODEL, SLOW_S = "slow_logits", 1.0
SLOW_CONFIG = f"""
name: "{SLOW_MODEL}"
backend: "python"
max_batch_size: 8
input [
  {{ name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, {IMAGE_SIZE}, {IMAGE_SIZE} ] }},
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, {VOCAB} ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""
SLOW_PYTHON = f"""
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep({SLOW_S})
        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
            logits = np.ones((*ids.shape, {VOCAB}), dtype=np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits)]))
        return responses
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, str]]:
    repository = tmp_path_factory.mktemp("repository")
    name = stage_ceiling_model(repository, IMAGE_SIZE, VOCAB)
    (repository / SLOW_MODEL / "1").mkdir(parents=True)
    (repository / SLOW_MODEL / "config.pbtxt").write_text(SLOW_CONFIG)
    (repository / SLOW_MODEL / "1" / "model.py").write_text(SLOW_PYTHON)
    with LocalProvider(Path(tmp_path_factory.mktemp("server"))).start(repository) as running:
        running.load_model(name)
        yield running, name


def _url(server: LocalServer, protocol: str) -> str:
    return server.endpoints.grpc_url if protocol == "grpc" else server.endpoints.http_url


async def _one_output(url: str, protocol: str, model: str, settings: LoadSettings) -> tuple[np.ndarray, list[str]]:
    """One request's logits, and the regions of its level the server held while the level was open."""
    settings = replace(settings, protocol=protocol)
    async with open_inferer(url, model, blip_inputs(), settings, slots=2) as inferer:
        logits = await inferer.infer_output()
        kind = shared_memory_kind(settings.shared_memory)
        headers = settings.headers_for_restricted_apis()
        held = await kind.registered_names(inferer.client, headers) if kind is not None else []
        tag = inferer._regions.plan.tag if kind is not None else ""
    return logits, [name for name in held if name.startswith(f"{tag}-")]


def ours_left_behind(server: LocalServer) -> tuple[list[str], list[str]]:
    """Regions of this process still registered on the server, and still in /dev/shm."""
    mine = level_tag(token="")
    client = triton_http.InferenceServerClient(server.endpoints.http_url)
    try:
        status = client.get_system_shared_memory_status(headers=server.run_key.http_headers())
        registered = [region["name"] for region in status]
    finally:
        client.close()
    files = [path.name for path in SYSTEM_SHM_DIR.glob(f"{mine}*")]
    return [name for name in registered if name.startswith(mine)], files


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_system_shared_memory_returns_the_same_logits_and_leaves_nothing(
    server: tuple[LocalServer, str], protocol: str
) -> None:
    running, model = server
    url = _url(running, protocol)
    inline, held_inline = asyncio.run(_one_output(url, protocol, model, LoadSettings().keyed_for(running)))
    shared, held = asyncio.run(_one_output(url, protocol, model, SYSTEM.keyed_for(running)))
    assert held_inline == []
    assert len([name for name in held if name.startswith(SHM_PREFIX)]) == 3  # inputs + 2 output slots
    assert inline.shape == (1, SEQUENCE, VOCAB) and np.abs(inline).max() > 0  # a fresh region reads as zeros
    np.testing.assert_array_equal(shared, inline)

    settings = replace(SYSTEM.keyed_for(running), protocol=protocol)
    level = measure_level(url, model, blip_inputs(), LoadLevel(CONCURRENCY, 2), settings)
    completed = sum(len(window.latencies_ms) for window in level.windows)
    assert completed > 0 and level.summary.errors == 0
    assert level.server is not None and level.server.success_count > 0
    assert ours_left_behind(running) == ([], [])


@pytest.mark.server
def test_open_loop_adds_output_slots_and_releases_them(server: tuple[LocalServer, str]) -> None:
    running, model = server
    level = measure_level(
        running.endpoints.grpc_url, model, blip_inputs(), LoadLevel(REQUEST_RATE, 4), SYSTEM.keyed_for(running)
    )
    assert sum(len(window.latencies_ms) for window in level.windows) > 0 and level.summary.errors == 0
    assert ours_left_behind(running) == ([], [])


@pytest.mark.server
def test_a_level_that_fails_still_releases_its_regions(server: tuple[LocalServer, str]) -> None:
    running, model = server

    async def fail_mid_level() -> None:
        async with open_inferer(
            running.endpoints.grpc_url, model, blip_inputs(), SYSTEM.keyed_for(running), slots=3
        ) as inferer:
            await inferer.infer()
            raise RuntimeError("the level broke")

    with pytest.raises(RuntimeError, match="the level broke"):
        asyncio.run(fail_mid_level())
    assert ours_left_behind(running) == ([], [])


@pytest.mark.unit
def test_reachability_is_checked_on_the_url_the_load_uses() -> None:
    check_reachable("system", "127.0.0.1:8001")
    with pytest.raises(SharedMemoryError):
        check_reachable("cuda", "gpu-box:8001")


@pytest.mark.unit
def test_a_container_shares_host_ipc_only_under_shared_memory() -> None:
    from blip_triton_bench.servers.container import ipc_options

    assert ipc_options("none", "1g") == {"shm_size": "1g"}  # unchanged: a private 1 GB /dev/shm
    assert ipc_options("system", "1g") == {"ipc_mode": "host"}
    assert ipc_options("cuda", "1g") == {"ipc_mode": "host"}


@pytest.mark.server
def test_a_level_left_with_a_request_in_flight_leaves_no_region(server: tuple[LocalServer, str]) -> None:
    """A level that ends with a request in flight (an open loop stopped mid-stream, a level aborted) releases its
    regions while the server still executes that request: nothing stays registered or in /dev/shm."""
    running, _ = server
    running.load_model(SLOW_MODEL)

    async def leave_with_a_request_in_flight() -> None:
        async with open_inferer(
            running.endpoints.grpc_url, SLOW_MODEL, blip_inputs(), SYSTEM.keyed_for(running), slots=1
        ) as inferer:
            request = asyncio.create_task(inferer.infer())
            await asyncio.sleep(SLOW_S / 3)  # the server is executing it, its output region held
            request.cancel()  # the client stops waiting; the server does not
            await asyncio.gather(request, return_exceptions=True)

    asyncio.run(leave_with_a_request_in_flight())
    assert ours_left_behind(running) == ([], [])


@pytest.mark.server
def test_requests_that_find_no_free_output_slot_at_once_each_get_one_of_their_own(
    server: tuple[LocalServer, str],
) -> None:
    """An open loop adds output slots as its in-flight count grows; requests that ask at the same moment must not
    be handed the same new slot (one region registered twice, two responses written into one region)."""
    running, model = server

    async def three_at_once() -> tuple[list[np.ndarray], list[str], list[str]]:
        async with open_inferer(
            running.endpoints.grpc_url, model, blip_inputs(), SYSTEM.keyed_for(running), slots=0
        ) as inferer:
            outputs = await asyncio.gather(*(inferer.infer_output() for _ in range(3)))
            plan = inferer._regions.plan
            expected = [plan.input_region, *(plan.output_region(slot) for slot in range(3))]
            return list(outputs), sorted(inferer._regions.names()), sorted(expected)

    outputs, names, expected = asyncio.run(three_at_once())
    assert names == expected
    for output in outputs[1:]:
        np.testing.assert_array_equal(output, outputs[0])
    assert ours_left_behind(running) == ([], [])


@pytest.mark.server
def test_a_level_without_the_runs_key_is_refused_naming_the_restriction(server: tuple[LocalServer, str]) -> None:
    running, model = server
    with pytest.raises(SharedMemoryError, match=r"the server restricts its shared-memory API .*--shared-memory none"):
        measure_level(running.endpoints.grpc_url, model, blip_inputs(), LoadLevel(CONCURRENCY, 1), SYSTEM)
    assert ours_left_behind(running) == ([], [])
