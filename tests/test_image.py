"""The CPU image's content-hash tag, the Debian mirror lookup and the GPU selection, without a Docker engine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from blip_triton_bench.host.hardware import GpuInfo, HostInfo
from blip_triton_bench.servers.base import ServerStartError
from blip_triton_bench.servers.container import NGC_GPU_IMAGE, default_image, device_requests, resolve_gpus
from blip_triton_bench.servers.image import (
    CPU_IMAGE_REPOSITORY,
    DEFAULT_DEBIAN_MIRROR,
    ImageBuildError,
    ImageRecipe,
    cpu_image_tag,
    debian_mirror,
    default_server_dir,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def server_dir(tmp_path: Path) -> Path:
    """A copy of server/'s image inputs, with a stand-in backend when the real one is not there."""
    source = default_server_dir()
    target = tmp_path / "server"
    (target / "onnxruntime").mkdir(parents=True)
    for name in ("Dockerfile", "image-requirements.txt"):
        shutil.copy2(source / name, target / name)
    backend = source / "onnxruntime" / "model.py"
    (target / "onnxruntime" / "model.py").write_text(backend.read_text() if backend.is_file() else "# backend\n")
    return target


def test_tag_is_stable_and_follows_every_input(server_dir: Path) -> None:
    tag = cpu_image_tag(server_dir)
    assert tag.startswith(f"{CPU_IMAGE_REPOSITORY}:")
    assert cpu_image_tag(server_dir) == tag

    changed = []
    for relative, edit in (
        ("onnxruntime/model.py", lambda text: text + "\n# changed\n"),
        ("Dockerfile", lambda text: text + "\nLABEL changed=1\n"),
        ("image-requirements.txt", lambda text: text.replace("numpy==1.26.4", "numpy==1.26.3")),
    ):
        path = server_dir / relative
        original = path.read_text()
        path.write_text(edit(original))
        changed.append(cpu_image_tag(server_dir))
        path.write_text(original)
    assert len({tag, *changed}) == 4
    assert cpu_image_tag(server_dir) == tag  # back to the same inputs, back to the same tag


def test_new_backend_file_and_pycache(server_dir: Path) -> None:
    tag = cpu_image_tag(server_dir)
    (server_dir / "onnxruntime" / "__pycache__").mkdir()
    (server_dir / "onnxruntime" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    assert cpu_image_tag(server_dir) == tag  # bytecode is not an input
    (server_dir / "onnxruntime" / "helpers.py").write_text("X = 1\n")
    assert cpu_image_tag(server_dir) != tag


def test_requirement_comments_do_not_count_but_pins_are_required(server_dir: Path) -> None:
    requirements = server_dir / "image-requirements.txt"
    tag = cpu_image_tag(server_dir)
    requirements.write_text("# a new comment\n" + requirements.read_text())
    assert cpu_image_tag(server_dir) == tag
    requirements.write_text(requirements.read_text() + "flatbuffers>=25\n")
    with pytest.raises(ImageBuildError, match=r"image-requirements.txt: pin every wheel with ==.*flatbuffers>=25"):
        ImageRecipe(server_dir).requirement_pins()


def test_missing_backend_is_named(server_dir: Path) -> None:
    (server_dir / "onnxruntime" / "model.py").unlink()
    with pytest.raises(ImageBuildError, match=r"onnxruntime/model.py is missing"):
        cpu_image_tag(server_dir)


def test_debian_mirror_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n"
    )
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"

    (tmp_path / "sources.list").write_text("# comment\ndeb [arch=amd64] http://other.example/debian bookworm main\n")
    assert debian_mirror(tmp_path) == "http://other.example/debian"

    assert debian_mirror(tmp_path / "missing") == DEFAULT_DEBIAN_MIRROR


def host_with_gpus(count: int) -> HostInfo:
    gpus = tuple(GpuInfo(name="GPU", driver="550", memory_mib=81920) for _ in range(count))
    return HostInfo(cpu_model="cpu", cpu_cores=2, gpus=gpus, ort_providers=("CPUExecutionProvider",))


def test_default_image_is_ngc_on_gpu_hosts_and_the_local_build_elsewhere(server_dir: Path) -> None:
    assert default_image(host_with_gpus(2), server_dir) == NGC_GPU_IMAGE
    assert default_image(host_with_gpus(0), server_dir) == cpu_image_tag(server_dir)
    (server_dir / "onnxruntime" / "model.py").unlink()
    with pytest.raises(ServerStartError, match=r"model\.py is missing"):
        default_image(host_with_gpus(0), server_dir)


def test_gpu_selection_follows_docker_gpus_flag() -> None:
    assert resolve_gpus("auto", 0) == "none"
    assert resolve_gpus("auto", 4) == "all"
    assert resolve_gpus(" 0, 1 ", 4) == "0,1"
    assert device_requests("none") == []
    (everything,) = device_requests("all")
    assert (everything["Count"], everything["Capabilities"]) == (-1, [["gpu"]])
    (chosen,) = device_requests("0,1")
    assert (chosen["DeviceIDs"], chosen["Capabilities"]) == (["0", "1"], [["gpu"]])
    for bad in ("", "first", "0,,1", "-1"):
        with pytest.raises(ServerStartError, match="is not auto, all, none or a list of ids"):
            resolve_gpus(bad, 2)
    with pytest.raises(
        ServerStartError, match=r"^--gpus 1,7: GPU 7 asked for, but this host has 2 GPU\(s\) \(ids 0 to 1\)"
    ):
        resolve_gpus("1,7", 2)
    with pytest.raises(ServerStartError, match=r"^--gpus 0: GPU 0 asked for, but this host has 0 GPU\(s\); name"):
        resolve_gpus("0", 0)
    with pytest.raises(ServerStartError, match=r"^--gpus all: this host has no GPU"):
        resolve_gpus("all", 0)
    assert resolve_gpus("all", 2) == "all" and resolve_gpus("none", 0) == "none"
