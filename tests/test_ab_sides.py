"""The 'before' side of an A/B run: a variant that calls other models brings them along, renamed with it, so the
'before' captioner calls the 'before' vision encoder and decoder, never the 'after' ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip_triton_bench.repository.variants import discover_variants, with_callees
from blip_triton_bench.runs.ab_sides import BEFORE_SUFFIX, renamed_config

pytestmark = pytest.mark.unit

SEED_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def seed() -> dict:
    return {variant.name: variant for variant in discover_variants(SEED_REPOSITORY)}


def test_a_captioner_comes_with_its_callees_first_each_once() -> None:
    variants = seed()
    ordered = [variant.name for variant in with_callees(variants["blip_caption"], variants)]
    assert ordered == ["blip_caption_vision", "blip_caption_decoder", "blip_caption"]
    assert [variant.name for variant in with_callees(variants["base_model_cpu"], variants)] == ["base_model_cpu"]


def test_the_renamed_captioner_calls_the_renamed_models_and_the_original_is_untouched() -> None:
    captioner = seed()["blip_caption"]
    renamed = renamed_config(captioner, BEFORE_SUFFIX)
    assert renamed.name == "blip_caption__before"
    assert renamed.parameters["vision_encoder_model"].string_value == "blip_caption_vision__before"
    assert renamed.parameters["text_decoder_model"].string_value == "blip_caption_decoder__before"
    assert renamed.parameters["max_active_captions"].string_value == "8"  # other parameters kept as they were
    assert captioner.config.parameters["text_decoder_model"].string_value == "blip_caption_decoder"
    assert captioner.name == "blip_caption"


def test_ensemble_steps_are_renamed(tmp_path: Path) -> None:
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "config.pbtxt").write_text(
        'name: "pipeline"\nplatform: "ensemble"\nmax_batch_size: 8\n'
        'input [ { name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, 384, 384 ] } ]\n'
        'output [ { name: "logits" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'ensemble_scheduling { step [ { model_name: "encode" model_version: -1 '
        'input_map { key: "x" value: "pixel_values" } output_map { key: "y" value: "logits" } } ] }\n'
    )
    (tmp_path / "encode").mkdir()
    (tmp_path / "encode" / "config.pbtxt").write_text('name: "encode"\nbackend: "python"\n')
    pipeline = {variant.name: variant for variant in discover_variants(tmp_path)}["pipeline"]
    assert [step.model_name for step in renamed_config(pipeline, "__b").ensemble_scheduling.step] == ["encode__b"]
