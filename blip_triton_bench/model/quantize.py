"""Dynamic INT8 quantization of the FP32 ONNX export with ONNX Runtime, cached like the export it starts from.

The artifact is a sibling of the export (`<export>-int8-<recipe>`), keyed on the export's own cache key, the ONNX
Runtime version and the recipe, so a second call (or a second session) reuses it.

Which operators, and why (measured with this module on the seeded `base` and `tiny` exports, ONNX Runtime 1.32, a
2-core AMD EPYC host; 8 real images x 16 teacher-forced tokens against the FP32 export):

* MatMul and Gemm only. The weight-bearing GEMMs (attention projections, MLPs, the 768 x 30524 LM head) hold
  ~all of BLIP's weights and FLOPs; the patch-embedding Conv, LayerNorm, Softmax and GELU stay FP32.
* Only MatMuls whose second input is a constant weight (ORT's `MatMulConstBOnly`, its dynamic-mode default).
  Attention's activation x activation MatMuls (Q @ K^T, softmax @ V) quantized too gained nothing on `base` at
  batch 1, sequence 16 (711 vs 688 ms median, within this host's noise) and would round softmax probabilities to
  1/255 steps at run time; agreement with FP32 was the same (top-1 92.2%, cosine mean 0.9990 either way), though
  the seeded models' vision towers are inert (initializer_range 1e-10), so that says little about image attention.
* Dynamic: activation scales and zero points are computed per batch at run time (DynamicQuantizeLinear), so no
  calibration set is needed and no input distribution is baked into the artifact.
* Weights QInt8, symmetric, per output channel, 7-bit range (`reduce_range`). Without VNNI (this AMD EPYC host has
  AVX2 only) ORT's U8S8 kernel sums pairs of u8 x s8 products in int16 (vpmaddubsw), which saturates with full-range
  weights; per-channel scales put a +-127 weight in every column, so saturation is most likely there. Measured on
  `tiny`: per-channel 8-bit, min logit cosine 0.973; per-channel 7-bit, 0.9997. On `base` 7-bit costs little
  (cosine mean 0.99888 vs 0.99907), and with 7 bits per-channel beats per-tensor on both models (base min cosine
  0.9984 vs 0.9973). The artifact is built once and may be served on a host with or without VNNI, so it takes
  the setting that is safe on both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import onnxruntime
from onnxruntime.quantization import QuantType, quantize_dynamic

from blip_triton_bench.host.files import link_or_copy
from blip_triton_bench.model.export import MODEL_FILENAME, ArtifactIdentity, ExportedModel, cached_artifact
from blip_triton_bench.model.onnx_files import EXTERNAL_DATA_THRESHOLD_BYTES, make_file_loadable

logger = logging.getLogger(__name__)


class QuantizationError(RuntimeError):
    """The quantizer failed, or produced a graph without the quantized operators it should contain."""


@dataclass(frozen=True)
class QuantizationRecipe:
    """Everything that shapes the quantized graph besides the source model and ONNX Runtime's version."""

    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    per_channel: bool = True
    reduce_range: bool = True  # 7-bit weights: no int16 saturation in ORT's AVX2 (non-VNNI) U8S8 kernel
    matmul_const_b_only: bool = True  # leave attention's activation x activation MatMuls in FP32
    version: int = 1  # bump when this module changes the graph it produces

    @property
    def name(self) -> str:
        """Short and file-name safe; the full recipe is in the cache key."""
        parts = ["dyn", "pc" if self.per_channel else "pt"]
        if self.reduce_range:
            parts.append("rr")
        if not self.matmul_const_b_only:
            parts.append("attn")
        return "-".join([*parts, f"v{self.version}"])


DEFAULT_RECIPE = QuantizationRecipe()

#: Operators a dynamically quantized MatMul becomes; one of them in the graph shows quantization happened.
QUANTIZED_OP_TYPES = ("MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def quantized_cache_key(exported: ExportedModel, recipe: QuantizationRecipe) -> str:
    parts = {"export": exported.cache_key, "onnxruntime": onnxruntime.__version__, "recipe": asdict(recipe)}
    canonical = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def _quantize_into(source: ExportedModel, work_dir: Path, recipe: QuantizationRecipe, external_data: bool) -> None:
    # ORT reads a model path, runs shape inference into a file beside it and reads model.onnx.data from beside it:
    # quantize from a scratch folder, so the cached export is never written to. The graph file is hard linked (free
    # for an inline 1 GB model); external data is copied, because onnx refuses to read hard-linked external data.
    scratch = work_dir / ".source"
    scratch.mkdir()
    try:
        for path in source.artifact_files:
            if path.name == MODEL_FILENAME:
                link_or_copy(path, scratch / path.name)
            else:
                shutil.copyfile(path, scratch / path.name)
        quantize_dynamic(
            model_input=scratch / MODEL_FILENAME,
            model_output=work_dir / MODEL_FILENAME,
            op_types_to_quantize=list(recipe.op_types),
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            weight_type=QuantType.QInt8,
            use_external_data_format=external_data,  # ORT names the file model.onnx.data, as the export does
            extra_options={"MatMulConstBOnly": recipe.matmul_const_b_only},
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    make_file_loadable(work_dir / MODEL_FILENAME)
    check_quantized(work_dir / MODEL_FILENAME)


def check_quantized(onnx_path: Path) -> None:
    """Raise QuantizationError when the graph has no quantized operator (e.g. an op type list that matched none)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    if not any(node.op_type in QUANTIZED_OP_TYPES for node in graph.node):
        raise QuantizationError(
            f"{onnx_path} has none of {', '.join(QUANTIZED_OP_TYPES)}: ONNX Runtime quantized no operator"
        )


def quantize_model(
    exported: ExportedModel,
    cache_dir: Path,
    recipe: QuantizationRecipe = DEFAULT_RECIPE,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> ExportedModel:
    """The INT8 artifact for `exported`, quantizing it first when the cache has none.

    The source may keep its weights in model.onnx.data; the INT8 graph does too only when it could approach
    protobuf's 2 GiB limit (estimated as half the FP32 size: weights shrink 4x, embeddings stay FP32).
    """
    key = quantized_cache_key(exported, recipe)
    external_data = exported.size_bytes / 2 > external_data_threshold_bytes

    def produce(work_dir: Path) -> None:
        logger.info("quantizing %s to INT8 (%s)", exported.directory, recipe.name)
        _quantize_into(exported, work_dir, recipe, external_data)

    return cached_artifact(
        cache_dir / "exports" / f"{exported.directory.name}-int8-{recipe.name}",
        ArtifactIdentity(key, exported.model_source, exported.parameter_count, exported.opset),
        produce,
    )
