"""BLIP captioning as a Triton Python BLS model: greedy decoding server-side with a KV cache.

One request = one image. The vision encoder runs once (with the cross-attention keys/values of its patches);
the text decoder then runs one step per token, fed only the newest token and the previous step's keys/values. In decoupled mode each token is streamed as
its own response (then a final empty one), so clients measure time to first token and inter-token latency.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

GENERATION_CONFIG_FILENAME = "generation_config.json"

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


def _parameter(config: dict[str, Any], key: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    if not value:
        raise CaptionError(f"config.pbtxt of '{config['name']}' has no parameters '{key}' naming the model to call")
    return value


def _optional_scalar(request: Any, name: str, default: Any) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else from_triton(tensor).reshape(-1)[0].item()


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.config = json.loads(args["model_config"])
        self.vision_model = _parameter(self.config, "vision_encoder_model")
        self.decoder_model = _parameter(self.config, "text_decoder_model")
        path = os.path.join(args["model_repository"], args["model_version"], GENERATION_CONFIG_FILENAME)
        try:
            with open(path, encoding="utf-8") as handle:
                generation = json.load(handle)
        except OSError as error:
            raise CaptionError(
                f"model '{self.config['name']}': cannot read {path} ({error.strerror}); it holds bos_token_id, "
                "eos_token_id, max_new_tokens and decoder_cache_shape [layers, heads, head_dim]"
            ) from None
        self.bos_token_id = int(generation["bos_token_id"])
        self.eos_token_id = int(generation["eos_token_id"])
        self.max_new_tokens = int(generation["max_new_tokens"])
        self.cache_shape = tuple(int(n) for n in generation["decoder_cache_shape"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)

    def _call(self, model: str, inputs: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
        """Run `model` on ndarrays or pb_utils.Tensors; its outputs stay pb_utils.Tensors (no copy between steps)."""
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[to_triton(name, array) for name, array in inputs.items()],
            requested_output_names=outputs,
            # numpy needs host memory, wherever (CPU or GPU) the composing model ran
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = request.exec()
        if response.has_error():
            raise CaptionError(f"{model}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name) for name in outputs}

    def _caption(self, request: Any, emit: Any) -> list[int]:
        pixel_values = pb_utils.get_input_tensor_by_name(request, "pixel_values")
        max_new_tokens = int(_optional_scalar(request, "max_new_tokens", self.max_new_tokens))
        ignore_eos = bool(_optional_scalar(request, "ignore_eos", False))
        if max_new_tokens < 1:
            raise CaptionError(f"max_new_tokens is {max_new_tokens}; ask for at least 1")
        cross = self._call(self.vision_model, {"pixel_values": pixel_values}, ["cross_keys", "cross_values"])
        layers, heads, head_dim = self.cache_shape
        keys = np.zeros((1, layers, heads, 0, head_dim), dtype=np.float32)
        values = np.zeros_like(keys)
        token = self.bos_token_id
        generated: list[int] = []
        for _ in range(max_new_tokens):
            step = self._call(
                self.decoder_model,
                {
                    "input_ids": np.asarray([[token]], dtype=np.int64),
                    "cross_keys": cross["cross_keys"],
                    "cross_values": cross["cross_values"],
                    "past_keys": keys,
                    "past_values": values,
                },
                ["logits", "present_keys", "present_values"],
            )
            keys, values = step["present_keys"], step["present_values"]
            token = int(np.argmax(from_triton(step["logits"])[0, -1]))
            generated.append(token)
            emit([token])
            if token == self.eos_token_id and not ignore_eos:
                break
        return generated

    def execute(self, requests: list[Any]) -> list[Any] | None:
        responses = []
        for request in requests:
            sender = request.get_response_sender() if self.decoupled else None

            def emit(tokens: list[int], sender: Any = sender) -> None:
                if sender is not None:
                    tensor = to_triton("token_ids", np.asarray(tokens, dtype=np.int64))
                    sender.send(pb_utils.InferenceResponse(output_tensors=[tensor]))

            try:
                generated = self._caption(request, emit)
            except Exception as error:  # one failed caption answers its own request, not the others
                failure = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error)))
                if sender is not None:
                    sender.send(failure, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                else:
                    responses.append(failure)
                continue
            if sender is not None:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                tensor = to_triton("token_ids", np.asarray(generated, dtype=np.int64))
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return None if self.decoupled else responses
