"""Every model file a variant can be served with, produced on first use and cached: the FP32 export, its INT8
quantization, its FP16 conversion, the distilled student's export, and the split captioner's vision encoder and text decoder.

A variant names its artifact in config.pbtxt (`bench_artifact`); only the artifacts of selected variants are built.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from blip_triton_bench.host.files import write_text_atomic
from blip_triton_bench.model.export import ExportedModel, export_model
from blip_triton_bench.model.source import LoadedModel, ModelSpec, load_model
from blip_triton_bench.model.workload import DEFAULT_MAX_NEW_TOKENS
from blip_triton_bench.repository.variants import CAPTIONER_ROLE, Variant

if TYPE_CHECKING:
    from blip_triton_bench.model.split_export import SplitModel
    from blip_triton_bench.model.student import StudentCheckpoint

logger = logging.getLogger(__name__)

#: Written beside a captioner's model.py, as HF ships generation_config.json beside a checkpoint.
GENERATION_CONFIG_FILENAME = "generation_config.json"


@dataclass
class ModelArtifacts:
    """Builds each artifact once per session (and once per cache key across sessions)."""

    teacher: LoadedModel
    teacher_export: ExportedModel
    cache_dir: Path
    opset: int
    student_source: str | None = None  # --student PATH; None: distil one from the teacher
    distill_steps: int | None = None
    notes: list[str] = field(default_factory=list)
    _int8: ExportedModel | None = None
    _fp16: ExportedModel | None = None
    _student: LoadedModel | None = None
    _student_checkpoint: StudentCheckpoint | None = None
    _student_export: ExportedModel | None = None
    _split: SplitModel | None = None

    def for_kind(self, kind: str) -> ExportedModel:
        if kind == "fp32":
            return self.teacher_export
        if kind == "int8":
            return self.int8()
        if kind == "fp16":
            return self.fp16()
        if kind == "student":
            return self.student_export()
        if kind == "vision_encoder":
            return self.split().vision
        if kind == "text_decoder":
            return self.split().decoder
        raise ValueError(f"unknown artifact kind {kind!r}")

    def int8(self) -> ExportedModel:
        if self._int8 is None:
            from blip_triton_bench.model.quantize import quantize_model

            self._int8 = quantize_model(self.teacher_export, self.cache_dir)
            state = "reused from cache" if self._int8.from_cache else f"quantized now in {self._int8.export_s:.1f} s"
            self.notes.append(
                f"INT8 artifact: {self._int8.size_bytes / 1e6:.0f} MB, {state}, at {self._int8.directory}"
            )
        return self._int8

    def fp16(self) -> ExportedModel:
        if self._fp16 is None:
            from blip_triton_bench.model.half_precision import convert_model_to_fp16

            self._fp16 = convert_model_to_fp16(self.teacher_export, self.cache_dir)
            state = "reused from cache" if self._fp16.from_cache else f"converted now in {self._fp16.export_s:.1f} s"
            self.notes.append(
                f"FP16 artifact: {self._fp16.size_bytes / 1e6:.0f} MB, {state}, at {self._fp16.directory}"
            )
        return self._fp16

    def student(self) -> LoadedModel:
        if self._student is None:
            source = self.student_source
            if source is None:
                from blip_triton_bench.model.student import DEFAULT_DISTILL_STEPS, build_student

                steps = self.distill_steps or DEFAULT_DISTILL_STEPS
                self._student_checkpoint = build_student(self.teacher, self.cache_dir, steps=steps)
                checkpoint = self._student_checkpoint
                result = checkpoint.result
                state = "reused from cache" if checkpoint.from_cache else "distilled now"
                self.notes.append(
                    f"student: distilled from the teacher's logits, {result.steps} steps of batch {result.batch_size} "
                    f"in {result.seconds:.0f} s, held-out KL {result.loss_before:.4f} -> {result.loss_after:.4f} "
                    f"({state}, {checkpoint.directory})"
                )
                source = str(checkpoint.directory)
            else:
                self.notes.append(f"student: {source} (--student)")
            self._student = load_model(ModelSpec(source))
        return self._student

    def student_export(self) -> ExportedModel:
        if self._student_export is None:
            self._student_export = export_model(self.student(), self.cache_dir, self.opset)
        return self._student_export

    def split(self) -> SplitModel:
        if self._split is None:
            from blip_triton_bench.model.split_export import export_split_model

            self._split = export_split_model(self.teacher, self.cache_dir, self.opset)
            size_mb = (self._split.vision.size_bytes + self._split.decoder.size_bytes) / 1e6
            self.notes.append(
                f"split captioner: vision encoder + KV-cache text decoder, {size_mb:.0f} MB, at "
                f"{self._split.vision.directory} and {self._split.decoder.directory}"
            )
        return self._split

    def files_for(self, variant: Variant, scratch: Path) -> list[Path]:
        """What staging links into the variant's version folder."""
        if variant.serves_onnx:
            return list(self.for_kind(variant.artifact).artifact_files)
        if variant.role == CAPTIONER_ROLE:
            return [self.generation_config(scratch / variant.name)]
        return []

    def generation_config(self, directory: Path) -> Path:
        """What a server-side decoding loop needs: start and end tokens from the model's own config, the
        decoder's position count (the longest caption it can decode), and the shape of its KV cache."""
        tokens = self.teacher.description.special_tokens
        split = self.split()
        path = directory / GENERATION_CONFIG_FILENAME
        document = {
            "bos_token_id": tokens.bos_token_id,
            "eos_token_id": tokens.eos_token_id,
            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
            "max_positions": self.teacher.description.max_positions,
            "decoder_cache_shape": [split.layer_count, split.head_count, split.head_dim],
        }
        write_text_atomic(path, json.dumps(document, indent=2) + "\n")
        return path
