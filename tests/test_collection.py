"""What the collection layer stages: only the variants a remaining test serves, with the models they call."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from blip_triton_bench.fixtures.collection import RunPlan, variants_under_test
from blip_triton_bench.repository import discover_variants

pytestmark = pytest.mark.unit

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def item(**params: object) -> SimpleNamespace:
    return SimpleNamespace(callspec=SimpleNamespace(params=params))


def plan() -> RunPlan:
    repository = discover_variants(REPOSITORY)
    return RunPlan(options=None, repository=repository, variants=repository, staged=repository, server_choice=None)


def test_after_deselection_only_the_served_variants_and_what_they_call_are_staged() -> None:
    run = plan()
    by_name = {variant.name: variant for variant in run.repository}
    items = [
        item(variant=by_name["base_model_gpu"]),
        item(captioner=by_name["blip_caption"]),
        item(),  # a test without a variant (export vs PyTorch) stages nothing
    ]
    staged = {variant.name for variant in variants_under_test(run, items)}
    assert staged == {"base_model_gpu", "blip_caption", "blip_caption_vision", "blip_caption_decoder"}


def test_nothing_is_staged_when_no_remaining_test_serves_a_variant() -> None:
    assert variants_under_test(plan(), [item()]) == []
