"""The software that decides a measured speed, recorded with each baseline run and compared at judging time: a
"regression" that is really an upgrade (ONNX Runtime 1.31.1 to 1.32.0, another numpy in the backend's interpreter,
another exporter) says so.

Triton's version, the server image and the hardware are in the baseline's key already (baselines.Fingerprint); what
is here is named, not keyed, so that an upgrade is judged against the old numbers and called out, never silently
starts from no baseline. The Python packages are this environment's: where the local provider serves, the Python
backend runs the models in it; for a container or an external server they are the exporter's and the in-process
reference's, and the server's own are identified by its image or version in the key.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Mapping, Sequence

from blip_triton_bench.host.environment import installed_onnxruntime

#: Distributions whose version changes what the suite measures: the runtime, the arrays the backend hands it, the
#: exporter and its model code, and the client that sends the load.
SPEED_DISTRIBUTIONS = ("numpy", "torch", "transformers", "tritonclient")


def speed_software(triton_version: str, opset: int | None) -> dict[str, str]:
    """Name -> version of what decides this run's speed besides the hardware and the repository."""
    software = {"triton": triton_version, "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    runtimes = installed_onnxruntime()
    if len(runtimes) == 1:
        (runtime,) = runtimes
        software["onnxruntime"] = runtime.version + ("" if runtime.name == "onnxruntime" else f" ({runtime.name})")
    for name in SPEED_DISTRIBUTIONS:
        try:
            software[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if opset is not None:
        software["onnx opset"] = str(opset)
    return software


def software_changes(recorded: Sequence[Mapping[str, str]], current: Mapping[str, str]) -> tuple[str, ...]:
    """`onnxruntime 1.31.1 -> 1.32.0` for each piece of `current` software that differs from what one of the
    baseline's runs was `recorded` under. A run that named none (recorded before the suite did) says nothing."""
    changes = []
    for name, now in current.items():
        before = sorted({run[name] for run in recorded if name in run and run[name] != now})
        if before:
            changes.append(f"{name} {' / '.join(before)} -> {now}")
    return tuple(changes)
