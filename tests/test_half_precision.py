"""The FP16 artifact of the tiny export: cache reuse, a graph FP16 inside and FP32 at its edges, the operators a
recipe keeps in FP32, and its agreement with the FP32 export on real images (a broken one fails the threshold)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from blip_triton_bench.judging.agreement import AgreementBelowThreshold, check_agreement
from blip_triton_bench.judging.correctness import AGREEMENT_THRESHOLDS, threshold_for_artifact
from blip_triton_bench.model.artifacts import ModelArtifacts
from blip_triton_bench.model.export import ExportedModel
from blip_triton_bench.model.half_precision import (
    DEFAULT_RECIPE,
    HalfPrecisionError,
    HalfPrecisionRecipe,
    check_half_precision,
    convert_model_to_fp16,
)
from blip_triton_bench.model.source import LoadedModel
from blip_triton_bench.model.workload import ModelInputs, load_image, preprocess, token_ids
from blip_triton_bench.repository.variants import discover_variants
from tests.conftest import SEED_REPOSITORY

pytestmark = pytest.mark.unit

IMAGES = ("astronaut", "coffee", "chelsea")  # as suite/test_accuracy.py


@pytest.fixture(scope="module")
def fp32(tiny_artifacts: ModelArtifacts) -> ExportedModel:
    return tiny_artifacts.teacher_export


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fp16-cache")


@pytest.fixture(scope="module")
def fp16(fp32: ExportedModel, cache_dir: Path) -> ExportedModel:
    return convert_model_to_fp16(fp32, cache_dir)


@pytest.fixture(scope="module")
def requests(tiny_model: LoadedModel) -> list[ModelInputs]:
    """One request per real image, 16 teacher-forced tokens from the start token."""
    description = tiny_model.description
    result = []
    for seed, name in enumerate(IMAGES):
        ids = token_ids(description, 1, 16, seed=seed)
        ids[:, 0] = description.special_tokens.bos_token_id
        result.append(ModelInputs(preprocess([load_image(name)], description), ids, np.ones_like(ids)))
    return result


def logits(onnx_path: Path, requests: list[ModelInputs]) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logits"], request.as_dict())[0] for request in requests])


def weight_types(onnx_path: Path) -> dict[str, int]:
    return {i.name: i.data_type for i in onnx.load(str(onnx_path)).graph.initializer if len(i.dims) == 2}


def test_second_call_reuses_the_cached_artifact(fp32: ExportedModel, fp16: ExportedModel, cache_dir: Path) -> None:
    source_files = sorted(p.name for p in fp32.directory.iterdir())
    mtime = fp16.onnx_path.stat().st_mtime_ns
    again = convert_model_to_fp16(fp32, cache_dir)

    assert again.from_cache and not fp16.from_cache
    assert (
        again.directory == fp16.directory == cache_dir / "exports" / f"{fp32.directory.name}-fp16-{DEFAULT_RECIPE.name}"
    )
    assert again.onnx_path.stat().st_mtime_ns == mtime
    assert fp16.size_bytes < 0.6 * fp32.size_bytes  # two bytes a weight instead of four
    assert sorted(p.name for p in fp32.directory.iterdir()) == source_files  # the converter wrote nothing beside it
    assert not [p for p in (cache_dir / "exports").iterdir() if p.name.startswith(".tmp")]


def test_weights_are_fp16_and_the_edges_stay_fp32(fp32: ExportedModel, fp16: ExportedModel) -> None:
    before, after = weight_types(fp32.onnx_path), weight_types(fp16.onnx_path)
    assert set(before.values()) == {onnx.TensorProto.FLOAT}
    assert set(after.values()) == {onnx.TensorProto.FLOAT16}
    assert after.keys() == before.keys()

    session = onnxruntime.InferenceSession(str(fp16.onnx_path), providers=["CPUExecutionProvider"])
    edges = {value.name: value.type for value in [*session.get_inputs(), *session.get_outputs()]}
    assert edges == {
        "pixel_values": "tensor(float)",
        "input_ids": "tensor(int64)",
        "attention_mask": "tensor(int64)",
        "logits": "tensor(float)",
    }


def test_the_check_refuses_a_graph_that_is_not_fp16(fp32: ExportedModel, fp16: ExportedModel, tmp_path: Path) -> None:
    check_half_precision(fp16.onnx_path)
    with pytest.raises(HalfPrecisionError, match="left most weights in FP32"):
        check_half_precision(fp32.onnx_path)
    with pytest.raises(HalfPrecisionError, match="should be FLOAT16"):
        check_half_precision(fp16.onnx_path, HalfPrecisionRecipe(keep_io_types=False))


def test_a_recipe_that_keeps_operators_in_fp32_is_another_artifact(
    fp32: ExportedModel, fp16: ExportedModel, cache_dir: Path
) -> None:
    kept = convert_model_to_fp16(fp32, cache_dir, HalfPrecisionRecipe(fp32_op_types=("LayerNormalization",)))
    assert kept.cache_key != fp16.cache_key and kept.directory != fp16.directory

    def layer_norms_fed_from_fp32_casts(path: Path) -> set[bool]:
        """Per LayerNormalization: does a Cast to FP32 produce its input? (the converter's way of keeping it FP32)"""
        graph = onnx.load(str(path)).graph
        to_fp32 = {
            output
            for node in graph.node
            if node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT
            for output in node.output
        }
        return {node.input[0] in to_fp32 for node in graph.node if node.op_type == "LayerNormalization"}

    assert layer_norms_fed_from_fp32_casts(kept.onnx_path) == {True}
    assert layer_norms_fed_from_fp32_casts(fp16.onnx_path) == {False}


def test_fp16_agrees_with_fp32_on_real_images(
    fp32: ExportedModel, fp16: ExportedModel, requests: list[ModelInputs]
) -> None:
    reference = logits(fp32.onnx_path, requests)
    served = logits(fp16.onnx_path, requests)
    assert not np.array_equal(served, reference)  # the FP16 graph really rounds
    # Measured on this host: top-1 100 %, 1 - cosine at most 3.3e-7 (correctness.py states the threshold's basis).
    agreement = check_agreement("tiny fp16 vs fp32", served, reference, AGREEMENT_THRESHOLDS["fp16_vs_fp32"])
    assert agreement.positions == len(IMAGES) * 16


def test_fp16_weights_rounded_to_five_bits_fail_the_threshold(
    fp32: ExportedModel, fp16: ExportedModel, tmp_path: Path, requests: list[ModelInputs]
) -> None:
    model = onnx.load(str(fp16.onnx_path))
    for initializer in model.graph.initializer:
        if initializer.data_type == onnx.TensorProto.FLOAT16 and len(initializer.dims) == 2:
            mantissa, exponent = np.frexp(numpy_helper.to_array(initializer).astype(np.float64))
            rounded = np.ldexp(np.round(mantissa * 32) / 32, exponent).astype(np.float16)
            initializer.CopyFrom(numpy_helper.from_array(rounded, initializer.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))

    with pytest.raises(AgreementBelowThreshold, match="below threshold 'fp16_vs_fp32'"):
        check_agreement(
            "broken fp16",
            logits(broken, requests),
            logits(fp32.onnx_path, requests),
            AGREEMENT_THRESHOLDS["fp16_vs_fp32"],
        )


def test_the_seed_fp16_variant_is_served_with_the_fp16_artifact_on_a_gpu(tiny_artifacts: ModelArtifacts) -> None:
    variant = next(v for v in discover_variants(SEED_REPOSITORY) if v.name == "base_model_gpu_fp16")
    assert variant.artifact == "fp16" and variant.runs_in_fp16
    assert threshold_for_artifact(variant.artifact) == "fp16_vs_fp32"
    assert variant.requirements.gpu_count == 1
    assert variant.config.max_batch_size >= 64 and max(variant.config.dynamic_batching.preferred_batch_size) >= 32
    (staged,) = tiny_artifacts.files_for(variant, Path("unused"))
    assert staged == tiny_artifacts.fp16().onnx_path
    assert any("FP16 artifact" in note for note in tiny_artifacts.notes)
