"""Throughput and latency per variant x load level, judged against the stored baseline for this machine.

A level fails when throughput falls, or p99 latency rises, beyond the tolerance *and* beyond the run's own
measured spread; the message shows baseline, measured, change and spread.
"""

from __future__ import annotations

import warnings

import pytest

from blip_triton_bench.fixtures.verdicts import enforce_verdict
from blip_triton_bench.judging.baselines import BaselineError
from blip_triton_bench.judging.proof import Judgement
from blip_triton_bench.load.engine import LoadLevel
from blip_triton_bench.runs.perf import PerfRun, UnstableMeasurement, VariantStopped
from blip_triton_bench.servers.served import ServedVariant

pytestmark = pytest.mark.perf


def test_throughput_and_latency(
    served_variant: ServedVariant, load_level: LoadLevel, perf_run: PerfRun, judgement: Judgement
) -> None:
    try:
        judged = perf_run.run_level(served_variant.variant, load_level)
    except BaselineError as error:
        pytest.fail(str(error), pytrace=False)
    except VariantStopped as stopped:
        if not stopped.first:  # the level that stopped the variant said why, with the server's log
            pytest.skip(str(stopped).splitlines()[0])
        pytest.fail(str(stopped), pytrace=False)

    summary = judged.measurement.summary
    assert summary.request_count > 0, f"no request completed at {load_level.level_id}"
    assert summary.errors == 0, f"{summary.errors} requests failed at {load_level.level_id}"
    if not summary.stable:
        warnings.warn(
            UnstableMeasurement(
                f"{served_variant.name} {load_level.level_id}: {summary.stability_reason}; reported as unstable and "
                "not recorded as a baseline (raise --max-windows or --window-s)"
            ),
            stacklevel=1,
        )
    enforce_verdict(judged, perf_run, judgement)
