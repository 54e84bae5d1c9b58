"""Options that shape what is measured, each on the command line a user would type, checked in what the run
measured and reported: windows that wait for a request count, token ids per request, Poisson arrivals, the sweep's
grid and levels, the captions timed per variant, the student's source and distillation steps, and the container
provider's image and GPUs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blip_triton_bench.host.hardware import query_gpus
from blip_triton_bench.load.engine import MAX_WINDOW_STRETCH
from blip_triton_bench.servers.docker_engine import docker_available
from tests.suite_runs import REPOSITORY_ROOT, Suite

pytestmark = pytest.mark.e2e

#: Offered by the open-loop level: a fraction of what this host serves the tiny model at (about 100 a second at
#: concurrency 2 on 2 cores, half that beside another test), so the level never depends on the host keeping up.
REQUEST_RATE = 30
#: A window lasts until this many requests completed (or MAX_WINDOW_STRETCH times --window-s, 1 s here): a 1 s
#: window of the open loop without the option holds about REQUEST_RATE, and enough that Poisson arrivals vary
#: little from window to window (1/sqrt(90), about 11 %).
MIN_REQUESTS = 90


def test_measurement_and_sweep_options_shape_what_is_measured(tmp_path: Path) -> None:
    run = Suite(tmp_path).run(
        "--min-requests-per-window", str(MIN_REQUESTS), "--sequence-length", "8",
        "--request-rate", str(REQUEST_RATE), "--request-distribution", "poisson",
        "--sweep-variant", "base_model_cpu", "--sweep-grid", "instance_count=1", "--sweep-grid", "max_batch_size=1",
        "--sweep-concurrency", "2", "--caption-repeats", "2", "--update-baselines",
        # the server restricts shared-memory registration to the run's key: every level must still send it
        "--shared-memory", "system",
        "suite/test_serving_correctness.py", "suite/test_perf.py", "suite/test_batching_sweep.py",
        "suite/test_caption_latency.py",
    )  # fmt: skip
    assert run.returncode == 0, run.output[-4000:]
    levels = {level["measurement"]["level"]["mode"]: level["measurement"] for level in run.results()["levels"]}
    assert set(levels) == {"concurrency", "request_rate"}
    for measurement in levels.values():
        # each window held the requests asked for, or (a host too busy to answer them) lasted as long as a window may
        # stretch; with the option ignored, the open loop's 1 s windows hold about REQUEST_RATE and end at 1 s
        for window in measurement["windows"]:
            count, lasted_s = len(window["latencies_ms"]), window["duration_s"]
            assert count >= MIN_REQUESTS or lasted_s >= 0.99 * MAX_WINDOW_STRETCH, (count, lasted_s)
        assert measurement["input_shapes"]["input_ids"] == [1, 8]
        assert measurement["input_shapes"]["attention_mask"] == [1, 8]
    assert levels["request_rate"]["arrival"] == "poisson"
    assert levels["concurrency"]["arrival"] is None  # a closed loop sends when an answer comes back

    with (run.report_dir / "sweep" / "base_model_cpu" / "sweep.csv").open() as sweep:
        rows = list(csv.DictReader(sweep))
    assert {row["Variant"] for row in rows} == {"base_model_cpu__as_given", "base_model_cpu__mbs1_i1_t1"}
    assert {row["Concurrency"] for row in rows} == {"2"}

    (timed,) = run.section("Caption latency (genai-perf metrics)")["data"]
    assert (timed["variant"], timed["captions"]) == ("base_model_cpu", 2)


def save_teacher_as_a_checkpoint(directory: Path) -> Path:
    """The tiny teacher as a user's save_pretrained directory: a 'student' that is the teacher itself."""
    from blip_triton_bench.model.source import ModelSpec, load_model

    teacher = load_model(ModelSpec("tiny"))
    teacher.model.save_pretrained(directory)
    teacher.description.image_processor.save_pretrained(directory)
    return directory


def run_student(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "--model", "tiny", "--server", "local",
         "--variant", "student_model_cpu", f"--report-dir={tmp_path / name}", f"--cache-dir={tmp_path / 'cache'}",
         "suite/test_accuracy.py", *extra],
        cwd=REPOSITORY_ROOT, env={k: v for k, v in os.environ.items() if k != "CI"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def agreement_of(report_dir: Path) -> tuple[float, float]:
    import json

    rows = json.loads((report_dir / "results.json").read_text())["sections"]["Pick a variant"]["data"]
    (student,) = [row for row in rows if row["variant"] == "student_model_cpu"]
    return student["top1_vs_teacher"], student["cosine_vs_teacher"]


def test_the_student_is_distilled_in_the_steps_asked_or_taken_from_the_checkpoint_given(tmp_path: Path) -> None:
    distilled = run_student(tmp_path, "distilled", "--distill-steps", "2")
    assert distilled.returncode == 0, distilled.stdout[-4000:]
    assert "student: distilled from the teacher's logits, 2 steps" in distilled.stdout

    checkpoint = save_teacher_as_a_checkpoint(tmp_path / "teacher-as-student")
    given = run_student(tmp_path, "given", "--student", str(checkpoint))
    assert given.returncode == 0, given.stdout[-4000:]
    assert f"student: {checkpoint} (--student)" in given.stdout
    assert "distilled from the teacher's logits" not in given.stdout
    top1, cosine = agreement_of(tmp_path / "given")
    assert top1 == 1.0 and cosine > 0.9999  # the checkpoint given is the teacher: the served 'student' agrees fully


@pytest.mark.skipif(not docker_available(), reason="no Docker engine answers on this host")
def test_the_container_image_and_gpus_asked_for_are_the_ones_used(tmp_path: Path) -> None:
    base = ("--server", "container", "suite/test_serving_correctness.py")
    missing = Suite(tmp_path).run(*base, "--triton-image", "blip-bench/never-built:0")
    assert missing.returncode == pytest.ExitCode.TESTS_FAILED, missing.output[-4000:]
    assert "blip-bench/never-built:0" in missing.output

    absent = len(query_gpus())  # the first GPU id this host does not have
    no_such_gpu = Suite(tmp_path).run(*base, "--gpus", str(absent))
    assert no_such_gpu.returncode == pytest.ExitCode.TESTS_FAILED, no_such_gpu.output[-4000:]
    assert f"--gpus {absent}: GPU {absent} asked for, but this host has {absent} GPU(s)" in no_such_gpu.output


def test_a_reference_image_needs_the_container_provider(tmp_path: Path) -> None:
    run = Suite(tmp_path).run("--server", "local", "--reference-triton-image", "blip-bench/any:0", "suite/test_ab.py")
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--reference-triton-image starts a second container: use it with --server container" in run.output
