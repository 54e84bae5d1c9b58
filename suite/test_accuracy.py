"""What each variant costs in accuracy against the FP32 teacher, on real images: top-1 token agreement and
logit cosine similarity (teacher-forced), and greedy-caption exact match.

Variants served with a lossy artifact (INT8, a student) are measured, not held to FP32 tolerance; the
thresholds they must meet live in blip_triton_bench/judging/correctness.py (AGREEMENT_THRESHOLDS) with the reason for each.
"""

from __future__ import annotations

import numpy as np
import pytest

from blip_triton_bench.captioning.caption import caption_through_triton, greedy_caption
from blip_triton_bench.judging.agreement import caption_exact_match, check_agreement
from blip_triton_bench.judging.correctness import AGREEMENT_THRESHOLDS, threshold_for_artifact
from blip_triton_bench.judging.proof import Judgement
from blip_triton_bench.load.client import TritonInferClient
from blip_triton_bench.model.reference import ReferenceSessions
from blip_triton_bench.model.source import ModelDescription
from blip_triton_bench.model.workload import ModelInputs, image_pixels, token_ids
from blip_triton_bench.options import BenchOptions
from blip_triton_bench.servers.served import ServedVariant

pytestmark = pytest.mark.correctness

IMAGES = ("astronaut", "coffee", "chelsea")
SEQUENCE_LENGTH = 16
CAPTION_TOKENS = 8


@pytest.fixture(scope="session")
def accuracy_inputs(model_description: ModelDescription) -> list[ModelInputs]:
    """One request per real image, with teacher-forced token ids starting at the start token."""
    requests = []
    for index, name in enumerate(IMAGES):
        ids = token_ids(model_description, 1, SEQUENCE_LENGTH, seed=index)
        ids[:, 0] = model_description.special_tokens.bos_token_id
        requests.append(ModelInputs(image_pixels(model_description, [name]), ids, np.ones_like(ids)))
    return requests


@pytest.fixture(scope="session")
def teacher_captions(
    reference_sessions: ReferenceSessions, model_description: ModelDescription
) -> list[tuple[int, ...]]:
    """The FP32 teacher's greedy captions of IMAGES, in process."""
    session = reference_sessions.for_export()
    return [
        greedy_caption(
            lambda inputs: session.run(["logits"], inputs.as_dict())[0],
            image_pixels(model_description, [name]),
            model_description.special_tokens,
            CAPTION_TOKENS,
        ).token_ids
        for name in IMAGES
    ]


def test_accuracy_against_fp32_teacher(
    served_variant: ServedVariant,
    reference_sessions: ReferenceSessions,
    model_description: ModelDescription,
    accuracy_inputs: list[ModelInputs],
    teacher_captions: list[tuple[int, ...]],
    bench_session,
    bench_options: BenchOptions,
    judgement: Judgement,
) -> None:
    teacher = reference_sessions.for_export()
    with TritonInferClient.to_server(served_variant.server, "grpc", bench_options.request_timeout_s) as client:
        served = np.concatenate([client.infer(served_variant.name, inputs) for inputs in accuracy_inputs])
        captions = [
            caption_through_triton(client, served_variant.name, model_description, inputs.pixel_values, CAPTION_TOKENS)
            for inputs in accuracy_inputs
        ]
    expected = np.concatenate([teacher.run(["logits"], inputs.as_dict())[0] for inputs in accuracy_inputs])
    match = caption_exact_match([caption.token_ids for caption in captions], teacher_captions)

    threshold_name = threshold_for_artifact(served_variant.variant.artifact)
    threshold = AGREEMENT_THRESHOLDS[threshold_name] if threshold_name else None
    bench_session.record_caption_match(served_variant.name, match)
    agreement = check_agreement(f"{served_variant.name} logits vs FP32 teacher", served, expected, threshold)
    bench_session.record_accuracy(served_variant.name, agreement)
    bench_session.record_correctness_line(
        f"{served_variant.name} vs FP32 teacher ({served_variant.variant.artifact}): {agreement.describe()}; "
        f"caption exact match {match:.0%} over {len(IMAGES)} images"
        + (f" (threshold '{threshold_name}')" if threshold_name else " (measured; no threshold for this artifact)")
    )
    if threshold_name is None:  # measured for the pick-a-variant table: with no threshold it could not have failed
        judgement.not_judged("", f"no agreement threshold for {served_variant.variant.artifact} artifacts: measured")
