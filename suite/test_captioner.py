"""The split captioner served by Triton (BLS: vision encoder once, KV-cache decoder per token, tokens streamed)
generates exactly what HF generate() and the seed-style monolithic loop generate for the same image."""

from __future__ import annotations

import pytest

from blip_triton_bench.caption import CaptionerClient, greedy_caption
from blip_triton_bench.caption import main as caption_main
from blip_triton_bench.client import InferenceError
from blip_triton_bench.model import LoadedModel, generate_caption
from blip_triton_bench.reference import ReferenceSessions
from blip_triton_bench.servers.served import ServedVariant
from blip_triton_bench.workload import load_image, preprocess

pytestmark = pytest.mark.correctness

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def caption_outcomes() -> dict[str, dict[str, bool]]:
    """Per captioner, per image this module compared: whether its caption matched."""
    return {}


@pytest.mark.parametrize("image_name", ["astronaut", "coffee"])
def test_captioner_tokens_equal_generate_and_monolithic_loop(
    served_captioner: ServedVariant,
    loaded_model: LoadedModel,
    reference_sessions: ReferenceSessions,
    bench_session,
    caption_outcomes: dict[str, dict[str, bool]],
    image_name: str,
) -> None:
    outcomes = caption_outcomes.setdefault(served_captioner.name, {})
    outcomes[image_name] = False  # a miss unless every check below passes, whatever stops it
    try:
        _check_captioner_tokens(served_captioner, loaded_model, reference_sessions, bench_session, image_name)
        outcomes[image_name] = True
    finally:
        # the fraction of the images compared so far, so one failed image never leaves a 100 % match behind
        bench_session.caption_match[served_captioner.name] = sum(outcomes.values()) / len(outcomes)


def _check_captioner_tokens(
    served_captioner: ServedVariant,
    loaded_model: LoadedModel,
    reference_sessions: ReferenceSessions,
    bench_session,
    image_name: str,
) -> None:
    tokens = loaded_model.description.special_tokens
    pixel_values = preprocess([load_image(image_name)], loaded_model.description)
    with CaptionerClient(served_captioner.server.endpoints.grpc_url) as client:
        served = client.caption(served_captioner.name, pixel_values, tokens.bos_token_id, MAX_NEW_TOKENS)
    session = reference_sessions.for_export()
    monolithic = greedy_caption(
        lambda inputs: session.run(["logits"], inputs.as_dict())[0], pixel_values, tokens, MAX_NEW_TOKENS
    )

    expected = generate_caption(loaded_model, pixel_values, MAX_NEW_TOKENS)
    assert list(served.token_ids) == expected, "the captioner's tokens differ from HF generate()"
    assert list(monolithic.token_ids) == expected, "the monolithic loop's tokens differ from HF generate()"
    assert len(served.step_latencies_ms) == len(served.generated_ids)  # one streamed response per token
    bench_session.correctness.append(
        f"{served_captioner.name} on {image_name}: {len(served.generated_ids)} tokens, equal to generate() and to "
        "the monolithic loop"
    )


def test_captioner_streams_every_token_when_told_to_ignore_eos(
    served_captioner: ServedVariant, loaded_model: LoadedModel
) -> None:
    pixel_values = preprocess([load_image("chelsea")], loaded_model.description)
    with CaptionerClient(served_captioner.server.endpoints.grpc_url) as client:
        caption = client.caption(
            served_captioner.name, pixel_values, loaded_model.description.special_tokens.bos_token_id, 7, True
        )
    assert len(caption.generated_ids) == 7
    assert len(caption.step_latencies_ms) == 7
    assert all(latency >= 0 for latency in caption.step_latencies_ms)


def test_captioner_rejects_a_bad_request_with_a_message(
    served_captioner: ServedVariant, loaded_model: LoadedModel
) -> None:
    pixel_values = preprocess([load_image("chelsea")], loaded_model.description)
    with CaptionerClient(served_captioner.server.endpoints.grpc_url) as client:
        with pytest.raises(InferenceError, match="max_new_tokens is 0"):
            client.caption(served_captioner.name, pixel_values, 0, 0)
        # the stream and the model survive a failed request
        after = client.caption(served_captioner.name, pixel_values, 0, 2, True)
    assert len(after.generated_ids) == 2


def test_caption_command_streams_from_the_captioner(
    served_captioner: ServedVariant, loaded_model: LoadedModel, bench_options, capsys
) -> None:
    exit_code = caption_main(
        [
            "--url", served_captioner.server.endpoints.grpc_url,
            "--variant", served_captioner.name,
            "--model", bench_options.model,
            "--image", "coffee",
            "--max-new-tokens", str(MAX_NEW_TOKENS),
        ]
    )  # fmt: skip
    expected = generate_caption(
        loaded_model, preprocess([load_image("coffee")], loaded_model.description), MAX_NEW_TOKENS
    )
    assert exit_code == 0
    assert f"token ids: {expected}" in capsys.readouterr().out
