"""Before vs after in one run (--reference-repository, --reference-triton-url, --reference-triton-image): each level
of each selected variant, and each caption load level of each captioner, measured in alternating rounds against
the 'before' side's variant of the same name, and judged by a paired test of after against before. Needs no
baseline and records nothing."""

from __future__ import annotations

import pytest

from blip_triton_bench.judging.proof import Judgement, verdict_outcome
from blip_triton_bench.load.engine import LevelAborted, LoadLevel
from blip_triton_bench.model.source import ModelDescription
from blip_triton_bench.model.workload import image_pixels
from blip_triton_bench.runs.ab import ABLevel, ABRoundFailed, ABRun
from blip_triton_bench.servers.base import ServerStartError
from blip_triton_bench.servers.served import ServedVariant

pytestmark = [pytest.mark.perf, pytest.mark.ab]

IMAGE = "astronaut"


def test_after_vs_before(
    served_variant: ServedVariant, load_level: LoadLevel, ab_run: ABRun, judgement: Judgement
) -> None:
    try:
        compared = ab_run.run_level(served_variant.variant, load_level)
    except ServerStartError as error:
        pytest.fail(f"the 'before' side could not be prepared: {error}", pytrace=False)
    except LevelAborted as aborted:
        pytest.fail(f"{aborted} during {served_variant.name} {load_level.level_id} (A/B)", pytrace=False)
    fail_on_regression(compared, judgement)


def test_caption_after_vs_before(
    served_captioner: ServedVariant,
    caption_load_level: LoadLevel,
    ab_run: ABRun,
    model_description: ModelDescription,
    bench_options,
    judgement: Judgement,
) -> None:
    pixel_values = image_pixels(model_description, [IMAGE])
    try:
        compared = ab_run.run_caption_level(
            served_captioner.variant, caption_load_level, pixel_values, bench_options.caption_tokens
        )
    except ServerStartError as error:
        pytest.fail(f"the 'before' side could not be prepared: {error}", pytrace=False)
    except ABRoundFailed as failed:
        pytest.fail(f"{served_captioner.name} {caption_load_level.level_id} (A/B): {failed}", pytrace=False)
    fail_on_regression(compared, judgement)


def fail_on_regression(compared: ABLevel, judgement: Judgement) -> None:
    verdict = compared.verdict
    judgement.judged(
        f"{compared.level_id} {verdict.unit}",
        verdict_outcome(verdict.status.value),
        f"{verdict.effect_pct:+.1f} % against the 'before' side over {verdict.rounds} rounds, p = {verdict.p_value:.3f}",
    )
    if verdict.failed:
        pytest.fail(
            f"{compared.variant} {compared.level_id} regressed against the reference: {compared.verdict.message}",
            pytrace=False,
        )
