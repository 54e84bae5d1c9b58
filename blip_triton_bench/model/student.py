"""A smaller BLIP distilled from the teacher's logits: half the vision and text layers, initialised from the
teacher's every other layer (DistilBERT-style), trained on KL(teacher || student), saved as a checkpoint.

The checkpoint is a `save_pretrained` directory, cached under the teacher's weights digest and the recipe, and loads
through blip_triton_bench.model.source.load_model like any user checkpoint (`--student PATH` serves one instead).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers import BlipConfig, BlipForConditionalGeneration

from blip_triton_bench.host.files import contents_problem, produce_directory
from blip_triton_bench.model.source import LoadedModel, weights_digest
from blip_triton_bench.model.workload import FIRST_WORD_TOKEN_ID, SAMPLE_IMAGES, load_image, preprocess

logger = logging.getLogger(__name__)

#: Bump when distillation changes what it produces, so old cached students are not reused.
DISTILL_RECIPE_VERSION = 1
#: Measured on 2 CPU cores with the seeded `base` teacher: build_student's 8 steps of one image (x 4 token sequences)
#: took 58 s (~6 s a step, the 577-token vision towers most of it) and cut the held-out KL from 0.132 to 0.090;
#: batch 2 for 4 steps, the same time, reached 0.096, so more, smaller steps. 3e-5 did as well as 1e-4 (0.088) and
#: better than 1e-5 (0.127); Adam moves every weight by ~lr whatever its gradient, so the smaller of the two.
#: The `tiny` student starts at a KL of ~7e-7 (its random layers barely change the logits): nothing left to learn.
DEFAULT_DISTILL_STEPS = 8
DEFAULT_BATCH_SIZE = 1
DEFAULT_LEARNING_RATE = 3e-5
METADATA_FILENAME = "distillation.json"


class StudentError(RuntimeError):
    """A student could not be built from this teacher, or its cached checkpoint is unusable."""


@dataclass(frozen=True)
class DistillRecipe:
    """What shapes the training data and the loss, besides steps, batch size, learning rate and seed."""

    temperature: float = 2.0  # softens both distributions so the student also learns the teacher's runners-up
    sequence_length: int = 16  # as the workload's requests
    sequences_per_image: int = 4  # the vision towers dominate a step; more token positions per image cost less
    crop_min_fraction: float = 0.6  # random crops keep at least this fraction of each side
    pixel_noise_std: float = 0.05  # Gaussian noise on the normalised pixels
    held_out_images: int = 2  # the fixed batch the losses are measured on


DEFAULT_RECIPE = DistillRecipe()


@dataclass(frozen=True)
class DistillResult:
    steps: int
    batch_size: int
    loss_before: float  # KL(teacher || student) on the held-out batch before the first step
    loss_after: float  # the same after the last step
    seconds: float


@dataclass(frozen=True)
class StudentCheckpoint:
    directory: Path
    result: DistillResult
    from_cache: bool


def _halved(layers: int) -> int:
    return max(1, layers // 2)


def student_config(teacher: BlipConfig) -> BlipConfig:
    """The teacher's config with half the vision and text layers (at least one).

    Widths, heads, vocabulary, image size and special tokens stay the teacher's, so every teacher tensor outside the
    dropped layers has the student's shape (initialize_from_teacher copies them) and the student takes the same
    inputs and emits logits over the same vocabulary; depth is what costs latency per token and per image.
    """
    config = BlipConfig.from_dict(teacher.to_dict())
    config.vision_config.num_hidden_layers = _halved(teacher.vision_config.num_hidden_layers)
    config.text_config.num_hidden_layers = _halved(teacher.text_config.num_hidden_layers)
    return config


#: A layer's parameters, and the prefix naming its index, in each tower.
_LAYER_PATTERNS = (
    re.compile(r"^(vision_model\.encoder\.layers\.)(\d+)\."),
    re.compile(r"^(text_decoder\.bert\.encoder\.layer\.)(\d+)\."),
)


def _layer_counts(model: BlipForConditionalGeneration) -> tuple[int, int]:
    return model.config.vision_config.num_hidden_layers, model.config.text_config.num_hidden_layers


def teacher_layer(student_layer: int, student_layers: int, teacher_layers: int) -> int:
    """Every other layer, from the first: student layer i starts as teacher layer i * teacher/student."""
    return student_layer * teacher_layers // student_layers


def teacher_parameter_name(
    name: str, student: BlipForConditionalGeneration, teacher: BlipForConditionalGeneration
) -> str:
    """The teacher tensor a student tensor is copied from: the same name, with layer indices mapped."""
    for pattern, student_layers, teacher_layers in zip(
        _LAYER_PATTERNS, _layer_counts(student), _layer_counts(teacher), strict=True
    ):
        match = pattern.match(name)
        if match:
            index = teacher_layer(int(match.group(2)), student_layers, teacher_layers)
            return f"{match.group(1)}{index}.{name[match.end() :]}"
    return name


def initialize_from_teacher(student: BlipForConditionalGeneration, teacher: BlipForConditionalGeneration) -> None:
    """Copy embeddings, heads, norms and every other layer of both towers from the teacher, exactly."""
    teacher_state = teacher.state_dict()
    mapped = {}
    for name, tensor in student.state_dict().items():
        source = teacher_parameter_name(name, student, teacher)
        if source not in teacher_state or teacher_state[source].shape != tensor.shape:
            raise StudentError(
                f"student tensor {name} {tuple(tensor.shape)} has no teacher counterpart of that shape ({source}); "
                "the student must keep the teacher's widths (student_config does)"
            )
        mapped[name] = teacher_state[source].detach().clone()
    student.load_state_dict(mapped, strict=True)


def _augmented(image: Image.Image, rng: np.random.Generator, recipe: DistillRecipe) -> Image.Image:
    width, height = image.size
    crop_w = int(width * rng.uniform(recipe.crop_min_fraction, 1.0))
    crop_h = int(height * rng.uniform(recipe.crop_min_fraction, 1.0))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    cropped = image.crop((left, top, left + crop_w, top + crop_h))
    return ImageOps.mirror(cropped) if rng.random() < 0.5 else cropped


@dataclass(frozen=True)
class _Batch:
    pixel_values: torch.Tensor  # [images, 3, H, W]
    input_ids: torch.Tensor  # [images * sequences_per_image, S], grouped by image


def _draw_batch(
    teacher: LoadedModel, images: list[Image.Image], count: int, rng: np.random.Generator, recipe: DistillRecipe
) -> _Batch:
    """`count` augmented real images through the teacher's image processor, and random word-piece sequences
    starting with the decoder's start token."""
    description = teacher.description
    chosen = [images[int(i)] for i in rng.integers(0, len(images), size=count)]
    pixels = preprocess([_augmented(image, rng, recipe) for image in chosen], description)
    pixels = pixels + rng.normal(0.0, recipe.pixel_noise_std, size=pixels.shape).astype(np.float32)
    ids = rng.integers(
        FIRST_WORD_TOKEN_ID, description.vocab_size, size=(count * recipe.sequences_per_image, recipe.sequence_length)
    )
    ids[:, 0] = description.special_tokens.bos_token_id
    return _Batch(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids.astype(np.int64)))


def _logits(model: BlipForConditionalGeneration, batch: _Batch, recipe: DistillRecipe) -> torch.Tensor:
    """BlipForConditionalGeneration.forward's path, with each image's embedding shared by its token sequences."""
    image_embeds = model.vision_model(pixel_values=batch.pixel_values).last_hidden_state
    image_embeds = image_embeds.repeat_interleave(recipe.sequences_per_image, dim=0)
    return model.text_decoder(
        input_ids=batch.input_ids,
        attention_mask=torch.ones_like(batch.input_ids),
        encoder_hidden_states=image_embeds,
    ).logits


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened next-token distributions, averaged over every position,
    times T^2 so gradients keep their scale as T changes (Hinton et al., 2015)."""
    vocab = student_logits.shape[-1]
    student_log_probs = F.log_softmax(student_logits.reshape(-1, vocab) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    return kl * temperature**2


def _held_out_loss(
    teacher_logits: torch.Tensor, student: BlipForConditionalGeneration, batch: _Batch, recipe: DistillRecipe
) -> float:
    student.eval()
    with torch.no_grad():
        student_logits = _logits(student, batch, recipe)
    # In float64: a student close to its teacher has a KL near float32's rounding of 30k log-probabilities.
    return float(distillation_loss(student_logits.double(), teacher_logits.double(), recipe.temperature))


def distill(
    teacher: LoadedModel,
    student_model: BlipForConditionalGeneration,
    steps: int,
    batch_size: int,
    seed: int,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    recipe: DistillRecipe = DEFAULT_RECIPE,
) -> DistillResult:
    """Train `student_model` in place on the teacher's softened logits; losses are on a fixed held-out batch."""
    if steps < 0 or batch_size < 1:
        raise StudentError(f"distillation needs steps >= 0 and batch_size >= 1, got steps={steps}, batch={batch_size}")
    started = time.monotonic()
    images = [load_image(name) for name in SAMPLE_IMAGES]
    # Separate streams: the held-out batch is the same whatever the number of steps or the batch size.
    held_out_rng, train_rng = (np.random.default_rng(stream) for stream in np.random.SeedSequence(seed).spawn(2))
    torch.manual_seed(seed)
    teacher_model = teacher.model.eval()
    held_out = _draw_batch(teacher, images, recipe.held_out_images, held_out_rng, recipe)
    with torch.no_grad():
        held_out_teacher = _logits(teacher_model, held_out, recipe)
    loss_before = _held_out_loss(held_out_teacher, student_model, held_out, recipe)

    optimizer = torch.optim.AdamW(student_model.parameters(), lr=learning_rate, weight_decay=0.0)
    student_model.train()
    for step in range(steps):
        batch = _draw_batch(teacher, images, batch_size, train_rng, recipe)
        with torch.no_grad():
            target = _logits(teacher_model, batch, recipe)
        loss = distillation_loss(_logits(student_model, batch, recipe), target, recipe.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        logger.debug("distillation step %d/%d: training KL %.5f", step + 1, steps, loss.item())
    loss_after = _held_out_loss(held_out_teacher, student_model, held_out, recipe)
    student_model.eval()
    return DistillResult(
        steps=steps,
        batch_size=batch_size,
        loss_before=loss_before,
        loss_after=loss_after,
        seconds=round(time.monotonic() - started, 3),
    )


def student_cache_key(teacher: LoadedModel, config: BlipConfig, steps: int, seed: int) -> str:
    parts = {
        "teacher_weights_sha256": teacher.weights_sha256,
        "student_config": config.to_dict(),
        "steps": steps,
        "seed": seed,
        "batch_size": DEFAULT_BATCH_SIZE,
        "learning_rate": DEFAULT_LEARNING_RATE,
        "recipe": asdict(DEFAULT_RECIPE),
        "recipe_version": DISTILL_RECIPE_VERSION,
        "torch": torch.__version__,
    }
    canonical = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def _read_cached(directory: Path) -> StudentCheckpoint | None:
    """The checkpoint at `directory` when it is whole and holds what it recorded; None when there is none or when it
    must be distilled again (a file missing, cut short or edited, unreadable metadata), saying why in the log."""
    metadata_path = directory / METADATA_FILENAME
    if not metadata_path.is_file():
        return None
    problem = contents_problem(directory)
    if problem is None:
        try:
            metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
            result = DistillResult(**{field: metadata[field] for field in DistillResult.__dataclass_fields__})
            return StudentCheckpoint(directory=directory, result=result, from_cache=True)
        except (ValueError, KeyError, TypeError) as error:
            problem = f"{METADATA_FILENAME} is unreadable ({error})"
    logger.warning("cached student %s is not used: %s; it is distilled again", directory, problem)
    return None


def _write_checkpoint(
    work_dir: Path, teacher: LoadedModel, student: BlipForConditionalGeneration, result: DistillResult, seed: int
) -> None:
    student.save_pretrained(work_dir)
    teacher.description.image_processor.save_pretrained(work_dir)
    metadata = {
        **asdict(result),
        "seed": seed,
        "learning_rate": DEFAULT_LEARNING_RATE,
        "recipe": asdict(DEFAULT_RECIPE),
        "recipe_version": DISTILL_RECIPE_VERSION,
        "teacher_source": teacher.description.spec.source,
        "teacher_weights_sha256": teacher.weights_sha256,
        "student_weights_sha256": weights_digest(student),
        "layers": {
            "vision": [
                teacher.model.config.vision_config.num_hidden_layers,
                student.config.vision_config.num_hidden_layers,
            ],
            "text": [teacher.model.config.text_config.num_hidden_layers, student.config.text_config.num_hidden_layers],
        },
    }
    # Written last: its presence is what marks a directory as a whole checkpoint.
    (work_dir / METADATA_FILENAME).write_text(json.dumps(metadata, indent=2) + "\n")
    for path in work_dir.iterdir():
        path.chmod(0o644)  # safetensors writes 0600, which would hide the weights from another user


def build_student(
    teacher: LoadedModel, cache_dir: Path, steps: int = DEFAULT_DISTILL_STEPS, seed: int = 0
) -> StudentCheckpoint:
    """The cached student checkpoint for this teacher, distilling it first when the cache has none."""
    config = student_config(teacher.description.config)
    key = student_cache_key(teacher, config, steps, seed)
    final_dir = cache_dir / "students" / f"{teacher.description.spec.slug}-{key}"
    cached = _read_cached(final_dir)
    if cached is not None:
        logger.info("student of %s found in cache: %s", teacher.description.spec.source, final_dir)
        return cached

    results: list[DistillResult] = []

    def produce(work_dir: Path) -> None:
        student = BlipForConditionalGeneration(config)
        initialize_from_teacher(student, teacher.model)
        logger.info(
            "distilling a %s student from %s: %d steps",
            _describe_layers(config),
            teacher.description.spec.source,
            steps,
        )
        results.append(distill(teacher, student, steps, DEFAULT_BATCH_SIZE, seed, DEFAULT_LEARNING_RATE))
        _write_checkpoint(work_dir, teacher, student, results[0], seed)

    # The metadata is written last: its presence is what makes an entry whole (see _write_checkpoint).
    if not produce_directory(final_dir, key, produce, lambda directory: (directory / METADATA_FILENAME).is_file()):
        waited = _read_cached(final_dir)
        if waited is None:
            raise StudentError(f"{final_dir} lost its {METADATA_FILENAME} while this run read it")
        logger.info("student %s distilled by another run while this one waited for it", final_dir)
        return waited
    result = results[0]
    logger.info(
        "distilled %s in %.0f s: held-out KL %.4f -> %.4f",
        final_dir,
        result.seconds,
        result.loss_before,
        result.loss_after,
    )
    return StudentCheckpoint(directory=final_dir, result=result, from_cache=False)


def _describe_layers(config: BlipConfig) -> str:
    return f"{config.vision_config.num_hidden_layers}+{config.text_config.num_hidden_layers}-layer"
