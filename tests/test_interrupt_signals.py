"""Ctrl-C and SIGTERM raise KeyboardInterrupt through one handler that remembers them: an interrupt that code under
test swallowed still ends the run (a Ctrl-C mid-sweep was lost once in 5 runs on a loaded host, and the run exited
0), and a SIGINT the process was started ignoring stays ignored."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest

from blip_triton_bench.host.interrupts import run_cancelled_by_signals, signals_as_interrupt

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_either_signal_raises_keyboard_interrupt_and_is_remembered_even_when_swallowed(signum: int) -> None:
    with signals_as_interrupt() as interrupts:
        with pytest.raises(KeyboardInterrupt, match=f"signal {signum}"):
            os.kill(os.getpid(), signum)
        assert interrupts.received == signum
    with signals_as_interrupt() as interrupts:
        with contextlib.suppress(KeyboardInterrupt):  # swallowed, as code under test might: the record stays
            os.kill(os.getpid(), signum)
        assert interrupts.received == signum


def test_the_handlers_before_are_back_after_and_an_ignored_sigint_stays_ignored() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with signals_as_interrupt():
        pass
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals_as_interrupt() as interrupts:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # ignored: nothing raised, nothing recorded
            assert interrupts.received is None
    finally:
        signal.signal(signal.SIGINT, previous)


async def _swallowing_callback_then_forever(swallowed: list[BaseException], cleaned_up: list[bool]) -> None:
    """A callback that, like grpc.aio's Cython completion callbacks, drops whatever is raised inside it, and a signal
    that arrives while it runs; then a wait that only a cancellation ends (hang-guarded)."""

    def callback() -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(200_000):  # bytecode after the signal: a Python handler would run in here
                pass
        except BaseException as error:  # what a C callback does with an exception
            swallowed.append(error)

    asyncio.get_running_loop().call_soon(callback)
    try:
        await asyncio.sleep(10)  # the hang guard: an interrupt that was lost ends here, and the test fails
    finally:
        cleaned_up.append(True)


def test_a_signal_cancels_the_loops_coroutine_between_callbacks_never_inside_one() -> None:
    swallowed: list[BaseException] = []
    cleaned_up: list[bool] = []
    with signals_as_interrupt() as interrupts:
        handler = signal.getsignal(signal.SIGINT)
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt, match="signal 2"):
            run_cancelled_by_signals(_swallowing_callback_then_forever(swallowed, cleaned_up))
        assert time.monotonic() - started < 5  # cancelled at once, not ended by the hang guard
        assert swallowed == []  # the callback never saw the interrupt
        assert cleaned_up == [True]  # the coroutine's own cleanup ran
        assert interrupts.received == signal.SIGINT  # handed to the handler it found, which recorded it
        assert signal.getsignal(signal.SIGINT) is handler  # and that handler is back


def test_a_loop_without_a_signal_returns_its_result_and_leaves_the_handlers_as_they_were() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert run_cancelled_by_signals(answer()) == 42
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_coroutine_that_swallows_its_cancellation_still_ends_in_keyboard_interrupt() -> None:
    """asyncio's own Ctrl-C handling loses the interrupt when the cancelled task returns anyway (the run went on and
    exited 0): here the signal is handed over whatever the coroutine did with its cancellation."""

    async def stubborn() -> str:
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "went on"
        return "not cancelled"

    with signals_as_interrupt() as interrupts:
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            run_cancelled_by_signals(stubborn())
        assert interrupts.received == signal.SIGTERM
