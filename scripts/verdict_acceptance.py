"""Issue 15's acceptance: how often a ~10 % slowdown is called a regression, and how often an unchanged repository
is, by the A/B run and by a multi-run baseline. Runs the suite as a user would, alternating slowed and unchanged
runs so drift hits both alike, and writes one CSV row per run plus the counts.

    .venv/bin/python scripts/verdict_acceptance.py ab --runs 20 --out /tmp/ab-acceptance
    .venv/bin/python scripts/verdict_acceptance.py ab --model base --delay-us 80000 --runs 5 --window-s 3 \
        --min-requests 3 --out /tmp/ab-acceptance-base
    .venv/bin/python scripts/verdict_acceptance.py baseline --baseline-runs 5 --runs 20 --out /tmp/baseline-acceptance
    .venv/bin/python scripts/verdict_acceptance.py replay --runs 20 --out /tmp/replay-acceptance

replay: the baseline is recorded once (`--update-baselines`, which keeps the recorded repository in the store), then
each run judges the repository with `--replay-baselines` (suite/test_perf.py and suite/test_ab.py), as a user would
after a change; the A/B verdict against the recorded copy is what counts.

The slowdown: base_model_cpu's batcher waits --delay-us for a batch of 8 that one client never fills (at c=1 on
the tiny model, 1200 us is ~10 % of a request's time). Pass --model base for BLIP-base (a larger --delay-us).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "model_repository"
AB_SECTION = "Before vs after (A/B, one interleaved run)"


def repository(destination: Path, delay_us: int | None) -> Path:
    text = (SEED / "base_model_cpu" / "config.pbtxt").read_text()
    if delay_us is not None:
        text = text.replace("preferred_batch_size: [ 1, 2, 4, 8 ]", "preferred_batch_size: [ 8 ]")
        text = text.replace("max_queue_delay_microseconds: 1000", f"max_queue_delay_microseconds: {delay_us}")
    (destination / "base_model_cpu").mkdir(parents=True, exist_ok=True)
    (destination / "base_model_cpu" / "config.pbtxt").write_text(text)
    return destination


def pytest(model: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--model", model, "--server", "local"]
    command += ["--variant", "base_model_cpu", "--concurrency", "1", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def ab_run(
    model: str, after: Path, report: Path, rounds: int, window_s: float, min_requests: int, *before: str
) -> dict:
    pytest(
        model, f"--model-repository={after}", *(before or (f"--reference-repository={SEED}",)),
        f"--report-dir={report}", "--ab-rounds", str(rounds), "--window-s", str(window_s), "--warmup-s", "0.5",
        "--min-requests-per-window", str(min_requests), "suite/test_ab.py",
    )  # fmt: skip
    (data,) = json.loads((report / "results.json").read_text())["sections"][AB_SECTION]["data"]
    return {key: data[key] for key in ("status", "effect_pct", "p_value", "detectable_pct")}


def baseline_run(model: str, repo: Path, store: Path, report: Path, tolerance: float, *extra: str) -> dict:
    pytest(
        model, f"--model-repository={repo}", f"--baseline-dir={store}", f"--report-dir={report}",
        "--tolerance-pct", str(tolerance), "--window-s", "1", "--warmup-s", "0.5", "--max-windows", "8",
        "suite/test_serving_correctness.py", "suite/test_perf.py", *extra,
    )  # fmt: skip
    (level,) = json.loads((report / "results.json").read_text())["levels"]
    (throughput,) = [v for v in level["verdicts"] if v["metric"] == "throughput_infer_per_s"] or [None]
    if throughput is None:
        return {"status": "no verdict", "effect_pct": None, "p_value": None, "detectable_pct": None}
    return {
        "status": throughput["status"],
        "effect_pct": throughput["change_pct"],
        "p_value": throughput["p_value"],
        "detectable_pct": throughput["detectable_pct"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("ab", "baseline", "replay"))
    parser.add_argument("--runs", type=int, default=20, help="runs of each kind (slowed, unchanged)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--delay-us", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=10, help="A/B: --ab-rounds")
    parser.add_argument("--window-s", type=float, default=1.0, help="A/B: --window-s")
    parser.add_argument("--min-requests", type=int, default=10, help="A/B: --min-requests-per-window")
    parser.add_argument("--baseline-runs", type=int, default=5, help="baseline: runs recorded first")
    parser.add_argument("--tolerance-pct", type=float, default=5.0, help="baseline: --tolerance-pct")
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()
    out = options.out
    slowed = repository(out / "slowed", options.delay_us)
    unchanged = repository(out / "unchanged", None)
    store = out / "baselines"
    if options.mode == "replay":
        recorded = pytest(
            options.model, f"--model-repository={unchanged}", f"--baseline-dir={store}",
            f"--report-dir={out / 'record'}", "--update-baselines", "--window-s", "1", "--warmup-s", "0.5",
            "--max-windows", "8", "suite/test_serving_correctness.py", "suite/test_perf.py",
        )  # fmt: skip
        print(f"recorded the baseline and its repository: exit {recorded.returncode}", flush=True)
    if options.mode == "baseline":
        for index in range(options.baseline_runs):
            recorded = pytest(
                options.model, f"--model-repository={unchanged}", f"--baseline-dir={store}",
                f"--report-dir={out / f'record-{index}'}", "--update-baselines",
                "--baseline-runs", str(options.baseline_runs), "--window-s", "1", "--warmup-s", "0.5",
                "--max-windows", "8", "suite/test_serving_correctness.py", "suite/test_perf.py",
            )  # fmt: skip
            print(f"recorded baseline run {index + 1}: exit {recorded.returncode}", flush=True)
    rows = []
    for index in range(options.runs):
        for kind, repo in (("slowed", slowed), ("unchanged", unchanged)):
            report = out / f"{kind}-{index}"
            if options.mode == "ab":
                row = ab_run(options.model, repo, report, options.rounds, options.window_s, options.min_requests)
            elif options.mode == "replay":
                row = ab_run(
                    options.model, repo, report, options.rounds, options.window_s, options.min_requests,
                    "--replay-baselines", f"--baseline-dir={store}", "suite/test_perf.py",
                )  # fmt: skip
            else:
                row = baseline_run(options.model, repo, store, report, options.tolerance_pct)
            rows.append({"run": index + 1, "kind": kind, **row})
            print(rows[-1], flush=True)
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for kind in ("slowed", "unchanged"):
        mine = [row for row in rows if row["kind"] == kind]
        flagged = sum(row["status"] == "regression" for row in mine)
        print(f"{kind}: {flagged} of {len(mine)} reported as a regression")


if __name__ == "__main__":
    main()
