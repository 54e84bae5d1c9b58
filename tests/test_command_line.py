"""The suite as a user runs it: collection by variant, skips derived from configs, and usage errors.

Each test runs pytest in a subprocess on this repository, exactly as a user would type it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest

from blip_triton_bench.host.environment import probe_provider
from blip_triton_bench.host.hardware import query_gpus
from blip_triton_bench.load.shared_memory import cuda_unavailable

pytestmark = pytest.mark.e2e

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
TENSORRT = "TensorrtExecutionProvider"
SEED_VARIANTS = ("base_model_cpu", "base_model_gpu", "base_model_multi_gpu", "trt_model")
REPOSITORY_VARIANTS = (
    "base_model_cpu",
    "base_model_cpu_int8",
    "base_model_gpu",
    "base_model_gpu_fp16",
    "base_model_multi_gpu",
    "blip_caption",
    "blip_caption_decoder",
    "blip_caption_vision",
    "student_model_cpu",
    "trt_model",
)


def run_pytest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--model", "tiny", *args],
        cwd=REPOSITORY_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_run_that_ends_at_a_usage_error_never_imports_torch() -> None:
    """pytest.ini is read by every pytest process: a warning category it names is imported before any test, and
    naming torch.jit.TracerWarning there cost each process about 3.5 s of torch import (a usage error answered in
    6.3 s instead of 2.7 s). The export silences tracer warnings where it traces."""
    code = (
        "import sys, pytest\n"
        "code = pytest.main(['-p', 'no:cacheprovider', '-q', '--model', 'tiny', '--variant', 'nope', 'suite'])\n"
        "print('exit', int(code), 'torch' in sys.modules)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.stdout.splitlines()[-1] == "exit 4 False", completed.stdout[-3000:] + completed.stderr[-3000:]


def test_collection_lists_every_seed_variant() -> None:
    result = run_pytest("--collect-only", "-q", "suite/test_serving_correctness.py")
    assert result.returncode == 0, result.stdout + result.stderr
    for variant in SEED_VARIANTS:
        for protocol in ("grpc", "http"):
            assert f"test_triton_matches_onnxruntime[{variant}-{protocol}]" in result.stdout


def test_gpu_marker_selects_the_variants_whose_config_needs_a_gpu() -> None:
    result = run_pytest("--collect-only", "-q", "-m", "gpu", "suite/test_serving_correctness.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[base_model_cpu-" not in result.stdout
    for variant in ("base_model_gpu", "base_model_gpu_fp16", "base_model_multi_gpu", "trt_model"):
        assert f"[{variant}-grpc]" in result.stdout


def gpu_variant_gaps() -> dict[str, list[str]]:
    """What this host lacks for each GPU variant of the seed under --server local, read as the package reads it
    (nvidia-smi's GPUs; this environment's onnxruntime, TensorRT tried in a session): the words its skip reason must
    hold, none where the host serves the variant."""
    gpus = len(query_gpus())
    tensorrt_runs = TENSORRT in onnxruntime.get_available_providers() and probe_provider(TENSORRT).usable
    one_gpu = f"needs 1 GPU (instance_group[0] kind KIND_GPU on gpus [0]), this host has {gpus}"
    two_gpus = f"needs 2 GPUs (instance_group[0] kind KIND_GPU on gpus [0, 1]), this host has {gpus}"
    return {
        "base_model_gpu": [one_gpu] if gpus < 1 else [],
        "base_model_gpu_fp16": [one_gpu] if gpus < 1 else [],
        "base_model_multi_gpu": [two_gpus] if gpus < 2 else [],
        "trt_model": ([one_gpu] if gpus < 1 else []) + ([TENSORRT] if not tensorrt_runs else []),
    }


def test_gpu_variants_this_host_cannot_serve_are_skipped_naming_what_it_lacks() -> None:
    gaps = {variant: lacks for variant, lacks in gpu_variant_gaps().items() if lacks}
    if not gaps:
        pytest.skip("needs a host without a GPU, a second GPU or TensorRT: this one serves every GPU variant")
    # Only variants this host cannot serve: each selected test is skipped before its fixtures run, no server starts.
    selected = [argument for variant in gaps for argument in ("--variant", variant)]
    result = run_pytest("-rs", "-m", "gpu", "--server", "local", *selected, "suite/test_serving_correctness.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{2 * len(gaps)} skipped" in result.stdout  # grpc and http for each
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    for variant, lacks in gaps.items():
        (reason,) = [line for line in skipped if f": {variant}: " in line]
        for words in lacks:
            assert words in reason


def test_unknown_variant_is_a_usage_error_listing_the_known_ones() -> None:
    result = run_pytest("--collect-only", "--variant", "base_model_tpu")
    assert result.returncode == 4  # pytest's usage-error exit code
    assert "unknown --variant base_model_tpu; this repository has: " + ", ".join(REPOSITORY_VARIANTS) in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_config_in_another_repository_is_a_usage_error(tmp_path: Path) -> None:
    folder = tmp_path / "broken_variant"
    folder.mkdir()
    (folder / "config.pbtxt").write_text('name: "broken_variant"\nplatform: "onnxruntime_onnx"\nmax_batch: 8\n')
    result = run_pytest("--collect-only", f"--model-repository={tmp_path}")
    assert result.returncode == 4
    assert f"{folder / 'config.pbtxt'}:3:1: " in result.stderr
    assert 'no field named "max_batch"' in result.stderr
    assert "Traceback" not in result.stderr


def test_another_repository_of_configs_parametrizes_the_suite(tmp_path: Path) -> None:
    for name, group in (("edge_cpu", "kind: KIND_CPU count: 2"), ("edge_gpu", "kind: KIND_GPU")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.pbtxt").write_text(
            (REPOSITORY_ROOT / "model_repository" / "base_model_cpu" / "config.pbtxt")
            .read_text()
            .replace('name: "base_model_cpu"', f'name: "{name}"')
            .replace("kind: KIND_CPU", group)
        )
    result = run_pytest("--collect-only", "-q", f"--model-repository={tmp_path}", "suite/test_serving_correctness.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[edge_cpu-grpc]" in result.stdout
    assert "[edge_gpu-http]" in result.stdout
    assert "base_model_cpu" not in result.stdout


def test_container_provider_without_a_docker_engine_is_a_usage_error(tmp_path: Path) -> None:
    environment = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    result = run_pytest("--collect-only", "--server", "container", env=environment)
    assert result.returncode == 4
    assert "--server container: no Docker engine answers" in result.stderr
    assert "server/docker_engine.sh" in result.stderr and "--server local" in result.stderr


def test_external_provider_needs_a_url() -> None:
    result = run_pytest("--collect-only", "--server", "external")
    assert result.returncode == 4
    assert "--server external needs --triton-url HOST:PORT" in result.stderr


def test_malformed_concurrency_range_is_a_usage_error() -> None:
    result = run_pytest("--collect-only", "--concurrency", "4:1")
    assert result.returncode == 4
    assert "--concurrency '4:1': need 0 < start <= end and step > 0" in result.stderr


def test_shared_memory_that_cannot_work_is_a_usage_error() -> None:
    result = run_pytest("--collect-only", "--shared-memory", "system", "--triton-url", "10.0.0.5:8000")
    assert result.returncode == 4
    assert "--shared-memory system needs the server on this host, but it is at 10.0.0.5:8000" in result.stderr
    result = run_pytest("--collect-only", "--shared-memory", "cuda", "--server", "local")
    problem = cuda_unavailable()  # why this host cannot use CUDA shared memory, None where it can
    if problem is None:
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert result.returncode == 4
        assert f"--shared-memory cuda needs a GPU and cuda-python: {problem}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--opset", "16"), "--opset 16: at least 17 (the export's LayerNormalization is an opset 17 operator)"),
        (("--sequence-length", "0"), "--sequence-length 0: at least 1 token id per request"),
        (("--request-distribution", "uniform"), "argument --request-distribution: invalid choice: 'uniform'"),
    ],
)
def test_a_value_the_export_or_the_load_cannot_use_is_a_usage_error(option: tuple[str, ...], message: str) -> None:
    result = run_pytest("--collect-only", *option)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_gpu_run_on_a_host_whose_nvidia_smi_fails_is_an_error_never_all_skipped(tmp_path: Path) -> None:
    """The GPU workflow's command on a runner whose driver broke: an error naming nvidia-smi's own words, not a
    green run with every GPU variant skipped as if the host had none."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = run_pytest("suite", "-m", "gpu", env=env)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout[-2000:] + result.stderr[-2000:]
    assert (
        f"the GPUs of this host cannot be listed: {fake} failed with exit code 9 and said: NVIDIA-SMI has failed"
        in (result.stderr)
    )


def test_require_gpus_fails_a_host_without_them_and_says_why(tmp_path: Path) -> None:
    no_nvidia_smi = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # this venv's tools only
    result = run_pytest("suite", "-m", "gpu", "--require-gpus", "1", env=no_nvidia_smi)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout[-2000:] + result.stderr[-2000:]
    assert "--require-gpus 1: no nvidia-smi on PATH (no NVIDIA driver installed)" in result.stderr
    plain = run_pytest("suite", "-m", "gpu", "--collect-only", "-q", env=no_nvidia_smi)
    assert plain.returncode == pytest.ExitCode.OK  # a host that simply has no GPU still collects, skipping them


@pytest.mark.parametrize("hostile", ["relative", "absolute", "linked_version_folder"])
def test_a_repository_that_points_outside_itself_exits_4_and_leaves_the_victim_alone(
    tmp_path: Path, hostile: str
) -> None:
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    victim = victim_dir / "model.onnx"
    victim.write_bytes(b"a file the run must not touch\n")
    repository = tmp_path / "repository"
    folder = repository / "base_model_cpu"
    folder.mkdir(parents=True)
    config = (REPOSITORY_ROOT / "model_repository" / "base_model_cpu" / "config.pbtxt").read_text()
    if hostile == "relative":
        config += '\ndefault_model_filename: "../../victim"\n'
        expected = f"{folder / 'config.pbtxt'}: default_model_filename is '../../victim'; it must be one plain name"
    elif hostile == "absolute":
        config += f'\ndefault_model_filename: "{victim}"\n'
        expected = f"{folder / 'config.pbtxt'}: default_model_filename is '{victim}'; it must be one plain name"
    else:
        (folder / "1").symlink_to(victim_dir, target_is_directory=True)
        expected = f"{folder / '1'} links to {victim_dir.resolve()}, outside {folder}"
    (folder / "config.pbtxt").write_text(config)

    result = run_pytest(f"--model-repository={repository}", "suite/test_serving_correctness.py")

    assert result.returncode == 4, result.stdout + result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert victim.read_bytes() == b"a file the run must not touch\n"
    assert sorted(p.name for p in victim_dir.iterdir()) == ["model.onnx"]


def test_a_cache_on_a_full_disk_exits_1_naming_cache_dir_and_leaves_no_temp_folder(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("this host cannot mount a 64 KiB tmpfs (mount needs root): the disk-full path is not exercised")
    try:
        result = run_pytest(f"--cache-dir={small}", "--variant=base_model_cpu", "suite/test_serving_correctness.py")
        left = sorted(p.relative_to(small).as_posix() for p in small.rglob("*"))
    finally:
        subprocess.run(["umount", str(small)], check=True)

    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout[-2000:] + result.stderr[-2000:]
    said = result.stdout + result.stderr
    assert f"into the cache at {small}/exports (No space left on device): free disk space" in said
    assert "or pass --cache-dir a writable directory" in said
    assert "Traceback" not in said
    assert not [name for name in left if ".tmp-" in name], left


@pytest.mark.parametrize("option", ["--cache-dir", "--baseline-dir"])
def test_a_cache_or_store_of_another_user_is_a_usage_error(tmp_path: Path, option: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root: the refusal is not exercised")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    result = run_pytest("--collect-only", "-q", f"{option}={theirs}", "suite/test_perf.py")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"{option} {theirs}: {theirs} belongs to uid 4242, not to this user (uid 0)" in result.stderr
    assert f"pass {option} a folder of your own" in result.stderr
