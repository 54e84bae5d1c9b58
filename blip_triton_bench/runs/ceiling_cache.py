"""The client ceiling remembered between runs on this host.

Measuring the ceiling costs a model load, a warm-up and several windows at concurrency 8 (about 6 s of both cores on a
2-core host, in every run that measures a level), and all it decides is a flag on a level within a factor of 2 of it
(load/ceiling.py NEAR_CEILING_FRACTION): a margin that this host kind's drift within the hour (10 to 20 %) does not
cross. So a ceiling that a run on this host measured for the same hardware, server, protocol, payloads and load side
less than MAX_AGE_S ago is reused, and its note says when it was measured. A cache file that cannot be read or written
costs a measurement, never the run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blip_triton_bench.host.files import write_text_atomic

logger = logging.getLogger(__name__)

CEILING_CACHE_FILE = "client-ceilings.json"
#: How long a measured ceiling is reused: short enough that the host's slow drift stays inside the factor-of-2 margin.
MAX_AGE_S = 1800.0
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RememberedCeiling:
    """A ceiling a run measured: infer/s, when (seconds since the epoch), and the note it wrote then."""

    infer_per_s: float
    measured_at: float
    note: str

    def to_dict(self) -> dict[str, float | str]:
        return {"infer_per_s": self.infer_per_s, "measured_at": self.measured_at, "note": self.note}

    @classmethod
    def from_dict(cls, data: object) -> RememberedCeiling | None:
        """None for anything that is not a plausible entry (an edited or foreign file)."""
        if not isinstance(data, dict):
            return None
        value, when, note = data.get("infer_per_s"), data.get("measured_at"), data.get("note")
        if not isinstance(value, int | float) or not isinstance(when, int | float) or not isinstance(note, str):
            return None
        if not 0 < value < float("inf"):
            return None
        return cls(float(value), float(when), note)

    def recalled_note(self, now: float, path: Path) -> str:
        minutes = max(0.0, now - self.measured_at) / 60.0
        return (
            f"{self.note} (measured {minutes:.0f} min ago by an earlier run on this host, reused for up to "
            f"{MAX_AGE_S / 60:.0f} min: {path})"
        )


class CeilingCache:
    """Ceilings by key (ceiling_key) in one JSON file of the cache folder."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time, max_age_s: float = MAX_AGE_S) -> None:
        self.path = path
        self.clock = clock
        self.max_age_s = max_age_s

    def recall(self, key: str) -> RememberedCeiling | None:
        """The ceiling stored under `key` if it was measured less than max_age_s ago."""
        remembered = RememberedCeiling.from_dict(self._entries().get(key))
        if remembered is None or not self._fresh(remembered):
            return None
        return remembered

    def remember(self, key: str, ceiling: RememberedCeiling) -> None:
        """Store `ceiling` under `key`, dropping stale entries; a file that cannot be written is logged, not raised."""
        entries = {
            name: entry.to_dict()
            for name, data in self._entries().items()
            if (entry := RememberedCeiling.from_dict(data)) is not None and self._fresh(entry)
        }
        entries[key] = ceiling.to_dict()
        text = json.dumps({"schema_version": SCHEMA_VERSION, "ceilings": entries}, indent=2, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, text + "\n")
        except OSError as error:
            logger.warning("client ceiling not remembered in %s: %s", self.path, error)

    def _fresh(self, ceiling: RememberedCeiling) -> bool:
        return 0.0 <= self.clock() - ceiling.measured_at < self.max_age_s

    def _entries(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            return {}
        ceilings = data.get("ceilings")
        return ceilings if isinstance(ceilings, dict) else {}


def ceiling_key(
    fingerprint_key: str, model: str, input_shapes: dict[str, tuple[int, ...]], load_side: str, shared_memory: str
) -> str:
    """What a ceiling depends on: the host, server and protocol (the baseline fingerprint's key), the model it was
    measured on, the request's tensors, who sent the load and how the tensors travelled (--shared-memory)."""
    shapes = ",".join(f"{name}={'x'.join(map(str, shape))}" for name, shape in sorted(input_shapes.items()))
    return f"{fingerprint_key}|{model}|{shapes}|{load_side}|shared-memory={shared_memory}"
