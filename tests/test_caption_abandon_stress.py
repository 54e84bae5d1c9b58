"""A thousand captions abandoned at random steps on a server of their own: the shipped captioner's cancel
request keeps Triton 2.51 up, frees every slot, and leaves the captions beside it exact (docs/disconnects.md)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from blip_triton_bench.captioning.caption import CaptionerClient, cancel_parameter_of
from blip_triton_bench.captioning.disconnects import (
    AT_LAST_TOKEN,
    BEFORE_FIRST_TOKEN,
    CANCEL_REQUEST,
    MID_CAPTION,
    AbandonPlan,
    abandon_captions,
    captioner_slots,
    captions_cancelled,
)
from blip_triton_bench.model.source import LoadedModel, generate_caption
from blip_triton_bench.model.workload import load_image, preprocess
from blip_triton_bench.repository.variants import StagedRepository
from blip_triton_bench.servers.local import LocalProvider, LocalServer

pytestmark = [pytest.mark.server, pytest.mark.slow]

CAPTIONER = "blip_caption"
#: The crash this guards against came after 118 abandoned streams (docs/disconnects.md): a thousand leave an 8x
#: margin, and over 100 abandoned at each step (before the first token, mid-caption, at the last token).
ABANDONED = 1000
#: A slot is given back at the next decoder step; this only bounds a hang.
SLOTS_FREED_DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def captioner_server(
    staged_captioner: StagedRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    """A server of this module's own: no other test shares what a stress may do to it."""
    with LocalProvider(tmp_path_factory.mktemp("abandon-server")).start(staged_captioner.root) as server:
        for name in ("blip_caption_vision", "blip_caption_decoder", CAPTIONER):
            server.load_model(name)
        yield server


def metrics_text(server: LocalServer) -> str:
    return requests.get(server.endpoints.metrics_url, timeout=10).text


def wait_for_free_slots(server: LocalServer) -> tuple[int, int] | None:
    deadline = time.monotonic() + SLOTS_FREED_DEADLINE_S
    while (slots := captioner_slots(metrics_text(server), CAPTIONER)) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    return slots


def test_a_thousand_captions_cancelled_at_random_steps_leave_the_server_up_and_its_captions_exact(
    captioner_server: LocalServer, tiny_model: LoadedModel
) -> None:
    pixel_values = preprocess([load_image("astronaut")], tiny_model.description)
    expected = generate_caption(tiny_model, pixel_values, 12)
    plan = AbandonPlan(
        abandoned_captions=ABANDONED,
        how=CANCEL_REQUEST,
        leaving_clients=6,
        staying_clients=1,
        headers=captioner_server.request_headers("grpc"),
    )
    before = captions_cancelled(metrics_text(captioner_server), CAPTIONER).get(CANCEL_REQUEST, 0)

    outcome = abandon_captions(
        captioner_server.endpoints.grpc_url,
        CAPTIONER,
        pixel_values,
        expected,
        tiny_model.description.special_tokens.bos_token_id,
        plan,
        captioner_server.liveness,
    )

    assert outcome.survived, outcome.finding()
    assert "Signal (" not in captioner_server.log_text(), captioner_server.log_tail()
    assert outcome.abandoned == ABANDONED, outcome.client_errors[:5]
    assert not outcome.client_errors, outcome.client_errors[:5]
    assert all(
        outcome.abandoned_by_step.get(step, 0) > 100 for step in (BEFORE_FIRST_TOKEN, MID_CAPTION, AT_LAST_TOKEN)
    )
    assert outcome.staying_captions > 0
    assert not outcome.staying_mismatches, f"{expected=}: {outcome.staying_mismatches[:3]}"
    assert wait_for_free_slots(captioner_server) == (0, 0), "an abandoned caption kept its slot"
    stopped = captions_cancelled(metrics_text(captioner_server), CAPTIONER)[CANCEL_REQUEST] - before
    # Captions left before their end are stopped by the model; those whose cancel came after their last step were
    # already done, so fewer than all, and never more.
    assert 0 < stopped <= outcome.abandoned


def test_a_cancel_request_stops_its_caption_at_the_next_step_and_keeps_the_stream(
    captioner_server: LocalServer, tiny_model: LoadedModel
) -> None:
    description = tiny_model.description
    longest = description.max_positions - 1
    pixel_values = preprocess([load_image("coffee")], description)
    config = captioner_server.http_client().get_model_config(CAPTIONER)
    parameter = cancel_parameter_of(_config_message(config))
    assert parameter == "cancel_caption"
    with CaptionerClient(
        captioner_server.endpoints.grpc_url, headers=captioner_server.request_headers("grpc")
    ) as stream:
        started = stream.send(CAPTIONER, pixel_values, longest, ignore_eos=True, request_id="caption-1")
        head = stream.receive(CAPTIONER, description.special_tokens.bos_token_id, started, stop_after=2)
        discarded = stream.abandon(CAPTIONER, "caption-1", parameter)
        after = stream.caption(CAPTIONER, pixel_values, description.special_tokens.bos_token_id, 5)
    assert len(head.generated_ids) == 2
    assert 2 + discarded < longest, "the caption ran to its end instead of stopping"
    assert list(after.token_ids) == generate_caption(tiny_model, pixel_values, 5)
    assert wait_for_free_slots(captioner_server) == (0, 0)


def _config_message(config_json: dict):
    """The JSON model config from the HTTP client as Triton's protobuf message."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    return json_format.ParseDict(config_json, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
