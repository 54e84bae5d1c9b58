"""Caption an image through a served BLIP model by greedy decoding, either way Triton can serve it.

Monolithic: the seed's iterative_inference_onnx.py done properly, one full request per generated token, the
same loop HF `generate()` runs (start token, argmax of the last position, stop at the sep token). Captioner:
one request to a server-side decoding model (blip_caption), its tokens streamed back as they are generated.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from blip_triton_bench.load.client import DEFAULT_REQUEST_TIMEOUT_S, InferenceError, TritonInferClient
from blip_triton_bench.model.source import ModelDescription, ModelSourceError, ModelSpec, SpecialTokens, describe_model
from blip_triton_bench.model.workload import (
    DEFAULT_MAX_NEW_TOKENS,
    ModelInputs,
    WorkloadError,
    image_pixels,
)

if TYPE_CHECKING:
    from blip_triton_bench.servers.base import RunningServer

logger = logging.getLogger(__name__)

#: The config parameter a captioner names its cancel request's parameter with (model_repository/blip_caption), and
#: the name it takes when the parameter is absent.
CANCEL_REQUEST_CONFIG_KEY = "cancel_request_parameter"
DEFAULT_CANCEL_REQUEST_PARAMETER = "cancel_caption"


@dataclass(frozen=True)
class Caption:
    token_ids: tuple[int, ...]  # starts with the start token, as HF generate() returns it
    #: per generated token, the time since the previous one (the first: since the caption was asked for, i.e.
    #: the time to first token): one request each (monolithic), or between streamed responses (captioner)
    step_latencies_ms: tuple[float, ...]

    @property
    def generated_ids(self) -> tuple[int, ...]:
        return self.token_ids[1:]


def greedy_caption(
    infer: Callable[[ModelInputs], np.ndarray],
    pixel_values: np.ndarray,
    tokens: SpecialTokens,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ignore_eos: bool = False,
) -> Caption:
    """Greedy decoding of one image ([1, 3, H, W]); `infer` maps inputs to logits [1, S, vocab].

    `ignore_eos` keeps generating after the end token, as genai-perf does, so every caption is as long.
    """
    if pixel_values.shape[0] != 1:
        raise ValueError(f"greedy_caption takes one image, got a batch of {pixel_values.shape[0]}")
    ids = [tokens.bos_token_id]
    latencies_ms = []
    for _ in range(max_new_tokens):
        input_ids = np.asarray([ids], dtype=np.int64)
        started = time.perf_counter()
        logits = infer(ModelInputs(pixel_values, input_ids, np.ones_like(input_ids)))
        latencies_ms.append((time.perf_counter() - started) * 1000.0)
        next_id = int(np.argmax(logits[0, -1]))
        ids.append(next_id)
        if next_id == tokens.eos_token_id and not ignore_eos:
            break
    return Caption(token_ids=tuple(ids), step_latencies_ms=tuple(latencies_ms))


def caption_through_triton(
    client: TritonInferClient,
    model_name: str,
    description: ModelDescription,
    pixel_values: np.ndarray,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ignore_eos: bool = False,
) -> Caption:
    return greedy_caption(
        lambda inputs: client.infer(model_name, inputs),
        pixel_values,
        description.special_tokens,
        max_new_tokens,
        ignore_eos,
    )


class CaptionerClient:
    """Captions through a captioner model (pixel_values -> token_ids) over one gRPC stream.

    A decoupled captioner answers with one response per token and a final empty one; any other answers once
    with every token. Each token's arrival is timed on the client, as genai-perf times a streamed response.
    """

    def __init__(
        self,
        grpc_url: str,
        timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`timeout_s`: how long to wait for each response (a token) before the caption fails (--request-timeout-s);
        `headers`: what the stream carries (RunningServer.request_headers("grpc"): the run's key where the server
        restricts inference)."""
        self._client = triton_grpc.InferenceServerClient(grpc_url)
        self._timeout_s = timeout_s
        self._responses: queue.Queue = queue.Queue()
        self._client.start_stream(
            callback=lambda result, error: self._responses.put((time.perf_counter(), result, error)),
            headers=dict(headers) if headers else None,
        )

    @classmethod
    def to_server(cls, server: RunningServer, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> CaptionerClient:
        """A stream to `server`'s gRPC endpoint carrying its run key (None for a server without one)."""
        return cls(server.endpoints.grpc_url, timeout_s, server.request_headers("grpc"))

    def __enter__(self) -> CaptionerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> bool:
        """End the stream as a client that is done does (the server finishes what is in flight on it and closes
        it), then the channel. Returns whether the server closed it. One that has not within the response deadline
        is hung or gone (Triton 2.51 hangs in its fatal-signal handler with its sockets open, docs/disconnects.md):
        the client stops waiting and leaves the stream to end with the server, instead of waiting on it forever."""
        closing = threading.Thread(target=self._close_gracefully, name="caption-stream-close", daemon=True)
        closing.start()
        closing.join(self._timeout_s)
        if closing.is_alive():
            logger.warning(
                "the server did not close a caption stream within %.0f s: left to end with it", self._timeout_s
            )
            return False
        return True

    def _close_gracefully(self) -> None:
        with contextlib.suppress(InferenceServerException):
            self._client.stop_stream()
        self._client.close()

    def send(
        self,
        model_name: str,
        pixel_values: np.ndarray,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        ignore_eos: bool = False,
        request_id: str = "",
    ) -> float:
        """Ask for one caption on the stream; returns when it was asked (perf_counter), for `receive`. A caption
        that may be stopped early with `abandon` needs a `request_id`."""
        inputs = []
        for name, array in (
            ("pixel_values", pixel_values.astype(np.float32)),
            ("max_new_tokens", np.asarray([max_new_tokens], dtype=np.int32)),
            ("ignore_eos", np.asarray([ignore_eos], dtype=bool)),
        ):
            triton_input = triton_grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            triton_input.set_data_from_numpy(array)
            inputs.append(triton_input)
        started = time.perf_counter()
        self._enqueue(model_name, inputs, request_id)
        return started

    def _enqueue(self, model_name: str, inputs: list, request_id: str, parameters: dict | None = None) -> None:
        try:
            self._client.async_stream_infer(
                model_name, inputs, request_id=request_id, parameters=parameters, enable_empty_final_response=True
            )
        except InferenceServerException as error:  # the stream broke earlier (its callback got the cause)
            raise InferenceError(f"{model_name} (grpc stream): {error.message()}") from None

    def receive(
        self,
        model_name: str,
        bos_token_id: int,
        started: float,
        stop_after: int | None = None,
        on_token: Callable[[float], None] | None = None,
    ) -> Caption:
        """The tokens of the caption asked for at `started`, each timed on arrival; with `stop_after`, only
        that many (the caller then cancels the rest with `cancel`). `on_token(arrived_s)` is told of each
        token as it arrives (a load generator's windows count tokens of captions still streaming)."""
        ids = [bos_token_id]
        latencies_ms: list[float] = []
        previous = started
        while stop_after is None or len(latencies_ms) < stop_after:
            try:
                arrived, result, error = self._responses.get(timeout=self._timeout_s)
            except queue.Empty:
                raise InferenceError(f"{model_name}: no response within {self._timeout_s:.0f} s") from None
            if error is not None:
                raise InferenceError(f"{model_name} (grpc stream): {error.message()}")
            tokens = result.as_numpy("token_ids")
            if tokens is not None and tokens.size:
                ids.extend(int(token) for token in tokens.reshape(-1))
                gaps_ms = [(arrived - previous) * 1000.0] + [0.0] * (tokens.size - 1)
                latencies_ms.extend(gaps_ms)
                previous = arrived
                for _ in range(tokens.size if on_token is not None else 0):
                    on_token(arrived)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        return Caption(token_ids=tuple(ids), step_latencies_ms=tuple(latencies_ms))

    def caption(
        self,
        model_name: str,
        pixel_values: np.ndarray,
        bos_token_id: int,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        ignore_eos: bool = False,
    ) -> Caption:
        started = self.send(model_name, pixel_values, max_new_tokens, ignore_eos)
        return self.receive(model_name, bos_token_id, started)

    def abandon(
        self, model_name: str, request_id: str, cancel_parameter: str = DEFAULT_CANCEL_REQUEST_PARAMETER
    ) -> int:
        """Stop the caption sent as `request_id` mid-way without cancelling the gRPC call: a cancel request on the
        same stream names it, and this returns once both are answered, so the stream is free for the next caption.
        Returns how many of the caption's tokens were still on their way (discarded)."""
        cancel_id = f"{request_id}:cancel"
        self._enqueue(model_name, [], cancel_id, {cancel_parameter: request_id})
        unanswered, discarded = {request_id, cancel_id}, 0
        while unanswered:
            try:
                _, result, error = self._responses.get(timeout=self._timeout_s)
            except queue.Empty:
                raise InferenceError(
                    f"{model_name}: no answer to cancelling caption {request_id} within {self._timeout_s:.0f} s "
                    f"(still waiting for {', '.join(sorted(unanswered))})"
                ) from None
            if error is not None:
                raise InferenceError(f"{model_name} (grpc stream, cancelling {request_id}): {error.message()}")
            response = result.get_response()
            tokens = result.as_numpy("token_ids")
            discarded += 0 if tokens is None else int(tokens.size)
            if response.parameters["triton_final_response"].bool_param:
                unanswered.discard(response.id)
        return discarded

    def disconnect(self) -> None:
        """Cancel the gRPC call with whatever it still waits for, as a client that goes away mid-caption does. On
        Triton 2.51 this can crash the server (docs/disconnects.md): the suite does it only to a server that is
        being checked for exactly that, never to one other tests share."""
        with contextlib.suppress(InferenceServerException):
            self._client.stop_stream(cancel_requests=True)


def cancel_parameter_of(config) -> str | None:
    """The request parameter a captioner's cancel request names its caption with (None: it takes none)."""
    parameter = config.parameters.get(CANCEL_REQUEST_CONFIG_KEY)
    return parameter.string_value if parameter is not None and parameter.string_value else None


def is_captioner(grpc_url: str, model_name: str) -> bool:
    """Whether the served model takes pixel_values alone and returns token_ids (asked of the server)."""
    with contextlib.closing(triton_grpc.InferenceServerClient(grpc_url)) as client:
        config = client.get_model_config(model_name).config
    return any(output.name == "token_ids" for output in config.output)


def decode_text(description: ModelDescription, token_ids: tuple[int, ...]) -> str | None:
    """The caption as text when the model ships a tokenizer (real checkpoints); None for random models."""
    if description.spec.is_synthetic:
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(description.spec.source)
    except (OSError, ValueError):
        return None
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)


def header_options(headers: Mapping[str, str] | None) -> list[str]:
    """blip-caption's options that send `headers` (RunningServer.request_headers: the run's key)."""
    return [option for name, value in (headers or {}).items() for option in ("-H", f"{name}:{value}")]


def _header(text: str) -> tuple[str, str]:
    name, separator, value = text.partition(":")
    if not separator or not name.strip():
        raise argparse.ArgumentTypeError(f"'{text}': give a header as NAME:VALUE")
    return name.strip(), value.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="blip-caption",
        description="Caption an image through a Triton-served BLIP model: greedy, one request per token for a "
        "monolithic variant, or one streamed request for a captioner such as blip_caption.",
    )
    parser.add_argument("--url", default="127.0.0.1:8001", help="server endpoint (gRPC port for grpc)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--variant", default="base_model_cpu", help="the model name on the server")
    parser.add_argument(
        "--model", default="base", help="tiny, base, hub id or directory: gives preprocessing and tokens"
    )
    parser.add_argument("--image", default="astronaut", help="an image file or a scikit-image sample name")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        type=_header,
        metavar="NAME:VALUE",
        help="a header every request carries (repeatable), as perf_analyzer's -H: for a server that restricts "
        "inference (--http-restricted-api / --grpc-restricted-protocol)",
    )
    args = parser.parse_args(argv)
    headers = dict(args.header) or None
    try:
        description = describe_model(ModelSpec(args.model))
        pixel_values = image_pixels(description, [args.image])
        if args.protocol == "grpc" and is_captioner(args.url, args.variant):
            with CaptionerClient(args.url, headers=headers) as captioner:
                caption = captioner.caption(
                    args.variant, pixel_values, description.special_tokens.bos_token_id, args.max_new_tokens
                )
        else:
            with TritonInferClient(args.url, args.protocol, headers=headers) as client:
                caption = caption_through_triton(client, args.variant, description, pixel_values, args.max_new_tokens)
    except (ModelSourceError, WorkloadError, InferenceError) as error:
        print(f"blip-caption: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # connection refused and the like, from the client libraries
        print(f"blip-caption: cannot reach Triton at {args.url} ({args.protocol}): {error}", file=sys.stderr)
        return 2
    text = decode_text(description, caption.token_ids)
    latencies = np.asarray(caption.step_latencies_ms)
    print(f"token ids: {list(caption.token_ids)}")
    if text is not None:
        print(f"caption: {text}")
    print(
        f"{len(caption.generated_ids)} tokens in {latencies.sum():.0f} ms "
        f"(per token: median {np.median(latencies):.1f} ms, max {latencies.max():.1f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
