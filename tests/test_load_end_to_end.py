"""Load generation against a real server: closed loop vs open loop on a model with a known service time.

An open-loop client that offers more than the server can do must see the queue in its latencies (they
count from each request's scheduled send time), and report an achieved rate below the offered one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from blip_triton_bench.load import CONCURRENCY, REQUEST_RATE, LoadLevel, LoadSettings, measure_level
from blip_triton_bench.servers.local import LocalProvider, LocalServer
from blip_triton_bench.workload import ModelInputs

FEATURES = 192  # 3 x 8 x 8 pixels
LAYERS = 150
VOCAB = 8
SETTINGS = LoadSettings(window_s=1.0, warmup_s=0.5, max_windows=4, min_requests_per_window=1)

CONFIG = f"""
name: "busy"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {{ name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, 8, 8 ] }},
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, {VOCAB} ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
"""


def busy_model() -> onnx.ModelProto:
    """BLIP's input and output names around a chain of matrix products: a few milliseconds of real work."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(
        (rng.standard_normal((FEATURES, FEATURES)) / FEATURES**0.5).astype(np.float32), "W"
    )
    head = numpy_helper.from_array(rng.standard_normal((FEATURES, VOCAB)).astype(np.float32), "H")
    flat = helper.make_tensor("flat", TensorProto.INT64, [2], [-1, FEATURES])
    nodes = [helper.make_node("Reshape", ["pixel_values", "flat"], ["h0"])]
    for layer in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [f"h{layer}", "W"], [f"m{layer}"]))
        nodes.append(helper.make_node("Tanh", [f"m{layer}"], [f"h{layer + 1}"]))
    nodes += [
        helper.make_node("MatMul", [f"h{LAYERS}", "H"], ["scores"]),  # [B, V]
        helper.make_node("Unsqueeze", ["scores", "one"], ["scores3"]),  # [B, 1, V]
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Concat", ["ids_shape", "vocab"], ["target"], axis=0),
        helper.make_node("Expand", ["scores3", "target"], ["logits"]),  # [B, S, V]
    ]
    graph = helper.make_graph(
        nodes,
        "busy",
        [
            helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["B", 3, 8, 8]),
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", VOCAB])],
        initializer=[
            weight,
            head,
            flat,
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
            helper.make_tensor("vocab", TensorProto.INT64, [1], [VOCAB]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    repository = tmp_path_factory.mktemp("repository")
    (repository / "busy" / "1").mkdir(parents=True)
    (repository / "busy" / "config.pbtxt").write_text(CONFIG)
    onnx.save_model(busy_model(), str(repository / "busy" / "1" / "model.onnx"))
    with LocalProvider(Path(tmp_path_factory.mktemp("server"))).start(repository) as running:
        running.load_model("busy")
        yield running


def inputs() -> ModelInputs:
    ids = np.ones((1, 4), dtype=np.int64)
    return ModelInputs(np.ones((1, 3, 8, 8), dtype=np.float32), ids, ids.copy())


def test_open_loop_counts_the_queue_that_a_closed_loop_never_sees(server: LocalServer) -> None:
    url = server.endpoints.grpc_url
    closed = measure_level(url, "busy", inputs(), LoadLevel(CONCURRENCY, 1), SETTINGS)
    capacity = closed.summary.throughput_infer_per_s
    assert capacity > 5, "the model should serve several requests per second"
    assert closed.server is not None and closed.server.inference_count > 0  # the server's own statistics

    under = measure_level(url, "busy", inputs(), LoadLevel(REQUEST_RATE, round(capacity * 0.3, 1)), SETTINGS)
    assert under.achieved_rate_per_s == pytest.approx(under.offered_rate_per_s, rel=0.3)
    assert under.summary.latency_p50_ms < 3 * closed.summary.latency_p50_ms

    # far above capacity: a closed loop at concurrency 1 idles between requests, so it underestimates what the
    # server can take (3x was once absorbed at 85 %)
    over = measure_level(url, "busy", inputs(), LoadLevel(REQUEST_RATE, round(capacity * 8, 1)), SETTINGS)
    assert over.achieved_rate_per_s < 0.7 * over.offered_rate_per_s  # the server cannot keep up...
    assert over.summary.latency_p50_ms > 3 * closed.summary.latency_p50_ms  # ...and the latencies show the queue
    assert over.unfinished_requests > 0  # requests were still queued when measurement stopped

    settled = measure_level(url, "busy", inputs(), LoadLevel(REQUEST_RATE, round(capacity * 0.3, 1)), SETTINGS)
    assert settled.achieved_rate_per_s == pytest.approx(settled.offered_rate_per_s, rel=0.3)  # the backlog drained


def test_poisson_arrivals_average_the_offered_rate(server: LocalServer) -> None:
    settings = LoadSettings(window_s=1.0, warmup_s=0.5, max_windows=4, min_requests_per_window=1, arrival="poisson")
    level = measure_level(server.endpoints.grpc_url, "busy", inputs(), LoadLevel(REQUEST_RATE, 5), settings)
    assert level.achieved_rate_per_s == pytest.approx(5, rel=0.5)


def test_http_requests_succeed_as_grpc_ones_do(server: LocalServer) -> None:
    settings = LoadSettings(window_s=0.5, warmup_s=0.2, max_windows=3, min_requests_per_window=1, protocol="http")
    level = measure_level(server.endpoints.http_url, "busy", inputs(), LoadLevel(CONCURRENCY, 2), settings)
    assert sum(len(window.latencies_ms) for window in level.windows) > 0
    assert level.summary.errors == 0  # a float `timeout` once made the server reject every HTTP request
