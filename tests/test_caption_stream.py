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
