"""The split export (vision encoder + KV-cached text decoder): same captions and logits as HF and the monolith."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper

from blip_triton_bench.captioning.caption import greedy_caption
from blip_triton_bench.host.environment import max_ir_version_onnxruntime_loads
from blip_triton_bench.judging.correctness import TOLERANCES, Tolerance, assert_close
from blip_triton_bench.model.export import export_model
from blip_triton_bench.model.source import LoadedModel, ModelSpec, load_model, weights_digest
from blip_triton_bench.model.split_export import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    VISION_INPUT,
    VISION_OUTPUTS,
    RunDecoder,
    RunVision,
    SplitModel,
    cache_keyword,
    cross_attentions_of,
    empty_past,
    export_split_model,
    greedy_caption_cached,
    onnxruntime_runners,
    step_feeds,
)
from blip_triton_bench.model.workload import ModelInputs, load_image, preprocess, token_ids

pytestmark = pytest.mark.unit

MAX_NEW_TOKENS = 12

#: Both sides are float32 ONNX Runtime on the same weights; only the attention's summation order differs (the
#: cached step multiplies one query row, the monolith all of them), which moves tiny-model logits by ~1e-7. A wrong
#: position id, mask or cache entry moves them by whole units.
SPLIT_VS_MONOLITHIC = Tolerance(
    name="split_vs_monolithic",
    atol=1e-4,
    rtol=1e-4,
    why="same weights and runtime; only float32 summation order differs between a cached step and a full pass",
)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    """The tiny model, with an image that matters: what the decoder's cross-attention reads must reach the logits.

    BLIP's vision config initialises its weights with std 1e-10, so the stock tiny vision tower outputs ~1e-6 and
    cross-attention keys/values ~1e-7: swapping or dropping them would move the logits far less than the tolerance.
    """
    loaded = load_model(ModelSpec("tiny"))
    generator = torch.Generator().manual_seed(1)
    cross_biases = [
        getattr(attention, name).bias
        for attention in cross_attentions_of(loaded.model.text_decoder)
        for name in ("key", "value")
    ]
    matrices = [p for p in loaded.model.vision_model.parameters() if p.dim() > 1]
    with torch.no_grad():
        for parameter in [*matrices, *cross_biases]:  # the biases start at zero, which hides a dropped bias
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return dataclasses.replace(loaded, weights_sha256=weights_digest(loaded.model))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("split-export-cache")


@pytest.fixture(scope="module")
def split(tiny: LoadedModel, cache_dir: Path) -> SplitModel:
    return export_split_model(tiny, cache_dir)


@pytest.fixture(scope="module")
def runners(split: SplitModel) -> tuple[RunVision, RunDecoder]:
    return onnxruntime_runners(split)


@pytest.fixture(scope="module")
def monolithic(tiny: LoadedModel, cache_dir: Path) -> onnxruntime.InferenceSession:
    exported = export_model(tiny, cache_dir)
    return onnxruntime.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])


def monolithic_logits(session: onnxruntime.InferenceSession, inputs: ModelInputs) -> np.ndarray:
    return session.run(["logits"], inputs.as_dict())[0]


def image(loaded: LoadedModel, name: str) -> np.ndarray:
    return preprocess([load_image(name)], loaded.description)


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_cached_greedy_caption_equals_hf_generate_and_the_monolith(
    tiny: LoadedModel,
    split: SplitModel,
    runners: tuple[RunVision, RunDecoder],
    monolithic: onnxruntime.InferenceSession,
    name: str,
) -> None:
    pixel_values = image(tiny, name)
    tokens = tiny.description.special_tokens

    cached = greedy_caption_cached(*runners, pixel_values, tokens, split.head_shape, MAX_NEW_TOKENS)

    with torch.no_grad():
        generated = tiny.model.generate(
            torch.from_numpy(pixel_values), do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS
        )
    full = greedy_caption(lambda inputs: monolithic_logits(monolithic, inputs), pixel_values, tokens, MAX_NEW_TOKENS)
    assert cached.token_ids == tuple(generated[0].tolist())
    assert cached.token_ids == full.token_ids
    assert cached.token_ids[0] == tokens.bos_token_id
    assert len(cached.step_latencies_ms) == len(cached.generated_ids)


def test_each_decoder_step_matches_the_monoliths_last_position_logits(
    tiny: LoadedModel,
    split: SplitModel,
    runners: tuple[RunVision, RunDecoder],
    monolithic: onnxruntime.InferenceSession,
) -> None:
    run_vision, run_decoder = runners
    steps: list[dict[str, np.ndarray]] = []

    def recording_decoder(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        steps.append({**feeds, **run_decoder(feeds)})
        return steps[-1]

    pixel_values = image(tiny, "astronaut")
    cached = greedy_caption_cached(
        run_vision, recording_decoder, pixel_values, tiny.description.special_tokens, split.head_shape, MAX_NEW_TOKENS
    )

    assert [step["input_ids"].tolist() for step in steps] == [[[token]] for token in cached.token_ids[:-1]]
    for position, step in enumerate(steps):
        prefix = np.asarray([cached.token_ids[: position + 1]], dtype=np.int64)
        expected = monolithic_logits(monolithic, ModelInputs(pixel_values, prefix, np.ones_like(prefix)))
        assert_close(f"logits at step {position + 1}", step["logits"][0, -1], expected[0, -1], SPLIT_VS_MONOLITHIC)


def test_second_export_is_served_from_the_cache(tiny: LoadedModel, split: SplitModel, cache_dir: Path) -> None:
    mtimes = [split.vision.onnx_path.stat().st_mtime_ns, split.decoder.onnx_path.stat().st_mtime_ns]

    again = export_split_model(tiny, cache_dir)

    assert not split.vision.from_cache and not split.decoder.from_cache
    assert again.vision.from_cache and again.decoder.from_cache
    assert (again.vision.directory, again.decoder.directory) == (split.vision.directory, split.decoder.directory)
    assert [again.vision.onnx_path.stat().st_mtime_ns, again.decoder.onnx_path.stat().st_mtime_ns] == mtimes
    assert split.vision.directory.name.endswith("-vision") and split.decoder.directory.name.endswith("-decoder")
    assert again == dataclasses.replace(split, vision=again.vision, decoder=again.decoder)


def test_graphs_have_the_served_names_and_dynamic_axes(tiny: LoadedModel, split: SplitModel) -> None:
    for artifact in (split.vision, split.decoder):
        assert (
            onnx.load(str(artifact.onnx_path), load_external_data=False).ir_version
            <= max_ir_version_onnxruntime_loads()
        )
    vision = onnxruntime.InferenceSession(str(split.vision.onnx_path), providers=["CPUExecutionProvider"])
    decoder = onnxruntime.InferenceSession(str(split.decoder.onnx_path), providers=["CPUExecutionProvider"])
    layers, heads, head_dim = split.head_shape
    vocab = tiny.description.vocab_size

    assert [(i.name, i.type, i.shape) for i in vision.get_inputs()] == [
        (VISION_INPUT, "tensor(float)", ["batch", 3, 384, 384])
    ]
    cross_shape = ["batch", layers, heads, "patches", head_dim]
    assert [(o.name, o.type, o.shape) for o in vision.get_outputs()] == [
        (VISION_OUTPUTS[0], "tensor(float)", cross_shape),
        (VISION_OUTPUTS[1], "tensor(float)", cross_shape),
    ]
    assert [i.name for i in decoder.get_inputs()] == list(DECODER_INPUTS)
    assert [(i.name, i.type, i.shape) for i in decoder.get_inputs()] == [
        ("input_ids", "tensor(int64)", ["batch", "new_tokens"]),
        ("position_ids", "tensor(int64)", ["batch", "new_tokens"]),
        ("attention_mask", "tensor(int64)", ["batch", "present_len"]),
        ("cross_keys", "tensor(float)", cross_shape),
        ("cross_values", "tensor(float)", cross_shape),
        ("past_keys", "tensor(float)", ["batch", layers, heads, "past_len", head_dim]),
        ("past_values", "tensor(float)", ["batch", layers, heads, "past_len", head_dim]),
    ]
    assert [(o.name, o.shape) for o in decoder.get_outputs()] == [
        (DECODER_OUTPUTS[0], ["batch", "new_tokens", vocab]),
        (DECODER_OUTPUTS[1], ["batch", layers, heads, "present_len", head_dim]),
        (DECODER_OUTPUTS[2], ["batch", layers, heads, "present_len", head_dim]),
    ]


def test_first_step_takes_an_empty_past_and_the_cache_grows_one_token_per_step(
    tiny: LoadedModel, split: SplitModel, runners: tuple[RunVision, RunDecoder]
) -> None:
    run_vision, run_decoder = runners
    cross = run_vision(image(tiny, "coffee"))
    past_keys, past_values = empty_past(split, batch_size=1)
    assert past_keys.shape == (1, split.layer_count, split.head_count, 0, split.head_dim)

    token = tiny.description.special_tokens.bos_token_id
    shapes = []
    for _ in range(4):
        outputs = run_decoder(step_feeds(np.asarray([[token]], dtype=np.int64), cross, past_keys, past_values))
        shapes.append((outputs["logits"].shape, outputs["present_keys"].shape, outputs["present_values"].shape))
        # Each present holds the previous past unchanged, followed by the new token's keys/values.
        np.testing.assert_array_equal(outputs["present_keys"][:, :, :, : past_keys.shape[3]], past_keys)
        past_keys, past_values = outputs["present_keys"], outputs["present_values"]
        token = int(np.argmax(outputs["logits"][0, -1]))

    cache_shape = (1, split.layer_count, split.head_count)
    assert shapes == [
        ((1, 1, tiny.description.vocab_size), (*cache_shape, n, split.head_dim), (*cache_shape, n, split.head_dim))
        for n in (1, 2, 3, 4)
    ]


def test_several_new_tokens_after_a_cached_prefix_equal_one_full_pass(
    tiny: LoadedModel,
    split: SplitModel,
    runners: tuple[RunVision, RunDecoder],
    monolithic: onnxruntime.InferenceSession,
) -> None:
    """Batch 2, a 2-token prefill then 3 tokens at once: the causal mask and positions must follow past_len."""
    run_vision, run_decoder = runners
    pixel_values = preprocess([load_image("astronaut"), load_image("coffee")], tiny.description)
    cross = run_vision(pixel_values)
    input_ids = token_ids(tiny.description, batch_size=2, sequence_length=5)
    past_keys, past_values = empty_past(split, batch_size=2)

    prefill = run_decoder(step_feeds(input_ids[:, :2], cross, past_keys, past_values))
    rest = run_decoder(step_feeds(input_ids[:, 2:], cross, prefill["present_keys"], prefill["present_values"]))

    expected = monolithic_logits(monolithic, ModelInputs(pixel_values, input_ids, np.ones_like(input_ids)))
    assert rest["present_keys"].shape[3] == 5
    actual = np.concatenate([prefill["logits"], rest["logits"]], axis=1)
    assert_close("logits", actual, expected, SPLIT_VS_MONOLITHIC)


def test_captions_of_different_lengths_share_a_step_through_padding_and_positions(
    tiny: LoadedModel, split: SplitModel, runners: tuple[RunVision, RunDecoder]
) -> None:
    """In-flight batching's step: a caption 3 tokens in and one just started, decoded together with the newer one's
    cache padded at the front, give each the logits it gets alone. Without the padding mask or the per-row
    positions the newer row reads the other's padding slots or the wrong position embeddings."""
    run_vision, run_decoder = runners
    tokens = tiny.description.special_tokens
    older_image, newer_image = image(tiny, "astronaut"), image(tiny, "coffee")
    older = greedy_caption_cached(run_vision, run_decoder, older_image, tokens, split.head_shape, 4, ignore_eos=True)
    older_cross, newer_cross = run_vision(older_image), run_vision(newer_image)

    # The older caption's cache after its first 3 tokens (bos and 2 generated), alone.
    past_keys, past_values = empty_past(split, batch_size=1)
    for token in older.token_ids[:3]:
        step = run_decoder(step_feeds(np.asarray([[token]], dtype=np.int64), older_cross, past_keys, past_values))
        past_keys, past_values = step["present_keys"], step["present_values"]
    older_alone = run_decoder(
        step_feeds(np.asarray([[older.token_ids[3]]], dtype=np.int64), older_cross, past_keys, past_values)
    )
    newer_alone = run_decoder(
        step_feeds(np.asarray([[tokens.bos_token_id]], dtype=np.int64), newer_cross, *empty_past(split, 1))
    )

    padded = np.zeros_like(past_keys)
    together = run_decoder(
        {
            "input_ids": np.asarray([[older.token_ids[3]], [tokens.bos_token_id]], dtype=np.int64),
            "position_ids": np.asarray([[3], [0]], dtype=np.int64),
            "attention_mask": np.asarray([[1, 1, 1, 1], [0, 0, 0, 1]], dtype=np.int64),
            **{name: np.concatenate([older_cross[name], newer_cross[name]]) for name in VISION_OUTPUTS},
            "past_keys": np.concatenate([past_keys, padded + 7.0]),  # padding a wrong mask would let through
            "past_values": np.concatenate([past_values, padded - 3.0]),
        }
    )
    assert_close("older row", together["logits"][0], older_alone["logits"][0], SPLIT_VS_MONOLITHIC)
    assert_close("newer row", together["logits"][1], newer_alone["logits"][0], SPLIT_VS_MONOLITHIC)
    assert int(np.argmax(together["logits"][0, -1])) == older.token_ids[4]


def test_ignore_eos_decodes_past_the_end_token(
    tiny: LoadedModel,
    split: SplitModel,
    runners: tuple[RunVision, RunDecoder],
    monolithic: onnxruntime.InferenceSession,
) -> None:
    pixel_values = image(tiny, "astronaut")
    tokens = tiny.description.special_tokens
    free_running = greedy_caption_cached(*runners, pixel_values, tokens, split.head_shape, MAX_NEW_TOKENS)
    # The random tiny model never emits its real end token, so make a token it does emit mid-caption the end one.
    end_token = free_running.generated_ids[3]
    stops_after = free_running.generated_ids.index(end_token) + 1
    ending = dataclasses.replace(tokens, eos_token_id=end_token)

    stopped = greedy_caption_cached(*runners, pixel_values, ending, split.head_shape, MAX_NEW_TOKENS)
    ignored = greedy_caption_cached(*runners, pixel_values, ending, split.head_shape, MAX_NEW_TOKENS, ignore_eos=True)

    reference = greedy_caption(
        lambda inputs: monolithic_logits(monolithic, inputs), pixel_values, ending, MAX_NEW_TOKENS
    )
    assert stopped.token_ids == reference.token_ids
    assert stopped.generated_ids[-1] == end_token and len(stopped.generated_ids) == stops_after < MAX_NEW_TOKENS
    assert len(ignored.generated_ids) == len(ignored.step_latencies_ms) == MAX_NEW_TOKENS
    assert ignored.token_ids == free_running.token_ids


def test_one_image_at_a_time(tiny: LoadedModel, split: SplitModel, runners: tuple[RunVision, RunDecoder]) -> None:
    pixel_values = np.zeros((2, 3, 384, 384), dtype=np.float32)
    with pytest.raises(ValueError, match="takes one image, got a batch of 2"):
        greedy_caption_cached(*runners, pixel_values, tiny.description.special_tokens, split.head_shape)


def graph_tensors(onnx_path: Path) -> list[np.ndarray]:
    """Every weight a graph holds: its initializers and its Constant nodes' values."""
    graph = onnx.load(str(onnx_path)).graph
    constants = [a.t for node in graph.node if node.op_type == "Constant" for a in node.attribute if a.name == "value"]
    return [numpy_helper.to_array(tensor) for tensor in [*graph.initializer, *constants]]


def holds(tensors: list[np.ndarray], weight: np.ndarray) -> bool:
    """Whether a Linear's weight is among the tensors, as is or transposed (the exporter folds it into a MatMul)."""
    return any(np.array_equal(tensor, weight) or np.array_equal(tensor, weight.T) for tensor in tensors)


def test_the_cross_attention_projections_are_in_the_vision_graph_and_not_the_decoder(
    tiny: LoadedModel, split: SplitModel
) -> None:
    """The point of the split: a decoder step must not project the image's patches again."""
    vision_tensors, decoder_tensors = graph_tensors(split.vision.onnx_path), graph_tensors(split.decoder.onnx_path)
    attentions = cross_attentions_of(tiny.model.text_decoder)
    weights = {
        f"layer {index} {name}": getattr(attention, name).weight.detach().numpy()
        for index, attention in enumerate(attentions)
        for name in ("key", "value", "query")
    }
    projections = [name for name in weights if not name.endswith("query")]
    assert len(projections) == 2 * split.layer_count

    assert [name for name in projections if holds(decoder_tensors, weights[name])] == []
    assert [name for name in projections if holds(vision_tensors, weights[name])] == projections
    # The detector finds a cross-attention weight the decoder does keep: the query of the text tokens.
    queries = [name for name in weights if name.endswith("query")]
    assert [name for name in queries if holds(decoder_tensors, weights[name])] == queries

    projected = sum(
        getattr(a, name).weight.numel() + getattr(a, name).bias.numel() for a in attentions for name in ("key", "value")
    )
    vision_model_count = sum(p.numel() for p in tiny.model.vision_model.parameters())
    decoder_model_count = sum(p.numel() for p in tiny.model.text_decoder.parameters())
    assert (split.vision.parameter_count, split.decoder.parameter_count) == (
        vision_model_count + projected,
        decoder_model_count - projected,
    )


def test_the_vision_graph_outputs_the_keys_and_values_hf_cross_attention_caches(
    tiny: LoadedModel, runners: tuple[RunVision, RunDecoder]
) -> None:
    """Batch 2: HF's own first decoding step fills its cross-attention cache; the vision graph must output that."""
    run_vision, _ = runners
    pixel_values = preprocess([load_image("astronaut"), load_image("coffee")], tiny.description)
    start = np.full((2, 1), tiny.description.special_tokens.bos_token_id, dtype=np.int64)

    with torch.no_grad():
        image_embeds = tiny.model.vision_model(pixel_values=torch.from_numpy(pixel_values)).last_hidden_state
        outputs = tiny.model.text_decoder(
            input_ids=torch.from_numpy(start), encoder_hidden_states=image_embeds, use_cache=True
        )
    cross_cache = outputs.cache.cross_attention_cache
    expected = {
        "cross_keys": torch.stack([layer.keys for layer in cross_cache.layers], dim=1).numpy(),
        "cross_values": torch.stack([layer.values for layer in cross_cache.layers], dim=1).numpy(),
    }

    actual = run_vision(pixel_values)
    assert sorted(actual) == sorted(VISION_OUTPUTS)
    for name in VISION_OUTPUTS:
        assert actual[name].shape == expected[name].shape == (2, *cross_attention_shape(tiny))
        assert_close(name, actual[name], expected[name], TOLERANCES["onnxruntime_vs_pytorch"])


def cross_attention_shape(loaded: LoadedModel) -> tuple[int, int, int, int]:
    """(layers, heads, patches, head_dim): a [CLS] token and one per 16x16 patch."""
    text = loaded.description.config.text_config
    vision = loaded.description.config.vision_config
    patches = (loaded.description.image_size // vision.patch_size) ** 2 + 1
    heads = text.num_attention_heads
    return text.num_hidden_layers, heads, patches, text.hidden_size // heads


def test_the_kv_cache_goes_in_under_the_name_this_transformers_takes() -> None:
    class Current(torch.nn.Module):  # transformers 5.24
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs): ...

    class Older(torch.nn.Module):  # transformers 5.17: a `cache=` there landed in **kwargs, unread
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs): ...

    class Neither(torch.nn.Module):
        def forward(self, input_ids=None, **kwargs): ...

    assert cache_keyword(Current()) == "cache"
    assert cache_keyword(Older()) == "past_key_values"
    with pytest.raises(TypeError, match="neither `cache` nor `past_key_values`"):
        cache_keyword(Neither())


CAPTIONER_MODEL = Path(__file__).resolve().parents[1] / "model_repository" / "blip_caption" / "1" / "model.py"


@pytest.fixture
def captioner_model(monkeypatch: pytest.MonkeyPatch):
    """The captioner's model.py as a module. Its decoder and batch code never touch Triton; only the import of
    triton_python_backend_utils (which exists inside Triton's stub alone) needs a stand-in."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("blip_caption_model", CAPTIONER_MODEL)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_the_captioners_in_flight_batch_gives_each_caption_its_own_tokens(
    tiny: LoadedModel, split: SplitModel, runners: tuple[RunVision, RunDecoder], captioner_model
) -> None:
    """The served captioner's decoder and batch bookkeeping, step by step: captions join at steps 0, 3 and 5 and
    leave when done, so rows are padded, masked and cut; each row's tokens equal its caption decoded alone. On this
    tiny model (weights that make attention matter) a padding slot let through or a wrong position changes tokens."""
    run_vision, run_decoder = runners
    tokens = tiny.description.special_tokens
    decoder = captioner_model.InProcessDecoder(str(split.decoder.onnx_path), split.head_shape, "cpu", 0, 0)

    def caption(name: str, length: int):
        pixel_values = image(tiny, name)
        planned = captioner_model.Caption(None, None, pixel_values, length, True, tokens.bos_token_id)
        planned.cross_keys, planned.cross_values = (run_vision(pixel_values)[n] for n in VISION_OUTPUTS)
        return planned

    joins = {0: [caption("astronaut", 9)], 3: [caption("coffee", 4), caption("chelsea", 8)], 5: [caption("rocket", 6)]}
    active, batch, cache_lengths = [], None, []
    for step in range(30):
        staying = [c for c in active if len(c.generated) < c.max_new_tokens]
        joining = joins.get(step, [])
        if len(staying) < len(active) or joining:
            active = staying + joining
            if not active:
                break
            batch = decoder.regroup(batch, staying, joining)
            cache_lengths.append((batch.attention_mask.shape[1], max(len(c.generated) for c in active)))
        for planned, token in zip(active, decoder.step(batch).tolist(), strict=True):
            planned.emit(int(token))
            planned.next_token = int(token)

    everyone = [planned for group in joins.values() for planned in group]
    for planned in everyone:
        alone = greedy_caption_cached(
            run_vision, run_decoder, planned.pixel_values, tokens, split.head_shape, planned.max_new_tokens, True
        )
        assert tuple(planned.generated) == alone.generated_ids
    # the cache is cut to the longest row still decoding whenever the batch changes
    assert all(length == longest for length, longest in cache_lengths)
    assert len(cache_lengths) == 5  # 3 joins; coffee leaves at step 7, astronaut at 9, rocket at 11, chelsea at 11
