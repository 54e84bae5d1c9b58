"""Writing ONNX files every runtime of the suite loads: one IR version decision and one saving helper for every
model the suite writes (exports, split exports, INT8, the student, the client-ceiling model).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from blip_triton_bench.host.environment import max_ir_version_onnxruntime_loads

DEFAULT_OPSET = 17
MIN_OPSET = 17  # LayerNormalization became an ONNX operator in opset 17
EXTERNAL_DATA_FILENAME = "model.onnx.data"
#: protobuf cannot serialise a message over 2 GiB; above this the weights go to an external data file.
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3 - 64 * 1024**2


class OnnxFileError(RuntimeError):
    """A model cannot be written in a form the installed onnxruntime loads."""


def ir_version_to_write(model_ir_version: int, onnxruntime_max_ir_version: int, opset_min_ir_version: int) -> int:
    """The IR version a model is saved with: never newer than onnxruntime loads nor than the model was made with.

    onnx writes its newest IR version by default (onnx 1.23: 14) while a runtime may stop earlier (onnxruntime 1.31.1:
    "max supported IR version: 13"); an older IR version than the model's opsets need is invalid, so that is an error.
    """
    chosen = min(model_ir_version, onnxruntime_max_ir_version)
    if chosen < opset_min_ir_version:
        raise OnnxFileError(
            f"the model's opsets need IR version {opset_min_ir_version}, the installed onnxruntime loads at most "
            f"{onnxruntime_max_ir_version}: install an onnxruntime that supports this opset, or export with an older one"
        )
    return chosen


def with_loadable_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its IR version lowered, in place, to what the installed onnxruntime loads (and returned)."""
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = ir_version_to_write(model.ir_version, max_ir_version_onnxruntime_loads(), needed)
    return model


def save_model(model: onnx.ModelProto, path: Path, external_data: bool = False) -> None:
    """Save with a loadable IR version; `external_data`: weights over 1 KiB to `model.onnx.data` beside it (protobuf
    cannot serialise a message over 2 GiB)."""
    with_loadable_ir_version(model)
    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILENAME,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def weights_to_external_data_if_large(
    path: Path, parameter_bytes: int, threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES
) -> None:
    """Rewrite an exported model with its weights in `model.onnx.data` when they could approach protobuf's limit
    (unless the exporter already put them there)."""
    if parameter_bytes <= threshold_bytes or (path.parent / EXTERNAL_DATA_FILENAME).exists():
        return
    save_model(onnx.load(str(path)), path, external_data=True)


def make_file_loadable(path: Path) -> None:
    """Lower the IR version of a model another tool wrote (torch.onnx.export, ONNX Runtime's quantizer) where the
    installed onnxruntime would refuse it. Weights in external data stay where they are; the graph is rewritten only
    when its IR version changes."""
    model = onnx.load(str(path), load_external_data=False)
    written = model.ir_version
    if with_loadable_ir_version(model).ir_version != written:
        onnx.save_model(model, str(path))
