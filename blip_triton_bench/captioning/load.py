"""Caption load as genai-perf drives a generative model: streamed caption requests kept in flight (closed loop,
`--caption-concurrency`) or sent on a schedule (open loop, `--caption-request-rate`), measured in windows after a
warm-up, with the logits levels' stability rule.

Each caption asks for the same number of tokens with the end token ignored, so every caption is as long. A window
holds the captions that ended in it (time to first token, inter-token latency and request latency, percentiles over
every caption of the judged windows, never averaged across windows) and the tokens that arrived in it. Output
tokens/s comes from Little's law in closed loop (continuous, and blind to the lockstep bursts of captions that run
together) and from token arrivals in open loop.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from blip_triton_bench.captioning.caption import CaptionerClient
from blip_triton_bench.judging.slo import INTER_TOKEN_LATENCY, LATENCY, TIME_TO_FIRST_TOKEN, RequestOutcome
from blip_triton_bench.judging.stats import (
    Stability,
    StabilityTerms,
    WindowRates,
    latency_percentile,
    spread_pct,
    stability_of,
)
from blip_triton_bench.load.client import DEFAULT_REQUEST_TIMEOUT_S
from blip_triton_bench.load.engine import (
    MAX_CONCURRENCY,
    MAX_REQUEST_RATE,
    MAX_WINDOW_STRETCH,
    LoadLevel,
    LoadSettings,
    LoadSpecError,
    arrival_gaps,
    parse_range,
)

CAPTION_CONCURRENCY = "caption_concurrency"
CAPTION_REQUEST_RATE = "caption_request_rate"
#: A window lasts at least the measurement window and until this many captions ended in it (stretched up to
#: MAX_WINDOW_STRETCH times), so each window's latencies come from more than one caption.
MIN_CAPTIONS_PER_WINDOW = 3
#: Open loop: at most this many captions in flight (one gRPC stream each); beyond it the level has failed to
#: keep up and the backlog is reported, not grown without bound.
MAX_OPEN_LOOP_STREAMS = 256
PERCENTILES = (50, 90, 99)


def caption_concurrency_levels(text: str) -> list[LoadLevel]:
    values = parse_range(text, "--caption-concurrency", MAX_CONCURRENCY)
    if any(not value.is_integer() for value in values):
        raise LoadSpecError(f"--caption-concurrency {text!r}: concurrency levels must be whole numbers")
    return [LoadLevel(CAPTION_CONCURRENCY, int(value)) for value in values]


def caption_request_rate_levels(text: str) -> list[LoadLevel]:
    values = parse_range(text, "--caption-request-rate", MAX_REQUEST_RATE)
    return [LoadLevel(CAPTION_REQUEST_RATE, value) for value in values]


@dataclass(frozen=True)
class CaptionRecord:
    """One caption under load: when it was asked for (scheduled, in open loop) and when each token arrived."""

    asked_s: float
    token_arrivals_s: tuple[float, ...]
    error: str | None = None

    @property
    def ended_s(self) -> float:
        return self.token_arrivals_s[-1] if self.token_arrivals_s else self.asked_s

    @property
    def latency_ms(self) -> float:
        return (self.ended_s - self.asked_s) * 1000.0

    @property
    def time_to_first_token_ms(self) -> float:
        return (self.token_arrivals_s[0] - self.asked_s) * 1000.0

    @property
    def inter_token_latency_ms(self) -> float | None:
        """genai-perf's: (request latency - time to first token) / (output tokens - 1)."""
        if len(self.token_arrivals_s) < 2:
            return None
        return (self.token_arrivals_s[-1] - self.token_arrivals_s[0]) * 1000.0 / (len(self.token_arrivals_s) - 1)

    def outcome(self) -> RequestOutcome:
        """This caption as the SLO sees it (a caption of one token has no inter-token latency)."""
        if self.error is not None or not self.token_arrivals_s:
            return RequestOutcome(False, {})
        values = {LATENCY: self.latency_ms, TIME_TO_FIRST_TOKEN: self.time_to_first_token_ms}
        if (inter_token_ms := self.inter_token_latency_ms) is not None:
            values[INTER_TOKEN_LATENCY] = inter_token_ms
        return RequestOutcome(True, values)


@dataclass(frozen=True)
class CaptionWindow:
    start_s: float
    duration_s: float
    tokens_arrived: int  # tokens of any caption, finished or still streaming, that arrived in the window
    captions: tuple[CaptionRecord, ...]  # ended in this window, failed ones included
    tokens_per_caption: int
    concurrency: int | None = None  # closed loop: the captions kept in flight; None in open loop

    @property
    def mean_latency_ms(self) -> float:
        latencies = [record.latency_ms for record in self.captions if record.error is None]
        return float(np.mean(latencies)) if latencies else math.nan

    @property
    def tokens_per_s(self) -> float:
        """Closed loop: Little's law, concurrency x tokens per caption / mean caption latency. Captions kept in
        flight together tend to run in lockstep (they join a decoder step together and finish together), so their
        tokens arrive in bursts as long apart as a caption takes; counting arrivals would then read one burst or two
        per window. Open loop (or a window no caption ended in): the tokens that arrived, per second."""
        if self.concurrency is not None and math.isfinite(self.mean_latency_ms):
            return self.concurrency * self.tokens_per_caption / (self.mean_latency_ms / 1000.0)
        return self.tokens_arrived / self.duration_s


#: How the stability rule names a caption level's measures.
CAPTION_TERMS = StabilityTerms(
    throughput="output tokens/s", latency="mean caption latency", empty_window="ended no caption; lengthen --window-s"
)


def caption_stability(windows: Sequence[CaptionWindow], stability_windows: int, stability_pct: float) -> Stability:
    """The one stability rule (stats.stability_of) on a caption level's windows: output tokens/s and mean caption
    latency; a window that ended no caption is empty."""
    rates = [WindowRates(window.tokens_per_s, window.mean_latency_ms) for window in windows]
    return stability_of(rates, stability_windows, stability_pct, CAPTION_TERMS)


@dataclass(frozen=True)
class CaptionLevelMeasurement:
    level: LoadLevel
    tokens_per_caption: int
    windows: tuple[CaptionWindow, ...]
    stability: Stability

    @property
    def judged(self) -> list[CaptionWindow]:
        return [self.windows[index] for index in self.stability.window_indices]

    @property
    def captions(self) -> list[CaptionRecord]:
        return [record for window in self.judged for record in window.captions if record.error is None]

    @property
    def errors(self) -> list[str]:
        return [record.error for window in self.judged for record in window.captions if record.error is not None]

    def slo_outcomes(self) -> tuple[list[RequestOutcome], float]:
        """Every caption that ended in the judged windows, failed ones included, and those windows' length in s."""
        outcomes = [record.outcome() for window in self.judged for record in window.captions]
        return outcomes, sum(window.duration_s for window in self.judged)

    def metrics(self) -> dict[str, float]:
        """genai-perf's metrics: output tokens/s (median of the windows'), captions/s (tokens/s over the fixed
        caption length), and time to first token, inter-token latency and request latency percentiles."""
        windows = self.judged
        tokens_per_s = [window.tokens_per_s for window in windows]
        captions = self.captions
        metrics: dict[str, float] = {
            "output_token_throughput_per_s": float(np.median(tokens_per_s)),
            "output_token_throughput_spread_pct": spread_pct(tokens_per_s),
            "caption_throughput_per_s": float(np.median(tokens_per_s)) / self.tokens_per_caption,
            "caption_count": float(len(captions)),
            "caption_errors": float(len(self.errors)),
            "output_tokens": float(self.tokens_per_caption),
        }
        series: dict[str, Callable[[CaptionRecord], float | None]] = {
            "time_to_first_token": lambda record: record.time_to_first_token_ms,
            "inter_token_latency": lambda record: record.inter_token_latency_ms,
            "caption": lambda record: record.latency_ms,
        }
        for name, value_of in series.items():
            values = np.sort([v for v in map(value_of, captions) if v is not None])
            if not values.size:
                continue
            metrics[f"{name}_ms"] = latency_percentile(values, 50)
            for percentile in PERCENTILES[1:]:
                metrics[f"{name}_p{percentile}_ms"] = latency_percentile(values, percentile)
            per_window = [
                float(np.median(window_values))
                for window in windows
                if (window_values := [v for r in window.captions if r.error is None if (v := value_of(r)) is not None])
            ]
            metrics[f"{name}_spread_pct"] = spread_pct(per_window)
        return metrics


class _InFlight:
    """How many open-loop captions are streaming, bounded."""

    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self._limit = limit
        self.count = 0

    def enter(self) -> bool:
        with self._lock:
            if self.count >= self._limit:
                return False
            self.count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.count -= 1


class _Recorder:
    """Captions as they end and tokens as they arrive, shared by the load threads and the window clock."""

    def __init__(self, tokens_per_caption: int, concurrency: int | None) -> None:
        self._lock = threading.Lock()
        self._tokens_per_caption = tokens_per_caption
        self._concurrency = concurrency
        self.records: list[CaptionRecord] = []
        self.token_arrivals_s: list[float] = []

    def token(self, arrived_s: float) -> None:
        with self._lock:
            self.token_arrivals_s.append(arrived_s)

    def caption(self, record: CaptionRecord) -> None:
        with self._lock:
            self.records.append(record)

    def window(self, start_s: float, end_s: float) -> CaptionWindow:
        with self._lock:
            arrived = sum(start_s <= arrived_s < end_s for arrived_s in self.token_arrivals_s)
            ended = tuple(r for r in self.records if start_s <= r.ended_s < end_s)
        return CaptionWindow(start_s, end_s - start_s, arrived, ended, self._tokens_per_caption, self._concurrency)


@dataclass(frozen=True)
class CaptionRequest:
    """What every caption of a level asks for, and the tokens it must come back with."""

    model_name: str
    pixel_values: np.ndarray
    tokens: int
    expected_ids: tuple[int, ...] | None = None  # the same image captioned alone; None: only the length is checked


def caption_request_alone(
    grpc_url: str,
    model_name: str,
    pixel_values: np.ndarray,
    tokens: int,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> CaptionRequest:
    """What every caption of a level asks for, with the tokens it must come back with: the same image captioned
    alone, on the same server, before the load starts. `headers`: the run's key (LoadSettings.stream_headers);
    `timeout_s`: each token's deadline (--request-timeout-s)."""
    with CaptionerClient(grpc_url, timeout_s, headers) as client:
        alone = client.caption(model_name, pixel_values, 0, tokens, True)
    return CaptionRequest(model_name, pixel_values, tokens, alone.generated_ids)


def _one_caption(client: CaptionerClient, request: CaptionRequest, asked_s: float, recorder: _Recorder) -> None:
    model_name, tokens = request.model_name, request.tokens
    try:
        sent = client.send(model_name, request.pixel_values, tokens, ignore_eos=True)
        arrivals: list[float] = []

        def arrived(arrived_s: float) -> None:
            recorder.token(arrived_s)
            arrivals.append(arrived_s)

        caption = client.receive(model_name, 0, sent, on_token=arrived)
    except Exception as error:  # one failed caption is counted in its window; the load goes on
        recorder.caption(CaptionRecord(asked_s, (), f"{type(error).__name__}: {error}"))
        return
    error = None
    if len(arrivals) != tokens:
        error = f"asked for {tokens} tokens (end token ignored), got {len(arrivals)}"
    elif request.expected_ids is not None and caption.generated_ids != request.expected_ids:
        error = (
            f"tokens {list(caption.generated_ids)} differ from the same image's caption decoded alone "
            f"{list(request.expected_ids)}"
        )
    recorder.caption(CaptionRecord(asked_s, tuple(arrivals), error))


def _measure_windows(recorder: _Recorder, settings: LoadSettings, started_s: float) -> list[CaptionWindow]:
    windows: list[CaptionWindow] = []
    start = started_s + settings.warmup_s
    time.sleep(max(0.0, start - time.perf_counter()))
    while len(windows) < settings.max_windows and (
        not windows or not caption_stability(windows, settings.stability_windows, settings.stability_pct).stable
    ):
        end = start + settings.window_s
        longest = start + settings.window_s * MAX_WINDOW_STRETCH
        while True:
            time.sleep(max(0.0, end - time.perf_counter()))
            window = recorder.window(start, end)
            if len(window.captions) >= MIN_CAPTIONS_PER_WINDOW or end >= longest:
                break
            end = min(longest, end + settings.window_s / 2)
        windows.append(window)
        start = end
    return windows


@contextmanager
def _closed_loop(url: str, request: CaptionRequest, concurrency: int, settings: LoadSettings, recorder: _Recorder):
    stopping = threading.Event()

    def worker() -> None:
        with CaptionerClient(url, settings.request_timeout_s, settings.stream_headers()) as client:
            while not stopping.is_set():
                _one_caption(client, request, time.perf_counter(), recorder)

    threads = [threading.Thread(target=worker, name=f"caption-load-{i}", daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stopping.set()
        for thread in threads:  # each ends its current caption, so the next level starts on an idle server
            thread.join()


@contextmanager
def _open_loop(url: str, request: CaptionRequest, rate: float, settings: LoadSettings, recorder: _Recorder):
    stopping = threading.Event()
    clients: queue.SimpleQueue[CaptionerClient] = queue.SimpleQueue()
    in_flight = _InFlight(MAX_OPEN_LOOP_STREAMS)
    pool = ThreadPoolExecutor(MAX_OPEN_LOOP_STREAMS, thread_name_prefix="caption-open-loop")
    opened: list[CaptionerClient] = []

    def one(scheduled: float) -> None:
        try:
            client = clients.get_nowait()
        except queue.Empty:
            client = CaptionerClient(url, settings.request_timeout_s, settings.stream_headers())
            opened.append(client)
        try:
            _one_caption(client, request, scheduled, recorder)
        finally:
            clients.put(client)
            in_flight.leave()

    def dispatch() -> None:
        scheduled = time.perf_counter()
        for gap in arrival_gaps(rate, settings.arrival, settings.seed):  # until the level sets `stopping`
            scheduled += gap
            if stopping.wait(max(0.0, scheduled - time.perf_counter())):
                return
            if not in_flight.enter():
                # the server cannot keep up: the caption is counted as failed in its window, not queued here
                recorder.caption(CaptionRecord(scheduled, (), f"more than {MAX_OPEN_LOOP_STREAMS} captions in flight"))
                continue
            pool.submit(one, scheduled)

    dispatcher = threading.Thread(target=dispatch, name="caption-dispatch", daemon=True)
    dispatcher.start()
    try:
        yield
    finally:
        stopping.set()
        dispatcher.join()
        pool.shutdown(wait=True)
        for client in opened:
            client.close()


def measure_caption_level(
    url: str, request: CaptionRequest, level: LoadLevel, settings: LoadSettings
) -> CaptionLevelMeasurement:
    """Run one caption load level against a streamed captioner over gRPC and measure it in windows."""
    if request.tokens < 1:
        raise LoadSpecError(f"--caption-tokens {request.tokens}: ask for at least 1 token per caption")
    closed_loop = level.mode == CAPTION_CONCURRENCY
    recorder = _Recorder(request.tokens, int(level.value) if closed_loop else None)
    started = time.perf_counter()
    if level.mode == CAPTION_CONCURRENCY:
        load = _closed_loop(url, request, int(level.value), settings, recorder)
    elif level.mode == CAPTION_REQUEST_RATE:
        load = _open_loop(url, request, float(level.value), settings, recorder)
    else:
        raise LoadSpecError(f"not a caption load level: {level.level_id}")
    with load:
        windows = _measure_windows(recorder, settings, started)
    stability = caption_stability(windows, settings.stability_windows, settings.stability_pct)
    return CaptionLevelMeasurement(level, request.tokens, tuple(windows), stability)


def caption_levels(concurrency: str | None, request_rate: str | None) -> Iterator[LoadLevel]:
    if concurrency:
        yield from caption_concurrency_levels(concurrency)
    if request_rate:
        yield from caption_request_rate_levels(request_rate)
