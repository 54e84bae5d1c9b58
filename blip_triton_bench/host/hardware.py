"""What this host has: CPU, GPUs (through nvidia-smi) and ONNX Runtime's execution providers.

Read once per session and passed around; variants compare their needs against it, baselines key on it.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from blip_triton_bench.host.environment import installed_onnxruntime, onnxruntime_distribution

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    driver: str
    memory_mib: int


@dataclass(frozen=True)
class HostInfo:
    cpu_model: str
    cpu_cores: int
    gpus: tuple[GpuInfo, ...]
    ort_providers: tuple[str, ...]
    ort_distribution: str = "onnxruntime"  # which build lists them: "onnxruntime-gpu 1.31.1"
    cpu_features: tuple[str, ...] = ()  # SPEED_CPU_FLAGS this CPU has, in that order

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    @property
    def gpu_driver(self) -> str:
        return self.gpus[0].driver if self.gpus else ""


def read_cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: /proc/cpuinfo flags that change how fast ONNX Runtime runs these models, in the order they are shown. The
#: same "AMD EPYC" name covers hosts with AVX2 only and hosts with AVX-512 + VNNI + BF16, and INT8 runs 1.6x
#: FP32 on the first and 2.6x on the second: cores and model name alone do not tell those machines apart.
#: FMA and the other AVX-512 subsets come with these on every CPU that has them, so they would only lengthen keys.
SPEED_CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def parse_cpu_features(cpuinfo_text: str) -> tuple[str, ...]:
    """The SPEED_CPU_FLAGS on the first `flags` line of /proc/cpuinfo text, in SPEED_CPU_FLAGS order.

    The first processor stands for all: a VM's vCPUs share one flag set. No flags line (not x86) gives ().
    """
    for line in cpuinfo_text.splitlines():
        name, colon, value = line.partition(":")
        if colon and name.strip() == "flags":
            present = set(value.split())
            return tuple(flag for flag in SPEED_CPU_FLAGS if flag in present)
    return ()


def read_cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    try:
        return parse_cpu_features(cpuinfo.read_text())
    except OSError:
        return ()


def parse_nvidia_smi(csv_text: str) -> tuple[GpuInfo, ...]:
    """Parse `nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader,nounits`.

    nvidia-smi prints warnings (e.g. a corrupted infoROM) among its rows and `[N/A]` for a field it cannot
    read: a line without three fields is not a GPU and is skipped; an unreadable memory size is 0, since the
    GPU is still there and counts toward what variants need.
    """
    gpus = []
    for line in csv_text.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or not parts[0]:
            logger.debug("nvidia-smi line skipped, not name, driver, memory: %r", line)
            continue
        name, driver, memory = parts
        try:
            memory_mib = int(float(memory))
        except ValueError:
            memory_mib = 0
        gpus.append(GpuInfo(name=name, driver=driver, memory_mib=memory_mib))
    return tuple(gpus)


#: How long nvidia-smi may take to list the GPUs (a healthy driver answers in about a second).
NVIDIA_SMI_TIMEOUT_S = 30.0
NO_NVIDIA_SMI = "no nvidia-smi on PATH (no NVIDIA driver installed)"


class GpuQueryError(RuntimeError):
    """nvidia-smi is there but cannot list the GPUs: a broken or unloaded driver, never 'no GPUs'."""


def query_gpus(timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> tuple[GpuInfo, ...]:
    """GPUs visible to nvidia-smi; none when there is no nvidia-smi (a host without an NVIDIA driver).

    An nvidia-smi that fails or hangs raises GpuQueryError with its own message: a GPU host whose driver broke
    must not pass as a host without GPUs, whose GPU variants are all skipped and whose run goes green.
    """
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return ()
    command = [executable, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"]
    fix = "fix the NVIDIA driver, or take nvidia-smi off PATH on a host that is meant to have no GPU"
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise GpuQueryError(f"{executable} did not answer within {timeout_s:g} s: {fix}") from None
    except OSError as error:
        raise GpuQueryError(f"{executable} could not be run ({error}): {fix}") from None
    if completed.returncode != 0:
        said = " ".join((completed.stdout + " " + completed.stderr).split()) or "nothing"
        code = completed.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"failed with exit code {code}"
        raise GpuQueryError(f"{executable} {how} and said: {said}; {fix}")
    return parse_nvidia_smi(completed.stdout)


def missing_gpus(required: int, gpus: tuple[GpuInfo, ...], nvidia_smi: str | None) -> str | None:
    """Why fewer than `required` GPUs are usable here (None when enough are): --require-gpus's message."""
    if len(gpus) >= required:
        return None
    if nvidia_smi is None:
        return f"--require-gpus {required}: {NO_NVIDIA_SMI}"
    found = ", ".join(gpu.name for gpu in gpus)
    return f"--require-gpus {required}: nvidia-smi lists {len(gpus)} of {required}" + (f" ({found})" if found else "")


def probe_host() -> HostInfo:
    import onnxruntime  # here, not at import: without one, the plugin's configure names the extra to install first

    return HostInfo(
        cpu_model=read_cpu_model(),
        cpu_cores=os.cpu_count() or 1,
        cpu_features=read_cpu_features(),
        gpus=query_gpus(),
        ort_providers=tuple(onnxruntime.get_available_providers()),
        ort_distribution=onnxruntime_distribution(installed_onnxruntime(), onnxruntime.__version__),
    )
