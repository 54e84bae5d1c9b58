"""Load generation against a real server: closed loop vs open loop on a model with a known service time.

An open-loop client that offers more than the server can do must see the queue in its latencies (they
count from each request's scheduled send time), and report an achieved rate below the offered one.

The model sleeps a fixed SERVICE_MS per execution, one request per execution on one instance, so every
bound asserted here follows from that service time alone, whatever the host's speed or load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from blip_triton_bench.load.engine import (
    CONCURRENCY,
    REQUEST_RATE,
    LoadLevel,
    LoadSettings,
    measure_level,
    open_loop_in_flight_cap,
)
from blip_triton_bench.model.workload import ModelInputs
from blip_triton_bench.servers.local import LocalProvider, LocalServer

pytestmark = [pytest.mark.server, pytest.mark.serial]  # its checks compare rates with the measured service rate

SERVICE_MS = 20.0
VOCAB = 8
SETTINGS = LoadSettings(window_s=1.0, warmup_s=0.5, max_windows=4, min_requests_per_window=1)
SERVICE_RATE_PER_S = 1000.0 / SERVICE_MS  # one instance, one request per execution
#: The most completions per second a window can show. The server completes one per SERVICE_MS (plus one
#: already executing when the window opened), but the client stamps a completion when its event loop gets
#: to it, and a loop busy sending hundreds of requests a second gets to them late and in bursts: a window
#: may also hold up to a window's worth of earlier completions.
MAX_OBSERVED_RATE_PER_S = 2 * SERVICE_RATE_PER_S + 1.0 / SETTINGS.window_s
#: Offered in the overload level, as a multiple of the service rate: above MAX_OBSERVED_RATE_PER_S, so the
#: achieved rate is below the offered one by construction. Larger only lengthens the drain after the level.
OVERLOAD = 3.0
#: Below the service rate with room for the client's and the server's own per-request overhead.
UNDERLOAD = 0.3

CONFIG = f"""
name: "fixed"
backend: "python"
max_batch_size: 8
input [
  {{ name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, 8, 8 ] }},
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ -1, {VOCAB} ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "service_ms" value: {{ string_value: "{SERVICE_MS}" }} }}
"""

# No dynamic_batching in the config: Triton hands the model one request per execute(), so each request
# costs the full service time and the service rate is exactly 1000 / SERVICE_MS.
MODEL = f"""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        self.service_s = float(parameters["service_ms"]["string_value"]) / 1000.0

    def execute(self, requests):
        time.sleep(self.service_s)  # never shorter than asked: the service time is a lower bound
        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
            logits = np.zeros((*ids.shape, {VOCAB}), dtype=np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits)]))
        return responses
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    repository = tmp_path_factory.mktemp("repository")
    (repository / "fixed" / "1").mkdir(parents=True)
    (repository / "fixed" / "config.pbtxt").write_text(CONFIG)
    (repository / "fixed" / "1" / "model.py").write_text(MODEL)
    with LocalProvider(Path(tmp_path_factory.mktemp("server"))).start(repository) as running:
        running.load_model("fixed")
        yield running


def inputs() -> ModelInputs:
    ids = np.ones((1, 4), dtype=np.int64)
    return ModelInputs(np.ones((1, 3, 8, 8), dtype=np.float32), ids, ids.copy())


def queue_floor_ms(overload: float, warmup_s: float) -> float:
    """The least latency of any request an overloaded open loop completes after its warm-up.

    With one FIFO server of service time N and requests scheduled every N / overload from the level's start,
    the k-th request completes no earlier than k*N and was scheduled at k*N/overload, so it waited at least
    k*N*(1 - 1/overload); one completing after warm-up w also waited at least w - k*N/overload. The smaller
    of the two is least at k*N = w: w * (1 - 1/overload).
    """
    return warmup_s * 1000.0 * (1.0 - 1.0 / overload)


def test_open_loop_counts_the_queue_that_a_closed_loop_never_sees(server: LocalServer) -> None:
    url, settings = server.endpoints.grpc_url, SETTINGS.keyed_for(server)

    closed = measure_level(url, "fixed", inputs(), LoadLevel(CONCURRENCY, 1), settings)
    capacity = closed.summary.throughput_infer_per_s
    assert capacity > 5, "the model should serve several requests per second"
    assert capacity <= MAX_OBSERVED_RATE_PER_S  # one request at a time, each sleeping SERVICE_MS
    assert closed.summary.latency_p50_ms >= SERVICE_MS
    assert closed.server is not None and closed.server.inference_count > 0  # the server's own statistics
    assert closed.server.execution_count == closed.server.inference_count  # no batching: one request each
    assert closed.server.compute_infer_ms >= SERVICE_MS  # the server timed the sleep too

    under_rate = round(SERVICE_RATE_PER_S * UNDERLOAD, 1)
    under = measure_level(url, "fixed", inputs(), LoadLevel(REQUEST_RATE, under_rate), settings)
    assert under.achieved_rate_per_s == pytest.approx(under.offered_rate_per_s, rel=0.3)
    assert under.summary.latency_p50_ms >= SERVICE_MS

    over_rate = round(SERVICE_RATE_PER_S * OVERLOAD, 1)
    over = measure_level(url, "fixed", inputs(), LoadLevel(REQUEST_RATE, over_rate), settings)
    assert over.achieved_rate_per_s <= MAX_OBSERVED_RATE_PER_S < over.offered_rate_per_s  # the server cannot keep up...
    assert over.summary.latency_p50_ms >= queue_floor_ms(OVERLOAD, SETTINGS.warmup_s)  # ...and latencies show it
    assert over.unfinished_requests > 0  # requests were still queued when measurement stopped
    # the backlog grows by (OVERLOAD - 1) x the service rate a second: past 2 s of the offered rate in flight, sends
    # wait (the client's memory stays bounded) and the queue still shows in the latencies above
    assert over.in_flight_cap == open_loop_in_flight_cap(over_rate)
    assert over.held_sends > 0 and over.unfinished_requests <= over.in_flight_cap

    settled = measure_level(url, "fixed", inputs(), LoadLevel(REQUEST_RATE, under_rate), settings)
    assert settled.achieved_rate_per_s == pytest.approx(settled.offered_rate_per_s, rel=0.3)  # the backlog drained


def test_poisson_arrivals_average_the_offered_rate(server: LocalServer) -> None:
    settings = LoadSettings(window_s=1.0, warmup_s=0.5, max_windows=4, min_requests_per_window=1, arrival="poisson")
    level = measure_level(
        server.endpoints.grpc_url, "fixed", inputs(), LoadLevel(REQUEST_RATE, 5), settings.keyed_for(server)
    )
    assert level.achieved_rate_per_s == pytest.approx(5, rel=0.5)


def test_http_requests_succeed_as_grpc_ones_do(server: LocalServer) -> None:
    settings = LoadSettings(window_s=0.5, warmup_s=0.2, max_windows=3, min_requests_per_window=1, protocol="http")
    level = measure_level(
        server.endpoints.http_url, "fixed", inputs(), LoadLevel(CONCURRENCY, 2), settings.keyed_for(server)
    )
    assert sum(len(window.latencies_ms) for window in level.windows) > 0
    assert level.summary.errors == 0  # a float `timeout` once made the server reject every HTTP request
