"""The batching sweep's machinery: grid parsing, point generation on the real base_model_cpu config, the
frontier and the choice under a budget, and the report files."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from blip_triton_bench.judging.correctness import OutputMismatch
from blip_triton_bench.load.engine import REQUEST_RATE
from blip_triton_bench.report.text import SWEEP_CSV_COLUMNS as CSV_COLUMNS
from blip_triton_bench.report.write import BEST_CONFIG, write_sweep_report
from blip_triton_bench.repository.variants import parse_config
from blip_triton_bench.runs.sweep import (
    AUTO,
    DEFAULT_GRID,
    GRID_KEYS,
    THREAD_PARAMETER,
    SweepError,
    SweepGrid,
    SweepMeasurement,
    SweepResult,
    as_given_point,
    best_under_budget,
    config_text,
    pareto_frontier,
    parse_grid,
    run_sweep,
    sweep_points,
    write_config,
)
from blip_triton_bench.servers.base import ServerStartError

pytestmark = pytest.mark.unit

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
BASE = "base_model_cpu"


@pytest.fixture
def base_config() -> model_config_pb2.ModelConfig:
    return parse_config(REPOSITORY / BASE / "config.pbtxt")


def measurement(
    name: str,
    throughput: float,
    p99: float,
    *,
    level: int = 1,
    stable: bool = True,
    errors: int = 0,
) -> SweepMeasurement:
    return SweepMeasurement(
        point_name=name,
        level_id=f"concurrency={level}",
        level_value=float(level),
        throughput_infer_per_s=throughput,
        latency_p50_ms=p99 * 0.8,
        latency_p99_ms=p99,
        stable=stable,
        errors=errors,
    )


# ------------------------------------------------------------------------------------------ grid


def test_default_grid_is_small_and_fits_two_cores(base_config) -> None:
    points = sweep_points(BASE, base_config, DEFAULT_GRID)
    assert 4 <= len(points) <= 6
    assert max(p.instance_count * p.intra_op_thread_count for p in points) <= 2
    assert {p.max_batch_size for p in points} == {1, 8}
    assert {p.instance_count for p in points} == {1, 2}


def test_parse_grid_replaces_given_keys_and_keeps_the_rest() -> None:
    grid = parse_grid(
        [
            "max_batch_size=0, 4,8",
            "preferred_batch_size=auto,2|4,none,4|2",
            "instance_count=3,3",
        ]
    )
    assert grid.max_batch_size == (0, 4, 8)
    assert grid.preferred_batch_size == (AUTO, (2, 4), ())  # 4|2 is 2|4 sorted, listed once
    assert grid.instance_count == (3,)
    assert grid.max_queue_delay_microseconds == DEFAULT_GRID.max_queue_delay_microseconds
    assert grid.intra_op_thread_count == DEFAULT_GRID.intra_op_thread_count
    assert parse_grid([]) == DEFAULT_GRID
    assert grid.size == 3 * 3 * 1 * 1 * 1


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("batch=1,2", r"unknown key 'batch'; use one of max_batch_size, preferred_batch_size, max_queue_delay"),
        ("max_batch_size", r"expected KEY=V1,V2"),
        ("max_batch_size=", r"max_batch_size has an empty value"),
        ("instance_count=1,,2", r"instance_count has an empty value"),
        ("max_batch_size=8,a", r"max_batch_size value 'a' is not a whole number"),
        ("max_queue_delay_microseconds=1.5", r"value '1.5' is not a whole number"),
        ("max_batch_size=-1", r"max_batch_size -1 is below 0"),
        ("intra_op_thread_count=-2", r"intra_op_thread_count -2 is below 0"),
        ("instance_count=0", r"instance_count 0 is below 1 \(Triton needs at least one instance\)"),
        ("preferred_batch_size=2|x", r"'x' is not a whole number; use 'auto', 'none' or sizes separated by '\|'"),
        ("preferred_batch_size=2||4", r"has an empty size"),
        ("preferred_batch_size=0|2", r"preferred batch sizes must be at least 1"),
    ],
)
def test_parse_grid_errors_name_the_spec_the_field_and_the_fix(spec: str, expected: str) -> None:
    with pytest.raises(SweepError, match=expected) as caught:
        parse_grid([spec])
    assert f"--sweep-grid {spec!r}" in str(caught.value)


def test_a_key_given_twice_is_an_error() -> None:
    with pytest.raises(SweepError, match=r"instance_count is given twice; put all its values in one spec"):
        parse_grid(["instance_count=1", "instance_count=2"])


def test_a_grid_built_in_code_is_checked_too() -> None:
    with pytest.raises(SweepError, match=r"'instance_count' has no value"):
        SweepGrid(instance_count=())
    with pytest.raises(SweepError, match=r"'max_batch_size': -4 is below 0"):
        SweepGrid(max_batch_size=(-4,))
    with pytest.raises(SweepError, match=r"'preferred_batch_size': 'sometimes' is neither 'auto'"):
        SweepGrid(preferred_batch_size=("sometimes",))


#: Per grid key: the ModelConfig field it must set, how Triton's value is read there, and two grid values
#: with the value each must put there.
TRITON_FIELDS = {
    "max_batch_size": ("max_batch_size", lambda config: config.max_batch_size, {4: 4, 8: 8}),
    "preferred_batch_size": (
        "dynamic_batching",
        lambda config: list(config.dynamic_batching.preferred_batch_size),
        {(2,): [2], (1, 4): [1, 4]},
    ),
    "max_queue_delay_microseconds": (
        "dynamic_batching",
        lambda config: config.dynamic_batching.max_queue_delay_microseconds,
        {100: 100, 500: 500},
    ),
    "instance_count": (
        "instance_group",
        lambda config: [group.count for group in config.instance_group],
        {1: [1], 3: [3]},
    ),
    "intra_op_thread_count": (
        "parameters",
        lambda config: config.parameters[THREAD_PARAMETER].string_value,
        {1: "1", 2: "2"},
    ),
}


@pytest.mark.parametrize("key", GRID_KEYS)
def test_each_grid_key_sets_its_triton_field_and_only_that(base_config, key: str) -> None:
    field_name, read, triton_values = TRITON_FIELDS[key]  # a new grid key must say where it lands
    fixed = {name: (next(iter(values)),) for name, (_, _, values) in TRITON_FIELDS.items()}
    points = sweep_points(BASE, base_config, SweepGrid(**{**fixed, key: tuple(triton_values)}))
    assert len(points) == 2
    assert sorted(repr(read(point.config)) for point in points) == sorted(map(repr, triton_values.values()))
    first, second = (point.config for point in points)
    differing = [
        field.name
        for field in model_config_pb2.ModelConfig.DESCRIPTOR.fields
        if field.name != "name" and getattr(first, field.name) != getattr(second, field.name)
    ]
    assert differing == [field_name]


# ------------------------------------------------------------------------------------------ points


def test_points_set_every_knob_on_a_copy_of_the_base(base_config) -> None:
    before = config_text(base_config)
    grid = SweepGrid(
        max_batch_size=(8,),
        preferred_batch_size=((2, 4),),
        max_queue_delay_microseconds=(500,),
        instance_count=(3,),
        intra_op_thread_count=(2,),
    )
    (point,) = sweep_points(BASE, base_config, grid)
    config = point.config
    assert point.name == "base_model_cpu__mbs8_q500_p2-4_i3_t2"
    assert config.name == point.name
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 3)]
    assert config.parameters[THREAD_PARAMETER].string_value == "2"
    assert [list(t.dims) for t in config.input] == [list(t.dims) for t in base_config.input]
    assert config.platform == base_config.platform
    assert config_text(base_config) == before  # the base is never mutated
    assert base_config.name == BASE


def test_batch_size_0_and_1_have_no_dynamic_batching_and_collapse(base_config, caplog) -> None:
    grid = SweepGrid(
        max_batch_size=(0, 1, 8),
        preferred_batch_size=(AUTO, ()),
        max_queue_delay_microseconds=(0, 2000),
        instance_count=(1,),
        intra_op_thread_count=(0,),
    )
    points = sweep_points(BASE, base_config, grid)
    # 0 and 1: one point each whatever the queue delay and preferred sizes; 8: 2 preferred x 2 delays
    assert [p.name for p in points] == [
        "base_model_cpu__mbs0_i1_t0",
        "base_model_cpu__mbs1_i1_t0",
        "base_model_cpu__mbs8_q0_p1-2-4-8_i1_t0",
        "base_model_cpu__mbs8_q2000_p1-2-4-8_i1_t0",
        "base_model_cpu__mbs8_q0_pnone_i1_t0",
        "base_model_cpu__mbs8_q2000_pnone_i1_t0",
    ]
    for point in points[:2]:
        assert not point.dynamic_batching
        assert not point.config.HasField("dynamic_batching")
        assert [list(t.dims) for t in point.config.input] == [[3, 384, 384], [-1], [-1]]
    assert points[0].config.max_batch_size == 0
    assert "max_batch_size 0 serves tensors of exactly the config's dims" in caplog.text
    assert THREAD_PARAMETER not in points[0].config.parameters  # 0: ONNX Runtime's default
    none_point = points[4]
    assert none_point.config.HasField("dynamic_batching")  # present though empty: batching stays on
    assert list(none_point.config.dynamic_batching.preferred_batch_size) == []


def test_auto_and_the_same_explicit_sizes_are_one_point(base_config) -> None:
    grid = SweepGrid(max_batch_size=(8,), preferred_batch_size=(AUTO, (1, 2, 4, 8)))
    points = sweep_points(BASE, base_config, grid)
    assert len(points) == len(grid.instance_count)  # 2 preferred values, one config each instance count


def test_preferred_sizes_above_max_batch_size_are_dropped(base_config) -> None:
    grid = SweepGrid(max_batch_size=(2, 8), preferred_batch_size=((4, 8), AUTO), instance_count=(1,))
    names = [p.name for p in sweep_points(BASE, base_config, grid)]
    assert names == [
        "base_model_cpu__mbs2_q2000_p1-2_i1_t1",
        "base_model_cpu__mbs8_q2000_p4-8_i1_t1",
        "base_model_cpu__mbs8_q2000_p1-2-4-8_i1_t1",
    ]
    with pytest.raises(SweepError, match=r"every point .* invalid \(preferred_batch_size 4\|8 with max_batch_size 2\)"):
        sweep_points(BASE, base_config, SweepGrid(max_batch_size=(2,), preferred_batch_size=((4, 8),)))


def test_names_are_unique_valid_model_names_and_configs_round_trip(base_config, tmp_path) -> None:
    grid = parse_grid(
        [
            "max_batch_size=0,1,4,8",
            "preferred_batch_size=auto,none,2|4",
            "max_queue_delay_microseconds=0,100",
            "instance_count=1,2",
            "intra_op_thread_count=0,1",
        ]
    )
    points = sweep_points(BASE, base_config, grid)
    names = [p.name for p in points]
    assert len(names) == len(set(names))
    # 0, 1: 2 instances x 2 threads each; 4, 8: 3 preferred x 2 delays x 2 x 2
    assert len(points) == 2 * 4 + 2 * 3 * 2 * 4
    for point in points:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", point.name)
        parsed = text_format.Parse(config_text(point.config), model_config_pb2.ModelConfig())
        assert parsed == point.config
    write_config(points[-1].config, tmp_path / "config.pbtxt")
    assert parse_config(tmp_path / "config.pbtxt") == points[-1].config


def test_instance_count_is_set_on_every_group_keeping_kind_and_gpus() -> None:
    base = text_format.Parse(
        """
        name: "multi" platform: "onnxruntime_onnx" max_batch_size: 4
        instance_group [ { kind: KIND_GPU gpus: [ 0 ] }, { kind: KIND_GPU gpus: [ 1 ] count: 3 } ]
        parameters { key: "intra_op_thread_count" value: { string_value: "4" } }
        parameters { key: "bench_concurrency" value: { string_value: "1:8:1" } }
        """,
        model_config_pb2.ModelConfig(),
    )
    grid = SweepGrid(max_batch_size=(4,), instance_count=(2,), intra_op_thread_count=(0,))
    (point,) = sweep_points("multi", base, grid)
    groups = [(g.kind, list(g.gpus), g.count) for g in point.config.instance_group]
    assert groups == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, [0], 2),
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, [1], 2),
    ]
    assert THREAD_PARAMETER not in point.config.parameters  # 0 removes the base's setting
    assert point.config.parameters["bench_concurrency"].string_value == "1:8:1"  # other parameters stay
    assert base.parameters[THREAD_PARAMETER].string_value == "4"
    assert not base.HasField("dynamic_batching")


def test_a_config_without_instance_group_gets_one() -> None:
    base = text_format.Parse('name: "m" platform: "onnxruntime_onnx" max_batch_size: 4', model_config_pb2.ModelConfig())
    (point,) = sweep_points("m", base, SweepGrid(max_batch_size=(4,), instance_count=(2,)))
    assert [(g.kind, g.count) for g in point.config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_AUTO, 2)
    ]
    assert len(base.instance_group) == 0


def test_a_sequence_model_or_a_bad_base_name_is_refused() -> None:
    base = text_format.Parse(
        'name: "s" platform: "onnxruntime_onnx" max_batch_size: 4 sequence_batching { }', model_config_pb2.ModelConfig()
    )
    with pytest.raises(SweepError, match=r"uses sequence_batching"):
        sweep_points("s", base, DEFAULT_GRID)
    with pytest.raises(SweepError, match=r"not a valid model folder name"):
        sweep_points("a/b", model_config_pb2.ModelConfig(), DEFAULT_GRID)


# ------------------------------------------------------------------------------------------ frontier and choice


def test_frontier_keeps_non_dominated_stable_error_free_points_by_throughput() -> None:
    slow_fast = measurement("a", 2.0, 100.0)
    mid = measurement("b", 5.0, 150.0)
    dominated = measurement("c", 4.0, 200.0)  # b is faster and lower
    fast = measurement("d", 8.0, 400.0)
    unstable = measurement("e", 20.0, 50.0, stable=False)  # would dominate everything
    failing = measurement("f", 20.0, 50.0, errors=3)
    frontier = pareto_frontier([fast, dominated, unstable, mid, failing, slow_fast])
    assert frontier == [slow_fast, mid, fast]


def test_frontier_keeps_exact_ties_and_drops_equal_throughput_higher_p99() -> None:
    one, twin = measurement("a", 5.0, 100.0), measurement("b", 5.0, 100.0)
    worse = measurement("c", 5.0, 120.0)
    assert pareto_frontier([worse, twin, one]) == [one, twin]


def test_best_under_budget() -> None:
    a = measurement("a", 2.0, 100.0)
    b = measurement("b", 5.0, 150.0)
    c = measurement("c", 8.0, 400.0)
    unstable = measurement("d", 9.0, 120.0, stable=False)
    assert best_under_budget([a, b, c, unstable], 200.0) is b
    assert best_under_budget([a, b, c, unstable], 150.0) is b  # the budget is inclusive
    assert best_under_budget([a, b, c, unstable], None) is c  # unstable d is faster but excluded
    assert best_under_budget([a, b, c], 50.0) is None
    assert best_under_budget([unstable], None) is None
    assert best_under_budget([], None) is None


def test_best_under_budget_breaks_throughput_ties_by_lower_p99() -> None:
    high = measurement("a", 5.0, 180.0)
    low = measurement("b", 5.0, 120.0)
    assert best_under_budget([high, low], 200.0) is low
    assert best_under_budget([low, high], None) is low


def test_budget_must_be_positive() -> None:
    with pytest.raises(SweepError, match=r"--latency-budget-ms 0"):
        best_under_budget([measurement("a", 1.0, 1.0)], 0.0)


# ------------------------------------------------------------------------------------------ report


def _swept(base_config):
    points = sweep_points(BASE, base_config, DEFAULT_GRID)
    names = [p.name for p in points]
    assert names == [
        "base_model_cpu__mbs1_i1_t1",
        "base_model_cpu__mbs1_i2_t1",
        "base_model_cpu__mbs8_q2000_pnone_i1_t1",
        "base_model_cpu__mbs8_q2000_pnone_i2_t1",
    ]
    measurements = [
        measurement(names[0], 2.0, 500.0, level=1),
        measurement(names[0], 2.1, 1900.0, level=4),
        measurement(names[1], 2.0, 520.0, level=1),
        measurement(names[1], 3.5, 1150.0, level=4),
        measurement(names[2], 1.9, 505.0, level=1),
        measurement(names[2], 3.0, 1300.0, level=4),
        measurement(names[3], 2.0, 490.0, level=1),
        measurement(names[3], 4.2, 1500.0, level=4, stable=False),
    ]
    return points, measurements


def test_report_writes_csv_markdown_plot_and_the_winner_config(base_config, tmp_path) -> None:
    points, measurements = _swept(base_config)
    report = write_sweep_report(tmp_path, BASE, points, measurements, latency_budget_ms=1200.0)

    winner = measurements[3]
    assert report.winner is winner
    assert report.winner_point is points[1]
    assert report.frontier == (measurements[6], measurements[3])

    with report.csv_path.open() as stream:
        rows = list(csv.DictReader(stream))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(measurements)
    best_row = next(row for row in rows if row["Best"] == "yes")
    assert best_row["Variant"] == points[1].name
    assert best_row["Concurrency"] == "4"
    assert best_row["Inferences/Second"] == "3.5000"
    assert best_row["p99 latency"] == "1150000"  # microseconds, as perf_analyzer writes them
    assert best_row["p50 latency"] == "920000"
    assert best_row["instance_count"] == "2"
    assert best_row["preferred_batch_size"] == "-"  # max_batch_size 1: no dynamic batching
    assert [row["On Frontier"] for row in rows].count("yes") == 2
    unstable_row = next(row for row in rows if row["Stable"] == "no")
    assert unstable_row["On Frontier"] == "no"
    assert unstable_row["max_queue_delay_microseconds"] == "2000"
    assert unstable_row["preferred_batch_size"] == "none"

    markdown = report.markdown_path.read_text()
    sentence = f"best under p99 <= 1200 ms: {points[1].name} at concurrency=4: 3.50 infer/s, p99 1150.0 ms"
    assert sentence in markdown
    assert sentence in "\n".join(report.lines)
    assert markdown.count("| base_model_cpu__") == len(measurements)
    assert "**best**, frontier" in markdown
    assert "UNSTABLE" in markdown
    assert "sweep_frontier.png" in markdown

    assert report.plot_path.read_bytes().startswith(b"\x89PNG")

    assert report.best_config_path == tmp_path / BEST_CONFIG
    best = parse_config(report.best_config_path)
    assert best.name == BASE
    assert report.best_config_path.read_text().startswith(f"# {points[1].name} of the batching sweep of {BASE}")
    assert best.max_batch_size == 1
    assert [g.count for g in best.instance_group] == [2]
    assert not best.HasField("dynamic_batching")
    assert points[1].config.name == points[1].name  # the point itself keeps its own name


def test_report_without_a_fitting_config_says_why_and_writes_no_best_config(base_config, tmp_path) -> None:
    points, measurements = _swept(base_config)
    (tmp_path / BEST_CONFIG).write_text("stale")  # an earlier run's winner must not survive
    report = write_sweep_report(tmp_path, BASE, points, measurements, latency_budget_ms=100.0)
    assert report.winner is None
    assert report.best_config_path is None
    assert not (tmp_path / BEST_CONFIG).exists()
    markdown = report.markdown_path.read_text()
    assert (
        f"no config fits p99 <= 100 ms: the lowest stable p99 was 490.0 ms ({points[3].name} at concurrency=1); "
        "best_config.pbtxt not written" in markdown
    )
    assert "**best**" not in markdown
    assert all(BEST_CONFIG not in line.split("(")[-1] for line in report.lines if line.startswith("- sweep report"))


def test_report_with_only_unusable_measurements(base_config, tmp_path) -> None:
    points, _ = _swept(base_config)
    measurements = [
        measurement(points[0].name, 3.0, 100.0, stable=False),
        measurement(points[1].name, 3.0, 90.0, errors=2),
    ]
    report = write_sweep_report(tmp_path, BASE, points, measurements, latency_budget_ms=None)
    assert report.winner is None
    assert report.frontier == ()
    assert "none of the 2 measurements was stable and error-free" in report.markdown_path.read_text()
    assert f"Not measured: {points[2].name}, {points[3].name}." in report.markdown_path.read_text()
    assert report.plot_path.read_bytes().startswith(b"\x89PNG")


def test_report_without_budget_picks_the_fastest_and_writes_request_rates(base_config, tmp_path) -> None:
    points, _ = _swept(base_config)
    rate = SweepMeasurement(points[2].name, "request_rate=2.5", 2.5, 2.4, 300.0, 900.0, True, 0, mode=REQUEST_RATE)
    report = write_sweep_report(tmp_path, BASE, points, [measurement(points[0].name, 2.0, 500.0), rate], None)
    assert report.winner is rate
    assert "best under no p99 budget (the fastest): base_model_cpu__mbs8_q2000_pnone_i1_t1 at request_rate=2.5" in (
        report.markdown_path.read_text()
    )
    rows = list(csv.DictReader(report.csv_path.open()))
    assert (rows[1]["Concurrency"], rows[1]["Request Rate"]) == ("", "2.5")
    assert parse_config(report.best_config_path).dynamic_batching.max_queue_delay_microseconds == 2000


def test_measurements_of_an_unknown_config_are_refused(base_config, tmp_path) -> None:
    points, _ = _swept(base_config)
    with pytest.raises(SweepError, match=r"measurements name elsewhere, which are not among the swept points"):
        write_sweep_report(tmp_path, BASE, points, [measurement("elsewhere", 1.0, 1.0)], None)


def test_the_config_as_given_is_a_point_of_its_own(base_config) -> None:
    point = as_given_point(BASE, base_config)
    expected = type(base_config)()
    expected.CopyFrom(base_config)
    expected.name = f"{BASE}__as_given"
    assert point.config == expected  # nothing but the name changes
    assert point.config is not base_config and base_config.name != point.name
    assert (point.max_batch_size, point.dynamic_batching, point.instance_count) == (8, True, 1)
    assert point.preferred_batch_size == (1, 2, 4, 8)
    assert point.max_queue_delay_microseconds == 1000
    assert point.intra_op_thread_count == 0  # ONNX Runtime's default
    assert point.name not in {p.name for p in sweep_points(BASE, base_config, DEFAULT_GRID)}


# ------------------------------------------------------------------------------------------ faults


def test_a_failing_point_is_reported_and_the_sweep_goes_on(base_config, tmp_path) -> None:
    points, measurements = _swept(base_config)
    by_point = {point.name: [m for m in measurements if m.point_name == point.name] for point in points}

    def measure_point(point):
        if point is points[1]:
            raise ServerStartError("Triton failed to load model 'x': out of memory\nServer log lines: ...")
        if point is points[2]:
            yield by_point[point.name][0]
            raise OutputMismatch("logits: max abs error 3, OUTSIDE tolerance")
        yield from by_point[point.name]

    def write(result: SweepResult) -> None:
        reports.append(write_sweep_report(tmp_path, BASE, points, result.measurements, None, result.failures))

    reports = []
    result = run_sweep(points, measure_point, write)

    assert [(f.point_name, f.levels_measured) for f in result.failures] == [(points[1].name, 0), (points[2].name, 1)]
    assert result.failures[0].cause.startswith("ServerStartError: Triton failed to load model 'x': out of memory\n")
    assert [m.point_name for m in result.measurements] == [points[0].name] * 2 + [points[2].name] + [points[3].name] * 2
    assert len(reports) == len(points)  # rewritten after every point
    markdown = reports[-1].markdown_path.read_text()
    assert f"- {points[1].name}: ServerStartError: Triton failed to load model 'x': out of memory\n" in markdown
    assert f"- {points[2].name}: OutputMismatch: logits: max abs error 3, OUTSIDE tolerance (after 1 level" in markdown
    assert "Not measured" not in markdown
    assert f"- FAILED {points[1].name}: ServerStartError: Triton failed to load model 'x': out of memory" in (
        reports[-1].lines
    )
    assert reports[-1].winner is not None  # the points that ran still pick a config


def test_a_fault_that_stops_the_sweep_keeps_the_points_measured_before_it(base_config, tmp_path) -> None:
    points, measurements = _swept(base_config)

    def measure_point(point):
        if point is points[2]:
            raise KeyboardInterrupt  # Ctrl-C, or anything else that ends the session mid-sweep
        return [m for m in measurements if m.point_name == point.name]

    def write(result: SweepResult) -> None:
        write_sweep_report(tmp_path, BASE, points, result.measurements, None, result.failures)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(points, measure_point, write)
    with (tmp_path / "sweep.csv").open() as stream:
        assert [row["Variant"] for row in csv.DictReader(stream)] == [points[0].name] * 2 + [points[1].name] * 2
    assert f"Not measured: {points[2].name}, {points[3].name}." in (tmp_path / "sweep.md").read_text()


def test_a_report_with_every_point_failed_names_them(base_config, tmp_path) -> None:
    points, _ = _swept(base_config)

    def measure_point(point):
        raise ServerStartError(f"Triton failed to load model '{point.name}'")

    result = run_sweep(points, measure_point, lambda _result: None)
    report = write_sweep_report(tmp_path, BASE, points, result.measurements, 1000.0, result.failures)
    assert report.winner is None and report.best_config_path is None
    assert sum(line.startswith("- FAILED ") for line in report.lines) == len(points)
    assert report.plot_path.read_bytes().startswith(b"\x89PNG")
