"""A synthetic model's description kept in the cache folder, so a run that finds its export cached imports neither
transformers nor torch.

Describing `tiny` or `base` means building a BlipConfig and a BlipImageProcessor, and importing transformers for
them imports torch: about 4 s of a 20 s tiny-model suite run, paid by every run although the answer never changes
for a given transformers. The numbers a run needs (image size, vocabulary, special tokens, positions) are kept in
`<cache>/descriptions/<model>-<key>/description.json`, and the sample images, once preprocessed, beside it
(workload.image_pixels). The key covers the synthetic configs and the versions of transformers, Pillow and
scikit-image, which decide those numbers and pixels. A checkpoint (`--model PATH` or a hub id) is always described
afresh: its files can change under the same name. An entry that cannot be read is described afresh and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from blip_triton_bench.host.files import write_text_atomic
from blip_triton_bench.model.source import (
    SYNTHETIC_VISION_INITIALIZER_RANGE,
    TINY_TEXT,
    TINY_VISION,
    ModelDescription,
    ModelSpec,
    SpecialTokens,
    describe_model,
    transformers_parts,
)

logger = logging.getLogger(__name__)

DESCRIPTIONS_DIR = "descriptions"
DESCRIPTION_FILE = "description.json"
SAMPLES_DIR = "samples"
#: The packages whose versions decide a synthetic model's config and its preprocessed pixels.
DECIDING_PACKAGES = ("transformers", "pillow", "scikit-image")


def description_key(spec: ModelSpec) -> str:
    """12 hex characters over the synthetic configs and the deciding packages' versions."""
    versions = {}
    for package in DECIDING_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    decided_by = {
        "model": spec.source,
        "tiny": [TINY_VISION, TINY_TEXT],
        "vision_initializer_range": SYNTHETIC_VISION_INITIALIZER_RANGE,
        "versions": versions,
    }
    canonical = json.dumps(decided_by, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def cached_description(spec: ModelSpec, cache_dir: Path) -> ModelDescription:
    """The model's description; for a synthetic model, from (or into) the cache, with its samples kept there."""
    if not spec.is_synthetic:
        return describe_model(spec)
    folder = cache_dir / DESCRIPTIONS_DIR / f"{spec.source}-{description_key(spec)}"
    description = _read(folder / DESCRIPTION_FILE, spec)
    if description is None:
        description = describe_model(spec)
        _write(folder / DESCRIPTION_FILE, description)
    return replace(description, samples_dir=folder / SAMPLES_DIR)


def _write(path: Path, description: ModelDescription) -> None:
    tokens = description.special_tokens
    summary = {
        "image_size": description.image_size,
        "vocab_size": description.vocab_size,
        "max_positions": description.max_positions,
        "special_tokens": {"bos": tokens.bos_token_id, "eos": tokens.eos_token_id, "pad": tokens.pad_token_id},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    except OSError as error:  # a cache that cannot be written costs the next run its import, not this run
        logger.warning("model description not kept in %s: %s", path, error)


def _read(path: Path, spec: ModelSpec) -> ModelDescription | None:
    """The description kept at `path`, or None where there is none or it is not one this module wrote."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        tokens = summary["special_tokens"]
        numbers = [summary["image_size"], summary["vocab_size"], summary["max_positions"]]
        ids = [tokens["bos"], tokens["eos"], tokens["pad"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in numbers + ids):
        return None
    image_size, vocab_size, max_positions = numbers
    bos, eos, pad = ids
    return ModelDescription(
        spec=spec,
        image_size=image_size,
        vocab_size=vocab_size,
        max_positions=max_positions,
        special_tokens=SpecialTokens(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad),
        transformers_parts=lambda: transformers_parts(spec),
    )
