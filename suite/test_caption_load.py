"""Captioning as a service, genai-perf's way: streamed caption requests at each --caption-concurrency (closed loop)
and --caption-request-rate (open loop) level, measured in windows after a warm-up, judged against the baseline.

Per level: output tokens/s, captions/s, time to first token, inter-token latency and request latency (p50, p90,
p99). Every caption asks for --caption-tokens tokens with the end token ignored, so every caption is as long and
one that comes back shorter, with other tokens than the same image captioned alone, or fails, fails the level.
"""

from __future__ import annotations

import warnings

import pytest

from blip_triton_bench.captioning.load import caption_request_alone, measure_caption_level
from blip_triton_bench.fixtures.verdicts import enforce_measured_numbers
from blip_triton_bench.judging.proof import Judgement
from blip_triton_bench.judging.slo import CAPTION_QUANTITIES
from blip_triton_bench.load.engine import LoadLevel
from blip_triton_bench.model.source import ModelDescription
from blip_triton_bench.model.workload import image_pixels
from blip_triton_bench.runs.perf import PerfRun, UnstableMeasurement
from blip_triton_bench.servers.served import ServedVariant

pytestmark = pytest.mark.perf

IMAGE = "astronaut"


def test_caption_load(
    served_captioner: ServedVariant,
    caption_load_level: LoadLevel,
    model_description: ModelDescription,
    bench_options,
    perf_run: PerfRun,
    bench_session,
    judgement: Judgement,
) -> None:
    url, tokens = served_captioner.server.endpoints.grpc_url, bench_options.caption_tokens
    pixel_values = image_pixels(model_description, [IMAGE])
    # the caption every one under load must equal (alone: see test_captioner.py)
    headers = served_captioner.server.request_headers("grpc")
    timeout_s = perf_run.settings.load.request_timeout_s
    request = caption_request_alone(url, served_captioner.name, pixel_values, tokens, headers, timeout_s)
    measurement = measure_caption_level(url, request, caption_load_level, perf_run.settings.load)
    bench_session.record_caption_load(served_captioner.name, measurement)
    errors = measurement.errors
    assert not errors, f"{len(errors)} caption(s) failed under {caption_load_level.level_id}; the first: {errors[0]}"
    assert measurement.captions, (
        f"no caption ended in the measured windows of {caption_load_level.level_id}; lengthen --window-s"
    )
    if not measurement.stability.stable:
        warnings.warn(
            UnstableMeasurement(
                f"{served_captioner.name} {caption_load_level.level_id}: {measurement.stability.reason}"
            ),
            stacklevel=1,
        )
    outcomes, judged_s = measurement.slo_outcomes()
    slo = perf_run.service_level_result(served_captioner.variant, outcomes, judged_s, CAPTION_QUANTITIES, "captions")
    unstable = "" if measurement.stability.stable else measurement.stability.reason or "its windows never settled"
    enforce_measured_numbers(
        perf_run, judgement, served_captioner.variant, measurement.metrics(), caption_load_level.level_id, slo, unstable
    )
