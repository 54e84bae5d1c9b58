"""The FP32 ONNX export converted to FP16 for GPUs with ONNX Runtime's own converter, cached like the export.

The artifact is a sibling of the export (`<export>-fp16-<recipe>`), keyed on the export's cache key, the ONNX Runtime
version (the converter ships with it) and the recipe, so a second call (or a second session) reuses it.

What stays FP32, and why:

* The graph's inputs and outputs (`keep_io_types`): the variant's config.pbtxt keeps TYPE_FP32 `pixel_values` and
  `logits`, so clients, shared memory and every correctness check send and read what they send the FP32 variants;
  the converter puts one Cast at each end, inside the graph, where the GPU does it.
* The converter's own block list (`DEFAULT_OP_BLOCK_LIST`: operators without FP16 kernels in ONNX Runtime, e.g.
  Range, CumSum, TopK), which BLIP's graph reaches through its position ids.
* Nothing else by default. The operators where FP16 loses accuracy in a transformer are the ones that accumulate:
  LayerNormalization and Softmax reduce over a row, and ONNX Runtime's CUDA kernels for both accumulate in FP32
  even with FP16 tensors; GEMMs accumulate in FP32 in cuBLAS (ONNX Runtime asks for FP32 compute unless told
  otherwise). Blocking them would only add Casts around every layer. The attention mask's `finfo(float32).min`
  constant is clamped to FP16's -65504 by the converter, which still zeroes a masked position after Softmax.
  Measured on `base` on a CPU (docs/fp16_agreement.py): blocking LayerNormalization and Softmax as well kept top-1
  agreement with FP32 at 100 % and moved 1 - cosine from 9.5e-7 to 4.2e-7, both a hundred times inside the
  `fp16_vs_fp32` threshold.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import onnxruntime
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from blip_triton_bench.model.export import MODEL_FILENAME, ArtifactIdentity, ExportedModel, cached_artifact
from blip_triton_bench.model.onnx_files import EXTERNAL_DATA_THRESHOLD_BYTES, save_model

logger = logging.getLogger(__name__)


class HalfPrecisionError(RuntimeError):
    """The converter failed, or produced a graph that is not FP16 inside and FP32 at its edges."""


@dataclass(frozen=True)
class HalfPrecisionRecipe:
    """Everything that shapes the FP16 graph besides the source model and ONNX Runtime's version."""

    keep_io_types: bool = True  # FP32 inputs and outputs: the config.pbtxt and every client stay as for FP32
    fp32_op_types: tuple[str, ...] = ()  # kept in FP32 beyond the converter's own DEFAULT_OP_BLOCK_LIST
    version: int = 1  # bump when this module changes the graph it produces

    @property
    def name(self) -> str:
        """Short and file-name safe; the full recipe is in the cache key."""
        parts = ["io32" if self.keep_io_types else "io16"]
        if self.fp32_op_types:
            digest = hashlib.sha256(",".join(sorted(self.fp32_op_types)).encode()).hexdigest()[:6]
            parts.append(f"keep{len(self.fp32_op_types)}-{digest}")
        return "-".join([*parts, f"v{self.version}"])

    @property
    def op_block_list(self) -> list[str]:
        return sorted({*DEFAULT_OP_BLOCK_LIST, *self.fp32_op_types})


DEFAULT_RECIPE = HalfPrecisionRecipe()


def half_precision_cache_key(exported: ExportedModel, recipe: HalfPrecisionRecipe) -> str:
    parts = {"export": exported.cache_key, "onnxruntime": onnxruntime.__version__, "recipe": asdict(recipe)}
    canonical = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def _float_tensor_types(values: list[onnx.ValueInfoProto]) -> dict[str, int]:
    return {value.name: value.type.tensor_type.elem_type for value in values if value.type.HasField("tensor_type")}


def check_half_precision(onnx_path: Path, recipe: HalfPrecisionRecipe = DEFAULT_RECIPE) -> None:
    """Raise HalfPrecisionError unless most of the weights are FP16 and the graph's edges are what the recipe keeps."""
    model = onnx.load(str(onnx_path))
    sizes: dict[int, int] = {}
    for initializer in model.graph.initializer:
        count = 1
        for dim in initializer.dims:
            count *= dim
        sizes[initializer.data_type] = sizes.get(initializer.data_type, 0) + count
    half, single = sizes.get(onnx.TensorProto.FLOAT16, 0), sizes.get(onnx.TensorProto.FLOAT, 0)
    if half == 0 or single > half:
        raise HalfPrecisionError(
            f"{onnx_path}: {half} FP16 and {single} FP32 weight values; the converter left most weights in FP32"
        )
    edge_type = onnx.TensorProto.FLOAT if recipe.keep_io_types else onnx.TensorProto.FLOAT16
    edges = {**_float_tensor_types(list(model.graph.input)), **_float_tensor_types(list(model.graph.output))}
    wrong = {
        name: onnx.TensorProto.DataType.Name(kind)
        for name, kind in edges.items()
        if kind in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and kind != edge_type
    }
    if wrong:
        raise HalfPrecisionError(
            f"{onnx_path}: inputs/outputs {wrong} should be {onnx.TensorProto.DataType.Name(edge_type)} "
            f"(keep_io_types={recipe.keep_io_types})"
        )


def _convert_into(source: ExportedModel, work_dir: Path, recipe: HalfPrecisionRecipe, external_data: bool) -> None:
    # Converted from memory: given a path, the converter writes a temp file beside the cached export.
    model = onnx.load(str(source.onnx_path))
    converted = convert_float_to_float16(
        model,
        keep_io_types=recipe.keep_io_types,
        op_block_list=recipe.op_block_list,
        # The converter reads tensor types from shape inference, which cannot hold a model over protobuf's 2 GiB in
        # memory; such a model is converted from the types the export declared.
        disable_shape_infer=source.size_bytes > EXTERNAL_DATA_THRESHOLD_BYTES,
    )
    save_model(converted, work_dir / MODEL_FILENAME, external_data=external_data)
    check_half_precision(work_dir / MODEL_FILENAME, recipe)


def convert_model_to_fp16(
    exported: ExportedModel,
    cache_dir: Path,
    recipe: HalfPrecisionRecipe = DEFAULT_RECIPE,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> ExportedModel:
    """The FP16 artifact for `exported`, converting it first when the cache has none.

    The FP16 graph keeps its weights in model.onnx.data only when it could approach protobuf's 2 GiB limit (half
    the FP32 size).
    """
    key = half_precision_cache_key(exported, recipe)
    external_data = exported.size_bytes / 2 > external_data_threshold_bytes

    def produce(work_dir: Path) -> None:
        logger.info("converting %s to FP16 (%s)", exported.directory, recipe.name)
        _convert_into(exported, work_dir, recipe, external_data)

    return cached_artifact(
        cache_dir / "exports" / f"{exported.directory.name}-fp16-{recipe.name}",
        ArtifactIdentity(key, exported.model_source, exported.parameter_count, exported.opset),
        produce,
    )
