"""Config parsing, requirement derivation, variant selection and staging of model repositories."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from blip_triton_bench.host.environment import ProviderProbe
from blip_triton_bench.repository.variants import (
    CAPTIONER_ROLE,
    COMPONENT_ROLE,
    LOGITS_ROLE,
    ConfigError,
    ServerProviders,
    discover_variants,
    load_variant,
    provider_unmet_reason,
    select_variants,
    stage_generated,
    stage_repository,
    unmet_requirements,
    with_composing_models,
)

pytestmark = pytest.mark.unit

SEED_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
CPU_ONLY = ServerProviders(("CPUExecutionProvider",))
GPU_BUILD = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

MINIMAL = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] }} ]
{extra}
"""


def write_variant(repository: Path, name: str, extra: str = "", text: str | None = None) -> Path:
    folder = repository / name
    folder.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(text if text is not None else MINIMAL.format(name=name, extra=extra))
    return folder


def test_seed_repository_has_its_variants_with_needs_from_their_configs() -> None:
    variants = {v.name: v for v in discover_variants(SEED_REPOSITORY)}
    assert {"base_model_cpu", "base_model_gpu", "base_model_multi_gpu", "trt_model"} <= set(variants)
    assert variants["base_model_cpu"].requirements.gpu_count == 0
    assert variants["base_model_gpu"].requirements.gpu_count == 1
    assert variants["base_model_multi_gpu"].requirements.gpu_count == 2
    assert variants["trt_model"].requirements.needs_tensorrt
    assert variants["trt_model"].runs_in_fp16
    assert variants["base_model_cpu"].marks == ()
    assert variants["base_model_multi_gpu"].marks == ("gpu", "multi_gpu")
    assert variants["trt_model"].marks == ("gpu", "trt")


def test_requirements_come_from_the_config_not_the_name(tmp_path: Path) -> None:
    gpu = write_variant(tmp_path, "innocent_cpu_name", extra="instance_group [ { kind: KIND_GPU gpus: [ 2 ] } ]")
    variant = load_variant(gpu)
    assert variant.requirements.gpu_count == 3  # GPU id 2 exists only on a host with three GPUs
    reasons = unmet_requirements(variant.requirements, gpu_count=1, server_providers=CPU_ONLY)
    assert reasons == ["needs 3 GPUs (instance_group[0] kind KIND_GPU on gpus [2]), this host has 1"]


def test_kind_auto_and_cpu_need_no_gpu(tmp_path: Path) -> None:
    folder = write_variant(tmp_path, "auto", extra="instance_group [ { kind: KIND_AUTO }, { kind: KIND_CPU } ]")
    assert load_variant(folder).requirements.gpu_count == 0


def test_openvino_accelerator_needs_its_provider(tmp_path: Path) -> None:
    extra = 'optimization { execution_accelerators { cpu_execution_accelerator: [ { name: "openvino" } ] } }'
    variant = load_variant(write_variant(tmp_path, "ov", extra=extra))
    reasons = unmet_requirements(variant.requirements, gpu_count=0, server_providers=CPU_ONLY)
    assert len(reasons) == 1
    assert "OpenVINOExecutionProvider" in reasons[0]
    assert "cpu_execution_accelerator 'openvino'" in reasons[0]
    assert unmet_requirements(variant.requirements, gpu_count=0, server_providers=None) == []


def test_a_listed_provider_that_a_session_lost_is_unmet_with_what_onnxruntime_said() -> None:
    lost = ProviderProbe("TensorrtExecutionProvider", usable=False, detail="libnvinfer.so.10 not loadable")
    asked_by = "optimization.execution_accelerators.gpu_execution_accelerator 'tensorrt'"
    reason = provider_unmet_reason("TensorrtExecutionProvider", asked_by, GPU_BUILD, "onnxruntime-gpu 1.31.1", lost)
    assert reason == (
        f"needs TensorRT ({asked_by}): TensorrtExecutionProvider is listed by onnxruntime-gpu 1.31.1 but a session "
        "could not use it (libnvinfer.so.10 not loadable)"
    )
    kept = ProviderProbe("TensorrtExecutionProvider", usable=True)
    assert provider_unmet_reason("TensorrtExecutionProvider", asked_by, GPU_BUILD, "ort", kept) is None
    assert provider_unmet_reason("TensorrtExecutionProvider", asked_by, GPU_BUILD, "ort", None) is None  # unprobed
    assert "onnxruntime 1.32.0 has CPUExecutionProvider" in (
        provider_unmet_reason(
            "TensorrtExecutionProvider", asked_by, ("CPUExecutionProvider",), "onnxruntime 1.32.0", None
        )
        or ""
    )


def test_tensorrt_is_probed_only_when_a_variant_needs_it_and_it_is_listed() -> None:
    variants = {v.name: v for v in discover_variants(SEED_REPOSITORY)}
    probed: list[str] = []

    def no_libnvinfer(provider: str) -> ProviderProbe:
        probed.append(provider)
        return ProviderProbe(provider, usable=False, detail="libnvinfer.so.10 not loadable")

    local = ServerProviders(GPU_BUILD, runtime="onnxruntime-gpu 1.31.1", probe=no_libnvinfer)
    assert unmet_requirements(variants["base_model_gpu"].requirements, gpu_count=1, server_providers=local) == []
    assert probed == []  # a CUDA variant does not pay for a TensorRT session
    (reason,) = unmet_requirements(variants["trt_model"].requirements, gpu_count=1, server_providers=local)
    assert reason.startswith("needs TensorRT (")
    assert reason.endswith(
        "listed by onnxruntime-gpu 1.31.1 but a session could not use it (libnvinfer.so.10 not loadable)"
    )
    assert probed == ["TensorrtExecutionProvider"]

    probed.clear()
    cpu_build = ServerProviders(("CPUExecutionProvider",), runtime="onnxruntime 1.32.0", probe=no_libnvinfer)
    (reason,) = unmet_requirements(variants["trt_model"].requirements, gpu_count=1, server_providers=cpu_build)
    assert "onnxruntime 1.32.0 has CPUExecutionProvider" in reason
    assert probed == []  # not listed: nothing to probe

    ngc = ServerProviders(GPU_BUILD, runtime="the NGC image's onnxruntime")  # a container: its list is trusted
    assert unmet_requirements(variants["trt_model"].requirements, gpu_count=1, server_providers=ngc) == []


def test_unknown_accelerator_is_a_config_error(tmp_path: Path) -> None:
    extra = 'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "warp_drive" } ] } }'
    folder = write_variant(tmp_path, "odd", extra=extra)
    with pytest.raises(ConfigError, match=r"config\.pbtxt: .*gpu_execution_accelerator\[0\] names 'warp_drive'"):
        load_variant(folder)


def test_malformed_config_names_file_line_and_reason(tmp_path: Path) -> None:
    text = 'name: "broken"\nplatform: "onnxruntime_onnx"\nmax_batch_sizes: 8\n'
    folder = write_variant(tmp_path, "broken", text=text)
    with pytest.raises(ConfigError) as error:
        discover_variants(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{folder / 'config.pbtxt'}:3:")
    assert 'no field named "max_batch_sizes"' in message


def test_bad_enum_value_is_reported_with_its_line(tmp_path: Path) -> None:
    folder = write_variant(tmp_path, "enum", extra="instance_group [ { kind: KIND_TPU } ]")
    with pytest.raises(ConfigError, match=r"config\.pbtxt:7:\d+: .*KIND_TPU"):
        load_variant(folder)


def test_name_must_match_folder(tmp_path: Path) -> None:
    folder = write_variant(tmp_path, "folder_name", text=MINIMAL.format(name="other_name", extra=""))
    with pytest.raises(ConfigError, match="field 'name' is 'other_name' but the folder is 'folder_name'"):
        load_variant(folder)


def test_missing_or_empty_repository_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        discover_variants(tmp_path / "nowhere")
    (tmp_path / "just_a_folder").mkdir()
    with pytest.raises(ConfigError, match="holds no variant"):
        discover_variants(tmp_path)


def test_unknown_variant_lists_the_known_ones() -> None:
    variants = discover_variants(SEED_REPOSITORY)
    with pytest.raises(ConfigError) as error:
        select_variants(variants, ["base_model_cpu", "no_such_variant"])
    assert "unknown --variant no_such_variant" in str(error.value)
    assert "base_model_cpu, base_model_cpu_int8, base_model_gpu" in str(error.value)
    assert [v.name for v in select_variants(variants, ["trt_model", "base_model_cpu"])] == [
        "trt_model",
        "base_model_cpu",
    ]


def test_staging_links_the_export_and_never_writes_into_the_source(tmp_path: Path) -> None:
    artifacts = tmp_path / "export"
    artifacts.mkdir()
    (artifacts / "model.onnx").write_bytes(b"graph")
    (artifacts / "model.onnx.data").write_bytes(b"weights")
    source = tmp_path / "repo"
    write_variant(source, "plain")
    write_variant(source, "renamed", extra='default_model_filename: "blip.onnx"')
    before = sorted(p.relative_to(source) for p in source.rglob("*"))

    staged = stage_repository(
        discover_variants(source),
        lambda _v: [artifacts / "model.onnx", artifacts / "model.onnx.data"],
        tmp_path / "staged",
    )

    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before
    plain = staged.root / "plain"
    assert (plain / "config.pbtxt").read_bytes() == (source / "plain" / "config.pbtxt").read_bytes()
    assert (plain / "1" / "model.onnx").read_bytes() == b"graph"
    assert os.path.samefile(plain / "1" / "model.onnx", artifacts / "model.onnx")  # a hard link, not a copy
    assert (staged.root / "renamed" / "1" / "blip.onnx").read_bytes() == b"graph"
    assert (staged.root / "renamed" / "1" / "model.onnx.data").read_bytes() == b"weights"
    assert staged.notes == ()


def test_variant_with_its_own_model_file_is_served_with_it_and_says_so(tmp_path: Path) -> None:
    source = tmp_path / "repo"
    folder = write_variant(source, "bring_your_own")
    (folder / "1").mkdir()
    (folder / "1" / "model.onnx").write_bytes(b"their graph")
    seed_style = write_variant(source, "placeholder")
    (seed_style / "1").mkdir()
    (seed_style / "1" / "dummy").write_bytes(b"")  # the seed's placeholder is not a model file

    staged = stage_repository(discover_variants(source), lambda _v: [write_artifact(tmp_path)], tmp_path / "staged")

    assert (staged.root / "bring_your_own" / "1" / "model.onnx").read_bytes() == b"their graph"
    assert any("bring_your_own: served with its own model files (1/model.onnx)" in n for n in staged.notes)
    assert not any("placeholder" in n for n in staged.notes)


def write_artifact(directory: Path) -> Path:
    path = directory / "model.onnx"
    path.write_bytes(b"our graph")
    return path


def test_roles_artifacts_and_composing_models_of_the_repository_come_from_the_configs() -> None:
    variants = {v.name: v for v in discover_variants(SEED_REPOSITORY)}
    assert variants["base_model_cpu"].role == LOGITS_ROLE
    assert variants["base_model_cpu"].artifact == "fp32"
    assert variants["base_model_cpu_int8"].artifact == "int8"
    assert variants["student_model_cpu"].artifact == "student"
    captioner = variants["blip_caption"]
    assert captioner.role == CAPTIONER_ROLE
    assert captioner.decoupled
    assert captioner.composing_models == ("blip_caption_vision", "blip_caption_decoder")
    assert variants["blip_caption_decoder"].role == COMPONENT_ROLE  # logits out, but no pixel_values in
    assert variants["blip_caption_vision"].artifact == "vision_encoder"
    assert [p.name for p in captioner.own_model_files] == ["model.py"]


def test_selecting_a_captioner_stages_the_models_it_calls() -> None:
    repository = discover_variants(SEED_REPOSITORY)
    staged = with_composing_models(select_variants(repository, ["blip_caption", "base_model_cpu"]), repository)
    assert sorted(v.name for v in staged) == [
        "base_model_cpu",
        "blip_caption",
        "blip_caption_decoder",
        "blip_caption_vision",
    ]


def test_a_composing_model_missing_from_the_repository_is_a_config_error(tmp_path: Path) -> None:
    write_variant(
        tmp_path,
        "caller",
        text="""name: "caller"
backend: "python"
parameters { key: "text_decoder_model" value: { string_value: "nowhere" } }
""",
    )
    with pytest.raises(
        ConfigError, match=r"caller/config.pbtxt: calls nowhere, which .* does not hold; add nowhere/config.pbtxt"
    ):
        discover_variants(tmp_path)


def test_an_unknown_artifact_is_a_config_error_listing_the_known_ones(tmp_path: Path) -> None:
    folder = write_variant(
        tmp_path, "odd", extra='parameters { key: "bench_artifact" value: { string_value: "int4" } }'
    )
    with pytest.raises(
        ConfigError, match=r"odd/config.pbtxt: parameters 'bench_artifact' is 'int4'; use one of 'fp32'"
    ):
        load_variant(folder)


def test_a_generated_variant_is_staged_as_triton_reads_it(tmp_path: Path) -> None:
    base = load_variant(write_variant(tmp_path / "repo", "base"))
    generated = type(base.config)()
    generated.CopyFrom(base.config)
    generated.name = "base__mbs2"
    generated.max_batch_size = 2
    artifact = write_artifact(tmp_path)

    folder = stage_generated(tmp_path / "staged", generated, [artifact], "blip.onnx")

    assert load_variant(folder).config.max_batch_size == 2
    assert (folder / "1" / "blip.onnx").read_bytes() == b"our graph"
    with pytest.raises(ConfigError, match="must be unique"):
        stage_generated(tmp_path / "staged", generated, [artifact])


def test_a_config_that_is_not_utf8_names_the_byte_and_the_fix(tmp_path: Path) -> None:
    folder = tmp_path / "latin1"
    folder.mkdir()
    (folder / "config.pbtxt").write_bytes('name: "latin1"\n# café\nplatform: "onnxruntime_onnx"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_variant(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder / 'config.pbtxt'}: byte 20 (line 2) is 0xe9, not UTF-8")
    assert "save the file as UTF-8" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("instance_group [ { count: 1000 } ]", "instance_group[0].count is 1000; at most 256 instances"),
        ("instance_group [ { count: -1 } ]", "instance_group[0].count is -1; use 1 or more"),
        ("dynamic_batching { preferred_batch_size: [ 2, 8 ] }", "preferred_batch_size[1] is 8, above max_batch_size 4"),
        ("dynamic_batching { preferred_batch_size: [ 0 ] }", "preferred_batch_size[0] is 0; Triton refuses"),
    ],
)
def test_values_triton_refuses_name_the_file_and_the_field(tmp_path: Path, extra: str, expected: str) -> None:
    folder = write_variant(tmp_path, "v", extra=extra)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(folder / 'config.pbtxt'))}: .*{re.escape(expected)}"):
        load_variant(folder)


def test_negative_batch_size_and_bad_dims_are_each_named(tmp_path: Path) -> None:
    text = MINIMAL.format(name="v", extra="").replace("max_batch_size: 4", "max_batch_size: -5")
    text = text.replace(
        'name: "x" data_type: TYPE_FP32 dims: [ 4 ]', 'name: "x" data_type: TYPE_FP32 dims: [ 3, -7, 99999999999 ]'
    )
    folder = write_variant(tmp_path, "v", text=text)
    with pytest.raises(ConfigError) as caught:
        load_variant(folder)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{folder / 'config.pbtxt'}: 3 values to fix:"
    assert lines[1].startswith("  max_batch_size is -5; Triton refuses a negative batch size")
    assert lines[2].startswith("  input[0].dims[1] is -7; a dimension is 1 to 2147483647, or -1")
    assert lines[3].startswith("  input[0].dims[2] is 99999999999;")


def test_a_negative_queue_delay_names_the_field_and_its_type(tmp_path: Path) -> None:
    folder = write_variant(tmp_path, "v", extra="dynamic_batching {\n  max_queue_delay_microseconds: -5\n}")
    with pytest.raises(ConfigError) as caught:
        load_variant(folder)
    assert str(caught.value) == (
        f"{folder / 'config.pbtxt'}:8:33: field 'max_queue_delay_microseconds' is -5, out of range for its type "
        "(uint64): it cannot be negative: use 0 or more"
    )


def test_a_gitkeep_is_not_a_model_file_the_variant_gets_the_export(tmp_path: Path) -> None:
    source = tmp_path / "repo"
    kept = write_variant(source, "kept")
    (kept / "1").mkdir()
    (kept / "1" / ".gitkeep").write_bytes(b"")
    (kept / "1" / "README").write_text("the export goes here\n")
    renamed = write_variant(source, "renamed", extra='default_model_filename: "blip.onnx"')
    (renamed / "1").mkdir()
    (renamed / "1" / "model.onnx").write_bytes(b"not the file Triton loads")

    variants = discover_variants(source)
    assert [v.own_model_files for v in variants] == [(), ()]
    staged = stage_repository(variants, lambda _v: [write_artifact(tmp_path)], tmp_path / "staged")

    assert sorted(p.name for p in (staged.root / "kept" / "1").iterdir()) == ["model.onnx"]
    assert (staged.root / "kept" / "1" / "model.onnx").read_bytes() == b"our graph"
    assert (staged.root / "renamed" / "1" / "blip.onnx").read_bytes() == b"our graph"
    assert staged.notes == ()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ('default_model_filename: "../../victim"', "default_model_filename is '../../victim'"),
        ('default_model_filename: "/etc/victim"', "default_model_filename is '/etc/victim'"),
        ('default_model_filename: ".."', "default_model_filename is '..'"),
        ('cc_model_filenames { key: "9.0" value: "../model.plan" }', "cc_model_filenames['9.0'] is '../model.plan'"),
        (
            'parameters { key: "vision_encoder_model" value: { string_value: "../elsewhere" } }',
            "parameters 'vision_encoder_model' is '../elsewhere'",
        ),
    ],
)
def test_a_name_that_leads_out_of_the_variant_folder_is_refused_naming_file_and_field(
    tmp_path: Path, extra: str, field: str
) -> None:
    folder = write_variant(tmp_path, "hostile", extra)
    with pytest.raises(ConfigError) as error:
        load_variant(folder)
    assert str(error.value).startswith(f"{folder / 'config.pbtxt'}: {field}; it must be one plain name")


def test_an_ensemble_step_naming_a_path_is_refused(tmp_path: Path) -> None:
    text = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [ { model_name: "../../outside" model_version: -1 } ] }
"""
    folder = write_variant(tmp_path, "pipeline", text=text)
    with pytest.raises(ConfigError, match=r"ensemble_scheduling.step\[0\].model_name is '../../outside'"):
        load_variant(folder)


def test_a_version_folder_or_file_linked_out_of_the_variant_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    (outside / "1" / "model.onnx").write_bytes(b"secret")
    repository = tmp_path / "repository"
    linked_folder = write_variant(repository, "linked_folder")
    (linked_folder / "1").symlink_to(outside / "1", target_is_directory=True)
    linked_file = write_variant(repository, "linked_file")
    (linked_file / "1").mkdir()
    (linked_file / "1" / "model.onnx").symlink_to(outside / "1" / "model.onnx")

    for folder in (linked_folder, linked_file):
        with pytest.raises(ConfigError) as error:
            load_variant(folder)
        assert f"links to {outside.resolve() / '1'}" in str(error.value)
        assert "copy the file or folder in instead of linking it" in str(error.value)


def test_links_that_stay_inside_the_variant_folder_are_followed(tmp_path: Path) -> None:
    folder = write_variant(tmp_path, "inside")
    (folder / "2").mkdir()
    (folder / "2" / "model.onnx").write_bytes(b"onnx")
    (folder / "1").symlink_to(folder / "2", target_is_directory=True)
    variant = load_variant(folder)
    assert [p.relative_to(folder).as_posix() for p in variant.own_model_files] == ["1/model.onnx", "2/model.onnx"]


def test_a_variant_folder_linked_out_of_the_repository_is_refused(tmp_path: Path) -> None:
    elsewhere = write_variant(tmp_path / "elsewhere", "borrowed")
    repository = tmp_path / "repository"
    write_variant(repository, "own")
    (repository / "borrowed").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ConfigError, match=r"borrowed links to .*, outside the model repository"):
        discover_variants(repository)


def test_staging_never_writes_outside_its_folder_nor_over_a_file(tmp_path: Path) -> None:
    from blip_triton_bench.host.files import link_or_copy
    from blip_triton_bench.repository.variants import staged_path

    target = tmp_path / "staged" / "variant"
    config = tmp_path / "config.pbtxt"
    assert staged_path(target, Path("1/model.onnx"), config) == target / "1" / "model.onnx"
    for escaping in (Path("1/../../victim"), Path("/etc/victim")):
        with pytest.raises(ConfigError, match=f"{config}: staging would write {escaping} outside {target}"):
            staged_path(target, escaping, config)

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    source = tmp_path / "artifact"
    source.write_bytes(b"model")
    with pytest.raises(FileExistsError):
        link_or_copy(source, victim)
    assert victim.read_bytes() == b"keep me"


def test_a_copy_where_no_link_can_be_made_never_replaces_a_file(tmp_path: Path, monkeypatch) -> None:
    from blip_triton_bench.host import files

    def cross_device(source, destination):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(files.os, "link", cross_device)
    source = tmp_path / "artifact"
    source.write_bytes(b"model")
    files.link_or_copy(source, tmp_path / "copied")
    assert (tmp_path / "copied").read_bytes() == b"model"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        files.link_or_copy(source, victim)
    assert victim.read_bytes() == b"keep me"


def test_a_generated_variant_with_a_path_for_a_name_is_refused(tmp_path: Path) -> None:
    from tritonclient.grpc import model_config_pb2

    for name, filename, field in (("../escape", "model.onnx", "name"), ("ok", "../../model.onnx", "default_model")):
        config = model_config_pb2.ModelConfig(name=name)
        with pytest.raises(ConfigError, match=f"generated variant '{re.escape(name)}': {field}"):
            stage_generated(tmp_path, config, [], model_filename=filename)
    assert list(tmp_path.iterdir()) == []
