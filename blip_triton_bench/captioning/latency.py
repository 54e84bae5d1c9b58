"""Caption latency as genai-perf names it: request latency per caption, time to first token, inter-token
latency and output token throughput, summarised over repeated captions of one image.

Plain numbers in, plain numbers out; the suite's caption benchmark feeds it Captions from either serving way.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from blip_triton_bench.captioning.caption import Caption
from blip_triton_bench.judging.stats import spread_pct

#: The baseline level the caption numbers are stored and judged under.
CAPTION_LEVEL = "caption"
#: The same split encoder and decoder steps run in the test process: the floor a served captioner is compared with.
IN_PROCESS_WAY = "in process (ONNX Runtime, no server)"


def in_process_key(captioner: str) -> str:
    return f"{captioner} in process"


@dataclass(frozen=True)
class CaptionLatency:
    """Repeated captions of one image by one variant, each of the same length."""

    variant: str
    way: str  # "monolithic (one request per token)" or "captioner (streamed)"
    captions: tuple[Caption, ...]

    def __post_init__(self) -> None:
        if not self.captions:
            raise ValueError("CaptionLatency needs at least one caption")

    @property
    def output_tokens(self) -> int:
        return len(self.captions[0].generated_ids)

    @property
    def caption_ms(self) -> tuple[float, ...]:
        return tuple(sum(caption.step_latencies_ms) for caption in self.captions)

    @property
    def time_to_first_token_ms(self) -> tuple[float, ...]:
        return tuple(caption.step_latencies_ms[0] for caption in self.captions)

    @property
    def inter_token_latency_ms(self) -> tuple[float, ...]:
        """genai-perf's: (request latency - time to first token) / (output tokens - 1), per caption."""
        return tuple(
            (sum(caption.step_latencies_ms) - caption.step_latencies_ms[0]) / (len(caption.step_latencies_ms) - 1)
            for caption in self.captions
            if len(caption.step_latencies_ms) > 1
        )

    def metrics(self) -> dict[str, float]:
        caption_ms = self.caption_ms
        ttft_ms = self.time_to_first_token_ms
        itl_ms = self.inter_token_latency_ms
        median_caption_ms = statistics.median(caption_ms)
        metrics = {
            "caption_ms": median_caption_ms,
            "caption_spread_pct": spread_pct(caption_ms),
            "time_to_first_token_ms": statistics.median(ttft_ms),
            "time_to_first_token_spread_pct": spread_pct(ttft_ms),
            "output_token_throughput_per_s": self.output_tokens / (median_caption_ms / 1000.0),
            "output_token_throughput_spread_pct": spread_pct(caption_ms),  # the same captions' spread, inverted
            "output_tokens": float(self.output_tokens),
        }
        if itl_ms:
            metrics["inter_token_latency_ms"] = statistics.median(itl_ms)
            metrics["inter_token_latency_spread_pct"] = spread_pct(itl_ms)
        return metrics


def speedup(faster: CaptionLatency, slower: CaptionLatency) -> float:
    """How many times faster `faster` captions than `slower` (median caption latency, same token count)."""
    if faster.output_tokens != slower.output_tokens:
        raise ValueError(
            f"{faster.variant} generated {faster.output_tokens} tokens and {slower.variant} {slower.output_tokens}: "
            "caption latencies compare only at equal length"
        )
    return statistics.median(slower.caption_ms) / statistics.median(faster.caption_ms)


def inter_token_floor_lines(latencies: Mapping[str, CaptionLatency]) -> list[str]:
    """Per captioner measured in process too: its served inter-token latency over the in-process decoder step's."""
    lines = []
    for name, served in latencies.items():
        floor = latencies.get(in_process_key(name))
        if floor is None or served.way == IN_PROCESS_WAY:
            continue
        served_itl, floor_itl = (
            served.metrics().get("inter_token_latency_ms"),
            floor.metrics().get("inter_token_latency_ms"),
        )
        if served_itl is None or not floor_itl:
            continue
        lines.append(
            f"{name}: inter-token latency {served_itl:.1f} ms, {served_itl / floor_itl:.2f}x the decoder step in process "
            f"({floor_itl:.1f} ms; medians, same run)"
        )
    return lines
