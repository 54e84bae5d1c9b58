"""Build the CPU Triton image locally, with no registry: a debootstrap'd Debian base plus wheels from the host.

The tag is a content hash of the Dockerfile, the pinned wheel list and the backend files, so an unchanged
image is found with one `docker image inspect` and never rebuilt. `blip-build-image` prints the tag.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from blip_triton_bench.host.files import default_cache_dir, link_or_copy, produce_directory

logger = logging.getLogger(__name__)

CPU_IMAGE_REPOSITORY = "blip-triton-bench/tritonserver-cpu"
BASE_IMAGE_REPOSITORY = "blip-triton-bench/debian-minbase"
CONTENT_HASH_LABEL = "blip-triton-bench.content-hash"
DEBIAN_SUITE = "bookworm"
#: What the base needs beyond minbase: Python for the venv and the backend stub (which links libpython3.11),
#: and the C++ runtime tritonserver links.
BASE_PACKAGES = ("python3", "python3-venv", "libpython3.11", "libstdc++6", "zlib1g", "ca-certificates")
#: Bookworm ships Python 3.11 and glibc 2.36: the wheels are chosen for exactly that.
IMAGE_PYTHON_VERSION = "3.11"
IMAGE_GLIBC_MINOR = 36
#: pip matches --platform exactly, so every manylinux tag that glibc 2.36 runs is listed.
IMAGE_WHEEL_PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(IMAGE_GLIBC_MINOR, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
)
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: Bounds for the slow steps; the first build takes a few minutes on a 2-core host.
DEBOOTSTRAP_TIMEOUT_S = 900
PIP_DOWNLOAD_TIMEOUT_S = 600
DOCKER_API_TIMEOUT_S = 900


class ImageBuildError(RuntimeError):
    """The CPU image could not be built: no Docker engine, no root for debootstrap, a failed build step."""


@dataclass(frozen=True)
class ImageRecipe:
    """The inputs of the CPU image, all under `server/`."""

    server_dir: Path

    @property
    def dockerfile(self) -> Path:
        return self.server_dir / "Dockerfile"

    @property
    def requirements(self) -> Path:
        return self.server_dir / "image-requirements.txt"

    @property
    def backend_dir(self) -> Path:
        return self.server_dir / "onnxruntime"

    def backend_files(self) -> tuple[Path, ...]:
        if not (self.backend_dir / "model.py").is_file():
            raise ImageBuildError(
                f'{self.backend_dir / "model.py"} is missing: the image serves `platform: "onnxruntime_onnx"` '
                "with that Python-based backend"
            )
        return tuple(
            sorted(
                path
                for path in self.backend_dir.rglob("*")
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
            )
        )

    def requirement_pins(self) -> tuple[str, ...]:
        lines = (line.split("#", 1)[0].strip() for line in self.requirements.read_text().splitlines())
        pins = tuple(line for line in lines if line)
        unpinned = [pin for pin in pins if "==" not in pin]
        if unpinned:
            raise ImageBuildError(f"{self.requirements}: pin every wheel with ==, not {unpinned}")
        return pins


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    built: bool  # False: an image with this content hash was already there
    elapsed_s: float
    size_bytes: int


def default_server_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "server"


def base_image_tag() -> str:
    digest = hashlib.sha256(f"{DEBIAN_SUITE}|minbase|{','.join(BASE_PACKAGES)}".encode()).hexdigest()
    return f"{BASE_IMAGE_REPOSITORY}:{DEBIAN_SUITE}-{digest[:12]}"


def content_hash(recipe: ImageRecipe) -> str:
    """Hash of everything that shapes the image; computed offline, without downloading a wheel."""
    digest = hashlib.sha256()

    def add(name: str, data: bytes) -> None:
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)

    add("base", base_image_tag().encode())
    add("wheels", f"{IMAGE_PYTHON_VERSION}|glibc-2.{IMAGE_GLIBC_MINOR}|{'|'.join(recipe.requirement_pins())}".encode())
    add("Dockerfile", recipe.dockerfile.read_bytes())
    for path in recipe.backend_files():
        add(f"onnxruntime/{path.relative_to(recipe.backend_dir).as_posix()}", path.read_bytes())
    return digest.hexdigest()


def cpu_image_tag(server_dir: Path | None = None) -> str:
    """The tag the CPU image built from `server/` has (whether or not it has been built)."""
    return f"{CPU_IMAGE_REPOSITORY}:{content_hash(ImageRecipe(server_dir or default_server_dir()))[:16]}"


def docker_client(timeout_s: float = DOCKER_API_TIMEOUT_S) -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=int(timeout_s))
        client.ping()
    except docker.errors.DockerException as error:
        raise ImageBuildError(
            f"no Docker engine answers ({error}). Start one with `server/docker_engine.sh` (installs docker.io "
            "and starts dockerd)"
        ) from None
    return client


def image_exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The host's Debian mirror (one-line or deb822 sources), so debootstrap goes where apt already goes."""
    candidates = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]
    for path in candidates:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split()
                if path.suffix == ".sources" and line.startswith("URIs:"):
                    uris = words[1:]
                elif words[:1] == ["deb"]:
                    uris = [word for word in words[1:] if "://" in word][:1]
                else:
                    continue
                for uri in uris:
                    if "security" not in uri:
                        return uri.rstrip("/")
    return DEFAULT_DEBIAN_MIRROR


def _unmount_under(root: Path) -> None:
    """A failed debootstrap can leave /proc or /sys mounted inside the rootfs; unmount before deleting it."""
    with contextlib.suppress(OSError):
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount_point in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
            subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)


def _run_step(command: list[str], what: str, timeout_s: float, **kwargs) -> None:
    logger.info("%s: %s", what, " ".join(command))
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, **kwargs)
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"{what} did not finish in {timeout_s:.0f} s: {' '.join(command)}") from None
    if completed.returncode != 0:
        output = "\n".join((completed.stdout + completed.stderr).splitlines()[-30:])
        raise ImageBuildError(f"{what} failed (exit {completed.returncode}): {' '.join(command)}\n{output}")


def ensure_base_image(client: docker.DockerClient, work_dir: Path, mirror: str | None = None) -> str:
    """The imported Debian base, debootstrap'd only when no image has its tag yet."""
    tag = base_image_tag()
    if image_exists(client, tag):
        return tag
    if shutil.which("debootstrap") is None:
        raise ImageBuildError(
            "debootstrap is not installed: `apt-get install -y debootstrap` (or server/docker_engine.sh)"
        )
    if os.geteuid() != 0:
        raise ImageBuildError("debootstrap needs root: run `blip-build-image` once as root; the base is then cached")
    work_dir.mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=work_dir))
    try:
        _run_step(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                mirror or debian_mirror(),
            ],
            "debootstrap",
            DEBOOTSTRAP_TIMEOUT_S,
        )
        _unmount_under(rootfs)
        # Package lists and caches are of no use in the image.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / leftover, ignore_errors=True)
        logger.info("importing %s as %s", rootfs, tag)
        with subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
        ) as tar_process:
            assert tar_process.stdout is not None
            client.api.import_image_from_stream(tar_process.stdout, repository=tag.split(":")[0], tag=tag.split(":")[1])
        if tar_process.returncode != 0 or not image_exists(client, tag):
            raise ImageBuildError(
                f"importing the debootstrap'd rootfs as {tag} failed (tar exit {tar_process.returncode})"
            )
    finally:
        _unmount_under(rootfs)
        shutil.rmtree(rootfs, ignore_errors=True)
    return tag


def download_wheels(recipe: ImageRecipe, cache_dir: Path) -> Path:
    """The pinned wheels for the image's Python and platform, downloaded once into the cache. Like every cache entry
    it records each wheel's size and SHA-256 and is checked on each use: a wheel cut short, swapped or added since is
    downloaded again (files.produce_directory), never built into the image."""
    pins = recipe.requirement_pins()
    key = hashlib.sha256(f"{IMAGE_PYTHON_VERSION}|glibc-2.{IMAGE_GLIBC_MINOR}|{'|'.join(pins)}".encode()).hexdigest()
    wheel_dir = cache_dir / "image" / f"wheels-{key[:16]}"

    def download(work_dir: Path) -> None:
        _run_step(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--no-deps",
                "--only-binary=:all:",
                "--implementation=cp",
                f"--python-version={IMAGE_PYTHON_VERSION}",
                *(f"--platform={platform}" for platform in IMAGE_WHEEL_PLATFORMS),
                f"--dest={work_dir}",
                *pins,
            ],
            "pip download",
            PIP_DOWNLOAD_TIMEOUT_S,
        )

    # --no-deps: one wheel per pin, so a folder with fewer is a download cut short
    produce_directory(
        wheel_dir, f"wheels-{key[:16]}", download, lambda folder: len(list(folder.glob("*.whl"))) == len(pins)
    )
    return wheel_dir


@contextlib.contextmanager
def staged_context(recipe: ImageRecipe, wheel_dir: Path, work_dir: Path) -> Iterator[Path]:
    """A build context with the Dockerfile, wheels/ and onnxruntime/, deleted afterwards."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="context-", dir=work_dir) as directory:
        context = Path(directory)
        shutil.copy2(recipe.dockerfile, context / "Dockerfile")
        for wheel in sorted(wheel_dir.glob("*.whl")):
            link_or_copy(wheel, context / "wheels" / wheel.name)
        for path in recipe.backend_files():
            link_or_copy(path, context / "onnxruntime" / path.relative_to(recipe.backend_dir))
        yield context


def _build(client: docker.DockerClient, context: Path, tag: str, base_tag: str, digest: str) -> None:
    build_log: list[str] = []
    for chunk in client.api.build(
        path=str(context),
        tag=tag,
        buildargs={"BASE_IMAGE": base_tag},
        labels={CONTENT_HASH_LABEL: digest},
        rm=True,
        forcerm=True,
        pull=False,
        decode=True,
    ):
        if "stream" in chunk:
            for line in chunk["stream"].splitlines():
                if line.strip():
                    build_log.append(line)
                    logger.info("docker build: %s", line)
        if "error" in chunk:
            tail = "\n".join(build_log[-30:])
            raise ImageBuildError(f"docker build of {tag} failed: {chunk['error'].strip()}\n{tail}")


def ensure_image(
    cache_dir: Path,
    server_dir: Path | None = None,
    client: docker.DockerClient | None = None,
    rebuild: bool = False,
    mirror: str | None = None,
) -> BuiltImage:
    """Return the CPU image for `server/`, building it (and its base) only when no image has its hash."""
    started = time.monotonic()
    recipe = ImageRecipe(server_dir or default_server_dir())
    digest = content_hash(recipe)
    tag = f"{CPU_IMAGE_REPOSITORY}:{digest[:16]}"
    client = client or docker_client()
    built = rebuild or not image_exists(client, tag)
    if built:
        work_dir = cache_dir / "image"
        base_tag = ensure_base_image(client, work_dir, mirror)
        wheel_dir = download_wheels(recipe, cache_dir)
        with staged_context(recipe, wheel_dir, work_dir) as context:
            _build(client, context, tag, base_tag, digest)
    size_bytes = int(client.images.get(tag).attrs.get("Size", 0))
    return BuiltImage(tag=tag, built=built, elapsed_s=time.monotonic() - started, size_bytes=size_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="blip-build-image",
        description="Build the CPU Triton image from server/ (or find it by content hash); prints its tag.",
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="wheels and build scratch")
    parser.add_argument("--server-dir", type=Path, default=default_server_dir(), help="Dockerfile and backend")
    parser.add_argument("--mirror", default=None, help="Debian mirror for debootstrap (default: the host's apt mirror)")
    parser.add_argument("--rebuild", action="store_true", help="build even when an image with this hash exists")
    parser.add_argument("--print-tag", action="store_true", help="print the tag this server/ gives and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if args.print_tag:
            print(cpu_image_tag(args.server_dir))
            return 0
        image = ensure_image(args.cache_dir, args.server_dir, rebuild=args.rebuild, mirror=args.mirror)
    except ImageBuildError as error:
        print(f"blip-build-image: {error}", file=sys.stderr)
        return 2
    state = "built" if image.built else "found (unchanged)"
    logger.info("%s %s in %.1f s, %.0f MB", state, image.tag, image.elapsed_s, image.size_bytes / 1e6)
    print(image.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
