"""Ctrl-C and SIGTERM raise KeyboardInterrupt through one handler that remembers them: an interrupt that code under
test swallowed still ends the run (a Ctrl-C mid-sweep was lost once in 5 runs on a loaded host, and the run exited
0), and a SIGINT the process was started ignoring stays ignored."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from blip_triton_bench.interrupts import signals_as_interrupt

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
