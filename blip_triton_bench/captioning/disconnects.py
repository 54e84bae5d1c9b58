"""Clients that leave mid-caption: a stress that abandons streamed captions at random steps while other captions
decode beside them, and what it found about the server (did it survive, did the staying captions stay right).

Two ways to leave: `disconnect` cancels the gRPC call as a departing client does (what a user's server must
survive; Triton 2.51 crashes on it, docs/disconnects.md), `cancel_request` asks the captioner to stop the caption on
the same stream (the suite's own way, which never cancels an RPC).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from blip_triton_bench.captioning.caption import DEFAULT_CANCEL_REQUEST_PARAMETER, CaptionerClient
from blip_triton_bench.load.client import InferenceError

DISCONNECT = "disconnect"
CANCEL_REQUEST = "cancel_request"
LEAVING_WAYS = (DISCONNECT, CANCEL_REQUEST)
#: Where in its caption a client leaves: before its first token, after some but not all, or after its last token
#: and before the final response (the step most likely to cross the caption's own end).
BEFORE_FIRST_TOKEN, MID_CAPTION, AT_LAST_TOKEN = "before its first token", "mid-caption", "at its last token"
DEFAULT_LEAVING_CLIENTS = 6
DEFAULT_STAYING_CLIENTS = 1
#: Long enough for a mid-caption step to exist, short enough that thousands of captions take a minute on tiny.
DEFAULT_ABANDONED_TOKENS = 8


class DisconnectStressError(ValueError):
    """The stress was asked for with settings it cannot run (a usage error)."""


@dataclass(frozen=True)
class AbandonPlan:
    """How many captions to abandon, from how many clients, while how many others caption beside them."""

    abandoned_captions: int
    how: str = DISCONNECT
    leaving_clients: int = DEFAULT_LEAVING_CLIENTS
    staying_clients: int = DEFAULT_STAYING_CLIENTS
    tokens: int = DEFAULT_ABANDONED_TOKENS  # each abandoned caption asks for this many (end token ignored)
    seed: int = 0
    timeout_s: float = 60.0  # one response's deadline; a server that answers nothing for this long is hung
    cancel_parameter: str = DEFAULT_CANCEL_REQUEST_PARAMETER
    #: what every stream carries: the run's key where the server restricts inference (RunningServer.request_headers)
    headers: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.how not in LEAVING_WAYS:
            raise DisconnectStressError(f"leaving way '{self.how}': use one of {', '.join(LEAVING_WAYS)}")
        if self.abandoned_captions < 1 or self.leaving_clients < 1 or self.staying_clients < 0:
            raise DisconnectStressError(
                f"abandon {self.abandoned_captions} captions from {self.leaving_clients} clients beside "
                f"{self.staying_clients}: ask for at least 1 caption and 1 leaving client"
            )
        if self.tokens < 2:
            raise DisconnectStressError(f"{self.tokens} tokens per abandoned caption leave no mid-caption step")

    def leaving_step(self, rng: random.Random) -> int:
        """How many tokens a leaving client waits for: 0, 1 to tokens-1, or all (a quarter, a half, a quarter)."""
        draw = rng.random()
        if draw < 0.25:
            return 0
        return self.tokens if draw >= 0.75 else rng.randint(1, self.tokens - 1)


def step_name(received: int, tokens: int) -> str:
    if received == 0:
        return BEFORE_FIRST_TOKEN
    return AT_LAST_TOKEN if received >= tokens else MID_CAPTION


@dataclass(frozen=True)
class AbandonOutcome:
    """What one stress found. `server_death` is the server's own account (exit code or signal), never a guess
    from client errors."""

    plan: AbandonPlan
    abandoned: int
    abandoned_by_step: dict[str, int]
    staying_captions: int
    staying_mismatches: tuple[str, ...]
    client_errors: tuple[str, ...]
    server_death: str | None
    elapsed_s: float

    @property
    def survived(self) -> bool:
        return self.server_death is None

    def to_dict(self) -> dict[str, object]:
        return {
            "how": self.plan.how,
            "abandoned": self.abandoned,
            "abandoned_by_step": self.abandoned_by_step,
            "staying_captions": self.staying_captions,
            "staying_mismatches": len(self.staying_mismatches),
            "client_errors": list(self.client_errors[:20]),
            "survived": self.survived,
            "server_death": self.server_death,
            "elapsed_s": self.elapsed_s,
        }

    def finding(self) -> str:
        steps = ", ".join(f"{count} {step}" for step, count in sorted(self.abandoned_by_step.items()))
        way = "disconnected" if self.plan.how == DISCONNECT else "cancelled on the stream"
        if not self.survived:
            return (
                f"the server under test crashed after {self.abandoned} abandoned streams ({way}; {steps}): "
                f"{self.server_death}"
            )
        return (
            f"the server survived {self.abandoned} abandoned captions ({way} by {self.plan.leaving_clients} clients; "
            f"{steps}) in {self.elapsed_s:.0f} s, while {self.plan.staying_clients} client(s) finished "
            f"{self.staying_captions} captions, {len(self.staying_mismatches)} of them wrong"
        )


@dataclass
class _Tally:
    """What the clients' threads saw; they only append under the lock, the caller reads after joining them."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    started: int = 0
    abandoned_by_step: Counter = field(default_factory=Counter)
    staying: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def claim(self, limit: int) -> bool:
        with self.lock:
            if self.started >= limit:
                return False
            self.started += 1
            return True


def abandon_captions(
    grpc_url: str,
    model_name: str,
    pixel_values: np.ndarray,
    expected_token_ids: list[int],
    bos_token_id: int,
    plan: AbandonPlan,
    server_death: Callable[[], str | None],
) -> AbandonOutcome:
    """Run `plan` against `model_name`: the leaving clients abandon captions of `pixel_values` at random steps while
    the staying clients caption it to the end and compare with `expected_token_ids` (HF generate()'s). Stops early
    once `server_death()` says the server is gone; then the outcome carries its account."""
    tally, stop = _Tally(), threading.Event()

    def gone() -> bool:
        if server_death() is not None:
            stop.set()
        return stop.is_set()

    def leave(seed: int) -> None:
        rng = random.Random(seed)
        with CaptionerClient(grpc_url, plan.timeout_s, plan.headers) as stream:
            while not stop.is_set() and tally.claim(plan.abandoned_captions):
                waited_for = plan.leaving_step(rng)
                try:
                    if plan.how == DISCONNECT:
                        received = _disconnect_one(grpc_url, model_name, pixel_values, bos_token_id, plan, waited_for)
                    else:
                        received = _cancel_one(stream, model_name, pixel_values, bos_token_id, plan, waited_for)
                except (InferenceError, OSError) as error:
                    if gone():
                        return
                    with tally.lock:
                        tally.errors.append(f"leaving client {seed}: {error}")
                    continue
                with tally.lock:
                    tally.abandoned_by_step[step_name(received, plan.tokens)] += 1

    def stay(index: int) -> None:
        with CaptionerClient(grpc_url, plan.timeout_s, plan.headers) as stream:
            while not stop.is_set():
                try:
                    caption = stream.caption(model_name, pixel_values, bos_token_id, len(expected_token_ids) - 1)
                except (InferenceError, OSError) as error:
                    if gone():
                        return
                    with tally.lock:
                        tally.errors.append(f"staying client {index}: {error}")
                    continue
                with tally.lock:
                    tally.staying += 1
                    if list(caption.token_ids) != expected_token_ids:
                        tally.mismatches.append(f"caption {tally.staying}: {list(caption.token_ids)}")

    started = time.monotonic()
    leavers = [threading.Thread(target=leave, args=(plan.seed + i,), daemon=True) for i in range(plan.leaving_clients)]
    stayers = [threading.Thread(target=stay, args=(i,), daemon=True) for i in range(plan.staying_clients)]
    for thread in (*stayers, *leavers):
        thread.start()
    for thread in leavers:
        thread.join()
    stop.set()
    for thread in stayers:
        thread.join()
    return AbandonOutcome(
        plan=plan,
        abandoned=sum(tally.abandoned_by_step.values()),
        abandoned_by_step=dict(tally.abandoned_by_step),
        staying_captions=tally.staying,
        staying_mismatches=tuple(tally.mismatches),
        client_errors=tuple(tally.errors),
        server_death=server_death(),
        elapsed_s=time.monotonic() - started,
    )


def _disconnect_one(
    url: str, model_name: str, pixel_values: np.ndarray, bos: int, plan: AbandonPlan, waited_for: int
) -> int:
    """One caption on a stream of its own, whose gRPC call is cancelled after `waited_for` tokens."""
    with CaptionerClient(url, plan.timeout_s, plan.headers) as client:
        started = client.send(model_name, pixel_values, plan.tokens, ignore_eos=True)
        received = (
            len(client.receive(model_name, bos, started, stop_after=waited_for).generated_ids) if waited_for else 0
        )
        client.disconnect()
    return received


def _cancel_one(
    stream: CaptionerClient, model_name: str, pixel_values: np.ndarray, bos: int, plan: AbandonPlan, waited_for: int
) -> int:
    """One caption on the client's own stream, stopped by a cancel request after `waited_for` tokens."""
    request_id = uuid.uuid4().hex
    started = stream.send(model_name, pixel_values, plan.tokens, ignore_eos=True, request_id=request_id)
    received = len(stream.receive(model_name, bos, started, stop_after=waited_for).generated_ids) if waited_for else 0
    stream.abandon(model_name, request_id, plan.cancel_parameter)
    return received


def _captioner_samples(metrics_text: str, model_name: str) -> dict[tuple[str, str], float]:
    """The captioner's own metrics (model_repository/blip_caption) for `model_name`: (family, reason) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (family.name, sample.labels.get("reason", "")): sample.value
        for family in text_string_to_metric_families(metrics_text)
        if family.name.startswith("blip_caption_")
        for sample in family.samples
        if sample.labels.get("model") == model_name
    }


def captioner_slots(metrics_text: str, model_name: str) -> tuple[int, int] | None:
    """(captions decoding, captions waiting for a slot), or None where the server exports no such gauges for
    `model_name` (a captioner other than the suite's)."""
    samples = _captioner_samples(metrics_text, model_name)
    active, waiting = samples.get(("blip_caption_active", "")), samples.get(("blip_caption_waiting", ""))
    return None if active is None or waiting is None else (int(active), int(waiting))


def captions_cancelled(metrics_text: str, model_name: str) -> dict[str, int]:
    """Captions the captioner stopped early, by reason (`disconnect`, `cancel_request`); empty where it exports none."""
    samples = _captioner_samples(metrics_text, model_name)
    return {reason: int(value) for (name, reason), value in samples.items() if name == "blip_caption_cancelled"}
