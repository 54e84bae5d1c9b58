"""The split captioner served by Triton (BLS: vision encoder once, KV-cache decoder per token, tokens streamed)
generates exactly what HF generate() and the seed-style monolithic loop generate for the same image."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from blip_triton_bench.captioning.caption import (
    CANCEL_REQUEST_CONFIG_KEY,
    CaptionerClient,
    cancel_parameter_of,
    greedy_caption,
    header_options,
)
from blip_triton_bench.captioning.caption import main as caption_main
from blip_triton_bench.load.client import InferenceError
from blip_triton_bench.model.reference import ReferenceSessions
from blip_triton_bench.model.source import LoadedModel, generate_caption
from blip_triton_bench.model.workload import SAMPLE_IMAGES, image_pixels
from blip_triton_bench.servers.served import ServedVariant

pytestmark = pytest.mark.correctness

MAX_NEW_TOKENS = 12
#: In-flight batching's slot count when a captioner's config does not set `max_active_captions`.
DEFAULT_MAX_ACTIVE_CAPTIONS = 8


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
        bench_session.record_caption_match(served_captioner.name, sum(outcomes.values()) / len(outcomes))


def _check_captioner_tokens(
    served_captioner: ServedVariant,
    loaded_model: LoadedModel,
    reference_sessions: ReferenceSessions,
    bench_session,
    image_name: str,
) -> None:
    tokens = loaded_model.description.special_tokens
    pixel_values = image_pixels(loaded_model.description, [image_name])
    with CaptionerClient.to_server(served_captioner.server) as client:
        served = client.caption(served_captioner.name, pixel_values, tokens.bos_token_id, MAX_NEW_TOKENS)
    session = reference_sessions.for_export()
    monolithic = greedy_caption(
        lambda inputs: session.run(["logits"], inputs.as_dict())[0], pixel_values, tokens, MAX_NEW_TOKENS
    )

    expected = generate_caption(loaded_model, pixel_values, MAX_NEW_TOKENS)
    assert list(served.token_ids) == expected, "the captioner's tokens differ from HF generate()"
    assert list(monolithic.token_ids) == expected, "the monolithic loop's tokens differ from HF generate()"
    assert len(served.step_latencies_ms) == len(served.generated_ids)  # one streamed response per token
    bench_session.record_correctness_line(
        f"{served_captioner.name} on {image_name}: {len(served.generated_ids)} tokens, equal to generate() and to "
        "the monolithic loop"
    )


def test_captioner_streams_every_token_when_told_to_ignore_eos(
    served_captioner: ServedVariant, loaded_model: LoadedModel
) -> None:
    pixel_values = image_pixels(loaded_model.description, ["chelsea"])
    with CaptionerClient.to_server(served_captioner.server) as client:
        caption = client.caption(
            served_captioner.name, pixel_values, loaded_model.description.special_tokens.bos_token_id, 7, True
        )
    assert len(caption.generated_ids) == 7
    assert len(caption.step_latencies_ms) == 7
    assert all(latency >= 0 for latency in caption.step_latencies_ms)


def test_captioner_rejects_a_bad_request_with_a_message(
    served_captioner: ServedVariant, loaded_model: LoadedModel
) -> None:
    pixel_values = image_pixels(loaded_model.description, ["chelsea"])
    with CaptionerClient.to_server(served_captioner.server) as client:
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
            *header_options(served_captioner.server.request_headers("grpc")),
        ]
    )  # fmt: skip
    expected = generate_caption(loaded_model, image_pixels(loaded_model.description, ["coffee"]), MAX_NEW_TOKENS)
    assert exit_code == 0
    assert f"token ids: {expected}" in capsys.readouterr().out


def max_active_captions(served_captioner: ServedVariant) -> int:
    parameter = served_captioner.variant.config.parameters.get("max_active_captions")
    return int(parameter.string_value) if parameter is not None else DEFAULT_MAX_ACTIVE_CAPTIONS


def test_concurrent_captions_of_different_images_each_equal_their_own_generate(
    served_captioner: ServedVariant, loaded_model: LoadedModel, bench_session
) -> None:
    """More captions than the captioner has slots, of different images and lengths: the first half is a few tokens
    in when the second half is asked for, so captions join the shared decoder step at different positions (their
    caches padded), leave it at different steps, and some wait for a slot; each still gets exactly its own image's
    generate() tokens."""
    count = max_active_captions(served_captioner) + 2
    bos = loaded_model.description.special_tokens.bos_token_id
    jobs = [(SAMPLE_IMAGES[index % len(SAMPLE_IMAGES)], MAX_NEW_TOKENS - index % 7) for index in range(count)]
    images = {name: image_pixels(loaded_model.description, [name]) for name, _ in jobs}
    first_half_started = threading.Event()
    first_half = threading.Barrier(count // 2, action=first_half_started.set)

    def caption(index: int) -> list[int]:
        name, length = jobs[index]
        with CaptionerClient.to_server(served_captioner.server) as client:
            if index >= count // 2:
                assert first_half_started.wait(timeout=120), "the first half's captions never got their first tokens"
            started = client.send(served_captioner.name, images[name], length)
            head = client.receive(served_captioner.name, bos, started, stop_after=2)
            if index < count // 2:
                first_half.wait(timeout=120)
            rest = client.receive(served_captioner.name, bos, started)
            return [*head.token_ids, *rest.generated_ids]

    with ThreadPoolExecutor(count) as pool:
        served = list(pool.map(caption, range(count)))
    expected = [generate_caption(loaded_model, images[name], length) for name, length in jobs]
    mismatched = [
        f"{name} ({length} tokens)" for (name, length), s, e in zip(jobs, served, expected, strict=True) if s != e
    ]
    assert not mismatched, f"concurrent captions differ from their own generate(): {', '.join(mismatched)}"
    assert len({tuple(ids) for ids in served}) > 1, "the images must caption differently for the check to mean much"
    bench_session.record_correctness_line(
        f"{served_captioner.name}: {count} concurrent captions of {len(images)} images, joining mid-caption, each "
        "equal to its own generate()"
    )


def test_a_cancelled_caption_frees_its_slot_and_disturbs_no_other(
    served_captioner: ServedVariant, loaded_model: LoadedModel
) -> None:
    """A client that stops a caption mid-way: its caption stops at the next step and leaves the batch, while a
    caption decoding beside it finishes with its own generate() tokens. Stopped with the captioner's cancel request,
    never by cancelling the gRPC call: on Triton 2.51 that can crash the server every other test shares
    (docs/disconnects.md; --disconnect-stress checks it on a server of its own)."""
    cancel_parameter = cancel_parameter_of(served_captioner.variant.config)
    if cancel_parameter is None:
        pytest.skip(
            f"{served_captioner.name} names no '{CANCEL_REQUEST_CONFIG_KEY}' in its config: it can only be stopped by "
            "a disconnect, which --disconnect-stress checks on a server of its own"
        )
    description = loaded_model.description
    longest = description.max_positions - 1
    bos = description.special_tokens.bos_token_id
    astronaut = image_pixels(description, ["astronaut"])
    with (
        CaptionerClient.to_server(served_captioner.server) as leaving,
        CaptionerClient.to_server(served_captioner.server) as staying,
    ):
        coffee = image_pixels(description, ["coffee"])
        started = leaving.send(served_captioner.name, coffee, longest, True, request_id="leaving")
        first_tokens = leaving.receive(served_captioner.name, bos, started, stop_after=3)
        other = staying.send(served_captioner.name, astronaut, MAX_NEW_TOKENS)
        discarded = leaving.abandon(served_captioner.name, "leaving", cancel_parameter)
        finished = staying.receive(served_captioner.name, bos, other)
        next_caption = leaving.caption(served_captioner.name, astronaut, bos, MAX_NEW_TOKENS)
    assert len(first_tokens.generated_ids) == 3
    assert 3 + discarded < longest, "the cancelled caption ran to its end instead of leaving its slot"
    assert list(finished.token_ids) == generate_caption(loaded_model, astronaut, MAX_NEW_TOKENS)
    assert next_caption.token_ids == finished.token_ids, "the stream that cancelled a caption captions on"
