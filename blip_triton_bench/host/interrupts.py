"""How the suite's processes end: SIGTERM handled as Ctrl-C, so a CI job that is cancelled unwinds (and stops its
servers) like a person's Ctrl-C, and either one remembered, so an interrupt is never lost; event loops that a signal
cancels between callbacks, never inside one; and child processes that die with the process that started them."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

#: The signals an event loop run by run_cancelled_by_signals turns into the cancellation of its coroutine.
CANCELLING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Interrupts:
    """The signal that interrupted the run, once one did: kept even where the KeyboardInterrupt it raised was
    swallowed on its way up, so the run can still end as interrupted. (Seen once in 5 runs of a Ctrl-C mid-sweep on
    a loaded host: the run went on and exited 0. The cause was grpc.aio swallowing it inside a callback, which
    run_cancelled_by_signals now prevents; the record stays for any other code that swallows one.)"""

    received: int | None = None


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[Interrupts]:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt for the duration, by one handler that also records them
    (main thread only: signals are delivered there). A SIGINT the process was started ignoring (a background job)
    stays ignored."""
    interrupts = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return

    def interrupt(signum: int, frame: object) -> None:
        interrupts.received = signum
        raise KeyboardInterrupt(f"signal {signum}")

    handled = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous = {signum: signal.signal(signum, interrupt) for signum in handled}
    try:
        yield interrupts
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_cancelled_by_signals(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main), where SIGINT or SIGTERM cancels `main` (its cleanup runs: open calls are cancelled and
    clients closed) and is then handed to the handler that was there before, outside the loop: signals_as_interrupt's
    raises KeyboardInterrupt and records it, a default SIGTERM ends the process. A signal ignored before stays
    ignored. Off the main thread (where no signal is delivered) it is plain asyncio.run.

    Why: a Python handler runs at whatever bytecode the main thread is at, and in an event loop that is often a
    grpc.aio completion callback, inside Cython. A KeyboardInterrupt raised there is printed and dropped ("Exception
    ignored in: 'grpc._cython.cygrpc.CallbackWrapper.functor_run'"), and the call that callback belonged to never
    completes: the level hung with nothing left to wake it (reproduced in about 60 interrupted levels), or, once in
    CI, the process died with a fatal error. The loop's own signal handling only notes the signal (a wakeup fd) and
    acts on it between callbacks."""
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(main)
    received: list[int] = []
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        cancel: list[Callable[[], object]] = []

        def on_signal(signum: int) -> None:
            received.append(signum)
            for cancelling in cancel:
                cancelling()

        async def cancellable() -> T:
            task = asyncio.current_task()
            assert task is not None  # a coroutine run by the Runner is always in a task
            cancel.append(task.cancel)
            return await main

        before = {signum: signal.getsignal(signum) for signum in CANCELLING_SIGNALS}
        # one ignored stays ignored; one installed from C (None) is not Python's to take over and put back
        caught = [signum for signum, handler in before.items() if handler not in (signal.SIG_IGN, None)]
        for signum in caught:
            loop.add_signal_handler(signum, on_signal, signum)
        cancelled = False
        try:
            result = runner.run(cancellable())
        except asyncio.CancelledError:
            if not received:
                raise
            cancelled = True
        finally:
            for signum in caught:
                loop.remove_signal_handler(signum)  # it sets the default back, not what was there
                signal.signal(signum, before[signum])
    if received:
        _hand_over(received[0], before[received[0]])
        if cancelled:  # a handler that only took note: the coroutine has no result to return
            raise KeyboardInterrupt(f"signal {received[0]}")
    return result


def _hand_over(signum: int, handler: Any) -> None:
    """Deliver a signal the loop caught to the handler it found (outside any loop now)."""
    if callable(handler):
        handler(signum, None)  # signals_as_interrupt's, or Python's default_int_handler: raises KeyboardInterrupt
    else:  # SIG_DFL: the signal's own action (SIGTERM ends the process), as if it had never been caught
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def die_with_parent() -> None:
    """In a child process: get SIGKILL when the parent dies, so a killed pytest never leaves a server or a load
    worker behind."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
