"""How far the FP16 artifact (blip_triton_bench/model/half_precision.py) moves BLIP's logits from the FP32 export, on real
images, and how far broken FP16 artifacts move them: the basis of the `fp16_vs_fp32` threshold in
blip_triton_bench/judging/correctness.py. In process, ONNX Runtime on this host's CPU, which runs the FP16 graph with FP16
weights and FP16 tensors between operators (operators it has no FP16 kernel for compute in FP32 between Casts,
as ONNX Runtime's CUDA kernels accumulate GEMMs, LayerNorm and Softmax in FP32).

    .venv/bin/python docs/fp16_agreement.py --model base
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper

from blip_triton_bench.host.files import default_cache_dir
from blip_triton_bench.judging.agreement import measure_agreement
from blip_triton_bench.model.export import export_model
from blip_triton_bench.model.half_precision import DEFAULT_RECIPE, HalfPrecisionRecipe, convert_model_to_fp16
from blip_triton_bench.model.source import ModelSpec, load_model
from blip_triton_bench.model.workload import ModelInputs, load_image, preprocess, token_ids

IMAGES = ("astronaut", "coffee", "chelsea", "camera", "rocket")
TOKENS = 16


def logits(path: Path, requests: list[ModelInputs]) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logits"], request.as_dict())[0] for request in requests])


def broken(source: Path, destination: Path, change: Callable[[onnx.ModelProto], None]) -> Path:
    model = onnx.load(str(source))
    change(model)
    onnx.save(model, str(destination))
    return destination


def round_weights(significant_bits: int) -> Callable[[onnx.ModelProto], None]:
    """Every 2-D FP16 weight rounded to `significant_bits` (FP16 keeps 11; bfloat16 8): a conversion that lost
    precision it should have kept."""

    def change(model: onnx.ModelProto) -> None:
        for initializer in model.graph.initializer:
            if initializer.data_type == onnx.TensorProto.FLOAT16 and len(initializer.dims) == 2:
                values = numpy_helper.to_array(initializer).astype(np.float64)
                mantissa, exponent = np.frexp(values)
                rounded = np.ldexp(np.round(mantissa * 2**significant_bits) / 2**significant_bits, exponent)
                initializer.CopyFrom(numpy_helper.from_array(rounded.astype(np.float16), initializer.name))

    return change


def zero_weight(pick: Callable[[list[onnx.TensorProto]], onnx.TensorProto]) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        initializer = pick(list(model.graph.initializer))
        zeros = np.zeros_like(numpy_helper.to_array(initializer))
        initializer.CopyFrom(numpy_helper.from_array(zeros, initializer.name))

    return change


def last_mlp_output(initializers: list[onnx.TensorProto]) -> onnx.TensorProto:
    """The text decoder's last MLP down-projection: the last [intermediate, hidden] MatMul weight in graph order (the
    embeddings are the named ones)."""
    down = [i for i in initializers if len(i.dims) == 2 and i.dims[0] > i.dims[1] and not i.name.startswith("model.")]
    return down[-1]


def lm_head(initializers: list[onnx.TensorProto]) -> onnx.TensorProto:
    return max((i for i in initializers if len(i.dims) == 2), key=lambda i: i.dims[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = parser.parse_args()

    loaded = load_model(ModelSpec(args.model))
    exported = export_model(loaded, args.cache_dir)
    description = loaded.description
    requests = []
    for seed, name in enumerate(IMAGES):
        ids = token_ids(description, 1, TOKENS, seed=seed)
        ids[:, 0] = description.special_tokens.bos_token_id
        requests.append(ModelInputs(preprocess([load_image(name)], description), ids, np.ones_like(ids)))
    reference = logits(exported.onnx_path, requests)
    top2 = np.sort(reference.reshape(-1, reference.shape[-1]), axis=-1)[:, -2:]
    print(
        f"{args.model}: FP32 top-1 margin median {np.median(top2[:, 1] - top2[:, 0]):.4f}, "
        f"{len(IMAGES)} images x {TOKENS} tokens"
    )

    default = convert_model_to_fp16(exported, args.cache_dir)
    kept = convert_model_to_fp16(
        exported, args.cache_dir, HalfPrecisionRecipe(fp32_op_types=("LayerNormalization", "Softmax"))
    )
    with tempfile.TemporaryDirectory() as scratch:
        rows = {
            f"fp16 {DEFAULT_RECIPE.name} (default)": default.onnx_path,
            "fp16, LayerNormalization and Softmax kept FP32": kept.onnx_path,
            "broken: weights rounded to 8 bits (bfloat16's)": broken(
                default.onnx_path, Path(scratch) / "bits8.onnx", round_weights(8)
            ),
            "broken: weights rounded to 5 bits": broken(
                default.onnx_path, Path(scratch) / "bits5.onnx", round_weights(5)
            ),
            "broken: the last text MLP's output weight zeroed": broken(
                default.onnx_path, Path(scratch) / "mlp.onnx", zero_weight(last_mlp_output)
            ),
            "broken: the LM head zeroed": broken(default.onnx_path, Path(scratch) / "head.onnx", zero_weight(lm_head)),
        }
        for label, path in rows.items():
            agreement = measure_agreement(logits(path, requests), reference)
            print(
                f"  {label:50s} top-1 {agreement.top1:7.2%}  1 - cosine mean {1 - agreement.cosine_mean:.1e}  "
                f"max {1 - agreement.cosine_min:.1e}"
            )


if __name__ == "__main__":
    main()
