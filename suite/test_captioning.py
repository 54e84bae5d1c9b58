"""Greedy captioning through Triton (one request per token, as the seed did) equals PyTorch's generate()."""

from __future__ import annotations

import pytest
import torch

from fixtures.caption import caption_through_triton
from fixtures.caption import main as caption_main
from fixtures.client import TritonInferClient
from fixtures.model import LoadedModel
from fixtures.plugin import ServedVariant
from fixtures.workload import load_image, preprocess

pytestmark = pytest.mark.correctness

MAX_NEW_TOKENS = 12


def generate_greedy(loaded_model: LoadedModel, pixel_values) -> list[int]:
    with torch.no_grad():
        generated = loaded_model.model.generate(
            pixel_values=torch.from_numpy(pixel_values),
            do_sample=False,
            num_beams=1,
            max_new_tokens=MAX_NEW_TOKENS,
            repetition_penalty=1.0,
        )
    return generated[0].tolist()


@pytest.fixture
def exact_variant(served_variant: ServedVariant) -> ServedVariant:
    if served_variant.variant.runs_in_fp16:
        pytest.skip(
            f"{served_variant.name} runs in FP16: its greedy tokens are not expected to equal float32 "
            "generate() token for token"
        )
    return served_variant


@pytest.mark.parametrize("image_name", ["astronaut", "coffee"])
def test_triton_greedy_caption_equals_generate(
    exact_variant: ServedVariant, loaded_model: LoadedModel, image_name: str
) -> None:
    description = loaded_model.description
    pixel_values = preprocess([load_image(image_name)], description)
    with TritonInferClient(exact_variant.server.endpoints.grpc_url, "grpc") as client:
        caption = caption_through_triton(client, exact_variant.name, description, pixel_values, MAX_NEW_TOKENS)

    expected = generate_greedy(loaded_model, pixel_values)
    assert list(caption.token_ids) == expected
    assert len(caption.step_latencies_ms) == len(caption.generated_ids)


def test_caption_command_prints_generate_tokens(
    exact_variant: ServedVariant, loaded_model: LoadedModel, bench_options, capsys
) -> None:
    exit_code = caption_main(
        [
            "--url", exact_variant.server.endpoints.http_url,
            "--protocol", "http",
            "--variant", exact_variant.name,
            "--model", bench_options.model,
            "--image", "chelsea",
            "--max-new-tokens", str(MAX_NEW_TOKENS),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    expected = generate_greedy(loaded_model, preprocess([load_image("chelsea")], loaded_model.description))
    assert exit_code == 0
    assert f"token ids: {expected}" in printed
