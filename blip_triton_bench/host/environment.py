"""The installed ONNX Runtime: which distribution provides it, which ONNX IR versions it loads, and whether an
execution provider it lists can really run a session.

Each question has a pure part (over plain values, unit-tested) and a thin reader of this process's environment.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: The import package every ONNX Runtime distribution (CPU, GPU, DirectML, OpenVINO, ...) installs.
ONNXRUNTIME_PACKAGE = "onnxruntime"
CPU_PROVIDER = "CPUExecutionProvider"
#: Lower than any IR version an opset-17 model can carry (IR 8), so the search below always ends.
OLDEST_IR_VERSION_PROBED = 3


def _canonical(name: str) -> str:
    """PEP 503 normalisation: `onnxruntime_gpu`, `ONNXRuntime-GPU` and `onnxruntime-gpu` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Distribution:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


def onnxruntime_install_problem(installed: Iterable[Distribution]) -> str | None:
    """Why this environment's `onnxruntime` cannot be trusted, or None when exactly one distribution provides it.

    `installed`: the distributions that install the `onnxruntime` import package. Two of them (`onnxruntime` and
    `onnxruntime-gpu` after `pip install .[gpu]` on top of the CPU one) overwrite each other's files, so which
    build a process imports depends on install order; ONNX Runtime's docs allow one per environment.
    """
    unique = sorted({Distribution(_canonical(d.name), d.version) for d in installed}, key=lambda d: d.name)
    if not unique:
        return (
            "no ONNX Runtime is installed: install this project with one of its extras, "
            "`pip install -e '.[cpu]'` (onnxruntime) or `pip install -e '.[gpu]'` (onnxruntime-gpu); "
            "`make install` picks gpu where `nvidia-smi -L` lists a GPU"
        )
    if len(unique) == 1:
        return None
    # Keep the most capable build: a GPU one over the CPU one (a GPU build also has the CPU provider).
    keep = next((d for d in unique if d.name != ONNXRUNTIME_PACKAGE), unique[0])
    names = " ".join(d.name for d in unique)
    return (
        f"{' and '.join(str(d) for d in unique)} are both installed; they share the `onnxruntime` package, "
        f"so which one this process imports depends on install order. Keep one: "
        f"`pip uninstall -y {names} && pip install {keep.name}=={keep.version}` "
        f"(or `make install ORT=cpu|gpu`, which does this)"
    )


def installed_onnxruntime() -> list[Distribution]:
    """The distributions on sys.path whose files include the `onnxruntime` import package."""
    names = importlib.metadata.packages_distributions().get(ONNXRUNTIME_PACKAGE, [])
    installed = []
    for name in dict.fromkeys(names):
        try:
            installed.append(Distribution(name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:  # metadata listed but unreadable: not importable either
            continue
    return installed


def onnxruntime_distribution(installed: Sequence[Distribution], imported_version: str) -> str:
    """How a message names the onnxruntime this process imported ("onnxruntime-gpu 1.31.1"): the installed
    distribution of that version, or just its version where that does not tell which."""
    matching = {_canonical(d.name) for d in installed if d.version == imported_version}
    name = matching.pop() if len(matching) == 1 else ONNXRUNTIME_PACKAGE
    return f"{name} {imported_version}"


def _identity_model(ir_version: int) -> bytes:
    """The smallest valid model: y = x, opset 17, with the IR version asked for."""
    from onnx import TensorProto, helper

    value = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", value[:1], value[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)
    return model.SerializeToString()


@functools.cache  # one answer per process: the installed onnxruntime does not change under it
def max_ir_version_onnxruntime_loads() -> int:
    """The highest ONNX IR version the installed onnxruntime creates a session for, at most onnx's own.

    ONNX Runtime exposes no constant for it (it refuses newer models with "max supported IR version: 13" at load),
    and onnx writes its newest IR version by default (onnx 1.23: IR 14), which onnxruntime 1.31.1 refused: so ask
    the runtime itself, with a model small enough that each try takes milliseconds.
    """
    import onnx
    import onnxruntime

    for ir_version in range(onnx.IR_VERSION, OLDEST_IR_VERSION_PROBED - 1, -1):
        try:
            onnxruntime.InferenceSession(_identity_model(ir_version), providers=[CPU_PROVIDER])
        except Exception:  # onnxruntime raises its own Fail/InvalidGraph types for an unsupported IR version
            continue
        return ir_version
    raise RuntimeError(f"onnxruntime {onnxruntime.__version__} loaded no model of IR version 3..{onnx.IR_VERSION}")


@dataclass(frozen=True)
class ProviderProbe:
    """Whether a session asked for `provider` kept it, and if not, what ONNX Runtime said about it."""

    provider: str
    usable: bool
    detail: str = ""  # why not, in ONNX Runtime's words where it logged any


#: `libnvinfer.so.10: cannot open shared object file` -> `libnvinfer.so.10 not loadable`
_MISSING_LIBRARY = re.compile(r"([\w.+-]+\.so[\w.]*): cannot open shared object file")


def summarise_provider_failure(session_providers: Sequence[str], log_text: str) -> str:
    """A short reason from what the session ended with and what ONNX Runtime logged while creating it."""
    missing = list(dict.fromkeys(_MISSING_LIBRARY.findall(log_text)))
    if missing:
        return f"{', '.join(missing)} not loadable"
    errors = [line for line in log_text.splitlines() if line.startswith("[E:") or "rror" in line]
    if errors:
        return errors[-1].split("] ", 1)[-1].strip()[:200]
    return f"the session fell back to {', '.join(session_providers) or 'no provider'}"


@contextlib.contextmanager
def _output_captured() -> Iterator[list[str]]:
    """What is written meanwhile to file descriptor 2 (ONNX Runtime's native log, where a provider that failed to
    load says why) and to sys.stdout (its Python layer prints "EP Error ... Falling back"); the list holds the text
    once the block ends."""
    captured: list[str] = []
    printed = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink, contextlib.redirect_stdout(printed):
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.extend([sink.read().decode(errors="replace"), printed.getvalue()])


@functools.cache  # one session per provider and process: TensorRT's libraries load (or fail to) once
def probe_provider(provider: str) -> ProviderProbe:
    """Create a session on a one-node model asking for `provider` first, and see whether it kept it.

    A provider that onnxruntime lists can still fail when the session loads its libraries (TensorRT without
    libnvinfer.so.10): ONNX Runtime then logs an error and falls back to the next provider, and the model is
    served without it. Only the session's own provider list tells.
    """
    import onnxruntime

    with warnings.catch_warnings(), _output_captured() as log:
        warnings.simplefilter("ignore")  # "Specified provider ... is not in available provider names"
        try:
            session = onnxruntime.InferenceSession(_identity_model(8), providers=[provider, CPU_PROVIDER])
            session_providers: list[str] = session.get_providers()
        except Exception as error:  # a provider that raises instead of falling back is just as unusable
            session_providers, failure = [], str(error)
        else:
            failure = ""
    if provider in session_providers:
        return ProviderProbe(provider, usable=True)
    detail = summarise_provider_failure(session_providers, "\n".join([*log, failure]))
    logger.info("%s is not usable: %s", provider, detail)
    return ProviderProbe(provider, usable=False, detail=detail)
