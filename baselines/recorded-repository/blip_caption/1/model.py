"""BLIP captioning as a Triton Python model: greedy decoding server-side, the KV cache kept where the decoder runs,
and every active caption decoded in one shared step (in-flight batching).

One request = one image. Its vision pass (the encoder plus every decoder layer's cross-attention keys/values) runs
once, through BLS on `vision_encoder_model`, whose dynamic batcher batches concurrent captions' passes. The text
decoder runs here, in this process: an ONNX Runtime session over `text_decoder_model`'s ONNX file, with I/O
binding, so each step's present keys/values are the next step's past keys/values as they lie (OrtValues, on the GPU
for a KIND_GPU instance), and the image's keys/values are bound once per change of the batch. Nothing crosses
Triton's shared memory per token.

One scheduler thread owns the decoder. At every step boundary, captions that finished, failed or were cancelled
leave, and waiting captions join (up to `max_active_captions`): their vision passes run first, sent together so the
vision model's batcher batches them, while the decoder waits (LLM servers' prefill-first scheduling; on a CPU, a
vision pass and decoder steps running at once would only slow each other). Each row's cache is padded to the longest
one and masked, with its own position ids. In decoupled mode each token is streamed as its own response
(then a final empty one), so clients measure time to first token and inter-token latency.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

GENERATION_CONFIG_FILENAME = "generation_config.json"
DECODER_FILENAME = "model.onnx"
DEFAULT_MAX_ACTIVE_CAPTIONS = 8
#: How long the idle scheduler waits for a caption before it looks at the stop flag again.
IDLE_POLL_S = 0.05
VISION_OUTPUTS = ("cross_keys", "cross_values")
#: The request parameter a cancel request names its caption by, unless the config's `cancel_request_parameter`
#: names another.
DEFAULT_CANCEL_REQUEST_PARAMETER = "cancel_caption"

#: The nvidia-pytriton 0.7.0 Python backend stub is built against numpy 1's C API. Under numpy 2 it reads
#: arrays wrongly: `pb_utils.Tensor(name, array)` sends zero bytes (shape intact) and `as_numpy()` returns
#: inputs with zero strides (every element equals the first). DLPack carries both correctly under numpy 2;
#: under numpy 1.26, `Tensor.from_dlpack` of an ndarray makes the stub unhealthy, so numpy 1 keeps the
#: numpy path. A BLS request's inputs go through the same stub code, so they need the same care. These two
#: functions are a copy of server/onnxruntime/model.py's: Triton loads this file from the model repository
#: and that one from the backend directory, so neither can import the other.
NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


def to_triton(name: str, array: Any) -> Any:
    """A pb_utils.Tensor holding `array` (an ndarray or another pb_utils.Tensor) whole, under numpy 1 and 2."""
    if isinstance(array, pb_utils.Tensor):
        if not NUMPY_2:
            return pb_utils.Tensor(name, array.as_numpy())
        return pb_utils.Tensor.from_dlpack(name, array)
    array = np.ascontiguousarray(array)  # DLPack exports C-order only
    # Strings (BYTES) have no DLPack form; an empty array has no bytes to lose (and the stub calls numpy's
    # DLPack strides of a zero-size array non-contiguous).
    if not NUMPY_2 or array.dtype == np.object_ or array.size == 0:
        return pb_utils.Tensor(name, array)
    if not array.flags.writeable:  # numpy refuses to export a read-only array over DLPack
        array = array.copy()
    return pb_utils.Tensor.from_dlpack(name, array)


def from_triton(tensor: Any) -> np.ndarray:
    """The ndarray a pb_utils.Tensor in host memory holds, read correctly under numpy 1 and 2."""
    return np.from_dlpack(tensor) if NUMPY_2 else tensor.as_numpy()


class CaptionError(Exception):
    """A request or a composing model failed; the message goes back to the client."""


def _parameter(config: dict[str, Any], key: str, default: str | None = None) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "") or default
    if not value:
        raise CaptionError(f"config.pbtxt of '{config['name']}' has no parameters '{key}' naming the model to call")
    return value


def _int_parameter(config: dict[str, Any], key: str, default: int, minimum: int) -> int:
    text = _parameter(config, key, str(default))
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise CaptionError(
            f"config.pbtxt of '{config['name']}': parameters '{key}' is {text!r}; use an integer >= {minimum}"
        )
    return value


def _optional_scalar(request: Any, name: str, default: Any) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else from_triton(tensor).reshape(-1)[0].item()


def decoder_path(own_folder: str, decoder_model: str) -> str:
    """The decoder's ONNX file in the same repository: `<repository>/<decoder_model>/<highest version>/model.onnx`."""
    folder = os.path.join(os.path.dirname(os.path.abspath(own_folder)), decoder_model)
    versions = (
        sorted((int(name) for name in os.listdir(folder) if name.isdigit()), reverse=True)
        if os.path.isdir(folder)
        else []
    )
    for version in versions:
        path = os.path.join(folder, str(version), DECODER_FILENAME)
        if os.path.isfile(path):
            return path
    raise CaptionError(
        f"no {DECODER_FILENAME} under {folder}/<version>/: the captioner runs the text decoder named by its "
        f"parameters 'text_decoder_model' ({decoder_model}) in process, from that model's file"
    )


@dataclass(eq=False)
class Caption:
    """One request's caption while it is being decoded."""

    request: Any
    sender: Any  # the decoupled response sender; None when the model answers once per request
    pixel_values: np.ndarray
    max_new_tokens: int
    ignore_eos: bool
    next_token: int
    cross_keys: np.ndarray | None = None  # [1, layers, heads, patches, head_dim], once its vision pass is done
    cross_values: np.ndarray | None = None
    request_id: str = ""
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel_asked: threading.Event = field(default_factory=threading.Event)  # a cancel request named this caption

    @property
    def position(self) -> int:
        """The position id of the token this caption feeds next (the start token is position 0)."""
        return len(self.generated)

    def disconnected(self) -> bool:
        """Whether Triton cancelled the request (its client disconnected, or cancelled the RPC)."""
        probe = self.sender if self.sender is not None else self.request
        return bool(getattr(probe, "is_cancelled", lambda: False)())

    def stop_reason(self) -> str | None:
        """Why the caption must leave before its end: None while its client still waits for it."""
        if self.cancel_asked.is_set():
            return "cancel_request"
        return "disconnect" if self.disconnected() else None

    def emit(self, token: int) -> None:
        """Add a generated token and stream it (decoupled); raises when the client is gone."""
        self.generated.append(token)
        if self.sender is not None:
            tensor = to_triton("token_ids", np.asarray([token], dtype=np.int64))
            self.sender.send(pb_utils.InferenceResponse(output_tensors=[tensor]))

    def finish(self, error: str | None = None, code: Any = None) -> None:
        """The caption's last response: its tokens (non-decoupled), the final flag, or its error."""
        self.finished, self.error = True, error
        if self.sender is not None:
            try:
                if error is None:
                    self.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                else:
                    failure = pb_utils.TritonError(error) if code is None else pb_utils.TritonError(error, code)
                    self.sender.send(
                        pb_utils.InferenceResponse(output_tensors=[], error=failure),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                    )
            except Exception:  # the client is gone; nothing is left to tell it
                pass
        self.done.set()

    def response(self) -> Any:
        if self.error is not None:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(self.error))
        tensor = to_triton("token_ids", np.asarray(self.generated, dtype=np.int64))
        return pb_utils.InferenceResponse(output_tensors=[tensor])


@dataclass
class DecoderBatch:
    """The decoder's inputs for the active captions, kept between steps: row i belongs to captions[i]."""

    captions: list[Caption]
    cross_keys: Any  # OrtValue [batch, layers, heads, patches, head_dim]
    cross_values: Any
    past_keys: Any  # OrtValue [batch, layers, heads, length, head_dim]; rows padded at the front
    past_values: Any
    attention_mask: np.ndarray  # [batch, length]: 1 where a row's cache holds one of its tokens, 0 for padding
    host_arrays: list[np.ndarray] = field(default_factory=list)  # what CPU OrtValues borrow; kept alive here


class InProcessDecoder:
    """The text decoder's ONNX Runtime session and the batch it steps; only the scheduler thread calls it."""

    def __init__(self, path: str, head_shape: Sequence[int], device: str, device_id: int, threads: int) -> None:
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers: list[Any] = ["CPUExecutionProvider"]
        if device == "cuda":
            available = onnxruntime.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise CaptionError(
                    f"a KIND_GPU captioner needs ONNX Runtime's CUDAExecutionProvider; this onnxruntime "
                    f"{onnxruntime.__version__} has {', '.join(available)} (install onnxruntime-gpu)"
                )
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        self.session = onnxruntime.InferenceSession(path, options, providers=providers)
        self.device, self.device_id = device, device_id
        self.head_shape = tuple(int(n) for n in head_shape)

    def _on_device(self, array: np.ndarray, batch: DecoderBatch) -> Any:
        array = np.ascontiguousarray(array)
        if self.device == "cpu":
            batch.host_arrays.append(array)
        return onnxruntime.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id)

    def regroup(self, previous: DecoderBatch | None, staying: list[Caption], joining: list[Caption]) -> DecoderBatch:
        """The batch for `staying` (rows of `previous`, in order) plus `joining` (empty caches, padded)."""
        layers, heads, head_dim = self.head_shape
        if previous is not None and staying:
            rows = [previous.captions.index(caption) for caption in staying]
            past_keys = previous.past_keys.numpy()[rows]
            past_values = previous.past_values.numpy()[rows]
            mask = previous.attention_mask[rows]
        else:
            past_keys = np.zeros((0, layers, heads, 0, head_dim), dtype=np.float32)
            past_values, mask = past_keys, np.zeros((0, 0), dtype=np.int64)
        length = mask.shape[1]
        padding = np.zeros((len(joining), layers, heads, length, head_dim), dtype=np.float32)
        past_keys = np.concatenate([past_keys, padding])
        past_values = np.concatenate([past_values, padding])
        mask = np.concatenate([mask, np.zeros((len(joining), length), dtype=np.int64)])
        # Slots no row uses any more (the oldest captions left) are cut, so the cache is as long as the longest row.
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if used.size else length
        captions = staying + joining
        batch = DecoderBatch(captions, None, None, None, None, mask[:, start:].copy())
        batch.past_keys = self._on_device(past_keys[:, :, :, start:], batch)
        batch.past_values = self._on_device(past_values[:, :, :, start:], batch)
        batch.cross_keys = self._on_device(np.concatenate([c.cross_keys for c in captions]), batch)
        batch.cross_values = self._on_device(np.concatenate([c.cross_values for c in captions]), batch)
        return batch

    def step(self, batch: DecoderBatch) -> np.ndarray:
        """One decoder step of every row; returns each row's next token and keeps the grown cache in `batch`."""
        rows = len(batch.captions)
        attention_mask = np.concatenate([batch.attention_mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([[c.next_token] for c in batch.captions], dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.asarray([[c.position] for c in batch.captions], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", attention_mask)
        for name in ("cross_keys", "cross_values", "past_keys", "past_values"):
            binding.bind_ortvalue_input(name, getattr(batch, name))
        binding.bind_output("logits", "cpu")
        binding.bind_output("present_keys", self.device, self.device_id)
        binding.bind_output("present_values", self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        logits, batch.past_keys, batch.past_values = binding.get_outputs()
        batch.attention_mask = attention_mask
        return np.argmax(logits.numpy()[:, -1], axis=-1)


class CaptionMetrics:
    """The captioner's own Prometheus metrics on Triton's metrics endpoint: captions decoding, captions waiting for
    a slot, and captions stopped early by reason. A slot that a departed client never gave back shows as an active
    caption that never leaves."""

    def __init__(self, model_name: str) -> None:
        labels = {"model": model_name}
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self._families = [
            pb_utils.MetricFamily("blip_caption_active", "Captions decoding in the shared decoder step", gauge),
            pb_utils.MetricFamily("blip_caption_waiting", "Captions accepted and waiting for a decoder slot", gauge),
            pb_utils.MetricFamily("blip_caption_cancelled", "Captions stopped before their end, by reason", counter),
        ]
        active, waiting, cancelled = self._families
        self.active, self.waiting = active.Metric(labels=labels), waiting.Metric(labels=labels)
        self.cancelled = {
            reason: cancelled.Metric(labels={**labels, "reason": reason}) for reason in ("disconnect", "cancel_request")
        }

    def show(self, active: int, waiting: int) -> None:
        self.active.set(float(active))
        self.waiting.set(float(waiting))

    def close(self) -> None:
        """The stub wants each Metric deleted before its MetricFamily."""
        del self.active, self.waiting, self.cancelled
        self._families.clear()


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.config = json.loads(args["model_config"])
        self.vision_model = _parameter(self.config, "vision_encoder_model")
        decoder_model = _parameter(self.config, "text_decoder_model")
        self.max_active = _int_parameter(self.config, "max_active_captions", DEFAULT_MAX_ACTIVE_CAPTIONS, 1)
        # 0: ONNX Runtime's default (one thread per core)
        threads = _int_parameter(self.config, "decoder_intra_op_thread_count", 0, 0)
        path = os.path.join(args["model_repository"], args["model_version"], GENERATION_CONFIG_FILENAME)
        try:
            with open(path, encoding="utf-8") as handle:
                generation = json.load(handle)
        except OSError as error:
            raise CaptionError(
                f"model '{self.config['name']}': cannot read {path} ({error.strerror}); it holds bos_token_id, "
                "eos_token_id, max_new_tokens, max_positions and decoder_cache_shape [layers, heads, head_dim]"
            ) from None
        self.bos_token_id = int(generation["bos_token_id"])
        self.eos_token_id = int(generation["eos_token_id"])
        self.max_new_tokens = int(generation["max_new_tokens"])
        self.max_positions = int(generation["max_positions"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)
        on_gpu = args.get("model_instance_kind") == "GPU"
        self.decoder = InProcessDecoder(
            decoder_path(args["model_repository"], decoder_model),
            generation["decoder_cache_shape"],
            "cuda" if on_gpu else "cpu",
            int(args.get("model_instance_device_id", 0)) if on_gpu else 0,
            threads,
        )
        self.logger = pb_utils.Logger
        self.cancel_parameter = _parameter(self.config, "cancel_request_parameter", DEFAULT_CANCEL_REQUEST_PARAMETER)
        self.metrics = CaptionMetrics(self.config["name"])
        self.waiting: queue.Queue[Caption] = queue.Queue()  # accepted, vision pass not run yet
        # Captions a cancel request may name, by request id; the scheduler drops the finished ones.
        self.open_captions: dict[str, Caption] = {}
        self.open_lock = threading.Lock()
        self.stopping = threading.Event()
        self.vision_pool = ThreadPoolExecutor(self.max_active, thread_name_prefix="caption-vision")
        self.scheduler = threading.Thread(target=self._decode_loop, name="caption-decoder", daemon=True)
        self.scheduler.start()

    # ---- requests in ----

    def _cancel_target(self, request: Any) -> str | None:
        """The request id a cancel request names, or None for a caption request."""
        parameters = json.loads(request.parameters() or "{}")
        target = parameters.get(self.cancel_parameter)
        return None if target is None else str(target)

    def _cancel(self, request: Any, target: str) -> Caption:
        """Mark the named caption to leave at the next step, and answer the cancel request at once (a caption that
        already finished, or an id never seen, leaves nothing to do)."""
        with self.open_lock:
            caption = self.open_captions.get(target)
        if caption is not None:
            caption.cancel_asked.set()
        sender = request.get_response_sender() if self.decoupled else None
        answer = Caption(request, sender, np.zeros(0, np.float32), 0, False, self.bos_token_id)
        answer.finish()
        return answer

    def _accept(self, request: Any) -> Caption:
        if (target := self._cancel_target(request)) is not None:
            return self._cancel(request, target)
        sender = request.get_response_sender() if self.decoupled else None
        caption = Caption(
            request, sender, np.zeros(0, np.float32), 0, False, self.bos_token_id, request_id=request.request_id()
        )
        try:
            tensor = pb_utils.get_input_tensor_by_name(request, "pixel_values")
            if tensor is None:
                raise CaptionError(
                    "pixel_values is missing: a caption request sends the image; a cancel request sends no inputs "
                    f"and names the caption's request id in its parameter '{self.cancel_parameter}'"
                )
            caption.pixel_values = np.array(from_triton(tensor), dtype=np.float32)  # a copy the request may outlive
            caption.max_new_tokens = int(_optional_scalar(request, "max_new_tokens", self.max_new_tokens))
            caption.ignore_eos = bool(_optional_scalar(request, "ignore_eos", False))
            if not 1 <= caption.max_new_tokens < self.max_positions:
                raise CaptionError(
                    f"max_new_tokens is {caption.max_new_tokens}; ask for 1 to {self.max_positions - 1} "
                    f"(the text decoder has {self.max_positions} positions)"
                )
        except Exception as error:  # one bad request answers itself and disturbs no other
            caption.finish(str(error))
            return caption
        if caption.request_id:
            with self.open_lock:
                self.open_captions[caption.request_id] = caption
        self.waiting.put(caption)
        return caption

    def _encode(self, caption: Caption) -> None:
        """The caption's vision pass (BLS); a failure answers the caption and leaves it out of the batch."""
        try:
            request = pb_utils.InferenceRequest(
                model_name=self.vision_model,
                inputs=[to_triton("pixel_values", caption.pixel_values)],
                requested_output_names=list(VISION_OUTPUTS),
                preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
            )
            response = request.exec()
            if response.has_error():
                raise CaptionError(f"{self.vision_model}: {response.error().message()}")
            outputs = [np.array(from_triton(pb_utils.get_output_tensor_by_name(response, n))) for n in VISION_OUTPUTS]
            caption.cross_keys, caption.cross_values = outputs
        except Exception as error:  # answered to its own client
            caption.finish(str(error))

    def _encode_together(self, captions: list[Caption]) -> list[Caption]:
        """Every joining caption's vision pass at once (the vision model batches them); those that succeeded."""
        for done in [self.vision_pool.submit(self._encode, caption) for caption in captions]:
            done.result()
        return [caption for caption in captions if not caption.finished]

    def execute(self, requests: list[Any]) -> list[Any] | None:
        captions = [self._accept(request) for request in requests]
        if self.decoupled:
            return None  # the scheduler streams every response
        for caption in captions:
            caption.done.wait()
        return [caption.response() for caption in captions]

    # ---- the decoding loop ----

    def _take_waiting(self, free_slots: int, wait: bool) -> list[Caption]:
        joining: list[Caption] = []
        while len(joining) < free_slots:
            try:
                caption = self.waiting.get(timeout=IDLE_POLL_S) if wait and not joining else self.waiting.get_nowait()
            except queue.Empty:
                break
            if reason := caption.stop_reason():
                self._stop(caption, reason, "caption cancelled before its first token")
                continue
            joining.append(caption)
        return joining

    def _stop(self, caption: Caption, reason: str, message: str) -> None:
        """End a caption early. Asked for by a cancel request: a plain final response, which the client waits for
        before it reuses or closes the stream; after a disconnect, a CANCELLED error nobody reads."""
        if reason == "cancel_request":
            caption.finish()
        else:
            caption.finish(message, getattr(pb_utils.TritonError, "CANCELLED", None))
        self.metrics.cancelled[reason].increment(1.0)

    def _leaving(self, active: list[Caption]) -> list[Caption]:
        leaving = []
        for caption in active:
            if caption.finished:
                leaving.append(caption)
            elif reason := caption.stop_reason():
                self._stop(caption, reason, "caption cancelled")
                self.logger.log_info(
                    f"{self.config['name']}: caption cancelled ({reason}) after {len(caption.generated)} tokens; its "
                    f"slot is free ({len(active) - 1} other captions decoding)"
                )
                leaving.append(caption)
        return leaving

    def _forget_finished(self) -> None:
        with self.open_lock:
            for request_id in [key for key, caption in self.open_captions.items() if caption.finished]:
                del self.open_captions[request_id]

    def _decode_loop(self) -> None:
        active: list[Caption] = []
        batch: DecoderBatch | None = None
        while not self.stopping.is_set():
            joining: list[Caption] = []
            try:
                leaving = self._leaving(active)
                staying = [caption for caption in active if caption not in leaving]
                if leaving:  # shown before an idle wait for new captions, so a scrape sees the slots free at once
                    self.metrics.show(len(staying), self.waiting.qsize())
                joining = self._encode_together(self._take_waiting(self.max_active - len(staying), wait=not staying))
                if leaving or joining:
                    active = staying + joining
                    batch = self.decoder.regroup(batch, staying, joining) if active else None
                    self._forget_finished()
                    self.metrics.show(len(active), self.waiting.qsize())
                if batch is None:
                    continue
                tokens = self.decoder.step(batch)
            except Exception as error:  # the decoder or its batch failed: every caption in it is told, the loop goes on
                self.logger.log_error(f"{self.config['name']}: decoding step failed, its captions fail: {error!r}")
                for caption in {*active, *joining}:
                    if not caption.finished:
                        caption.finish(f"text decoder step failed: {error}")
                active, batch = [], None
                self._forget_finished()
                self.metrics.show(0, self.waiting.qsize())
                continue
            for caption, token in zip(active, tokens.tolist(), strict=True):
                self._advance(caption, int(token))
            # Hand the GIL over at every step boundary: this loop releases it only inside ONNX Runtime and takes it
            # straight back, so on a busy host the stub's main thread, which accepts new captions and cancel
            # requests, could wait out a whole caption for it (a cancel seen after 508 of 511 tokens, under two CPU
            # hogs; docs/measurements.md).
            time.sleep(0)

    def _advance(self, caption: Caption, token: int) -> None:
        try:
            caption.emit(token)
        except Exception as error:  # its client is gone; the others go on
            caption.finish(f"cannot send a token: {error}")
            return
        caption.next_token = token
        if (token == self.eos_token_id and not caption.ignore_eos) or len(caption.generated) >= caption.max_new_tokens:
            caption.finish()

    def finalize(self) -> None:
        self.stopping.set()
        self.scheduler.join(timeout=30)
        self.vision_pool.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
