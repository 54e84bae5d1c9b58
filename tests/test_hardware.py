"""Host probing: nvidia-smi parsing and the CPU description the fingerprint uses."""

from __future__ import annotations

from pathlib import Path

from blip_triton_bench.hardware import GpuInfo, parse_nvidia_smi, probe_host, read_cpu_model


def test_nvidia_smi_csv_is_parsed() -> None:
    text = "NVIDIA H100 80GB HBM3, 560.35.03, 81559\nNVIDIA H100 80GB HBM3, 560.35.03, 81559\n"
    assert parse_nvidia_smi(text) == (GpuInfo("NVIDIA H100 80GB HBM3", "560.35.03", 81559),) * 2
    assert parse_nvidia_smi("") == ()


def test_cpu_model_comes_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\nflags\t: fpu\n")
    assert read_cpu_model(cpuinfo) == "AMD EPYC 9654 96-Core Processor"


def test_probe_reads_this_hosts_onnxruntime_providers() -> None:
    import onnxruntime

    host = probe_host()
    assert host.ort_providers == tuple(onnxruntime.get_available_providers())
    assert host.cpu_cores >= 1
    assert host.gpu_count == len(host.gpus)
