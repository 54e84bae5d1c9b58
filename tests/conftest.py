"""Shared fixtures of the machinery's tests: one tiny model, one tiny export, one staged captioner and one recorded
tiny baseline store per session.

Each is built once and handed out; a test that changes what it got copies it first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from blip_triton_bench.repository.variants import StagedRepository

#: The seed repository: every variant the project ships.
SEED_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def pytest_configure(config: pytest.Config) -> None:
    """Each test process's suite runs share a measurement lock of their own (measure_lock.LOCK_FILE_ENV): tests run
    suites side by side on purpose, and must neither wait on each other nor on a real run of the suite on this host.
    Tests of the lock itself name their file with --measure-lock-file."""
    from blip_triton_bench.host.measure_lock import LOCK_FILE_ENV

    # Always a new one: an xdist worker inherits the controller's environment, and must not share its lock.
    folder = Path(tempfile.mkdtemp(prefix="blip-bench-test-lock-"))
    os.environ[LOCK_FILE_ENV] = str(folder / "measure.lock")
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny BLIP (seeded random weights), built once per session."""
    from blip_triton_bench.model.source import ModelSpec, load_model

    return load_model(ModelSpec("tiny"))


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model's exports (full, and the split, INT8 and student ones when first asked for), in a cache of this
    session's own."""
    from blip_triton_bench.model.artifacts import ModelArtifacts
    from blip_triton_bench.model.export import export_model
    from blip_triton_bench.model.onnx_files import DEFAULT_OPSET

    cache = tmp_path_factory.mktemp("tiny-cache")
    exported = export_model(tiny_model, cache, DEFAULT_OPSET)
    return ModelArtifacts(
        teacher=tiny_model,
        teacher_export=exported,
        cache_dir=cache,
        opset=DEFAULT_OPSET,
        student_source=None,
        distill_steps=None,
    )


@pytest.fixture(scope="session")
def staged_captioner(tiny_artifacts, tmp_path_factory: pytest.TempPathFactory) -> StagedRepository:
    """The seed's captioner (blip_caption and the models it calls) staged with the tiny export."""
    from blip_triton_bench.repository.variants import (
        discover_variants,
        select_variants,
        stage_repository,
        with_composing_models,
    )

    seed = discover_variants(SEED_REPOSITORY)
    chosen = with_composing_models(select_variants(seed, ["blip_caption"]), seed)
    scratch = tmp_path_factory.mktemp("captioner-files")
    return stage_repository(
        chosen, lambda variant: tiny_artifacts.files_for(variant, scratch), tmp_path_factory.mktemp("captioner-repo")
    )


@pytest.fixture(scope="session")
def recorded_tiny_baselines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One baseline store per session, recorded by the suite as a user would (`--update-baselines`) for the seed's
    base_model_cpu at suite_runs.QUICK_LEVEL. Tests copy it (`copy_recorded_baselines`) instead of recording their
    own; a test of recording itself (test_regression_end_to_end.py) still records."""
    from tests.suite_runs import RECORDING_LEVEL, Suite

    suite = Suite(tmp_path_factory.mktemp("recorded-baselines"), level=RECORDING_LEVEL)
    recorded = suite.run("suite/test_serving_correctness.py", "suite/test_perf.py", "--update-baselines")
    assert recorded.returncode == 0, recorded.output[-4000:]
    assert len(list(suite.baseline_dir.rglob("base_model_cpu.json"))) == 1, recorded.output[-4000:]
    return suite.baseline_dir
