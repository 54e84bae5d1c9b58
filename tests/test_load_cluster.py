"""--load-cluster end to end: a Ray cluster of a head and two worker nodes on loopback (Ray's own multi-node
harness, started and stopped here), the load workers placed one per node as Ray actors, one closed-loop and one
open-loop level of the tiny model on a real local Triton driven through them; each worker's raw timings are moved
onto the coordinator's clock and merged into its windows."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from ray.cluster_utils import Cluster

from tests.suite_runs import Suite, assert_no_leftovers

pytestmark = pytest.mark.e2e


def ray_processes(before: set[int]) -> list[psutil.Process]:
    """This process's descendants that Ray started since `before` was taken: GCS, raylets, their workers."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.pid not in before and "ray" in " ".join([child.name(), *child.cmdline()]):
                found.append(child)
    return found


@pytest.fixture
def ray_cluster() -> Iterator[Cluster]:
    """A head with no CPU for actors (the coordinator's node) and two nodes with one each: the load workers must
    land one per worker node."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        started = ray_processes(before)
        cluster.shutdown()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"left running after the cluster's shutdown: {[p.cmdline()[:3] for p in alive]}"


@pytest.mark.serial
def test_a_closed_and_an_open_loop_level_run_through_two_ray_nodes(tmp_path: Path, ray_cluster: Cluster) -> None:
    suite = Suite(tmp_path)
    run = suite.run(
        "suite/test_perf.py", "--load-cluster", ray_cluster.address, "--load-workers", "2", "--request-rate", "40"
    )
    assert run.returncode == 0, run.output[-4000:]
    assert "load side: 2 load worker(s) (ray) on 2 host(s)" in run.output
    levels = {level["measurement"]["level"]["mode"]: level["measurement"] for level in run.results()["levels"]}
    assert set(levels) == {"concurrency", "request_rate"}
    for measurement in levels.values():
        shares = measurement["load_workers"]
        assert len(shares) == 2 and len({share["host"] for share in shares}) == 2  # one worker per node
        assert all("Ray actor" in share["name"] for share in shares)
        merged = sum(len(window["latencies_ms"]) for window in measurement["windows"])
        assert merged == sum(share["completed"] for share in shares) and merged > 0
        assert all(share["clock_uncertainty_ms"] < 50.0 for share in shares)
    assert [share["level"]["value"] for share in levels["request_rate"]["load_workers"]] == [20.0, 20.0]
    assert_no_leftovers(run)
