"""A separate interpreter for the Python backend stub: a venv built once per requirement set under the cache.

The local provider's stub runs the interpreter first on PATH (LocalProvider's stub_bin_dir); this builds one with
other packages than the suite's own venv (e.g. numpy 2), keyed by the requirements and the Python version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from blip_triton_bench.host.files import produce_directory
from blip_triton_bench.servers.base import ServerStartError

logger = logging.getLogger(__name__)

#: Written last into a finished venv: a folder without it is a build that was interrupted.
COMPLETE_MARKER = "stub-env.json"


def stub_env_key(requirements: Sequence[str]) -> str:
    identity = {"python": sys.version.split()[0], "requirements": sorted(requirements)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def stub_interpreter(cache_dir: Path, requirements: Sequence[str]) -> Path:
    """The bin directory of a venv (this Python version) with `requirements` installed; built on first use, and
    built again when it no longer holds what it recorded (files.produce_directory: a file cut short or changed)."""
    final_dir = Path(cache_dir) / "stub-envs" / stub_env_key(requirements)
    installed: list[str] = []

    def build(work_dir: Path) -> None:
        # The same base interpreter as this venv's: the stub is built for this Python version only.
        base_python = Path(getattr(sys, "_base_executable", sys.executable))
        for command in (
            [str(base_python), "-m", "venv", str(work_dir)],
            [str(work_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements],
        ):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise ServerStartError(
                    f"building the stub interpreter for {', '.join(requirements)} failed: {' '.join(command)} "
                    f"exited {done.returncode}:\n{(done.stdout + done.stderr)[-2000:]}"
                )
        installed.extend(
            subprocess.run(
                [str(work_dir / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
            ).stdout.split()
        )
        # Written last: a venv finds its site-packages from pyvenv.cfg beside bin/, so it still works once renamed.
        (work_dir / COMPLETE_MARKER).write_text(
            json.dumps({"requirements": list(requirements), "installed": installed})
        )

    if produce_directory(final_dir, final_dir.name, build, lambda folder: (folder / COMPLETE_MARKER).is_file()):
        logger.info("built the stub interpreter %s (%s)", final_dir, ", ".join(installed))
    return final_dir / "bin"
