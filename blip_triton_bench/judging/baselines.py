"""The baseline store: one schema-versioned JSON file per (hardware fingerprint, model, variant).

Reading never modifies a file; writing is atomic, merges re-recorded levels into the previous file and keeps
that file as `<variant>.json.bak`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import re
import shlex
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip_triton_bench.host.files import backup_path, write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:  # only for annotations: importing them pulls in onnxruntime and tritonclient
    from blip_triton_bench.host.hardware import HostInfo
    from blip_triton_bench.servers.base import ServerDescription

#: 2: each level stores a list of runs (metrics + per-window throughputs); 1 (one run's metrics) still loads.
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
UPDATE_FLAG = "--update-baselines"
DIR_FLAG = "--baseline-dir"
FIX_UNREADABLE = f"delete it, or re-record it with {UPDATE_FLAG} (which replaces an unreadable file)"
#: Fingerprint.load_side without --load-workers: this process's own asyncio client.
ONE_CLIENT = "one client process"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_VARIANT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class BaselineError(Exception):
    """A baseline file that cannot be used: says which file, what is wrong, and how to fix it."""

    def __init__(self, path: Path, problem: str, fix: str = FIX_UNREADABLE) -> None:
        self.path = path
        self.problem = problem
        self.fix = fix
        super().__init__(f"baseline {path}: {problem}. Fix: {fix}")


def _slugify(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-.") or "unnamed"


def model_slug(model_id: str) -> str:
    """A folder name for a model id: hub ids keep their case, `/` becomes `--` as in the Hugging Face cache."""
    return _slugify(model_id.strip("/").replace("/", "--"))


@dataclass(frozen=True)
class Fingerprint:
    """What a measurement depends on besides the code: hardware, server, model and protocol.

    Results are only compared with a baseline recorded under an equal fingerprint.
    """

    cpu_model: str
    cpu_cores: int
    gpu_names: tuple[str, ...]
    gpu_count: int
    gpu_driver: str
    triton_version: str
    server_provider: str
    server_image: str
    model_id: str
    model_size: str  # parameter count or artifact bytes, as a string so "123" and 123 key alike
    protocol: str
    #: --shared-memory. Left out of the JSON (and so of the key) when "none", so baselines recorded before the
    #: option existed keep their paths; a system or cuda run keys apart, as a different protocol does.
    shared_memory: str = "none"
    #: hardware.SPEED_CPU_FLAGS of the CPU (AVX2, AVX-512, VNNI, BF16, AMX), which "AMD EPYC" and the core count
    #: do not tell apart. None: unknown, a baseline recorded before the suite read them; left out of the JSON (and
    #: so of the key) then, so those files keep their paths and still load, but never under a known feature set.
    cpu_features: tuple[str, ...] | None = None
    #: Who sent the load (--load-workers, --load-cluster). Named, not keyed: the server's speed does not depend on
    #: how many processes ask, so a level recorded from one client is judged from several (a level that is
    #: client-bound shows as near the ceiling, which is measured with the same load side).
    load_side: str = field(default=ONE_CLIENT, compare=False)

    @classmethod
    def from_parts(
        cls, host: HostInfo, server: ServerDescription, model_id: str, model_size: str | int, protocol: str
    ) -> Fingerprint:
        """The client host's hardware, except for an external server: it runs elsewhere, so its own account of
        itself (its GPUs from its metrics endpoint, the user's --fingerprint-label) keys it instead."""
        if server.provider == "external":
            hardware: dict[str, Any] = {
                "cpu_model": f"external server: {server.extra.get('label', 'unlabelled')}",
                "cpu_cores": 0,
                "gpu_names": (),
                "gpu_count": int(server.extra.get("gpu_count", "-1")),
                "gpu_driver": "",
                "cpu_features": None,
            }
        else:
            hardware = {
                "cpu_model": host.cpu_model,
                "cpu_cores": host.cpu_cores,
                "gpu_names": tuple(gpu.name for gpu in host.gpus),
                "gpu_count": host.gpu_count,
                "gpu_driver": host.gpu_driver,
                "cpu_features": host.cpu_features,
            }
        return cls(
            **hardware,
            triton_version=server.triton_version,
            server_provider=server.provider,
            server_image=server.image,
            model_id=model_id,
            model_size=str(model_size),
            protocol=protocol,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu_names"] = list(self.gpu_names)
        if self.shared_memory == "none":
            del data["shared_memory"]
        if self.cpu_features is None:
            del data["cpu_features"]
        else:
            data["cpu_features"] = list(self.cpu_features)
        return data

    def key(self) -> str:
        """12 hex characters of the sha256 of the canonical JSON (sorted keys, no spaces, ASCII), load side aside."""
        keyed = {name: value for name, value in self.to_dict().items() if name != "load_side"}
        canonical = json.dumps(keyed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:12]

    def slug(self) -> str:
        """A readable label, e.g. `16cpu-1gpu-container-grpc`; the key tells fingerprints apart."""
        shared = f"-shm-{self.shared_memory}" if self.shared_memory != "none" else ""
        if self.server_provider == "external":
            label = self.cpu_model.removeprefix("external server: ")
            gpus = "unknown" if self.gpu_count < 0 else str(self.gpu_count)
            return _slugify(f"external-{label}-{gpus}gpu-{self.protocol}{shared}")
        return _slugify(f"{self.cpu_cores}cpu-{self.gpu_count}gpu-{self.server_provider}-{self.protocol}{shared}")

    def dirname(self) -> str:
        return f"{self.slug()}-{self.key()}"


def describe_cpu_features(features: tuple[str, ...] | None) -> str:
    """`avx2 only`, `avx2 avx512f avx512_vnni`, or what an unknown or empty set means."""
    if features is None:
        return "unknown features (recorded before the suite read them from /proc/cpuinfo)"
    if not features:
        return "none of avx2, avx512f, vnni, bf16, amx"
    return f"{features[0]} only" if len(features) == 1 else " ".join(features)


def cpu_features_mismatch(recorded: Fingerprint, current: Fingerprint) -> str | None:
    """Why a baseline recorded under `recorded` is not used for `current`, when the CPU features are all that
    differ; None when they agree or something else differs too (then it is simply another machine's baseline).

    Unknown features never match a known set: AVX2-only and AVX-512 hosts differ by 1.6x in INT8 speed, and a
    baseline from the wrong one reads as a regression or hides one.
    """
    if recorded.cpu_features == current.cpu_features or replace(recorded, cpu_features=current.cpu_features) != current:
        return None
    return (
        f"baseline recorded on a CPU with {describe_cpu_features(recorded.cpu_features)}; "
        f"this CPU has {describe_cpu_features(current.cpu_features)}: "
        f"re-record with {UPDATE_FLAG} on this machine kind"
    )


@dataclass(frozen=True)
class LevelRun:
    """One recorded run of a level: its metrics (metric name -> value) and, when the run kept them, the
    per-window throughputs the verdict tests against (a schema-1 file has none)."""

    recorded_at: str  # ISO 8601, UTC
    metrics: dict[str, float]
    window_throughputs_infer_per_s: tuple[float, ...] = ()
    #: what decided its speed besides the hardware (software.speed_software); empty: recorded before it was named
    software: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recorded_at": self.recorded_at,
            "metrics": dict(self.metrics),
            "window_throughputs_infer_per_s": list(self.window_throughputs_infer_per_s),
        } | ({"software": dict(self.software)} if self.software else {})


@dataclass(frozen=True)
class Baseline:
    """Stored results of one variant: `runs` maps a level id ("concurrency=1", "request_rate=2", "startup") to
    its recorded runs, oldest first (at most --baseline-runs of them). Treat both as read-only.

    `levels` is the one number per metric the verdict quotes: the median over the runs that have the metric
    (with one run, that run's numbers exactly, as in schema 1).
    """

    schema_version: int
    fingerprint: Fingerprint
    model_id: str
    variant: str
    recorded_at: str  # ISO 8601, UTC
    command: str  # the pytest command that recorded the newest levels
    runs: dict[str, tuple[LevelRun, ...]]

    @property
    def levels(self) -> dict[str, dict[str, float]]:
        return {level: median_metrics(runs) for level, runs in self.runs.items()}

    @classmethod
    def create(
        cls,
        fingerprint: Fingerprint,
        variant: str,
        command: str,
        levels: Mapping[str, Mapping[str, float]],
        recorded_at: str | None = None,
        window_throughputs: Mapping[str, Sequence[float]] | None = None,
        software: Mapping[str, str] | None = None,
    ) -> Baseline:
        """A one-run baseline of the current schema, recorded now unless `recorded_at` says otherwise;
        `window_throughputs` maps a level to the per-window throughputs of this run (where it has them), `software`
        names what decided its speed."""
        recorded_at = recorded_at or datetime.now(UTC).isoformat(timespec="seconds")
        windows = window_throughputs or {}
        return cls(
            schema_version=SCHEMA_VERSION,
            fingerprint=fingerprint,
            model_id=fingerprint.model_id,
            variant=variant,
            recorded_at=recorded_at,
            command=command,
            runs={
                level: (
                    LevelRun(
                        recorded_at,
                        dict(metrics),
                        tuple(float(v) for v in windows.get(level, ())),
                        dict(software or {}),
                    ),
                )
                for level, metrics in levels.items()
            },
        )

    def to_json(self) -> str:
        # Always the current layout, whatever schema the baseline was read from: a schema-1 file saved again is 2.
        data = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": self.fingerprint.to_dict(),
            "model_id": self.model_id,
            "variant": self.variant,
            "recorded_at": self.recorded_at,
            "command": self.command,
            "levels": {level: [run.to_dict() for run in runs] for level, runs in self.runs.items()},
        }
        data[CONTENT_DIGEST_FIELD] = content_digest(data)
        # allow_nan=False: NaN/Infinity are not JSON, and a baseline of "nothing measured" compares with nothing.
        return json.dumps(data, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> Baseline:
        """Parse and validate; every problem is a BaselineError naming `source`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise BaselineError(source, f"is not valid JSON ({error.msg} at line {error.lineno})") from None
        return _parse_baseline(data, source)


def median_metrics(runs: Sequence[LevelRun]) -> dict[str, float]:
    """Per metric, the median over the runs that recorded it (one run: its own numbers)."""
    names = dict.fromkeys(name for run in runs for name in run.metrics)
    return {name: statistics.median(run.metrics[name] for run in runs if name in run.metrics) for name in names}


def _fail(source: Path, problem: str) -> BaselineError:
    return BaselineError(source, problem)


def _check_fields(data: Any, expected: Sequence[str], where: str, source: Path) -> None:
    if not isinstance(data, dict):
        raise _fail(source, f"{where} is a JSON {type(data).__name__}, not an object")
    missing = [name for name in expected if name not in data]
    unknown = [name for name in data if name not in expected]
    if missing or unknown:
        parts = [f"missing field(s) {', '.join(missing)}" if missing else ""]
        parts.append(f"unknown field(s) {', '.join(unknown)}" if unknown else "")
        raise _fail(source, f"{where} has {' and '.join(part for part in parts if part)}")


def _typed(value: Any, kind: type, name: str, source: Path) -> Any:
    # bool is an int in Python, but `"cpu_cores": true` is a broken file, not one core.
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise _fail(source, f"field {name} should be a {kind.__name__}, not {json.dumps(value)}")
    return value


def _parse_fingerprint(data: Any, source: Path) -> Fingerprint:
    names = [field.name for field in fields(Fingerprint)]
    # Absent shared_memory: "none", as before the option; absent cpu_features: unknown, as before the field;
    # absent load_side: one client process, the only one before --load-workers.
    optional = ("shared_memory", "cpu_features", "load_side")
    present = [name for name in names if name not in optional or (isinstance(data, dict) and name in data)]
    _check_fields(data, present, "fingerprint", source)
    values: dict[str, Any] = {}
    for name in present:
        value = data[name]
        if name in ("cpu_cores", "gpu_count"):
            values[name] = _typed(value, int, f"fingerprint.{name}", source)
        elif name in ("gpu_names", "cpu_features"):
            items = _typed(value, list, f"fingerprint.{name}", source)
            values[name] = tuple(_typed(item, str, f"fingerprint.{name}[]", source) for item in items)
        elif name == "model_size" and isinstance(value, int) and not isinstance(value, bool):
            values[name] = str(value)
        else:
            values[name] = _typed(value, str, f"fingerprint.{name}", source)
    return Fingerprint(**values)


#: Stored metrics that may be 0: spreads, and counts of errors. Every other one (a throughput, a latency, a count
#: of requests, a load time) is above 0 in anything that was measured.
MAY_BE_ZERO_SUFFIXES = ("_spread_pct", "_errors")


def implausible(name: str, value: float) -> str | None:
    """Why a stored metric cannot be a measurement (None when it can): a baseline edited to 0 or below would read
    as an improvement, or as inconclusive, for ever, and never fail a run."""
    if not math.isfinite(value):
        return "not a finite number"
    if name.endswith(MAY_BE_ZERO_SUFFIXES):
        return "below 0" if value < 0 else None
    return "not above 0" if value <= 0 else None


def _parse_metrics(data: Any, where: str, source: Path) -> dict[str, float]:
    metrics = _typed(data, dict, where, source)
    parsed = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _fail(source, f"{where}[{name!r}] should be a finite number, not {value!r}")
        if (problem := implausible(name, float(value))) is not None:
            raise BaselineError(
                source,
                f"{where}[{name!r}] is {value!r}, {problem}: no measurement reads so (was the file edited?)",
                fix=f"restore it from version control, or re-record it with {UPDATE_FLAG}",
            )
        parsed[name] = float(value)
    return parsed


def _parse_levels_v1(data: Any, recorded_at: str, source: Path) -> dict[str, tuple[LevelRun, ...]]:
    """Schema 1: one run's metrics per level, read as a one-run distribution without windows."""
    levels = _typed(data, dict, "levels", source)
    return {
        level: (LevelRun(recorded_at, _parse_metrics(metrics, f"levels[{level!r}]", source)),)
        for level, metrics in levels.items()
    }


def _parse_levels_v2(data: Any, source: Path) -> dict[str, tuple[LevelRun, ...]]:
    levels = _typed(data, dict, "levels", source)
    parsed = {}
    for level, runs in levels.items():
        items = []
        for index, run in enumerate(_typed(runs, list, f"levels[{level!r}]", source)):
            where = f"levels[{level!r}][{index}]"
            expected = ["recorded_at", "metrics", "window_throughputs_infer_per_s"]
            _check_fields(
                run, expected + (["software"] if isinstance(run, dict) and "software" in run else []), where, source
            )
            windows = _typed(
                run["window_throughputs_infer_per_s"], list, f"{where}.window_throughputs_infer_per_s", source
            )
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in windows):
                raise _fail(source, f"{where}.window_throughputs_infer_per_s should hold finite numbers only")
            items.append(
                LevelRun(
                    _typed(run["recorded_at"], str, f"{where}.recorded_at", source),
                    _parse_metrics(run["metrics"], f"{where}.metrics", source),
                    tuple(float(v) for v in windows),
                    _parse_software(run.get("software", {}), f"{where}.software", source),
                )
            )
        if not items:
            raise _fail(source, f"levels[{level!r}] lists no run")
        parsed[level] = tuple(items)
    return parsed


def _parse_software(data: Any, where: str, source: Path) -> dict[str, str]:
    software = _typed(data, dict, where, source)
    return {str(name): _typed(version, str, f"{where}[{name!r}]", source) for name, version in software.items()}


#: The SHA-256 of everything else in the file, written when it is recorded: a file edited afterwards (a number
#: typed in by hand, a merge gone wrong) no longer matches and is refused. A file without it (recorded before the
#: suite wrote one, or written by hand) is read as it is.
CONTENT_DIGEST_FIELD = "content_sha256"


def content_digest(data: Mapping[str, Any]) -> str:
    """SHA-256 of `data` without CONTENT_DIGEST_FIELD, as canonical JSON (sorted keys, no spaces): the same numbers
    give the same digest however the file is indented."""
    content = {key: value for key, value in data.items() if key != CONTENT_DIGEST_FIELD}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_digest(data: dict[str, Any], source: Path) -> None:
    if CONTENT_DIGEST_FIELD not in data:
        return
    recorded = _typed(data[CONTENT_DIGEST_FIELD], str, CONTENT_DIGEST_FIELD, source)
    if recorded != content_digest(data):
        raise BaselineError(
            source,
            f"was edited after it was recorded: its content no longer matches its {CONTENT_DIGEST_FIELD}",
            fix=f"re-record it with {UPDATE_FLAG}, or restore the recorded file ({source.name}.bak beside it, or "
            "version control)",
        )


def _parse_baseline(data: Any, source: Path) -> Baseline:
    if not isinstance(data, dict):
        raise _fail(source, f"holds a JSON {type(data).__name__}, not an object")
    _check_digest(data, source)
    data = {key: value for key, value in data.items() if key != CONTENT_DIGEST_FIELD}
    if "schema_version" not in data:
        raise _fail(source, f"has no schema_version (this suite reads schema_version {SCHEMA_VERSION})")
    version = data["schema_version"]
    if type(version) is not int or version not in READABLE_SCHEMA_VERSIONS:
        readable = " or ".join(map(str, READABLE_SCHEMA_VERSIONS))
        raise BaselineError(
            source,
            f"has schema_version {json.dumps(version)}, but this suite reads schema_version {readable}",
            fix=f"re-record it with {UPDATE_FLAG}, or run the version of the suite that wrote it",
        )
    _check_fields(
        data,
        ["schema_version", "fingerprint", "model_id", "variant", "recorded_at", "command", "levels"],
        "the file",
        source,
    )
    recorded_at = _typed(data["recorded_at"], str, "recorded_at", source)
    try:
        datetime.fromisoformat(recorded_at)
    except ValueError:
        raise _fail(source, f"field recorded_at is not an ISO 8601 time: {recorded_at!r}") from None
    return Baseline(
        schema_version=version,
        fingerprint=_parse_fingerprint(data["fingerprint"], source),
        model_id=_typed(data["model_id"], str, "model_id", source),
        variant=_typed(data["variant"], str, "variant", source),
        recorded_at=recorded_at,
        command=_typed(data["command"], str, "command", source),
        runs=_parse_levels_v1(data["levels"], recorded_at, source)
        if version == 1
        else _parse_levels_v2(data["levels"], source),
    )


def merge(previous: Baseline | None, new: Baseline, max_runs: int = 1) -> Baseline:
    """`new` with the levels it did not re-record kept from `previous`, in the current schema.

    The unit is the level: a re-recorded level appends `new`'s run to the previous runs of that level and keeps
    the `max_runs` most recent (1, the default: the new run replaces the level, so a metric no longer measured
    does not linger); every other level of `previous` is kept as it was. recorded_at and command are the new
    recording's.
    """
    if max_runs < 1:
        raise ValueError(f"max_runs must be at least 1 (got {max_runs})")
    runs = dict(previous.runs) if previous is not None else {}
    for level, new_runs in new.runs.items():
        runs[level] = (runs.get(level, ()) + new_runs)[-max_runs:]
    return replace(new, schema_version=SCHEMA_VERSION, runs=runs)


def describe_changes(previous: Baseline | None, new: Baseline) -> list[str]:
    """One line per number of `new` against `previous`: `concurrency=1 x: 24.30 -> 25.10 (+3.3%)`."""
    lines = []
    old_levels = previous.levels if previous is not None else {}
    for level, metrics in new.levels.items():
        old_metrics = old_levels.get(level, {})
        for name, value in metrics.items():
            if name not in old_metrics:
                lines.append(f"{level} {name}: {value:.2f} (new)")
                continue
            old = old_metrics[name]
            change = f" ({(value - old) / old * 100:+.1f}%)" if old != 0 else ""
            lines.append(f"{level} {name}: {old:.2f} -> {value:.2f}{change}")
        lines.extend(
            f"{level} {name}: {old:.2f} -> (no longer recorded)"
            for name, old in old_metrics.items()
            if name not in metrics
        )
    if previous is not None:
        lines.extend(
            f"{level}: kept from the previous baseline ({previous.recorded_at})"
            for level in previous.levels
            if level not in new.levels
        )
    return lines


def lock_path(path: Path) -> Path:
    """`.<variant>.json.lock` beside a baseline file: what writers of that file lock."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`'s lock file so parallel sessions (xdist, two runs on one store) never lose
    each other's levels. The lock file is opened for writing: on NFS, Linux carries flock as a POSIX lock, which
    needs a writable descriptor (a directory opened read-only gets EBADF there). The file stays: removing it would
    let a third writer lock a new file while one still waits on the old one."""
    with open(lock_path(path), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, also when this process dies
        yield


class BaselineStore:
    """Baselines under `root`, laid out as

        root/<fingerprint slug>-<fingerprint key>/<model slug>/<variant>.json

    e.g. `baselines/16cpu-0gpu-local-grpc-3f9a0c12b7de/Salesforce--blip-image-captioning-base/base_model_cpu.json`.
    The folder names are derived from the file's own fingerprint, model id and variant, and load checks
    that they still agree.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, fingerprint: Fingerprint, model_id: str, variant: str) -> Path:
        if not _VARIANT_NAME.fullmatch(variant):
            raise ValueError(f"variant name {variant!r} cannot be a file name (letters, digits, _ . - only)")
        return self.root / fingerprint.dirname() / model_slug(model_id) / f"{variant}.json"

    def load(self, fingerprint: Fingerprint, model_id: str, variant: str) -> Baseline | None:
        """The stored baseline, or None when none was recorded. Never modifies or deletes a file."""
        path = self.path_for(fingerprint, model_id, variant)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise BaselineError(path, f"cannot be read ({error})") from None
        baseline = Baseline.from_json(text, path)
        self._check_place(baseline, path, fingerprint, model_id, variant)
        return baseline

    def cpu_features_mismatches(self, fingerprint: Fingerprint, model_id: str, variant: str) -> list[str]:
        """Why each baseline of this model and variant recorded under another CPU feature set (or an unknown one)
        is not used, for the message of a missing baseline. Unreadable files there are another run's concern."""
        reasons = []
        for path in sorted(self.root.glob(f"*/{model_slug(model_id)}/{variant}.json")):
            try:
                stored = Baseline.from_json(path.read_text(encoding="utf-8"), path).fingerprint
            except (OSError, UnicodeDecodeError, BaselineError):
                continue
            reason = cpu_features_mismatch(stored, fingerprint)
            if reason is not None:
                reasons.append(f"{reason} ({path})")
        return reasons

    @staticmethod
    def _check_place(baseline: Baseline, path: Path, fingerprint: Fingerprint, model_id: str, variant: str) -> None:
        stored = baseline.fingerprint
        if stored.dirname() != path.parent.parent.name or stored != fingerprint:
            raise BaselineError(
                path,
                f"its fingerprint ({stored.dirname()}) does not match the folder it is in "
                f"({path.parent.parent.name}); it was moved or edited by hand",
            )
        if baseline.model_id != model_id or baseline.model_id != stored.model_id:
            raise BaselineError(
                path, f"it records model {baseline.model_id!r} (fingerprint: {stored.model_id!r}), not {model_id!r}"
            )
        if baseline.variant != variant:
            raise BaselineError(path, f"it records variant {baseline.variant!r}, not {variant!r}")

    def save(self, baseline: Baseline, overwrite_corrupt: bool = False, max_runs: int = 1) -> list[str]:
        """Write `baseline` merged into the previous file (see `merge`, which keeps `max_runs` runs per level);
        return old -> new lines, and with `max_runs` > 1 how many runs each re-recorded level now holds.

        An unreadable previous file is replaced only with `overwrite_corrupt=True` (the --update-baselines
        path); otherwise BaselineError, and the file is left exactly as it was. A previous file is first copied,
        as it is, to `<variant>.json.bak` beside it: an OSError there (or in the write) leaves it untouched.
        """
        path = self.path_for(baseline.fingerprint, baseline.model_id, baseline.variant)
        self._check_savable(baseline, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            notes = []
            try:
                previous = self.load(baseline.fingerprint, baseline.model_id, baseline.variant)
            except BaselineError as error:
                if not overwrite_corrupt:
                    raise BaselineError(path, f"{error.problem}; it was left as it is", error.fix) from None
                previous = None
                notes.append(f"replaced the unreadable previous file ({error.problem})")
            merged = merge(previous, baseline, max_runs)
            if path.exists():
                # A bad recording (a noisy machine, the wrong build) must not cost the only good numbers.
                write_bytes_atomic(backup_path(path), path.read_bytes())
                notes.append(f"previous file kept as {backup_path(path).name}")
            write_text_atomic(path, merged.to_json())
        runs_kept = [f"{level}: {len(merged.runs[level])} run(s) kept (at most {max_runs})" for level in baseline.runs]
        return notes + describe_changes(previous, baseline) + (runs_kept if max_runs > 1 else [])

    @staticmethod
    def _check_savable(baseline: Baseline, path: Path) -> None:
        if baseline.schema_version != SCHEMA_VERSION:
            raise ValueError(f"this suite writes schema_version {SCHEMA_VERSION}, not {baseline.schema_version}")
        if baseline.model_id != baseline.fingerprint.model_id:
            raise ValueError(
                f"baseline model_id {baseline.model_id!r} differs from its fingerprint's "
                f"{baseline.fingerprint.model_id!r}"
            )
        for level, runs in baseline.runs.items():
            values = [(name, value) for run in runs for name, value in run.metrics.items()]
            values += [("window throughput", value) for run in runs for value in run.window_throughputs_infer_per_s]
            for name, value in values:
                if implausible(name, value) is not None:
                    raise BaselineError(
                        path,
                        f"not saved: {level} {name} is {value} (nothing usable was measured)",
                        fix="look at the run's errors and stability, and measure longer windows",
                    )


def record_command(args: Sequence[str], program: str = "pytest") -> str:
    """The shell command that records a missing baseline: the run's own pytest args plus --update-baselines.

    `args` are pytest's arguments (config.invocation_params.args); a leading `pytest` is not repeated,
    and --update-baselines is added only when absent.
    """
    words = list(args)
    if not words or Path(words[0]).name not in ("pytest", "py.test"):
        words.insert(0, program)
    if UPDATE_FLAG not in words:
        words.append(UPDATE_FLAG)
    return shlex.join(words)
