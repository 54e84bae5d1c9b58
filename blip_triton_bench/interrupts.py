"""How the suite's processes end: SIGTERM handled as Ctrl-C, so a CI job that is cancelled unwinds (and stops its
servers) like a person's Ctrl-C, and either one remembered, so an interrupt is never lost; and child processes that
die with the process that started them."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Interrupts:
    """The signal that interrupted the run, once one did: kept even where the KeyboardInterrupt it raised was
    swallowed on its way up (seen once in 5 runs of a Ctrl-C mid-sweep on a loaded host: the run went on and
    exited 0), so the run can still end as interrupted."""

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


def die_with_parent() -> None:
    """In a child process: get SIGKILL when the parent dies, so a killed pytest never leaves a server or a load
    worker behind."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
