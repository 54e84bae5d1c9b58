"""Model inputs built from real photographs (scikit-image's sample data) and reproducible token ids.

Images go through the model's own BlipImageProcessor; inputs are built once and reused by every request.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skimage_data

from blip_triton_bench.host.files import write_bytes_atomic
from blip_triton_bench.model.source import ModelDescription

logger = logging.getLogger(__name__)

#: New tokens a caption asks for unless told otherwise (--max-new-tokens; a captioner's generation_config.json).
DEFAULT_MAX_NEW_TOKENS = 20

#: Photographs shipped with scikit-image: people, animals, objects, a scene; grey ones are made RGB.
SAMPLE_IMAGES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "cat",
    "hubble_deep_field",
    "immunohistochemistry",
)

#: Token ids below this are [unused]/special in BERT's vocabulary, which BLIP's tokenizer extends.
FIRST_WORD_TOKEN_ID = 1000


class WorkloadError(ValueError):
    """An image name or path that cannot be loaded."""


@dataclass(frozen=True)
class ModelInputs:
    """One request's tensors, named as the exported graph and the Triton configs name them."""

    pixel_values: np.ndarray  # [B, 3, H, W] float32
    input_ids: np.ndarray  # [B, S] int64
    attention_mask: np.ndarray  # [B, S] int64

    @property
    def batch_size(self) -> int:
        return int(self.pixel_values.shape[0])

    def as_dict(self) -> dict[str, np.ndarray]:
        return {
            "pixel_values": self.pixel_values,
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
        }


def load_image(name_or_path: str) -> Image.Image:
    """A scikit-image sample by name (e.g. `astronaut`) or an image file path, as RGB."""
    if name_or_path in SAMPLE_IMAGES:
        array = getattr(skimage_data, name_or_path)()
        return Image.fromarray(array).convert("RGB")
    path = Path(name_or_path)
    if not path.is_file():
        raise WorkloadError(
            f"image {name_or_path!r} is neither a file nor one of scikit-image's samples: {', '.join(SAMPLE_IMAGES)}"
        )
    return Image.open(path).convert("RGB")


def preprocess(images: Sequence[Image.Image], description: ModelDescription) -> np.ndarray:
    processed = description.image_processor(images=list(images), return_tensors="np")
    return np.ascontiguousarray(processed["pixel_values"], dtype=np.float32)


def image_pixels(description: ModelDescription, names: Sequence[str]) -> np.ndarray:
    """pixel_values [N, 3, H, W] of images by name (load_image's samples or files), each preprocessed alone as the
    processor does in a batch. A sample is preprocessed once and kept in the description's samples_dir
    (description_cache.py); a file is preprocessed every time, as its content may change."""
    return np.stack([_one_image_pixels(description, name) for name in names])


def _one_image_pixels(description: ModelDescription, name: str) -> np.ndarray:
    kept = description.samples_dir / f"{name}.npy" if description.samples_dir and name in SAMPLE_IMAGES else None
    expected = (3, description.image_size, description.image_size)
    if kept is not None:
        try:
            pixels = np.load(kept, allow_pickle=False)
        except (OSError, ValueError):
            pass
        else:
            if pixels.shape == expected and pixels.dtype == np.float32:
                return pixels
    pixels = preprocess([load_image(name)], description)[0]
    if kept is not None:
        buffer = io.BytesIO()
        np.save(buffer, pixels, allow_pickle=False)
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(kept, buffer.getvalue())
        except OSError as error:  # a cache that cannot be written costs the next run this preprocessing
            logger.warning("preprocessed %s not kept in %s: %s", name, kept, error)
    return pixels


def sample_pixel_values(description: ModelDescription, batch_size: int) -> np.ndarray:
    """`batch_size` real images, cycling through the samples when the batch is larger than the set."""
    return image_pixels(description, [SAMPLE_IMAGES[i % len(SAMPLE_IMAGES)] for i in range(batch_size)])


def token_ids(description: ModelDescription, batch_size: int, sequence_length: int, seed: int = 0) -> np.ndarray:
    """Reproducible ids: the decoder's start token, then word-piece ids drawn from the vocabulary."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_WORD_TOKEN_ID, description.vocab_size, size=(batch_size, sequence_length))
    ids[:, 0] = description.special_tokens.bos_token_id
    return ids.astype(np.int64)


def build_inputs(description: ModelDescription, batch_size: int, sequence_length: int, seed: int = 0) -> ModelInputs:
    ids = token_ids(description, batch_size, sequence_length, seed)
    return ModelInputs(
        pixel_values=sample_pixel_values(description, batch_size),
        input_ids=ids,
        attention_mask=np.ones_like(ids),
    )
