"""Model sources and the cached ONNX export: cache hits, external data, checkpoints, user errors."""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from blip_triton_bench.host.environment import max_ir_version_onnxruntime_loads
from blip_triton_bench.host.files import CacheWriteError
from blip_triton_bench.model.export import ExportError, export_model
from blip_triton_bench.model.source import LoadedModel, ModelSourceError, ModelSpec, describe_model, load_model
from blip_triton_bench.model.workload import build_inputs

pytestmark = pytest.mark.unit


def run_onnx(path: Path, loaded: LoadedModel) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], build_inputs(loaded.description, 2, 5).as_dict())[0]


def test_second_export_is_a_cache_hit(tiny_model: LoadedModel, tmp_path: Path) -> None:
    first = export_model(tiny_model, tmp_path)
    mtime = first.onnx_path.stat().st_mtime_ns
    second = export_model(tiny_model, tmp_path)

    assert not first.from_cache
    assert second.from_cache
    assert second.directory == first.directory
    assert second.onnx_path.stat().st_mtime_ns == mtime  # the artifact was not written again
    assert second.export_s == first.export_s  # the recorded export time is read back, not re-measured
    # no temp dirs left; the entry's lock file stays (see files.produce_directory)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [
        f".{first.directory.name}.lock",
        first.directory.name,
    ]


def test_cache_key_changes_with_opset_and_weights(tiny_model: LoadedModel, tmp_path: Path) -> None:
    opset17 = export_model(tiny_model, tmp_path, opset=17)
    opset18 = export_model(tiny_model, tmp_path, opset=18)
    assert opset17.cache_key != opset18.cache_key


def test_export_has_dynamic_batch_and_sequence(tiny_model: LoadedModel, tmp_path: Path) -> None:
    exported = export_model(tiny_model, tmp_path)
    session = onnxruntime.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    assert inputs["pixel_values"].shape == ["batch", 3, 384, 384]
    assert inputs["input_ids"].shape == ["batch", "sequence"]
    assert inputs["attention_mask"].type == "tensor(int64)"
    (output,) = session.get_outputs()
    assert (output.name, output.shape) == ("logits", ["batch", "sequence", 30524])
    assert run_onnx(exported.onnx_path, tiny_model).shape == (2, 5, 30524)


def test_large_models_use_external_data(tiny_model: LoadedModel, tmp_path: Path) -> None:
    inline = export_model(tiny_model, tmp_path / "inline")
    external = export_model(tiny_model, tmp_path / "external", external_data_threshold_bytes=0)

    assert [p.name for p in external.artifact_files] == ["model.onnx", "model.onnx.data"]
    # The graph file keeps only tensors under 1 KB inline; the weights live in the data file.
    assert external.onnx_path.stat().st_size * 10 < inline.onnx_path.stat().st_size
    np.testing.assert_array_equal(run_onnx(external.onnx_path, tiny_model), run_onnx(inline.onnx_path, tiny_model))
    for exported in (inline, external):
        assert (
            onnx.load(str(exported.onnx_path), load_external_data=False).ir_version
            <= max_ir_version_onnxruntime_loads()
        )


def test_a_save_pretrained_directory_goes_through_the_same_path(tiny_model: LoadedModel, tmp_path: Path) -> None:
    checkpoint = tmp_path / "my-blip"
    tiny_model.model.save_pretrained(checkpoint)
    tiny_model.description.image_processor.save_pretrained(checkpoint)

    loaded = load_model(ModelSpec(str(checkpoint)))

    assert not loaded.description.spec.is_synthetic
    assert loaded.weights_sha256 == tiny_model.weights_sha256
    assert loaded.description.special_tokens == tiny_model.description.special_tokens
    exported = export_model(loaded, tmp_path / "cache")
    assert exported.directory.name.startswith(f"{tmp_path.name}-my-blip-")
    np.testing.assert_allclose(
        run_onnx(exported.onnx_path, loaded), run_onnx(export_model(tiny_model, tmp_path / "c2").onnx_path, tiny_model)
    )


def test_unknown_model_source_is_explained() -> None:
    with pytest.raises(ModelSourceError, match="not 'tiny' or 'base', and not a loadable BLIP checkpoint"):
        describe_model(ModelSpec("/no/such/checkpoint"))


def test_old_opset_is_refused(tiny_model: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="opset 13 is too old"):
        export_model(tiny_model, tmp_path, opset=13)


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        pytest.param(lambda d: cut_in_half(d / "model.onnx"), "model.onnx is .* bytes, recorded as", id="truncated"),
        pytest.param(
            lambda d: flip_one_byte(d / "model.onnx"), "model.onnx changed since it was recorded", id="edited"
        ),
        pytest.param(lambda d: (d / "model.onnx.data").unlink(), r"missing: \['model.onnx.data'\]", id="data-gone"),
        pytest.param(lambda d: (d / "export.json").write_bytes(b"\xff{"), "export.json", id="metadata-not-utf8"),
        pytest.param(lambda d: (d / ".contents.json").unlink(), "no .contents.json", id="no-record"),
        pytest.param(
            lambda d: (d / ".contents.json").write_text("[1]"), ".contents.json is unreadable", id="bad-record"
        ),
    ],
)
def test_a_damaged_cache_entry_is_exported_again_and_the_log_says_why(
    tiny_model: LoadedModel,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], object],
    reason: str,
) -> None:
    first = export_model(tiny_model, tmp_path, external_data_threshold_bytes=0)
    expected = run_onnx(first.onnx_path, tiny_model)
    damage(first.directory)

    with caplog.at_level(logging.WARNING):
        again = export_model(tiny_model, tmp_path, external_data_threshold_bytes=0)

    assert not again.from_cache
    assert re.search(reason, caplog.text), caplog.text
    np.testing.assert_array_equal(run_onnx(again.onnx_path, tiny_model), expected)
    assert export_model(tiny_model, tmp_path, external_data_threshold_bytes=0).from_cache  # whole again
    assert not list((tmp_path / "exports").glob(".tmp-*"))


def test_a_full_cache_filesystem_names_the_folder_and_cache_dir_and_leaves_nothing(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("this host cannot mount a 64 KiB tmpfs (mount needs root): the disk-full path is not exercised")
    try:
        with pytest.raises(CacheWriteError, match=r"cannot write .* into the cache at .*small/exports .*--cache-dir"):
            export_model(tiny_model, small)
        assert not list((small / "exports").glob(".tmp-*"))
        assert not [p for p in (small / "exports").iterdir() if not p.name.endswith(".lock")]
    finally:
        subprocess.run(["umount", str(small)], check=True)
