"""What a caption costs on this host, in process (ONNX Runtime, no server): the split vision pass and one KV-cache
decoder step at batch 1, 2 and 4, medians. These bound what in-flight batching can give at caption concurrency N:
N captions need N vision passes (compute-bound: no cheaper per image in a batch on a CPU) and share their decoder
steps, so output tokens/s at N over 1 is at most

    (vision(1) + tokens * step(1)) / (vision(N) / N + tokens * step(N) / N)

    .venv/bin/python scripts/caption_step_costs.py --model base --tokens 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime

from blip_triton_bench.host.files import default_cache_dir
from blip_triton_bench.model.source import ModelSpec, load_model
from blip_triton_bench.model.split_export import VISION_OUTPUTS, export_split_model

BATCHES = (1, 2, 4)
PAST_LENGTH = 10  # a step halfway through a 20-token caption


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = parser.parse_args()
    split = export_split_model(load_model(ModelSpec(args.model)), args.cache_dir)
    providers = ["CPUExecutionProvider"]
    vision = onnxruntime.InferenceSession(str(split.vision.onnx_path), providers=providers)
    decoder = onnxruntime.InferenceSession(str(split.decoder.onnx_path), providers=providers)
    layers, heads, head_dim = split.head_shape
    size = 384
    costs = {}
    for batch in BATCHES:
        pixel_values = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
        cross = dict(zip(VISION_OUTPUTS, vision.run(list(VISION_OUTPUTS), {"pixel_values": pixel_values}), strict=True))
        past = np.zeros((batch, layers, heads, PAST_LENGTH, head_dim), dtype=np.float32)
        feeds = {
            "input_ids": np.ones((batch, 1), dtype=np.int64),
            "position_ids": np.full((batch, 1), PAST_LENGTH, dtype=np.int64),
            "attention_mask": np.ones((batch, PAST_LENGTH + 1), dtype=np.int64),
            **cross,
            "past_keys": past,
            "past_values": past,
        }
        vision_ms = median_ms(lambda pv=pixel_values: vision.run(None, {"pixel_values": pv}), 3)
        step_ms = median_ms(lambda f=feeds: decoder.run(None, f), 10)
        costs[batch] = (vision_ms, step_ms)
        print(f"batch {batch}: vision pass {vision_ms:.0f} ms, decoder step {step_ms:.1f} ms")
    one_vision, one_step = costs[1]
    for batch in BATCHES[1:]:
        vision_ms, step_ms = costs[batch]
        bound = (one_vision + args.tokens * one_step) / (vision_ms / batch + args.tokens * step_ms / batch)
        decode_gain = batch * one_step / step_ms
        print(
            f"concurrency {batch}: decoder tokens/s {decode_gain:.2f}x batch 1's; a {args.tokens}-token caption's "
            f"output tokens/s at most {bound:.2f}x concurrency 1's"
        )


if __name__ == "__main__":
    main()
