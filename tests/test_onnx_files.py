"""Every model the suite writes carries an IR version the installed onnxruntime loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from blip_triton_bench.host.environment import max_ir_version_onnxruntime_loads
from blip_triton_bench.load.ceiling import stage_ceiling_model
from blip_triton_bench.model import onnx_files
from blip_triton_bench.model.onnx_files import OnnxFileError, ir_version_to_write, make_file_loadable, save_model

pytestmark = pytest.mark.unit


def test_the_ir_version_is_capped_by_onnxruntime_and_never_raised() -> None:
    assert ir_version_to_write(14, 13, 8) == 13  # onnx 1.23's default, onnxruntime 1.31.1's max
    assert ir_version_to_write(8, 13, 8) == 8  # torch.onnx.export's IR 8 stays IR 8
    with pytest.raises(OnnxFileError, match="opsets need IR version 8, the installed onnxruntime loads at most 7"):
        ir_version_to_write(14, 7, 8)


def weighted_model() -> onnx.ModelProto:
    """y = x @ w with a 64 x 64 weight (over the 1 KiB external-data threshold), IR version onnx's default."""
    weight = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "weighted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        initializer=[weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def onnxruntime_loads_up_to_ir_10(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pin the runtime's limit below onnx's default, as onnxruntime 1.31.1 (IR 13) was below onnx 1.23's (IR 14)."""
    monkeypatch.setattr(onnx_files, "max_ir_version_onnxruntime_loads", lambda: 10)
    return 10


def run(path: Path) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ones((1, 64), np.float32)})[0]


def test_save_model_writes_the_runtimes_ir_version_inline_and_external(
    tmp_path: Path, onnxruntime_loads_up_to_ir_10: int
) -> None:
    assert weighted_model().ir_version > onnxruntime_loads_up_to_ir_10
    (tmp_path / "inline").mkdir()
    (tmp_path / "external").mkdir()
    save_model(weighted_model(), tmp_path / "inline" / "model.onnx")
    save_model(weighted_model(), tmp_path / "external" / "model.onnx", external_data=True)

    for folder in ("inline", "external"):
        assert onnx.load(str(tmp_path / folder / "model.onnx"), load_external_data=False).ir_version == 10
    assert (tmp_path / "external" / "model.onnx.data").stat().st_size == 64 * 64 * 4
    np.testing.assert_array_equal(run(tmp_path / "external" / "model.onnx"), run(tmp_path / "inline" / "model.onnx"))


def test_a_file_another_tool_wrote_with_external_data_is_lowered_in_place(
    tmp_path: Path, onnxruntime_loads_up_to_ir_10: int
) -> None:
    path = tmp_path / "model.onnx"
    onnx.save_model(
        weighted_model(), str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=1024
    )
    data_before = (tmp_path / "model.onnx.data").read_bytes()

    make_file_loadable(path)

    assert onnx.load(str(path), load_external_data=False).ir_version == 10
    assert (tmp_path / "model.onnx.data").read_bytes() == data_before  # the weights were not rewritten
    assert run(path).shape == (1, 64)


def test_a_file_already_loadable_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    model = weighted_model()
    model.ir_version = 8
    onnx.save_model(model, str(path))
    before = path.stat().st_mtime_ns
    make_file_loadable(path)
    assert path.stat().st_mtime_ns == before


def test_the_client_ceiling_model_loads_in_the_installed_onnxruntime(tmp_path: Path) -> None:
    name = stage_ceiling_model(tmp_path, image_size=8, vocab_size=5)
    path = tmp_path / name / "1" / "model.onnx"
    assert onnx.load(str(path)).ir_version <= max_ir_version_onnxruntime_loads()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        "pixel_values": np.zeros((1, 3, 8, 8), np.float32),
        "input_ids": np.array([[2, 3]], np.int64),
        "attention_mask": np.ones((1, 2), np.int64),
    }
    np.testing.assert_array_equal(session.run(None, feeds)[0], np.broadcast_to([[[3.0], [4.0]]], (1, 2, 5)))


def test_the_client_ceiling_model_takes_the_runtimes_limit(tmp_path: Path, onnxruntime_loads_up_to_ir_10: int) -> None:
    name = stage_ceiling_model(tmp_path, image_size=8, vocab_size=5)
    assert onnx.load(str(tmp_path / name / "1" / "model.onnx")).ir_version == onnxruntime_loads_up_to_ir_10


def test_the_ceiling_model_gets_instances_from_the_cores_so_the_server_is_not_what_it_measures() -> None:
    from blip_triton_bench.load.ceiling import ceiling_config, ceiling_instances

    assert [ceiling_instances(cores) for cores in (None, 1, 2, 4, 8, 16, 128)] == [1, 1, 1, 2, 4, 4, 4]
    text = ceiling_config(384, 30524, instances=ceiling_instances(16))
    assert "count: 4" in text
