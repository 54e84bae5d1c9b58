"""A pytest plugin for tests/test_server_crash.py: signals the suite's own tritonserver at a chosen moment.

BLIP_CRASH_TEST names a test (a substring of its id) and BLIP_CRASH_SIGNAL a signal (SIGSEGV, SIGKILL).
BLIP_CRASH_WHEN is `mid-level` (once the server has answered requests inside that test's call) or `after` (when
that test's teardown is done, so no test runs). The plugin waits for the process to be gone before it returns, so
what the suite sees next is a dead server, never a dying one.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from blip_triton_bench.fixtures.plugin import CONTEXT_KEY

#: Requests the server must have answered inside the level before the signal: proof the level is under way.
ANSWERED_BEFORE_SIGNAL = 5
HANG_GUARD_S = 120.0


FIRED_KEY = pytest.StashKey[bool]()


def _wanted(item: pytest.Item, when: str) -> bool:
    """The first test whose id holds BLIP_CRASH_TEST, once per run."""
    if item.config.stash.get(FIRED_KEY, False):
        return False
    wanted = os.environ.get("BLIP_CRASH_WHEN") == when and os.environ.get("BLIP_CRASH_TEST", "\0") in item.nodeid
    item.config.stash[FIRED_KEY] = wanted
    return wanted


def _server(config: pytest.Config):
    return config.stash[CONTEXT_KEY].session.server.current


def _signal_and_wait(server) -> None:
    server.process.send_signal(getattr(signal, os.environ["BLIP_CRASH_SIGNAL"]))
    deadline = time.monotonic() + HANG_GUARD_S
    while server.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def _answered(server) -> int:
    statistics = server.http_client().get_inference_statistics()
    return sum(int(model["inference_stats"]["success"]["count"]) for model in statistics["model_stats"])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if not _wanted(item, "mid-level"):
        yield
        return
    server = _server(item.config)
    before = _answered(server)

    def signal_once_answering() -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while _answered(server) < before + ANSWERED_BEFORE_SIGNAL and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_and_wait(server)

    watcher = threading.Thread(target=signal_once_answering, daemon=True)
    watcher.start()
    yield
    watcher.join(HANG_GUARD_S)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    if _wanted(item, "after"):
        _signal_and_wait(_server(item.config))
