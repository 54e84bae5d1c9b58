"""Host probing: nvidia-smi parsing and the CPU description the fingerprint uses."""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import pytest

from blip_triton_bench.host.hardware import (
    GpuInfo,
    GpuQueryError,
    missing_gpus,
    parse_cpu_features,
    parse_nvidia_smi,
    probe_host,
    query_gpus,
    read_cpu_features,
    read_cpu_model,
)

pytestmark = pytest.mark.unit

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "560.35.03", 81559)


def test_nvidia_smi_csv_is_parsed() -> None:
    text = "NVIDIA H100 80GB HBM3, 560.35.03, 81559\nNVIDIA H100 80GB HBM3, 560.35.03, 81559\n"
    assert parse_nvidia_smi(text) == (H100, H100)
    assert parse_nvidia_smi("") == ()


def test_nvidia_smi_warnings_are_not_gpus_and_an_unreadable_memory_size_still_is_one() -> None:
    text = (
        "WARNING: infoROM is corrupted at gpu 0000:41:00.0\n"
        "NVIDIA H100 80GB HBM3, 560.35.03, 81559\n"
        "\n"
        "NVIDIA GH200 480GB, 560.35.03, [N/A]\n"
        "No devices were found\n"
    )
    assert parse_nvidia_smi(text) == (H100, GpuInfo("NVIDIA GH200 480GB", "560.35.03", 0))


def test_cpu_model_comes_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC 9654 96-Core Processor\nflags\t: fpu\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9654 96-Core Processor\n"
    )
    assert read_cpu_model(cpuinfo) == "AMD EPYC 9654 96-Core Processor"  # not "model"'s 17


def test_cpu_model_without_cpuinfo_is_still_a_description(tmp_path: Path) -> None:
    assert read_cpu_model(tmp_path / "absent") != ""  # e.g. macOS: platform's own description


def fake_nvidia_smi(directory: Path, script: str) -> Path:
    executable = directory / "nvidia-smi"
    executable.write_text(f"#!/bin/sh\n{script}\n")
    executable.chmod(executable.stat().st_mode | stat.S_IXUSR)
    return directory


def test_probe_counts_this_hosts_cores_and_no_gpu_without_nvidia_smi(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi to be found
    host = probe_host()
    assert host.cpu_cores == os.cpu_count()
    assert host.gpus == ()
    assert host.gpu_count == 0 and host.gpu_driver == ""
    assert "CPUExecutionProvider" in host.ort_providers  # every onnxruntime build has it


def test_probe_asks_nvidia_smi_for_the_gpus(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, "echo 'NVIDIA H100 80GB HBM3, 560.35.03, 81559'")))
    host = probe_host()
    assert host.gpus == (H100,)
    assert host.gpu_count == 1 and host.gpu_driver == "560.35.03"


DRIVER_GONE = "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        # what nvidia-smi does on a host with the tool but no working driver
        (f"echo '{DRIVER_GONE}'; exit 9", f"failed with exit code 9 and said: {DRIVER_GONE}; fix the NVIDIA driver"),
        ("kill -9 $$", "was killed by signal 9 and said: nothing"),
        (f"exec {sys.executable} -c 'import time; time.sleep(5)'", "did not answer within 0.5 s"),  # a hung driver
    ],
)
def test_a_failing_or_hanging_nvidia_smi_is_an_error_naming_what_it_said(
    tmp_path, monkeypatch, script: str, expected: str
) -> None:
    """Never 'no GPUs': a GPU runner whose driver broke would skip every GPU variant and go green."""
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, script)))
    with pytest.raises(GpuQueryError, match=re.escape(expected)):
        query_gpus(timeout_s=0.5)


def test_too_few_gpus_for_require_gpus_say_why() -> None:
    assert missing_gpus(0, (), None) is None
    assert missing_gpus(1, (H100,), "/usr/bin/nvidia-smi") is None
    assert missing_gpus(1, (), None) == "--require-gpus 1: no nvidia-smi on PATH (no NVIDIA driver installed)"
    assert missing_gpus(2, (H100,), "/usr/bin/nvidia-smi") == (
        "--require-gpus 2: nvidia-smi lists 1 of 2 (NVIDIA H100 80GB HBM3)"
    )
    assert missing_gpus(1, (), "/usr/bin/nvidia-smi") == "--require-gpus 1: nvidia-smi lists 0 of 1"


# Two processors of the two "AMD EPYC" host kinds these VMs run on, flags lines as /proc/cpuinfo prints them.
AVX2_ONLY_CPUINFO = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""
AVX512_CPUINFO = (
    "processor\t: 0\nmodel name\t: AMD EPYC\n"
    "flags\t\t: fpu sse2 avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni gfni\n"
)


def test_cpu_features_are_the_speed_relevant_flags_in_a_fixed_order() -> None:
    assert parse_cpu_features(AVX2_ONLY_CPUINFO) == ("avx2",)
    assert parse_cpu_features(AVX512_CPUINFO) == ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")
    sapphire_rapids = "flags : avx2 amx_bf16 avx512f amx_tile amx_int8 avx_vnni avx512_vnni avx512_bf16\n"
    assert parse_cpu_features(sapphire_rapids) == (
        "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
    )  # fmt: skip


def test_cpu_features_match_whole_flags_not_prefixes() -> None:
    # "avx512f" must not be read out of "avx512fp16", nor "avx2" out of a line that only has "avx".
    assert parse_cpu_features("flags\t: avx avx512fp16 avx512_vnni_x\n") == ()


def test_cpu_without_a_flags_line_has_no_features(tmp_path: Path) -> None:
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"
    assert parse_cpu_features(arm) == ()
    assert read_cpu_features(tmp_path / "absent") == ()
