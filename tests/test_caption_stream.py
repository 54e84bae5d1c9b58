"""A caption stream never waits forever on a server that stopped answering.

The server stand-in is a listening socket that accepts connections and never says a word: what a tritonserver
hung in its fatal-signal handler looks like to a client (Triton 2.51, docs/disconnects.md), its sockets still open.
A client that closed its stream gracefully there waited on it forever (the CI run where --disconnect-stress hung).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from blip_triton_bench.captioning.caption import CaptionerClient
from blip_triton_bench.load.client import InferenceError

pytestmark = pytest.mark.unit

DEADLINE_S = 1.0
#: Far above the deadline: a close that waits on the server forever never gets here.
GIVE_UP_S = 15.0
#: A caption level's hang guard: one window (stretched to at most 5 s while no caption ends), then each stream's
#: current caption and close, a deadline each; far below the 600 s a stream used to wait.
LEVEL_GIVE_UP_S = 60.0


@pytest.fixture
def silent_server() -> Iterator[str]:
    """host:port of a listener that takes every connection and answers nothing."""
    accepted: list[socket.socket] = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        stopping = threading.Event()

        def accept() -> None:
            while not stopping.is_set():
                try:
                    accepted.append(listener.accept()[0])
                except TimeoutError:
                    continue

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        yield f"127.0.0.1:{listener.getsockname()[1]}"
        stopping.set()
        acceptor.join()
    for connection in accepted:
        connection.close()


def closed_within(client: CaptionerClient, limit_s: float) -> tuple[bool | None, float]:
    """(what close() returned, seconds it took); (None, limit) where it was still waiting at `limit_s`."""
    outcome: list[bool] = []
    started = time.monotonic()
    closing = threading.Thread(target=lambda: outcome.append(client.close()), daemon=True)
    closing.start()
    closing.join(limit_s)
    return (outcome[0] if outcome else None), time.monotonic() - started


def test_closing_a_stream_the_server_never_answers_gives_up_after_the_deadline(silent_server: str) -> None:
    client = CaptionerClient(silent_server, timeout_s=DEADLINE_S)
    closed, took_s = closed_within(client, GIVE_UP_S)
    assert closed is False, f"close() still waiting after {GIVE_UP_S:.0f} s on a server that answers nothing"
    assert DEADLINE_S * 0.9 <= took_s < DEADLINE_S + 5


def test_a_caption_asked_of_a_silent_server_fails_at_the_deadline_and_its_stream_still_closes(
    silent_server: str,
) -> None:
    client = CaptionerClient(silent_server, timeout_s=DEADLINE_S)
    started = client.send("blip_caption", np.zeros((1, 3, 8, 8), dtype=np.float32), max_new_tokens=4)
    with pytest.raises(InferenceError, match=r"blip_caption: no response within 1 s"):
        client.receive("blip_caption", bos_token_id=0, started=started)
    closed, _ = closed_within(client, GIVE_UP_S)
    assert closed is False


def test_a_caption_level_on_a_silent_server_ends_at_the_request_timeout(silent_server: str) -> None:
    """--request-timeout-s reaches the caption level's streams: each caption fails at it and the level ends. With
    the stream's own default deadline (it was 600 s) the level would wait that long for its first caption."""
    from blip_triton_bench.captioning.load import CAPTION_CONCURRENCY, CaptionRequest, measure_caption_level
    from blip_triton_bench.load.engine import LoadLevel, LoadSettings

    settings = LoadSettings(
        window_s=0.5, warmup_s=0.2, max_windows=1, min_requests_per_window=1, request_timeout_s=DEADLINE_S
    )
    request = CaptionRequest("blip_caption", np.zeros((1, 3, 8, 8), dtype=np.float32), 4)
    outcome: list = []
    level = threading.Thread(
        target=lambda: outcome.append(
            measure_caption_level(silent_server, request, LoadLevel(CAPTION_CONCURRENCY, 1), settings)
        ),
        daemon=True,
    )
    started = time.monotonic()
    level.start()
    level.join(LEVEL_GIVE_UP_S)
    assert outcome, f"the level still waited after {LEVEL_GIVE_UP_S:.0f} s on a server that answers nothing"
    assert time.monotonic() - started < LEVEL_GIVE_UP_S
    errors = outcome[0].errors
    assert errors and all("no response within 1 s" in error for error in errors), errors[:3]
