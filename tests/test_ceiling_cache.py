"""The client ceiling remembered between runs on one host: reused while fresh and for the same key only, a damaged
file costs a measurement and never the run, and a probe that recalls a ceiling measures nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blip_triton_bench.load.engine import LoadSettings
from blip_triton_bench.model.workload import ModelInputs
from blip_triton_bench.runs.ceiling_cache import (
    MAX_AGE_S,
    CeilingCache,
    RememberedCeiling,
    ceiling_key,
)
from blip_triton_bench.runs.perf import CeilingProbe, PerfSettings

pytestmark = pytest.mark.unit

NAN = float("nan")  # json.dumps writes NaN, which json.loads reads back

SHAPES = {"pixel_values": (1, 3, 384, 384), "input_ids": (1, 16), "attention_mask": (1, 16)}
LONGER_IDS = {**SHAPES, "input_ids": (1, 32)}
KEY = ceiling_key("abc123", "blip_bench_client_ceiling(384, 30524)", SHAPES, "one client process", "none")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cache_at(path: Path, now: float) -> CeilingCache:
    return CeilingCache(path, clock=Clock(now))


def test_a_ceiling_is_reused_while_fresh_and_only_under_its_own_key(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "ceilings.json"
    cache_at(path, 1000.0).remember(KEY, RememberedCeiling(250.0, 1000.0, "load generator ceiling: 250.0 infer/s"))

    assert cache_at(path, 1000.0 + MAX_AGE_S - 1).recall(KEY) == RememberedCeiling(
        250.0, 1000.0, "load generator ceiling: 250.0 infer/s"
    )
    assert cache_at(path, 1000.0 + MAX_AGE_S).recall(KEY) is None  # stale
    assert cache_at(path, 999.0).recall(KEY) is None  # from the future: a clock that moved back
    for other in (
        ceiling_key("def456", "blip_bench_client_ceiling(384, 30524)", SHAPES, "one client process", "none"),
        ceiling_key("abc123", "my_ceiling_model", SHAPES, "one client process", "none"),
        ceiling_key("abc123", "blip_bench_client_ceiling(384, 30524)", LONGER_IDS, "one client process", "none"),
        ceiling_key("abc123", "blip_bench_client_ceiling(384, 30524)", SHAPES, "2 load worker(s)", "none"),
        ceiling_key("abc123", "blip_bench_client_ceiling(384, 30524)", SHAPES, "one client process", "system"),
    ):
        assert other != KEY
        assert cache_at(path, 1000.0).recall(other) is None


def test_remembering_drops_stale_entries_and_keeps_fresh_ones(tmp_path: Path) -> None:
    path = tmp_path / "ceilings.json"
    cache_at(path, 0.0).remember("old", RememberedCeiling(100.0, 0.0, "old"))
    cache_at(path, MAX_AGE_S / 2).remember("recent", RememberedCeiling(200.0, MAX_AGE_S / 2, "recent"))
    cache_at(path, MAX_AGE_S + 1).remember("new", RememberedCeiling(300.0, MAX_AGE_S + 1, "new"))
    assert sorted(json.loads(path.read_text())["ceilings"]) == ["new", "recent"]


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        json.dumps({"schema_version": 99, "ceilings": {KEY: {"infer_per_s": 1.0, "measured_at": 0.0, "note": "x"}}}),
        json.dumps({"schema_version": 1, "ceilings": []}),
        json.dumps({"schema_version": 1, "ceilings": {KEY: {"infer_per_s": 0, "measured_at": 0.0, "note": "x"}}}),
        json.dumps({"schema_version": 1, "ceilings": {KEY: {"infer_per_s": "1", "measured_at": 0.0, "note": "x"}}}),
        json.dumps({"schema_version": 1, "ceilings": {KEY: {"infer_per_s": NAN, "measured_at": 0.0, "note": "x"}}}),
    ],
    ids=["not-json", "a-list", "other-schema", "ceilings-a-list", "zero", "a-string", "nan"],
)
def test_a_damaged_or_foreign_file_recalls_nothing_and_is_replaced_by_the_next_measurement(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / "ceilings.json"
    path.write_text(content)
    assert cache_at(path, 10.0).recall(KEY) is None
    cache_at(path, 10.0).remember(KEY, RememberedCeiling(123.0, 10.0, "measured"))
    assert cache_at(path, 11.0).recall(KEY) == RememberedCeiling(123.0, 10.0, "measured")


def test_a_cache_that_cannot_be_written_costs_nothing_but_the_reuse(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = cache_at(blocker / "ceilings.json", 10.0)  # its folder is a file
    cache.remember(KEY, RememberedCeiling(123.0, 10.0, "measured"))  # logged, not raised
    assert cache.recall(KEY) is None


def test_a_recalled_ceiling_says_when_it_was_measured_and_where_it_is_kept(tmp_path: Path) -> None:
    note = RememberedCeiling(250.0, 0.0, "load generator ceiling (grpc): 250.0 infer/s").recalled_note(
        600.0, tmp_path / "ceilings.json"
    )
    assert note.startswith("load generator ceiling (grpc): 250.0 infer/s (measured 10 min ago by an earlier run")
    assert str(tmp_path / "ceilings.json") in note


def probe(cache: CeilingCache, notes: list[str]) -> CeilingProbe:
    """A probe with no server at all: it can only answer from the cache (measuring would touch the server)."""
    inputs = ModelInputs(
        pixel_values=np.zeros((1, 3, 384, 384), np.float32),
        input_ids=np.zeros((1, 16), np.int64),
        attention_mask=np.ones((1, 16), np.int64),
    )
    return CeilingProbe(
        server=None,  # type: ignore[arg-type]
        repository_root=Path("/nonexistent"),
        image_size=384,
        vocab_size=30524,
        url="127.0.0.1:1",
        inputs=inputs,
        settings=PerfSettings(load=LoadSettings(), concurrency=None, request_rate=None, tolerance_pct=None),
        notes=notes,
        cache=cache,
        fingerprint_key="abc123",
    )


def test_a_probe_with_a_fresh_ceiling_for_its_key_measures_nothing_and_notes_the_reuse(tmp_path: Path) -> None:
    path = tmp_path / "ceilings.json"
    cache_at(path, 0.0).remember(KEY, RememberedCeiling(250.0, 0.0, "load generator ceiling: 250.0 infer/s"))
    notes: list[str] = []
    ceiling = probe(cache_at(path, 120.0), notes)
    assert ceiling() == 250.0 and ceiling() == 250.0
    assert notes == [
        f"load generator ceiling: 250.0 infer/s (measured 2 min ago by an earlier run on this host, reused for up "
        f"to {MAX_AGE_S / 60:.0f} min: {path})"
    ]
    with pytest.raises(AttributeError):  # nothing fresh under its key: it goes to the server to measure
        probe(cache_at(path, MAX_AGE_S + 1), []).__call__()
