"""One host, one measurement at a time where it matters: a host-wide lock that runs hold while their server runs.

A run that records baselines (--update-baselines) holds it exclusively, every other measuring run holds it shared:
measuring runs may overlap each other, but a baseline is never recorded while another run of the suite measures on
this host, and a run never measures while another records. `--measure-lock off` opts out.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

AUTO, EXCLUSIVE, SHARED, OFF = "auto", "exclusive", "shared", "off"
MEASURE_LOCK_MODES = (AUTO, EXCLUSIVE, SHARED, OFF)
LOCK_FILENAME = "blip-triton-bench-measure.lock"
#: /run/lock is the FHS place for host-wide lock files (world-writable and sticky, like /tmp, on Debian and Ubuntu);
#: the temp folder where it is missing or not writable. Never on a shared filesystem: the lock is per host.
SYSTEM_LOCK_DIR = Path("/run/lock")


#: Names another lock file for every run started with this environment (the machinery's tests give each test
#: process its own, so their runs, measuring side by side on purpose, do not wait on each other or on a real run).
LOCK_FILE_ENV = "BLIP_BENCH_MEASURE_LOCK"


def default_lock_path() -> Path:
    if os.environ.get(LOCK_FILE_ENV):
        return Path(os.environ[LOCK_FILE_ENV])
    directory = SYSTEM_LOCK_DIR if os.access(SYSTEM_LOCK_DIR, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())
    return directory / LOCK_FILENAME


def resolve_mode(mode: str, update_baselines: bool) -> str:
    """`auto`: exclusive when this run records baselines, shared otherwise."""
    if mode not in MEASURE_LOCK_MODES:
        raise ValueError(f"--measure-lock {mode!r}: use one of {', '.join(MEASURE_LOCK_MODES)}")
    if mode == AUTO:
        return EXCLUSIVE if update_baselines else SHARED
    return mode


class MeasureLockError(RuntimeError):
    """The lock file cannot be opened (a folder that is not writable, a file another user made unreadable)."""


@dataclass
class HeldLock:
    """The lock while this run holds it; `release()` (or process exit) lets the next run in."""

    path: Path
    mode: str
    waited_s: float
    waited_for: tuple[int, ...]  # the pids that held it when this run had to wait
    _file: IO[bytes] | None = field(default=None, repr=False)

    def describe(self) -> str:
        waited = (
            f"; waited {self.waited_s:.1f} s for pid {', '.join(map(str, self.waited_for)) or '?'}"
            if self.waited_for or self.waited_s >= 0.05
            else ""
        )
        return f"measurement lock: {self.mode} on {self.path}{waited}"

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


def lock_holders(path: Path) -> tuple[int, ...]:
    """Pids holding a flock on `path` now, as the kernel lists them in /proc/locks (waiters, marked `->`, are not
    holders); empty where /proc/locks cannot be read."""
    try:
        status = path.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return ()
    file_id = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    holders = []
    for line in lines:
        fields = line.split()
        if "->" not in fields and "FLOCK" in fields and file_id in fields:
            holders.append(int(fields[fields.index(file_id) - 1]))
    return tuple(sorted(set(holders)))


def _open_lock_file(path: Path) -> IO[bytes]:
    """Opened for writing where this user may (on NFS an exclusive flock needs it); read-only otherwise, which a
    local filesystem's flock accepts, for a lock file another user created (0644)."""
    try:
        return open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "rb")
    except PermissionError:
        return open(os.open(path, os.O_RDONLY), "rb")


def acquire(path: Path, mode: str, on_wait: Callable[[str], None]) -> HeldLock:
    """Take the lock on `path` in `mode` (EXCLUSIVE or SHARED), waiting as long as it takes; `on_wait` gets one line
    saying who holds it when this run has to wait. Ctrl-C ends the wait."""
    operation = fcntl.LOCK_EX if mode == EXCLUSIVE else fcntl.LOCK_SH
    try:
        lock_file = _open_lock_file(path)
    except OSError as error:
        raise MeasureLockError(
            f"cannot open the measurement lock {path} ({error.strerror or error}): pass --measure-lock-file a file "
            "this user can create or read, or --measure-lock off to measure without it"
        ) from None
    started = time.monotonic()
    holders: tuple[int, ...] = ()
    try:
        try:
            fcntl.flock(lock_file, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = lock_holders(path)
            on_wait(
                f"waiting for the measurement lock {path} ({mode}): held by pid "
                f"{', '.join(map(str, holders)) or '(unknown)'}; another run of the suite is measuring or recording "
                "on this host (--measure-lock off to measure anyway)"
            )
            fcntl.flock(lock_file, operation)
    except BaseException:
        lock_file.close()
        raise
    return HeldLock(path, mode, time.monotonic() - started, holders, lock_file)
