"""A trivial model with BLIP's exact inputs and outputs, to measure the load generator's own ceiling.

It does next to no arithmetic but moves BLIP-sized tensors both ways, so its throughput on the same server
and client is the most any BLIP measurement could show; a BLIP level near it measured the client.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from blip_triton_bench.model.onnx_files import save_model
from blip_triton_bench.repository.variants import CONFIG_FILENAME, STAGED_VERSION

CEILING_MODEL_NAME = "blip_bench_client_ceiling"
#: A level whose throughput reaches this fraction of the ceiling is flagged: the client may be what was measured.
NEAR_CEILING_FRACTION = 0.5


def trivial_blip_graph(image_size: int, vocab_size: int) -> onnx.ModelProto:
    """logits[b, s, v] = ids[b, s] + mask[b, s] + mean(pixels[b]): cheap, but every input is read."""
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values"], ["pixel_mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Squeeze", ["pixel_mean", "axis3"], ["pixel_term"]),  # [B, 1, 1]
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["ids_f", "mask_f"], ["token_sum"]),
        helper.make_node("Unsqueeze", ["token_sum", "axis2"], ["token_term"]),  # [B, S, 1]
        helper.make_node("Add", ["token_term", "pixel_term"], ["per_position"]),
        helper.make_node("Expand", ["per_position", "vocab_shape"], ["logits"]),  # [B, S, V]
    ]
    initializers = [
        helper.make_tensor("axis3", TensorProto.INT64, [1], [3]),
        helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("vocab_shape", TensorProto.INT64, [3], [1, 1, vocab_size]),
    ]
    graph = helper.make_graph(
        nodes,
        "client_ceiling",
        [
            helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["B", 3, image_size, image_size]),
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", vocab_size])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ceiling_instances(cpu_count: int | None) -> int:
    """Instances of the ceiling model: enough that the server side is not what the ceiling measures. One Python
    backend instance answers requests one after another (~1.75 ms each with BLIP-sized tensors: an H200 host's
    "client ceiling" was 549-572/s with one instance while its 16 cores idled); half the cores, at most 4, keep
    the client the bottleneck without starving it of cores on a small host."""
    return max(1, min(4, (cpu_count or 2) // 2))


def ceiling_config(image_size: int, vocab_size: int, max_batch_size: int = 8, instances: int = 1) -> str:
    return f"""name: "{CEILING_MODEL_NAME}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{ name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, {image_size}, {image_size} ] }},
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, {vocab_size} ] }} ]
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
"""


def stage_ceiling_model(repository: Path, image_size: int, vocab_size: int) -> str:
    """Write the ceiling model into a staged repository; returns its model name."""
    folder = repository / CEILING_MODEL_NAME
    (folder / STAGED_VERSION).mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILENAME).write_text(
        ceiling_config(image_size, vocab_size, instances=ceiling_instances(os.cpu_count()))
    )
    save_model(trivial_blip_graph(image_size, vocab_size), folder / STAGED_VERSION / "model.onnx")
    return CEILING_MODEL_NAME
