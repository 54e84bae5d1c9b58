"""A synthetic model's description and preprocessed samples kept in the cache: the second run reads the same numbers
and pixels without importing transformers or torch; a damaged entry is described afresh; a checkpoint never uses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blip_triton_bench.model import description_cache
from blip_triton_bench.model.description_cache import DESCRIPTION_FILE, cached_description, description_key
from blip_triton_bench.model.source import ModelSpec, describe_model
from blip_triton_bench.model.workload import SAMPLE_IMAGES, image_pixels, load_image, preprocess

pytestmark = pytest.mark.unit

TINY = ModelSpec("tiny")


def entry_folder(cache: Path) -> Path:
    (folder,) = (cache / description_cache.DESCRIPTIONS_DIR).iterdir()
    return folder


def not_described_again(spec: ModelSpec) -> None:
    raise AssertionError(f"{spec} described with transformers again")


def test_the_second_description_is_read_from_the_cache_with_the_same_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = describe_model(TINY)
    first = cached_description(TINY, tmp_path)
    monkeypatch.setattr(description_cache, "describe_model", not_described_again)
    second = cached_description(TINY, tmp_path)
    for description in (first, second):
        assert (description.image_size, description.vocab_size, description.max_positions) == (384, 30524, 512)
        assert description.special_tokens == fresh.special_tokens
        assert description.samples_dir == entry_folder(tmp_path) / "samples"
    assert "_parts" not in second.__dict__  # no transformers object built yet
    assert second.config.to_dict() == fresh.config.to_dict()  # built on first use
    assert second.image_processor.to_dict() == fresh.image_processor.to_dict()


def test_a_kept_sample_is_the_processors_own_pixels_and_a_damaged_one_is_preprocessed_again(tmp_path: Path) -> None:
    description = cached_description(TINY, tmp_path)
    names = ["astronaut", "coffee", "astronaut"]
    expected = preprocess([load_image(name) for name in names], describe_model(TINY))

    assert np.array_equal(image_pixels(description, names), expected)  # preprocessed, then kept
    kept = description.samples_dir / "coffee.npy"
    assert sorted(path.name for path in description.samples_dir.iterdir()) == ["astronaut.npy", "coffee.npy"]
    assert np.array_equal(image_pixels(description, names), expected)  # read back
    kept.write_bytes(b"not an array")
    assert np.array_equal(image_pixels(description, names), expected)
    np.save(kept, np.zeros((3, 8, 8), np.float32))  # another size: not this model's
    assert np.array_equal(image_pixels(description, ["coffee"]), expected[1:2])
    assert np.load(kept).shape == (3, 384, 384)


def test_a_file_image_is_preprocessed_every_time(tmp_path: Path) -> None:
    description = cached_description(TINY, tmp_path)
    image = tmp_path / "mine.png"
    load_image("chelsea").save(image)
    assert np.array_equal(image_pixels(description, [str(image)]), preprocess([load_image(str(image))], description))
    assert not description.samples_dir.exists()  # nothing kept for a file


NUMBER_AS_TEXT = (
    '{"image_size": "384", "vocab_size": 1, "max_positions": 1, "special_tokens": {"bos": 1, "eos": 2, "pad": 0}}'
)


@pytest.mark.parametrize(
    "content",
    ["not json", "{}", '{"image_size": 384}', NUMBER_AS_TEXT],
    ids=["not-json", "empty", "incomplete", "text"],
)
def test_a_damaged_description_is_described_afresh_and_rewritten(tmp_path: Path, content: str) -> None:
    kept = cached_description(TINY, tmp_path)
    path = entry_folder(tmp_path) / DESCRIPTION_FILE
    written = path.read_text()
    path.write_text(content)
    assert cached_description(TINY, tmp_path) == kept
    assert path.read_text() == written  # described with transformers, and kept again


def test_the_key_follows_the_synthetic_config_and_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    key = description_key(TINY)
    assert description_key(ModelSpec("base")) != key
    monkeypatch.setattr(description_cache, "TINY_VISION", {**description_cache.TINY_VISION, "hidden_size": 64})
    assert description_key(TINY) != key


def test_a_checkpoint_is_always_described_afresh(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    describe_model(TINY).config.save_pretrained(checkpoint)
    description = cached_description(ModelSpec(str(checkpoint)), tmp_path / "cache")
    assert description.samples_dir is None and description.image_size == 384
    assert not (tmp_path / "cache").exists()


def test_a_warm_cache_builds_a_runs_inputs_without_importing_transformers_or_torch(tmp_path: Path) -> None:
    warm = cached_description(TINY, tmp_path)
    image_pixels(warm, list(SAMPLE_IMAGES))
    program = f"""
import sys
from pathlib import Path
from blip_triton_bench.model.description_cache import cached_description
from blip_triton_bench.model.source import ModelSpec
from blip_triton_bench.model.workload import build_inputs
inputs = build_inputs(cached_description(ModelSpec("tiny"), Path({str(tmp_path)!r})), 8, 16)
assert inputs.pixel_values.shape == (8, 3, 384, 384), inputs.pixel_values.shape
print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
