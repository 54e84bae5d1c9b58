"""Load levels interrupted at random moments, against one real server: does every interrupt end its level?

Each round runs a closed-loop level (concurrency 6, gRPC or HTTP) against a model that sleeps 2 ms, inside the
suite's Ctrl-C/SIGTERM handler, and sends the process SIGINT after a random 0 to 1.5 s. A round prints nothing; every
10th prints its number. A round that hangs (the interrupt was lost inside a grpc.aio callback) stops the script
there: the `timeout` around it ends it, and the output shows "Exception ignored in:
'grpc._cython.cygrpc.CallbackWrapper.functor_run'". docs/faults.md has the counts.

    timeout 600 .venv/bin/python scripts/interrupt_stress.py --rounds 150 --protocol grpc
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blip_triton_bench.host.interrupts import signals_as_interrupt  # noqa: E402
from blip_triton_bench.load.engine import CONCURRENCY, LoadLevel, LoadSettings, measure_level  # noqa: E402
from blip_triton_bench.servers.local import LocalProvider  # noqa: E402
from tests.test_load_end_to_end import CONFIG, MODEL, inputs  # noqa: E402

SERVICE_MS = "2.0"
SETTINGS = LoadSettings(window_s=0.5, warmup_s=0.2, max_windows=4, min_requests_per_window=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    randomly = random.Random(args.seed)
    settings = replace(SETTINGS, protocol=args.protocol)
    with tempfile.TemporaryDirectory(prefix="interrupt-stress-") as scratch:
        repository = Path(scratch) / "repository"
        (repository / "fixed" / "1").mkdir(parents=True)
        (repository / "fixed" / "config.pbtxt").write_text(CONFIG.replace('"20.0"', f'"{SERVICE_MS}"'))
        (repository / "fixed" / "1" / "model.py").write_text(MODEL)
        (Path(scratch) / "server").mkdir()
        with LocalProvider(Path(scratch) / "server").start(repository) as server:
            server.load_model("fixed")
            url = server.endpoints.grpc_url if args.protocol == "grpc" else server.endpoints.http_url
            settings = settings.keyed_for(server)  # the run's key
            for round_index in range(args.rounds):
                interrupt = threading.Timer(randomly.uniform(0.0, 1.5), os.kill, (os.getpid(), signal.SIGINT))
                interrupt.start()
                try:
                    with signals_as_interrupt():
                        measure_level(url, "fixed", inputs(), LoadLevel(CONCURRENCY, 6), settings)
                        time.sleep(2)  # the level ended first: the interrupt comes here
                except KeyboardInterrupt:
                    pass
                interrupt.cancel()
                gc.collect()  # what an interrupted level left is freed now, not at some later test
                if round_index % 10 == 0:
                    print(round_index, flush=True)
    print(f"{args.rounds} rounds, every interrupt ended its level")


if __name__ == "__main__":
    main()
