"""A blocking Triton client over gRPC or HTTP that takes ModelInputs and returns logits.

Correctness tests and captioning use it; load generation has its own asynchronous clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from blip_triton_bench.judging.correctness import served_array
from blip_triton_bench.model.workload import ModelInputs

if TYPE_CHECKING:
    from blip_triton_bench.servers.base import RunningServer

OUTPUT_NAME = "logits"

#: --request-timeout-s: one BLIP-base request takes about a second on 2 cores and a queued one a few more, so a
#: request still unanswered after a minute has met a hung server; without a limit a level would wait for ever.
DEFAULT_REQUEST_TIMEOUT_S = 60.0


class InferenceError(RuntimeError):
    """The server rejected or failed a request; the message is the server's."""


class TritonInferClient:
    """`with TritonInferClient(url, "grpc") as client: client.infer("base_model_cpu", inputs)`."""

    def __init__(
        self,
        url: str,
        protocol: str,
        timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`headers`: what each request carries (RunningServer.request_headers: the run's key where the server
        restricts inference)."""
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, not {protocol!r}")
        self.protocol = protocol
        self._headers = dict(headers) if headers else None
        self._module = triton_grpc if protocol == "grpc" else triton_http
        self._timeout_s = timeout_s
        if protocol == "grpc":
            self._client = triton_grpc.InferenceServerClient(url)
        else:
            self._client = triton_http.InferenceServerClient(
                url, connection_timeout=timeout_s, network_timeout=timeout_s
            )

    @classmethod
    def to_server(
        cls, server: RunningServer, protocol: str = "grpc", timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    ) -> TritonInferClient:
        """A client of `server` over `protocol`, its requests carrying the server's run key (None for one without)."""
        url = server.endpoints.grpc_url if protocol == "grpc" else server.endpoints.http_url
        return cls(url, protocol, timeout_s, server.request_headers(protocol))

    def __enter__(self) -> TritonInferClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.close()

    def infer(self, model_name: str, inputs: ModelInputs) -> np.ndarray:
        triton_inputs = []
        for name, array in inputs.as_dict().items():
            triton_input = self._module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            triton_input.set_data_from_numpy(array)
            triton_inputs.append(triton_input)
        outputs = [self._module.InferRequestedOutput(OUTPUT_NAME)]
        try:
            if self.protocol == "grpc":
                result = self._client.infer(
                    model_name, triton_inputs, outputs=outputs, client_timeout=self._timeout_s, headers=self._headers
                )
            else:
                result = self._client.infer(model_name, triton_inputs, outputs=outputs, headers=self._headers)
        except InferenceServerException as error:
            raise InferenceError(f"{model_name} ({self.protocol}): {error.message()}") from None
        return served_array(result, OUTPUT_NAME)  # names an empty output instead of numpy's reshape error
