"""Greedy captioning through Triton (one request per token, as the seed did) equals PyTorch's generate() of the
model the variant serves (the teacher, or the student for a student variant)."""

from __future__ import annotations

import pytest

from blip_triton_bench.captioning.caption import caption_through_triton, header_options
from blip_triton_bench.captioning.caption import main as caption_main
from blip_triton_bench.load.client import TritonInferClient
from blip_triton_bench.model.source import LoadedModel, generate_caption
from blip_triton_bench.model.workload import load_image, preprocess
from blip_triton_bench.servers.served import ServedVariant

pytestmark = pytest.mark.correctness

MAX_NEW_TOKENS = 12


@pytest.fixture
def exact_variant(served_variant: ServedVariant) -> ServedVariant:
    if served_variant.variant.runs_in_fp16:
        pytest.skip(
            f"{served_variant.name} runs in FP16: its greedy tokens are not expected to equal float32 "
            "generate() token for token"
        )
    if served_variant.variant.artifact == "int8":
        pytest.skip(
            f"{served_variant.name} is quantized to INT8: its tokens are measured against FP32 (top-1 agreement, "
            "logit cosine) in test_accuracy.py, not asserted equal"
        )
    return served_variant


@pytest.fixture
def generating_model(exact_variant: ServedVariant, model_artifacts) -> LoadedModel:
    """The PyTorch model the variant's artifact was exported from."""
    return model_artifacts.student() if exact_variant.variant.artifact == "student" else model_artifacts.teacher


@pytest.mark.parametrize("image_name", ["astronaut", "coffee"])
def test_triton_greedy_caption_equals_generate(
    exact_variant: ServedVariant, generating_model: LoadedModel, image_name: str
) -> None:
    description = generating_model.description
    pixel_values = preprocess([load_image(image_name)], description)
    with TritonInferClient.to_server(exact_variant.server) as client:
        caption = caption_through_triton(client, exact_variant.name, description, pixel_values, MAX_NEW_TOKENS)

    expected = generate_caption(generating_model, pixel_values, MAX_NEW_TOKENS)
    assert list(caption.token_ids) == expected
    assert len(caption.step_latencies_ms) == len(caption.generated_ids)


def test_caption_command_prints_generate_tokens(
    exact_variant: ServedVariant, generating_model: LoadedModel, bench_options, capsys
) -> None:
    exit_code = caption_main(
        [
            "--url", exact_variant.server.endpoints.http_url,
            "--protocol", "http",
            "--variant", exact_variant.name,
            "--model", generating_model.description.spec.source,
            "--image", "chelsea",
            "--max-new-tokens", str(MAX_NEW_TOKENS),
            *header_options(exact_variant.server.request_headers("http")),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    expected = generate_caption(
        generating_model, preprocess([load_image("chelsea")], generating_model.description), MAX_NEW_TOKENS
    )
    assert exit_code == 0
    assert f"token ids: {expected}" in printed
