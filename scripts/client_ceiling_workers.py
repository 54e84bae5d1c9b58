"""Issue 16's measurement: the client ceiling (requests/s the load side sustains against a trivial model with
BLIP's inputs and outputs, on the same server) with --load-workers 1, 2, ... side by side in one sitting,
alternating, as a user would run the suite. Prints each run's ceiling, each worker's share, and the medians.

    .venv/bin/python scripts/client_ceiling_workers.py --workers 1 2 --repeats 3 --out /tmp/ceiling-workers
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CEILING_NOTE = re.compile(r"load generator ceiling \(.*?\): (?P<value>[0-9.]+) infer/s")


def ceiling_run(model: str, workers: int, report: Path) -> tuple[float, str]:
    command = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--model", model, "--server", "local",
        "--variant", "base_model_cpu", "--concurrency", "1", "--window-s", "2", "--warmup-s", "1",
        "--max-windows", "3", "--load-workers", str(workers), f"--report-dir={report}", "suite/test_perf.py",
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    notes = json.loads((report / "results.json").read_text())["metadata"]["notes"]
    for note in notes:
        if match := CEILING_NOTE.search(note):
            return float(match["value"]), note
    raise SystemExit(f"no ceiling note in {report / 'results.json'}: {notes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()
    ceilings: dict[int, list[float]] = {count: [] for count in options.workers}
    for repeat in range(options.repeats):
        for count in options.workers:
            value, note = ceiling_run(options.model, count, options.out / f"w{count}-{repeat}")
            ceilings[count].append(value)
            print(f"run {repeat + 1}, {count} worker(s): {note}", flush=True)
    first = statistics.median(ceilings[options.workers[0]])
    for count, values in ceilings.items():
        middle = statistics.median(values)
        print(
            f"{count} worker(s): median {middle:.1f} infer/s (min {min(values):.1f}, max {max(values):.1f}), "
            f"{middle / first:.2f}x {options.workers[0]} worker(s)"
        )


if __name__ == "__main__":
    main()
