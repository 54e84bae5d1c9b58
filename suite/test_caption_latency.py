"""Caption latency both ways Triton can serve BLIP, same run, same machine: the monolithic model driven one
request per token from the client, and a captioner decoding server-side with a KV cache, tokens streamed.

genai-perf's metrics (request latency per caption, time to first token, inter-token latency, output tokens/s)
over --caption-repeats captions of --caption-tokens tokens (end token ignored), judged against the baseline.
"""

from __future__ import annotations

import pytest

from blip_triton_bench.captioning.caption import Caption, CaptionerClient, caption_through_triton
from blip_triton_bench.captioning.latency import CAPTION_LEVEL, IN_PROCESS_WAY, CaptionLatency, in_process_key
from blip_triton_bench.fixtures.verdicts import enforce_measured_numbers
from blip_triton_bench.judging.proof import Judgement
from blip_triton_bench.load.client import TritonInferClient
from blip_triton_bench.model.source import ModelDescription
from blip_triton_bench.model.workload import image_pixels
from blip_triton_bench.runs.perf import PerfRun
from blip_triton_bench.servers.served import ServedVariant

pytestmark = pytest.mark.perf

IMAGE = "astronaut"


def judge(
    latency: CaptionLatency, served: ServedVariant, perf_run: PerfRun, bench_session, judgement: Judgement
) -> None:
    assert all(len(caption.generated_ids) == latency.output_tokens for caption in latency.captions)
    bench_session.record_caption_latency(latency)
    enforce_measured_numbers(perf_run, judgement, served.variant, latency.metrics(), CAPTION_LEVEL)


def test_monolithic_caption_latency(
    served_variant: ServedVariant,
    model_description: ModelDescription,
    bench_options,
    perf_run: PerfRun,
    bench_session,
    judgement: Judgement,
) -> None:
    pixel_values = image_pixels(model_description, [IMAGE])
    with TritonInferClient.to_server(served_variant.server) as client:
        caption_through_triton(client, served_variant.name, model_description, pixel_values, 2, True)  # warm-up
        captions = tuple(
            caption_through_triton(
                client, served_variant.name, model_description, pixel_values, bench_options.caption_tokens, True
            )
            for _ in range(bench_options.caption_repeats)
        )
    latency = CaptionLatency(served_variant.name, "monolithic (one request per token)", captions)
    judge(latency, served_variant, perf_run, bench_session, judgement)


def test_captioner_caption_latency(
    served_captioner: ServedVariant,
    model_description: ModelDescription,
    bench_options,
    perf_run: PerfRun,
    bench_session,
    judgement: Judgement,
) -> None:
    pixel_values = image_pixels(model_description, [IMAGE])
    bos = model_description.special_tokens.bos_token_id
    with CaptionerClient.to_server(served_captioner.server, bench_options.request_timeout_s) as client:
        client.caption(served_captioner.name, pixel_values, bos, 2, True)  # warm-up
        captions = tuple(
            client.caption(served_captioner.name, pixel_values, bos, bench_options.caption_tokens, True)
            for _ in range(bench_options.caption_repeats)
        )
    way = "captioner (streamed)" if served_captioner.variant.decoupled else "captioner (one response)"
    judge(CaptionLatency(served_captioner.name, way, captions), served_captioner, perf_run, bench_session, judgement)


def test_in_process_decoder_floor(
    served_captioner: ServedVariant,
    model_artifacts,
    model_description: ModelDescription,
    bench_options,
    bench_session,
    judgement: Judgement,
) -> None:
    """What the captioner's inter-token latency is held to, same run: the same split encoder and decoder step in this
    process (ONNX Runtime, no server, no transfer), for captions as long as the served ones. Not judged against a
    baseline: it is the floor the report compares the served numbers with."""
    from blip_triton_bench.model.split_export import greedy_caption_cached, onnxruntime_runners

    split = model_artifacts.split()
    runners = onnxruntime_runners(split)
    pixel_values = image_pixels(model_description, [IMAGE])
    tokens = model_description.special_tokens
    greedy_caption_cached(*runners, pixel_values, tokens, split.head_shape, 2, True)  # warm-up
    captions = []
    for _ in range(bench_options.caption_repeats):
        cached = greedy_caption_cached(
            *runners, pixel_values, tokens, split.head_shape, bench_options.caption_tokens, True
        )
        first = cached.encoder_ms + cached.step_latencies_ms[0]
        captions.append(Caption(cached.token_ids, (first, *cached.step_latencies_ms[1:])))
    latency = CaptionLatency(in_process_key(served_captioner.name), IN_PROCESS_WAY, tuple(captions))
    assert latency.output_tokens == bench_options.caption_tokens
    bench_session.record_caption_latency(latency)
    judgement.measured("", "the in-process decoder step the served inter-token latency is compared with")
