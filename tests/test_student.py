"""The distilled student on the tiny teacher: its config, the copy from the teacher, distillation, and the cached
checkpoint that loads like a user's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration

from blip_triton_bench.model.source import TINY_TEXT, TINY_VISION, LoadedModel, ModelSpec, load_model, synthetic_config
from blip_triton_bench.model.student import (
    build_student,
    distill,
    initialize_from_teacher,
    student_config,
    teacher_parameter_name,
)

pytestmark = pytest.mark.unit


def four_layer_config() -> BlipConfig:
    return BlipConfig(
        vision_config={**TINY_VISION, "num_hidden_layers": 4}, text_config={**TINY_TEXT, "num_hidden_layers": 4}
    )


def test_student_config_halves_the_depth_and_keeps_everything_else() -> None:
    base = synthetic_config("base")
    student = student_config(base)
    assert (student.vision_config.num_hidden_layers, student.text_config.num_hidden_layers) == (6, 6)
    assert student.text_config.hidden_size == base.text_config.hidden_size
    assert student.text_config.vocab_size == base.text_config.vocab_size
    assert student.vision_config.image_size == base.vision_config.image_size
    assert student.text_config.sep_token_id == base.text_config.sep_token_id
    assert base.text_config.num_hidden_layers == 12  # the teacher's config is not changed

    one_layer = BlipConfig(
        vision_config={**TINY_VISION, "num_hidden_layers": 1}, text_config={**TINY_TEXT, "num_hidden_layers": 1}
    )
    assert student_config(one_layer).vision_config.num_hidden_layers == 1
    assert student_config(one_layer).text_config.num_hidden_layers == 1


def test_initialize_from_teacher_copies_every_other_layer_exactly() -> None:
    torch.manual_seed(1)
    teacher = BlipForConditionalGeneration(four_layer_config())
    student = BlipForConditionalGeneration(student_config(teacher.config))
    initialize_from_teacher(student, teacher)

    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    for name, tensor in student_state.items():
        assert torch.equal(tensor, teacher_state[teacher_parameter_name(name, student, teacher)]), name
    # DistilBERT-style: student layer 1 is teacher layer 2, in both towers; embeddings and heads are the teacher's.
    assert teacher_parameter_name("text_decoder.bert.encoder.layer.1.output.dense.weight", student, teacher) == (
        "text_decoder.bert.encoder.layer.2.output.dense.weight"
    )
    assert teacher_parameter_name("vision_model.encoder.layers.1.mlp.fc1.weight", student, teacher) == (
        "vision_model.encoder.layers.2.mlp.fc1.weight"
    )
    assert torch.equal(
        student.text_decoder.bert.encoder.layer[1].intermediate.dense.weight,
        teacher.text_decoder.bert.encoder.layer[2].intermediate.dense.weight,
    )
    assert torch.equal(
        student.text_decoder.cls.predictions.transform.dense.weight,
        teacher.text_decoder.cls.predictions.transform.dense.weight,
    )
    assert torch.equal(
        student.vision_model.embeddings.patch_embedding.weight, teacher.vision_model.embeddings.patch_embedding.weight
    )


def test_distillation_lowers_the_held_out_loss(tiny_model: LoadedModel) -> None:
    # A student far from the teacher (fresh random weights), so the drop is well above float rounding.
    torch.manual_seed(123)
    student = BlipForConditionalGeneration(student_config(tiny_model.description.config))
    result = distill(tiny_model, student, steps=15, batch_size=2, seed=0, learning_rate=1e-3)

    assert (result.steps, result.batch_size) == (15, 2)
    assert result.loss_after < 0.5 * result.loss_before


def test_the_held_out_batch_does_not_depend_on_training(tiny_model: LoadedModel) -> None:
    def fresh() -> BlipForConditionalGeneration:
        student = BlipForConditionalGeneration(student_config(tiny_model.description.config))
        initialize_from_teacher(student, tiny_model.model)
        return student

    untrained = distill(tiny_model, fresh(), steps=0, batch_size=1, seed=0)
    trained = distill(tiny_model, fresh(), steps=2, batch_size=3, seed=0)
    other_seed = distill(tiny_model, fresh(), steps=0, batch_size=1, seed=1)

    assert untrained.loss_after == untrained.loss_before
    assert trained.loss_before == untrained.loss_before
    assert other_seed.loss_before != untrained.loss_before
    assert 0 < untrained.loss_before < 1e-3  # half the teacher's layers, copied from it: already close


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_build_student_caches_a_checkpoint_that_loads_like_a_users(
    tiny_model: LoadedModel, checkpoint_dir: Path
) -> None:
    first = build_student(tiny_model, checkpoint_dir, steps=3)
    second = build_student(tiny_model, checkpoint_dir, steps=3)

    assert not first.from_cache and second.from_cache
    assert second.directory == first.directory
    assert second.result == first.result
    assert first.directory.parent == checkpoint_dir / "students"
    assert not [p for p in first.directory.parent.iterdir() if p.name.startswith(".tmp")]
    assert all(path.stat().st_mode & 0o044 == 0o044 for path in first.directory.iterdir())  # readable by all

    metadata = json.loads((first.directory / "distillation.json").read_text())
    assert metadata["teacher_weights_sha256"] == tiny_model.weights_sha256
    assert (metadata["steps"], metadata["loss_before"], metadata["loss_after"]) == (
        3,
        first.result.loss_before,
        first.result.loss_after,
    )

    student = load_model(ModelSpec(str(first.directory)))
    assert student.weights_sha256 == metadata["student_weights_sha256"]
    assert (
        student.description.config.text_config.num_hidden_layers
        < tiny_model.description.config.text_config.num_hidden_layers
    )
    assert (
        student.description.config.vision_config.num_hidden_layers
        < tiny_model.description.config.vision_config.num_hidden_layers
    )
    assert student.parameter_count < tiny_model.parameter_count
    assert student.description.special_tokens == tiny_model.description.special_tokens
    assert student.description.image_processor.to_dict() == tiny_model.description.image_processor.to_dict()


def test_more_steps_or_another_seed_is_another_student(tiny_model: LoadedModel, checkpoint_dir: Path) -> None:
    baseline = build_student(tiny_model, checkpoint_dir, steps=3)
    assert build_student(tiny_model, checkpoint_dir, steps=4).directory != baseline.directory
    assert build_student(tiny_model, checkpoint_dir, steps=3, seed=1).directory != baseline.directory


@pytest.mark.parametrize("damage", ["weights-cut-short", "metadata-not-utf8"])
def test_a_damaged_cached_student_is_distilled_again(
    tiny_model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    first = build_student(tiny_model, tmp_path, steps=1)
    if damage == "weights-cut-short":
        (weights,) = first.directory.glob("*.safetensors")
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (first.directory / "distillation.json").write_bytes(b"\xff{")

    with caplog.at_level(logging.WARNING):
        again = build_student(tiny_model, tmp_path, steps=1)

    assert not again.from_cache
    assert f"cached student {first.directory} is not used" in caplog.text
    assert load_model(ModelSpec(str(again.directory))).parameter_count < tiny_model.parameter_count
    assert build_student(tiny_model, tmp_path, steps=1).from_cache
