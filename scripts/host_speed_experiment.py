"""Issue 25 item 4, direction 1, measured: does a fixed in-process CPU probe follow the served throughput's drift?

Loaded as a pytest plugin into one suite run, it takes over the level's measurement: after a warm-up it alternates a
0.4 s probe (a fixed ONNX Runtime MLP plus interpreter-bound Python, nothing a model repository or a server can
change) with a 2 s served segment of the level, HOST_SPEED_SEGMENTS times, and writes (probe before, infer/s,
probe after) per segment to HOST_SPEED_OUT. `analyse` then says how far the probe explains the served throughput:
per segment, and over blocks of 10 segments (the length of a short run), raw against calibrated (infer/s divided by
the probe).

    PYTHONPATH=docs HOST_SPEED_THREADS=1 HOST_SPEED_SEGMENTS=70 HOST_SPEED_OUT=/tmp/probe-1.json \
        .venv/bin/pytest -p host_speed_experiment -p no:cacheprovider -q suite/test_perf.py --model tiny \
        --server local --variant base_model_cpu --concurrency 1 --baseline-dir /tmp/probe/b --report-dir /tmp/probe/r
    .venv/bin/python scripts/host_speed_experiment.py analyse /tmp/probe-1.json

Results: docs/measurements.md, "A host-speed probe does not follow the served throughput".
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

PROBE_S = 0.4
SEGMENT_S = 2.0
UNITS_PER_SAMPLE = 8
BLOCK = 10


def probe_unit(threads: int) -> Callable[[], None]:
    """One unit of fixed work: an ONNX Runtime run of a seeded 4-layer MLP (batch 32, width 384) and a Python step."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(20261206)
    nodes, weights, current = [], [], "x"
    for layer in range(4):
        weights.append(numpy_helper.from_array(rng.standard_normal((384, 384)).astype(np.float32) / 20, f"w{layer}"))
        nodes += [
            helper.make_node("MatMul", [current, f"w{layer}"], [f"m{layer}"]),
            helper.make_node("Relu", [f"m{layer}"], [f"h{layer}"]),
        ]
        current = f"h{layer}"
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 384])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [None, 384])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"x": rng.standard_normal((32, 384)).astype(np.float32)}

    def unit() -> None:
        session.run(None, feeds)
        table: dict[int, int] = {}
        for index in range(4000):
            table[index % 97] = table.get(index % 97, 0) + index * 3

    unit()
    return unit


def probe(unit: Callable[[], None]) -> float:
    """Units per second: the median over samples of UNITS_PER_SAMPLE units, for PROBE_S seconds."""
    rates: list[float] = []
    deadline = time.perf_counter() + PROBE_S
    while len(rates) < 5 or time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(UNITS_PER_SAMPLE):
            unit()
        rates.append(UNITS_PER_SAMPLE / (time.perf_counter() - started))
    return statistics.median(rates)


def pytest_configure(config) -> None:
    from blip_triton_bench.runs import perf

    measure_level = perf.measure_level
    threads = int(os.environ.get("HOST_SPEED_THREADS", "1"))
    segments = int(os.environ.get("HOST_SPEED_SEGMENTS", "70"))
    out = Path(os.environ["HOST_SPEED_OUT"])

    def alternating(url, model_name, inputs, level, settings, liveness=None, workers=None):
        unit = probe_unit(threads)
        segment = replace(
            settings, window_s=SEGMENT_S, warmup_s=0.3, max_windows=1, stability_windows=1, min_requests_per_window=1
        )
        measure_level(url, model_name, inputs, level, replace(segment, warmup_s=2.0))
        rows = []
        for _ in range(segments):
            before = probe(unit)
            served = measure_level(url, model_name, inputs, level, segment).summary.throughput_infer_per_s
            rows.append({"probe_before": before, "infer_per_s": served, "probe_after": probe(unit)})
        out.write_text(json.dumps({"threads": threads, "segments": rows}, indent=1))
        return measure_level(url, model_name, inputs, level, settings, liveness, workers)

    perf.measure_level = alternating


def analyse(path: Path) -> None:
    data = json.loads(path.read_text())
    rows = data["segments"]
    served = np.array([row["infer_per_s"] for row in rows])
    reference = np.array([math.sqrt(row["probe_before"] * row["probe_after"]) for row in rows])
    calibrated = served / reference

    def cv(values: np.ndarray) -> float:
        return float(values.std() / values.mean() * 100)

    blocks = len(served) // BLOCK
    raw_blocks = np.array([np.median(served[i * BLOCK : (i + 1) * BLOCK]) for i in range(blocks)])
    cal_blocks = np.array([np.median(calibrated[i * BLOCK : (i + 1) * BLOCK]) for i in range(blocks)])

    def block_range(values: np.ndarray) -> float:
        return float((values.max() - values.min()) / values.mean() * 100)

    slope = np.polyfit(np.log(reference), np.log(served), 1)[0]
    print(f"{path}: probe threads {data['threads']}, {len(served)} segments of {SEGMENT_S:g} s")
    print(f"  served infer/s median {np.median(served):.1f}, cv {cv(served):.1f} %; probe cv {cv(reference):.1f} %")
    print(f"  correlation of log served with log probe {np.corrcoef(np.log(served), np.log(reference))[0, 1]:.2f}")
    print(f"  elasticity (log-log slope) {slope:.2f}; calibrated cv {cv(calibrated):.1f} % vs raw {cv(served):.1f} %")
    print(
        f"  {blocks} blocks of {BLOCK}: range of block medians raw {block_range(raw_blocks):.1f} %, "
        f"calibrated {block_range(cal_blocks):.1f} %"
    )


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "analyse":
        sys.exit(f"usage: {sys.argv[0]} analyse RESULTS.json")
    analyse(Path(sys.argv[2]))
