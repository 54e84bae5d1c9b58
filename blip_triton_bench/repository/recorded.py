"""The repository the baselines were recorded with, kept in the baseline store so that it can be measured again.

`--update-baselines` keeps a copy of each variant it records (its config.pbtxt and the files it ships, and the same
for every model it calls) under `<baseline store>/recorded-repository/`. `--replay-baselines` then serves that copy
beside the variant under test and judges each level by the A/B run's interleaved rounds (suite/test_ab.py): the
host's speed moves both sides alike, so a drift between the recording and now cannot read as a regression, which
the stored numbers cannot promise (docs/measurements.md). What the copy cannot replay, a server or runtime upgrade,
is still judged on the stored numbers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from blip_triton_bench.repository.variants import CONFIG_FILENAME, Variant, with_callees

RECORDED_REPOSITORY_DIRNAME = "recorded-repository"
REPLAY_FLAG = "--replay-baselines"


class RecordedRepositoryError(Exception):
    """The recorded repository cannot be used or written; the message names the path and the fix."""


def recorded_repository_path(baseline_dir: Path) -> Path:
    return baseline_dir / RECORDED_REPOSITORY_DIRNAME


def _copy_variant(variant: Variant, destination: Path) -> None:
    """config.pbtxt as the repository has it and each file the variant ships, at its path in the folder. Plain
    copies: the recorded repository must not change when the working repository does."""
    destination.mkdir(parents=True)
    shutil.copyfile(variant.config_path, destination / CONFIG_FILENAME)
    for path in variant.own_model_files:
        relative = path.relative_to(variant.source_dir)
        (destination / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination / relative)


def keep_recorded(root: Path, variant: Variant, repository: Mapping[str, Variant]) -> list[str]:
    """Replace `root/<name>` by a copy of `variant` and of each model it calls; the names kept. Each folder is built
    beside its place and swapped in, so a failed copy leaves the previous recording whole."""
    kept = []
    root.mkdir(parents=True, exist_ok=True)
    for model in with_callees(variant, repository):
        final = root / model.name
        building = root / f".tmp-{model.name}-{os.getpid()}"
        retired = root / f".old-{model.name}-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        try:
            _copy_variant(model, building)
            if final.exists():
                final.rename(retired)
            building.rename(final)
        finally:
            shutil.rmtree(building, ignore_errors=True)
            shutil.rmtree(retired, ignore_errors=True)
        kept.append(model.name)
    return kept


def replay_repository(baseline_dir: Path) -> Path:
    """The recorded repository --replay-baselines serves as 'before'; RecordedRepositoryError when there is none."""
    path = recorded_repository_path(baseline_dir)
    if not path.is_dir() or not any((child / CONFIG_FILENAME).is_file() for child in path.iterdir()):
        raise RecordedRepositoryError(
            f"{REPLAY_FLAG}: the baseline store {baseline_dir} holds no recorded repository ({path} has no "
            f"<variant>/{CONFIG_FILENAME}); record the baselines with --update-baselines first (it keeps a copy of "
            "each variant it records there), or pass --baseline-dir=PATH to the store that has one"
        )
    return path
