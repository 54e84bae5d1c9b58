"""Before vs after in one run (--reference-repository): each level of each selected variant measured in
alternating rounds against the reference repository's variant of the same name, on the same server, and
judged by a paired test of after against before. Needs no baseline and records nothing."""

from __future__ import annotations

import pytest

from blip_triton_bench.ab import ABRun
from blip_triton_bench.load import LevelAborted, LoadLevel
from blip_triton_bench.servers.base import ServerStartError
from blip_triton_bench.servers.served import ServedVariant

pytestmark = [pytest.mark.perf, pytest.mark.ab]


def test_after_vs_before(served_variant: ServedVariant, load_level: LoadLevel, ab_run: ABRun) -> None:
    try:
        compared = ab_run.run_level(served_variant.variant, load_level)
    except ServerStartError as error:
        pytest.fail(f"the 'before' side could not be prepared: {error}", pytrace=False)
    except LevelAborted as aborted:
        pytest.fail(f"{aborted} during {served_variant.name} {load_level.level_id} (A/B)", pytrace=False)
    if compared.verdict.failed:
        pytest.fail(
            f"{served_variant.name} {load_level.level_id} regressed against the reference repository: "
            f"{compared.verdict.message}",
            pytrace=False,
        )
