"""Export BLIP as two ONNX graphs: a vision encoder that also projects the image into every decoder layer's
cross-attention keys/values, and a text decoder that reads those and carries a self-attention KV cache.

A caption then costs one encoder run and one single-token decoder step per word; `greedy_caption_cached` is that
loop over any two runners (in-process ONNX Runtime here, Triton in the BLS captioner) and must equal HF generate().
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

from blip_triton_bench.model.export import (
    MODEL_FILENAME,
    ArtifactIdentity,
    ExportedModel,
    cache_key,
    cached_artifact,
    check_opset,
    export_onnx,
)
from blip_triton_bench.model.onnx_files import DEFAULT_OPSET, weights_to_external_data_if_large
from blip_triton_bench.model.source import LoadedModel, SpecialTokens
from blip_triton_bench.model.workload import DEFAULT_MAX_NEW_TOKENS

logger = logging.getLogger(__name__)

#: Bump when either graph this module produces changes, so old split artifacts are not reused.
#: 2: the cross-attention key/value projections moved from the decoder (every step) to the encoder (once per image).
#: 3: the decoder takes position_ids and an attention_mask, so captions of different lengths share a step.
SPLIT_RECIPE_VERSION = 3

VISION_INPUT = "pixel_values"
VISION_OUTPUTS = ("cross_keys", "cross_values")
DECODER_INPUTS = (
    "input_ids",
    "position_ids",
    "attention_mask",
    "cross_keys",
    "cross_values",
    "past_keys",
    "past_values",
)
DECODER_OUTPUTS = ("logits", "present_keys", "present_values")

#: Every key/value tensor's axes, the self-attention cache's [batch, layers, heads, past_len, head_dim] as the
#: cross-attention's [batch, layers, heads, patches, head_dim]; the layers are stacked in one tensor so a Triton
#: config does not depend on the layer count.
LAYER_AXIS = 1
PAST_SEQUENCE_AXIS = 3
PATCH_AXIS = 3

RunVision = Callable[[np.ndarray], dict[str, np.ndarray]]
RunDecoder = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class SplitModel:
    """The two artifacts of one model and the shape of its self-attention cache."""

    vision: ExportedModel
    decoder: ExportedModel
    layer_count: int
    head_count: int
    head_dim: int

    @property
    def head_shape(self) -> tuple[int, int, int]:
        """(layers, heads, head_dim): the cache tensor's axes besides batch and sequence."""
        return self.layer_count, self.head_count, self.head_dim


@dataclass(frozen=True)
class CachedCaption:
    """A greedy caption decoded with the KV cache, timed per stage."""

    token_ids: tuple[int, ...]  # starts with the start token, as HF generate() returns it
    encoder_ms: float  # the one vision encoder run
    step_latencies_ms: tuple[float, ...]  # one decoder step per generated token; the encoder is not in the first

    @property
    def generated_ids(self) -> tuple[int, ...]:
        return self.token_ids[1:]

    @property
    def time_to_first_token_ms(self) -> float:
        return self.encoder_ms + self.step_latencies_ms[0]

    @property
    def caption_ms(self) -> float:
        return self.encoder_ms + sum(self.step_latencies_ms)


def cross_attentions_of(text_decoder: torch.nn.Module) -> list[BlipTextSelfAttention]:
    """Each text-decoder layer's cross-attention, whose key/value Linears the vision encoder graph takes over."""
    return [layer.crossattention.self for layer in text_decoder.bert.encoder.layer]


def _heads(projected: torch.Tensor, attention: BlipTextSelfAttention) -> torch.Tensor:
    """[batch, patches, heads * head_dim] -> [batch, heads, patches, head_dim], as HF's cross-attention splits it."""
    return projected.view(*projected.shape[:-1], -1, attention.attention_head_size).transpose(1, 2)


class VisionEncoder(torch.nn.Module):
    """pixel_values -> cross_keys, cross_values: every decoder layer's cross-attention keys/values of the image.

    These are the tensors HF's cross-attention projects from the vision tower's last hidden state on the first
    decoding step; projecting them here, once per image, spares each decoder step most of its multiply-adds.
    """

    def __init__(self, vision_model: torch.nn.Module, cross_attentions: Sequence[BlipTextSelfAttention]) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.cross_attentions = torch.nn.ModuleList(cross_attentions)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        keys = [_heads(attention.key(image_embeds), attention) for attention in self.cross_attentions]
        values = [_heads(attention.value(image_embeds), attention) for attention in self.cross_attentions]
        return torch.stack(keys, dim=LAYER_AXIS), torch.stack(values, dim=LAYER_AXIS)


def cache_keyword(text_decoder: torch.nn.Module) -> str:
    """The name under which this transformers version's BLIP decoder takes its KV cache: `cache` in 5.24,
    `past_key_values` in 5.17 and before. A wrong name lands in **kwargs unread, and the decoder then runs without
    the cache (seen on a GPU host with transformers 5.17: the mask no longer matched the keys)."""
    parameters = inspect.signature(text_decoder.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise TypeError(f"{type(text_decoder).__name__}.forward takes neither `cache` nor `past_key_values`")


class CachedTextDecoder(torch.nn.Module):
    """One decoder step over the new tokens, given the self-attention keys/values of the tokens before them.

    Captions of different lengths share a step (in-flight batching): each row's cache is padded to the longest
    one, `attention_mask` [batch, past_len + new_tokens] marks the row's real positions (1) and its padding (0),
    and `position_ids` [batch, new_tokens] are each row's own positions. The additive mask (causal and padding)
    is built here with tensor ops only, so the traced graph follows past_len and new_tokens instead of freezing
    the example's values; HF's own mask code decides with Python branches on the cache that the tracer would bake in. The image's cross-attention keys/values come
    in precomputed (VisionEncoder) as a cross-attention cache marked as filled, so HF reads them instead of
    projecting the patches again, and the decoder graph holds no cross-attention key/value weights.
    """

    def __init__(self, text_decoder: torch.nn.Module, layer_count: int) -> None:
        super().__init__()
        self.text_decoder = text_decoder
        self.layer_count = layer_count
        self.cache_keyword = cache_keyword(text_decoder)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cross_keys: torch.Tensor,
        cross_values: torch.Tensor,
        past_keys: torch.Tensor,
        past_values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        past_length = past_keys.shape[PAST_SEQUENCE_AXIS]
        new_length = input_ids.shape[1]
        query_slots = torch.arange(new_length, device=input_ids.device) + past_length
        key_slots = torch.arange(past_length + new_length, device=input_ids.device)
        future = key_slots.unsqueeze(0) > query_slots.unsqueeze(1)  # [new, past + new]
        blocked = future[None, None] | (attention_mask == 0)[:, None, None, :]  # [batch, 1, new, past + new]
        # An additive 4D mask, as BLIP's eager attention adds it to the scores; HF passes a 4D mask through as is.
        additive_mask = torch.zeros(blocked.shape, dtype=cross_keys.dtype, device=input_ids.device)
        additive_mask = additive_mask.masked_fill(blocked, torch.finfo(cross_keys.dtype).min)
        self_attention = DynamicCache([(past_keys[:, i], past_values[:, i]) for i in range(self.layer_count)])
        cross_attention = DynamicCache([(cross_keys[:, i], cross_values[:, i]) for i in range(self.layer_count)])
        cache = EncoderDecoderCache(self_attention, cross_attention)
        # Marked as filled whatever the patch count, so every layer reads the given keys/values and projects nothing.
        cache.is_updated = dict.fromkeys(range(self.layer_count), True)
        outputs = self.text_decoder(
            input_ids=input_ids,
            attention_mask=additive_mask,
            position_ids=position_ids,
            # HF runs cross-attention only when this is not None; with the cache filled it never reads it. An empty
            # placeholder would fail the key Linear's shape check, should a later HF project it after all.
            encoder_hidden_states=cross_keys.new_zeros((cross_keys.shape[0], 0, 0)),
            **{self.cache_keyword: cache},
            use_cache=True,
        )
        present_keys = torch.stack([layer.keys for layer in self_attention.layers], dim=LAYER_AXIS)
        present_values = torch.stack([layer.values for layer in self_attention.layers], dim=LAYER_AXIS)
        return outputs.logits, present_keys, present_values


def head_shape_of(loaded: LoadedModel) -> tuple[int, int, int]:
    text = loaded.description.config.text_config
    heads = int(text.num_attention_heads)
    return int(text.num_hidden_layers), heads, int(text.hidden_size) // heads


def empty_past(
    split_or_head_shape: SplitModel | tuple[int, int, int], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-length past keys and values, [batch, layers, heads, 0, head_dim]: what the first step is fed."""
    layers, heads, head_dim = (
        split_or_head_shape.head_shape if isinstance(split_or_head_shape, SplitModel) else split_or_head_shape
    )
    shape = (batch_size, layers, heads, 0, head_dim)
    return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)


def step_feeds(
    input_ids: np.ndarray, cross: dict[str, np.ndarray], past_keys: np.ndarray, past_values: np.ndarray
) -> dict[str, np.ndarray]:
    """A decoder step's inputs for rows without padding: positions follow the cache, every slot is attended."""
    batch, new_length = input_ids.shape
    past_length = past_keys.shape[PAST_SEQUENCE_AXIS]
    positions = np.arange(past_length, past_length + new_length, dtype=np.int64)
    return {
        "input_ids": input_ids,
        "position_ids": np.broadcast_to(positions, (batch, new_length)).copy(),
        "attention_mask": np.ones((batch, past_length + new_length), dtype=np.int64),
        **cross,
        "past_keys": past_keys,
        "past_values": past_values,
    }


def split_cache_key(loaded: LoadedModel, opset: int) -> str:
    canonical = json.dumps({"model": cache_key(loaded, opset), "split_recipe": SPLIT_RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def example_vision_inputs(loaded: LoadedModel) -> tuple[torch.Tensor]:
    """Batch 2, so the tracer cannot specialise the batch axis to 1."""
    size = loaded.description.image_size
    return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def example_decoder_inputs(loaded: LoadedModel) -> tuple[torch.Tensor, ...]:
    """Batch 2, 3 new tokens after 4 cached ones, 5 patches: every dynamic axis has a distinct size above 1.
    The second row's cache starts with a padding slot, so the traced mask is not all ones."""
    generator = torch.Generator().manual_seed(0)
    layers, heads, head_dim = head_shape_of(loaded)
    cross_shape = (2, layers, heads, 5, head_dim)
    past_shape = (2, layers, heads, 4, head_dim)
    attention_mask = torch.ones(2, 7, dtype=torch.int64)
    attention_mask[1, 0] = 0
    return (
        torch.randint(0, loaded.description.vocab_size, (2, 3), generator=generator),
        torch.tensor([[4, 5, 6], [3, 4, 5]]),
        attention_mask,
        torch.randn(cross_shape, generator=generator),
        torch.randn(cross_shape, generator=generator),
        torch.randn(past_shape, generator=generator),
        torch.randn(past_shape, generator=generator),
    )


def _parameter_bytes(modules: Sequence[torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def _parameter_count(modules: Sequence[torch.nn.Module]) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def export_split_model(loaded: LoadedModel, cache_dir: Path, opset: int = DEFAULT_OPSET) -> SplitModel:
    """The cached vision encoder and cached-KV text decoder for this model, exporting whichever the cache lacks."""
    check_opset(opset)
    key = split_cache_key(loaded, opset)
    prefix = cache_dir / "exports" / f"{loaded.description.spec.slug}-{key}"
    source = loaded.description.spec.source
    layers, heads, head_dim = head_shape_of(loaded)
    vision_model = loaded.model.vision_model
    text_decoder = loaded.model.text_decoder
    cross_projections = [
        linear for attention in cross_attentions_of(text_decoder) for linear in (attention.key, attention.value)
    ]
    cross_parameter_count = _parameter_count(cross_projections)
    cross_axes = {0: "batch", PATCH_AXIS: "patches"}

    def produce_vision(work_dir: Path) -> None:
        onnx_path = work_dir / MODEL_FILENAME
        export_onnx(
            VisionEncoder(vision_model, cross_attentions_of(text_decoder)).eval(),
            example_vision_inputs(loaded),
            onnx_path,
            (VISION_INPUT,),
            VISION_OUTPUTS,
            {VISION_INPUT: {0: "batch"}, **dict.fromkeys(VISION_OUTPUTS, cross_axes)},
            opset,
        )
        weights_to_external_data_if_large(onnx_path, _parameter_bytes([vision_model, *cross_projections]))

    def produce_decoder(work_dir: Path) -> None:
        onnx_path = work_dir / MODEL_FILENAME
        past_axes = {0: "batch", PAST_SEQUENCE_AXIS: "past_len"}
        present_axes = {0: "batch", PAST_SEQUENCE_AXIS: "present_len"}
        export_onnx(
            CachedTextDecoder(text_decoder, layers).eval(),
            example_decoder_inputs(loaded),
            onnx_path,
            DECODER_INPUTS,
            DECODER_OUTPUTS,
            {
                "input_ids": {0: "batch", 1: "new_tokens"},
                "position_ids": {0: "batch", 1: "new_tokens"},
                "attention_mask": {0: "batch", 1: "present_len"},
                "cross_keys": cross_axes,
                "cross_values": cross_axes,
                "past_keys": past_axes,
                "past_values": past_axes,
                "logits": {0: "batch", 1: "new_tokens"},
                "present_keys": present_axes,
                "present_values": present_axes,
            },
            opset,
        )
        weights_to_external_data_if_large(onnx_path, _parameter_bytes([text_decoder]))

    # Each artifact counts the weights its graph holds: the cross-attention key/value projections are the vision's.
    vision = cached_artifact(
        prefix.with_name(f"{prefix.name}-vision"),
        ArtifactIdentity(key, source, _parameter_count([vision_model]) + cross_parameter_count, opset),
        produce_vision,
    )
    decoder = cached_artifact(
        prefix.with_name(f"{prefix.name}-decoder"),
        ArtifactIdentity(key, source, _parameter_count([text_decoder]) - cross_parameter_count, opset),
        produce_decoder,
    )
    return SplitModel(vision=vision, decoder=decoder, layer_count=layers, head_count=heads, head_dim=head_dim)


def greedy_caption_cached(
    run_vision: RunVision,
    run_decoder: RunDecoder,
    pixel_values: np.ndarray,
    tokens: SpecialTokens,
    head_shape: tuple[int, int, int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ignore_eos: bool = False,
) -> CachedCaption:
    """Greedy decoding of one image ([1, 3, H, W]) as blip_triton_bench.captioning.caption.greedy_caption, but with the KV cache.

    The encoder runs once; every step gets its cross-attention keys/values, step 1 the start token with an empty
    past, each later step only the newest token and the previous step's present keys/values. `ignore_eos` keeps
    generating after the end token.
    """
    if pixel_values.shape[0] != 1:
        raise ValueError(f"greedy_caption_cached takes one image, got a batch of {pixel_values.shape[0]}")
    started = time.perf_counter()
    vision = run_vision(pixel_values)
    cross = {name: vision[name] for name in VISION_OUTPUTS}
    encoder_ms = (time.perf_counter() - started) * 1000.0
    past_keys, past_values = empty_past(head_shape, batch_size=1)
    ids = [tokens.bos_token_id]
    latencies_ms = []
    for _ in range(max_new_tokens):
        feeds = step_feeds(np.asarray([[ids[-1]]], dtype=np.int64), cross, past_keys, past_values)
        started = time.perf_counter()
        outputs = run_decoder(feeds)
        latencies_ms.append((time.perf_counter() - started) * 1000.0)
        past_keys, past_values = outputs["present_keys"], outputs["present_values"]
        next_id = int(np.argmax(outputs["logits"][0, -1]))
        ids.append(next_id)
        if next_id == tokens.eos_token_id and not ignore_eos:
            break
    return CachedCaption(token_ids=tuple(ids), encoder_ms=encoder_ms, step_latencies_ms=tuple(latencies_ms))


def onnxruntime_runners(
    split: SplitModel, session_options: onnxruntime.SessionOptions | None = None
) -> tuple[RunVision, RunDecoder]:
    """In-process CPU sessions over both artifacts, shaped as greedy_caption_cached's runners."""
    providers = ["CPUExecutionProvider"]
    vision = onnxruntime.InferenceSession(str(split.vision.onnx_path), session_options, providers=providers)
    decoder = onnxruntime.InferenceSession(str(split.decoder.onnx_path), session_options, providers=providers)

    def run_vision(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(VISION_OUTPUTS, vision.run(list(VISION_OUTPUTS), {VISION_INPUT: pixel_values}), strict=True))

    def run_decoder(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(DECODER_OUTPUTS, decoder.run(list(DECODER_OUTPUTS), feeds), strict=True))

    return run_vision, run_decoder
