"""Export BlipForConditionalGeneration to ONNX, cached by a content hash of everything that shapes the graph.

The cache key covers the model config, the weights, the torch/transformers/onnx versions, the opset and
this module's recipe version, so a second run with the same inputs reuses the artifact instead of exporting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
import transformers

from blip_triton_bench.host.files import contents_problem, default_cache_dir, produce_directory
from blip_triton_bench.model.onnx_files import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_THRESHOLD_BYTES,
    MIN_OPSET,
    make_file_loadable,
    weights_to_external_data_if_large,
)
from blip_triton_bench.model.source import LoadedModel, ModelSourceError, ModelSpec, load_model

logger = logging.getLogger(__name__)

#: Bump when the export code changes the graph it produces, so old cache entries are not reused.
EXPORT_RECIPE_VERSION = 1
MODEL_FILENAME = "model.onnx"
INPUT_NAMES = ("pixel_values", "input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
METADATA_FILENAME = "export.json"


class ExportError(RuntimeError):
    """The export failed or the cache holds something unusable."""


@dataclass(frozen=True)
class ExportedModel:
    """An ONNX artifact directory: `model.onnx` (+ `model.onnx.data` for large models) and `export.json`."""

    directory: Path
    cache_key: str
    model_source: str
    parameter_count: int
    opset: int
    export_s: float  # how long the export took when it ran (read back from export.json on a cache hit)
    from_cache: bool

    @property
    def onnx_path(self) -> Path:
        return self.directory / MODEL_FILENAME

    @property
    def artifact_files(self) -> tuple[Path, ...]:
        return tuple(sorted(p for p in self.directory.iterdir() if p.name.startswith(MODEL_FILENAME)))

    @property
    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.artifact_files)


def cache_key(loaded: LoadedModel, opset: int) -> str:
    parts = {
        "config": loaded.description.config.to_dict(),
        "weights_sha256": loaded.weights_sha256,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "opset": opset,
        "recipe": EXPORT_RECIPE_VERSION,
    }
    canonical = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


class LogitsOnly(torch.nn.Module):
    """The served signature: (pixel_values, input_ids, attention_mask) -> logits, no KV cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.model(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits


def example_inputs(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch 2 and sequence 16, so the tracer cannot specialise either dimension to 1."""
    size = loaded.description.image_size
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, size, size, generator=generator)
    input_ids = torch.randint(0, loaded.description.vocab_size, (2, 16), generator=generator)
    return pixel_values, input_ids, torch.ones_like(input_ids)


def export_onnx(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    destination: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    """torch.onnx.export as every artifact of the suite is exported (TorchScript tracer, constants folded)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on constant shapes
        torch.onnx.export(
            module,
            example,
            str(destination),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter handles BLIP's text decoder without onnxscript
        )
    make_file_loadable(destination)


def _export_graph(loaded: LoadedModel, destination: Path, opset: int) -> None:
    dynamic_axes = {
        "pixel_values": {0: "batch"},
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    export_onnx(
        LogitsOnly(loaded.model), example_inputs(loaded), destination, INPUT_NAMES, OUTPUT_NAMES, dynamic_axes, opset
    )


def _parameter_bytes(loaded: LoadedModel) -> int:
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


def _is_complete(directory: Path) -> bool:
    """export.json is written last, beside the model: an entry without both is not one to read."""
    return (directory / MODEL_FILENAME).is_file() and (directory / METADATA_FILENAME).is_file()


def _read_metadata(directory: Path) -> ExportedModel:
    """What export.json says of the entry (ValueError or TypeError when it cannot be read)."""
    metadata = json.loads((directory / METADATA_FILENAME).read_text(encoding="utf-8"))
    return ExportedModel(directory=directory, from_cache=True, **metadata)


def _read_cached(directory: Path) -> ExportedModel | None:
    """The entry at `directory` when it is whole and holds what it recorded; None when there is none, or when it must
    be produced again (a file missing, cut short or edited, unreadable metadata), saying why in the log."""
    if not _is_complete(directory):
        return None
    problem = contents_problem(directory)
    if problem is None:
        try:
            return _read_metadata(directory)
        except (ValueError, TypeError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            problem = f"{METADATA_FILENAME} is unreadable ({error})"
    logger.warning("cache entry %s is not used: %s; it is produced again", directory, problem)
    return None


def export_model(
    loaded: LoadedModel,
    cache_dir: Path,
    opset: int = DEFAULT_OPSET,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> ExportedModel:
    """Return the cached export for this model, exporting it first when the cache has none."""
    check_opset(opset)
    key = cache_key(loaded, opset)

    def produce(work_dir: Path) -> None:
        _export_graph(loaded, work_dir / MODEL_FILENAME, opset)
        weights_to_external_data_if_large(
            work_dir / MODEL_FILENAME, _parameter_bytes(loaded), external_data_threshold_bytes
        )

    return cached_artifact(
        cache_dir / "exports" / f"{loaded.description.spec.slug}-{key}",
        ArtifactIdentity(key, loaded.description.spec.source, loaded.parameter_count, opset),
        produce,
    )


def check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: BLIP's graph needs opset {MIN_OPSET} or newer (--opset)")


@dataclass(frozen=True)
class ArtifactIdentity:
    """What export.json records about an artifact besides how long it took to produce."""

    cache_key: str
    model_source: str
    parameter_count: int
    opset: int


def cached_artifact(final_dir: Path, identity: ArtifactIdentity, produce: Callable[[Path], None]) -> ExportedModel:
    """The artifact in `final_dir`, or, when the cache has none, `produce(work_dir)` run and renamed into place.

    `produce` writes `model.onnx` (and any external data) into a private directory; the rename is atomic, so a
    crash never leaves half an artifact; two processes producing the same key produce it once (the other waits on
    the entry's lock, then reuses it); an entry that does not hold what it recorded (a file missing, cut short or
    edited; files.contents_problem) is produced again, under the lock. A filesystem that refuses the write (full,
    read-only) is files.CacheWriteError naming the folder and `--cache-dir`; nothing of the attempt is left.
    """
    cached = _read_cached(final_dir)
    if cached is not None:
        logger.info("%s found in cache", final_dir)
        return cached
    timing: list[float] = []

    def produce_with_metadata(work_dir: Path) -> None:
        started = time.monotonic()
        produce(work_dir)
        timing.append(time.monotonic() - started)
        metadata = {**asdict(identity), "export_s": round(timing[0], 3)}
        (work_dir / METADATA_FILENAME).write_text(json.dumps(metadata, indent=2) + "\n")

    produced = produce_directory(final_dir, identity.cache_key, produce_with_metadata, _is_complete)
    try:
        result = _read_metadata(final_dir)  # its contents were checked under the lock, or just recorded
    except (OSError, ValueError, TypeError) as error:  # only a process changing the entry now gets here
        raise ExportError(f"{final_dir} changed while this run read it ({error}); run again") from None
    if not produced:
        logger.info("%s produced by another run while this one waited for it", final_dir)
        return result
    logger.info("produced %s in %.1f s", final_dir, timing[0])
    return ExportedModel(**{**asdict(result), "from_cache": False})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="blip-export", description="Export BLIP to ONNX (cached); prints the artifact directory."
    )
    parser.add_argument("--model", default="base", help="tiny, base, a hub id or a save_pretrained directory")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        exported = export_model(load_model(ModelSpec(args.model)), args.cache_dir, args.opset)
    except (ModelSourceError, ExportError) as error:
        print(f"blip-export: {error}", file=sys.stderr)
        return 2
    state = "cached" if exported.from_cache else "exported"
    print(f"{exported.directory}  ({state}; export took {exported.export_s:.1f} s; {exported.size_bytes} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
