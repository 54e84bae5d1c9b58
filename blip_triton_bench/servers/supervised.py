"""The session's server, watched: a server that dies is noticed at the next look, accounted for once (how it died,
its last log lines, what was running), and replaced by a fresh one on the same endpoints with the same models.

So one crash costs the test that was running, not every test after it. An external server is not ours to restart:
once it stops answering, the run says so once and every later test is skipped with that reason.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from blip_triton_bench.repository.variants import Variant
from blip_triton_bench.servers.base import (
    ModelLoad,
    RunningServer,
    ServerDescription,
    ServerDied,
    ServerProvider,
    ServerStartError,
)
from blip_triton_bench.servers.resources import ProcessReading, ResourceSource

#: How many of a dead server's log lines its account quotes.
DEATH_LOG_LINES = 30


@dataclass(frozen=True)
class ServerDeath:
    """One server's end, as the run reports it."""

    cause: str  # the server's own account: exit code or signal, container state, or the health call's error
    during: str  # what was running: a test id, or "between tests"
    log_tail: str
    replaced: bool  # a fresh server took its place

    def message(self) -> str:
        after = (
            "A fresh server took its place for the tests after this one."
            if self.replaced
            else "It was not replaced: the tests after this one are skipped."
        )
        return f"tritonserver died during {self.during}: {self.cause}. {after}\nIts log ends with:\n{self.log_tail}"


class SupervisedServer(RunningServer):
    """A provider's server that can be replaced: every call goes to the server now running, on the endpoints the
    first one had, so URLs handed out earlier stay right. Enter it to start the first server; leaving stops the
    last one."""

    def __init__(self, provider: ServerProvider, repository: Path) -> None:
        self._provider, self._repository = provider, repository
        self._stack = contextlib.ExitStack()
        self._current: RunningServer | None = None
        # What is loaded, in load order (a replacement loads callees before their callers): the variant where it was
        # prepared as one, None where it was loaded by name.
        self._loaded: dict[str, Variant | None] = {}
        self.deaths: list[ServerDeath] = []
        self.generation = 0  # how many servers took a dead one's place
        self._closed = False

    def __enter__(self) -> SupervisedServer:
        current = self._stack.enter_context(self._provider.start(self._repository))
        self._adopt(current)
        super().__init__(current.endpoints, current.model_load_timeout_s)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closed = True  # stopped on purpose from here on: no death to report, nothing to replace
        self._stack.close()

    def _adopt(self, server: RunningServer) -> None:
        self._current = server
        self.provider_name = server.provider_name
        self.run_key = server.run_key
        self.loads_models = server.loads_models

    @property
    def current(self) -> RunningServer:
        if self._current is None:
            raise ServerStartError("the supervised server was never started (enter it first)")
        return self._current

    @property
    def replaceable(self) -> bool:
        """Whether the suite owns the server and can start another (not an external one)."""
        return self.loads_models

    # ---- watching ----

    def death(self) -> str | None:
        """None while the server lives (or once it was stopped on purpose); else how it ended, in its own words
        (exit code or signal, container state)."""
        return None if self._closed else self.current.liveness()

    def account_for_death(self, cause: str, during: str) -> ServerDeath:
        """Record the death once, and replace the server where the suite owns it. A replacement that cannot start
        leaves the death recorded as not replaced (the caller skips what follows)."""
        tail = self.current.log_tail(DEATH_LOG_LINES)
        replaced = False
        if self.replaceable:
            try:
                self._replace()
                replaced = True
            except Exception as error:  # whatever stops the replacement, the death is still told, and what followed
                cause = f"{cause}; no server could take its place: {error}"
        death = ServerDeath(cause=cause, during=during, log_tail=tail, replaced=replaced)
        self.deaths.append(death)
        return death

    def _replace(self) -> None:
        endpoints = self.endpoints
        self._stack.close()  # stops what is left of the dead one: reaps it, removes its stubs and regions
        self._stack = contextlib.ExitStack()
        self._adopt(self._stack.enter_context(self._provider.start(self._repository, endpoints)))
        self.generation += 1
        for name, variant in self._loaded.items():
            if variant is None:
                self.current.load_model(name)
            else:
                self.current.prepare_variant(variant)

    # ---- the RunningServer interface, on the server now running ----

    def log_text(self) -> str:
        return self.current.log_text()

    def liveness(self) -> str | None:
        return self.current.liveness()

    def describe(self) -> ServerDescription:
        return self.current.describe()

    def fingerprint_note(self) -> str | None:
        return self.current.fingerprint_note()

    def resource_source(self) -> ResourceSource:
        """Reads whichever server is running when the sampler asks."""
        first = self.current.resource_source()
        if first.read_process is None:
            return first

        def read() -> ProcessReading:
            reader = self.current.resource_source().read_process
            if reader is None:
                raise ServerDied(f"tritonserver ({self.provider_name}): its processes cannot be read any more")
            return reader()

        return ResourceSource(
            read_process=read,
            gpu_indices=first.gpu_indices,
            process_unavailable=first.process_unavailable,
            gpu_unavailable=first.gpu_unavailable,
        )

    def _refuse_if_dead(self, what: str) -> None:
        if (cause := self.death()) is not None:
            raise ServerDied(f"cannot {what}: tritonserver is gone ({cause})")

    def load_model(self, name: str) -> ModelLoad:
        self._refuse_if_dead(f"load model '{name}'")
        load = self.current.load_model(name)
        self._loaded.setdefault(name, None)
        return load

    def prepare_variant(self, variant: Variant) -> ModelLoad:
        self._refuse_if_dead(f"load model '{variant.name}'")
        load = self.current.prepare_variant(variant)
        self._loaded[variant.name] = variant
        return load

    def unload_model(self, name: str) -> None:
        self.current.unload_model(name)
        self._loaded.pop(name, None)
