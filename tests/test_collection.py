"""What the collection layer stages: only the variants a remaining test serves, with the models they call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from blip_triton_bench.assembly import RunPlan
from blip_triton_bench.fixtures.collection import role_params, variants_under_test
from blip_triton_bench.host.hardware import HostInfo
from blip_triton_bench.repository.variants import CAPTIONER_ROLE, LOGITS_ROLE, discover_variants, select_variants

pytestmark = pytest.mark.unit

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
HOST = HostInfo("AMD EPYC", 2, (), ("CPUExecutionProvider",))


def item(**params: object) -> SimpleNamespace:
    return SimpleNamespace(callspec=SimpleNamespace(params=params))


def plan() -> RunPlan:
    repository = discover_variants(REPOSITORY)
    return RunPlan(options=None, repository=repository, variants=repository, staged=repository, server_choice=None)


def test_after_deselection_only_the_served_variants_and_what_they_call_are_staged() -> None:
    run = plan()
    by_name = {variant.name: variant for variant in run.repository}
    items = [
        item(variant=by_name["base_model_gpu"]),
        item(captioner=by_name["blip_caption"]),
        item(),  # a test without a variant (export vs PyTorch) stages nothing
    ]
    staged = {variant.name for variant in variants_under_test(run, items)}
    assert staged == {"base_model_gpu", "blip_caption", "blip_caption_vision", "blip_caption_decoder"}


def test_nothing_is_staged_when_no_remaining_test_serves_a_variant() -> None:
    assert variants_under_test(plan(), [item()]) == []


@pytest.mark.parametrize(
    ("chosen", "role", "reason"),
    [
        (["base_model_cpu"], CAPTIONER_ROLE, "no captioner selected: --variant base_model_cpu leaves out blip_caption"),
        (["blip_caption"], LOGITS_ROLE, "no logits model (one forward pass per request) selected: --variant "
         "blip_caption leaves out base_model_cpu, base_model_cpu_int8, base_model_gpu"),
    ],
)  # fmt: skip
def test_a_role_left_out_by_variant_skips_its_tests_naming_what_was_left_out(
    chosen: list[str], role: str, reason: str
) -> None:
    """Not pytest's "got empty parameter set", which names no variant and no option."""
    repository = discover_variants(REPOSITORY)
    variants = select_variants(repository, chosen)
    run = RunPlan(
        options=SimpleNamespace(variants=chosen, model_repository=REPOSITORY),
        repository=repository,
        variants=variants,
        staged=variants,
        server_choice=None,
    )
    (param,) = role_params(run, HOST, role)
    assert param.values == (None,) and param.id == "none"
    (skip,) = param.marks
    assert skip.name == "skip" and skip.kwargs["reason"].startswith(reason)


def test_a_repository_without_a_captioner_says_so() -> None:
    repository = [variant for variant in discover_variants(REPOSITORY) if variant.role != CAPTIONER_ROLE]
    run = RunPlan(
        options=SimpleNamespace(variants=[], model_repository=REPOSITORY),
        repository=repository,
        variants=repository,
        staged=repository,
        server_choice=None,
    )
    (param,) = role_params(run, HOST, CAPTIONER_ROLE)
    assert param.marks[0].kwargs["reason"] == f"{REPOSITORY} has no captioner"


def test_loading_the_plugin_imports_neither_torch_nor_transformers_nor_scipy() -> None:
    """Every pytest process loads the plugin, and importing torch and transformers costs seconds (about 6 of a
    10 s run that stops at a usage error), scipy.stats 0.7 s more: only what needs them imports them."""
    code = (
        "import sys, importlib.metadata\n"
        "(entry,) = [e for e in importlib.metadata.entry_points(group='pytest11') if e.name == 'blip_triton_bench']\n"
        "entry.load()\n"
        "print(sorted({'torch', 'transformers', 'scipy'} & {name.split('.')[0] for name in sys.modules}))\n"
    )
    root = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]", completed.stdout


def test_only_the_pytest_layer_imports_pytest() -> None:
    """The package is usable without pytest: fixtures/ (installed as blip_triton_bench.fixtures) is its one
    pytest layer; no module under blip_triton_bench/ imports pytest, at its top or inside a function."""
    import ast

    package = Path(__file__).resolve().parents[1] / "blip_triton_bench"
    importing = []
    for module in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name.split(".")[0] in ("pytest", "_pytest") for name in names):
                importing.append(str(module.relative_to(package.parent)))
    assert importing == []


#: The package's entry points for its pytest layer: the run's assembly, its options, its session, what a run proved,
#: the repository's variants, and the perf run's results (what a suite test enforces).
ENTRY_POINTS = {
    "blip_triton_bench.assembly",
    "blip_triton_bench.options",
    "blip_triton_bench.session",
    "blip_triton_bench.judging.proof",
    "blip_triton_bench.repository.variants",
    "blip_triton_bench.runs.perf",
}
#: The longest a fixture may be (decorator excluded): it hands out what the package builds.
FIXTURE_LINES = 15


def test_the_pytest_layer_reaches_the_package_through_its_entry_points_and_its_fixtures_only_hand_out() -> None:
    """fixtures/ (installed as blip_triton_bench.fixtures) imports only ENTRY_POINTS of the package, counting
    imports inside functions and under TYPE_CHECKING, and no fixture there is longer than FIXTURE_LINES."""
    import ast

    layer = Path(__file__).resolve().parents[1] / "fixtures"
    imported, long_fixtures = set(), []
    for module in sorted(layer.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("blip_triton_bench"):
                names = (
                    [f"{node.module}.{alias.name}" for alias in node.names]
                    if node.module == "blip_triton_bench"
                    else [node.module]
                )
                imported.update(name for name in names if not name.startswith("blip_triton_bench.fixtures"))
            fixture = isinstance(node, ast.FunctionDef) and any(
                "fixture" in ast.unparse(d) for d in node.decorator_list
            )
            if fixture and (length := node.end_lineno - node.lineno + 1) > FIXTURE_LINES:
                long_fixtures.append(f"{module.name}:{node.name} ({length} lines)")
    assert imported <= ENTRY_POINTS, sorted(imported - ENTRY_POINTS)
    assert long_fixtures == []
