"""--load-cluster: the load workers as Ray actors on a real Ray cluster (Ray's own multi-node harness on loopback,
started and stopped here, a head and worker nodes), against a real local Triton. End to end: one closed-loop and one
open-loop level of the tiny model driven through two nodes, each worker's raw timings moved onto the coordinator's
clock and merged into its windows. Faults: an actor killed by ray.kill and the head lost mid-level each fail the
level with their cause and the report is still written; a node with another version of the suite is refused before
any load is sent; a loopback server URL is refused where the actors can run on another host."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from blip_triton_bench.load.cluster import (
    RAY_NAMESPACE,
    SUITE_DISTRIBUTION,
    ActorPlace,
    HeadWatch,
    RayWorkers,
    SuiteSoftware,
    actor_name,
    loopback_refusal,
    loopback_unreachable,
)
from blip_triton_bench.load.workers import WorkerDied
from tests.suite_runs import FAULT_LEVEL, PERF_TEST, Suite, SuiteRun, assert_no_leftovers

#: The processes of a Ray node that outlive its raylet when the head is gone (they wait for a GCS that will not come
#: back, minutes on end): the cluster's, never the suite's, so a test that removed the head kills them.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
#: TEST-NET-3 (RFC 5737): documentation only, never this host, and never connected to (refused before the run).
ELSEWHERE = "203.0.113.7"


def ray_processes(before: set[int]) -> list[psutil.Process]:
    """This process's descendants that Ray started since `before` was taken: GCS, raylets, their workers."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.pid not in before and "ray" in " ".join([child.name(), *child.cmdline()]):
                found.append(child)
    return found


@contextlib.contextmanager
def started_cluster(worker_nodes: int) -> Iterator[Cluster]:
    """A head with no CPU for actors (the coordinator's node) and `worker_nodes` nodes with one CPU each: the load
    workers land one per node. Everything Ray started is gone afterwards, also the nodes a test added, and also when
    a test removed the head (RAY_AGENTS)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    started: list[psutil.Process] = []
    try:
        for _ in range(worker_nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        started = ray_processes(before)  # while every node's processes are still this process's descendants
        yield cluster
    finally:
        head_removed = cluster.head_node is None
        started += ray_processes(before)
        cluster.shutdown()
    for process in started if head_removed else ():
        with contextlib.suppress(psutil.Error, IndexError):
            if process.cmdline()[0] in RAY_AGENTS:
                process.kill()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"left running after the cluster's shutdown: {[p.cmdline()[:3] for p in alive]}"


@pytest.fixture
def ray_cluster() -> Iterator[Cluster]:
    with started_cluster(2) as cluster:
        yield cluster


@contextlib.contextmanager
def ray_driver(cluster: Cluster) -> Iterator[None]:
    """This test process connected to `cluster` in the suite's namespace (to reach the actors a run named)."""
    ray.init(address=cluster.address, namespace=RAY_NAMESPACE, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def failed_level(run: SuiteRun) -> dict:
    """The run's one level that was not measured, from the report it still wrote."""
    assert (run.report_dir / "report.md").is_file(), run.output[-4000:]
    (failed,) = run.section("Levels not measured")["data"]
    assert failed["level"] == "concurrency=2", failed
    return failed


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_a_loopback_server_with_a_cluster_headed_elsewhere_is_a_usage_error_before_anything_runs(
    tmp_path: Path,
) -> None:
    run = Suite(tmp_path).run("suite/test_perf.py", "--load-cluster", f"{ELSEWHERE}:6379", "--load-workers", "2")
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.output[-4000:]
    assert (
        f"--load-cluster {ELSEWHERE}:6379 runs the load workers on a Ray cluster headed by another host "
        f"({ELSEWHERE}), and --server local gives the server as 127.0.0.1, a loopback address" in run.output
    )
    assert "--triton-url HOST:PORT" in run.output and "Traceback" not in run.output
    assert not run.report_dir.exists()


# ------------------------------------------------------------------------------------ faults


@pytest.mark.faults
def test_an_actor_killed_mid_level_fails_the_level_with_its_name_and_rays_cause(
    tmp_path: Path, ray_cluster: Cluster
) -> None:
    suite = Suite(tmp_path, level=FAULT_LEVEL)
    with suite.started("suite/test_perf.py", "--load-cluster", ray_cluster.address, "--load-workers", "2") as running:
        running.wait_for_perf_level()
        names = [actor_name(index, running.process.pid) for index in (0, 1)]
        with ray_driver(ray_cluster):
            assert sorted(ray.util.list_named_actors()) == names
            ray.kill(ray.get_actor(names[1]), no_restart=True)
        run = running.finish()
    assert run.returncode == 1, run.output[-4000:]
    cause = failed_level(run)["cause"]
    assert "load worker 1 (Ray actor, pid " in cause and "killed by `ray.kill`" in cause, cause
    assert f"{PERF_TEST} FAILED" in run.output
    with ray_driver(ray_cluster):
        assert ray.util.list_named_actors() == []  # the suite killed the other actor when it closed its workers
    assert_no_leftovers(run)


@pytest.mark.faults
def test_losing_the_ray_head_mid_level_fails_the_level_and_the_report_is_still_written(tmp_path: Path) -> None:
    with started_cluster(2) as cluster:
        suite = Suite(tmp_path, level=FAULT_LEVEL)
        with suite.started("suite/test_perf.py", "--load-cluster", cluster.address, "--load-workers", "2") as running:
            running.wait_for_perf_level()
            gcs = cluster.head_node.gcs_address
            cluster.remove_node(cluster.head_node, allow_graceful=False)
            run = running.finish()
    assert run.returncode == 1, run.output[-4000:]
    cause = failed_level(run)["cause"]
    assert f"the Ray head is gone: its GCS at {gcs} does not answer" in cause, cause
    # pytest ended on its own: Ray did not end the driver for its lost head (after 60 s, before any report)
    assert "Failed to connect to GCS" not in run.output and f"{PERF_TEST} FAILED" in run.output
    assert_no_leftovers(run)


#: A driver of the suite's that lost its head: it outlives Ray's own limit for a driver without its head, then asks
#: its worker for the time (the way a level starts).
DRIVER_WITHOUT_HEAD = """
import sys, time
from blip_triton_bench.load.cluster import RayWorkers
from blip_triton_bench.load.workers import WorkerDied
with RayWorkers(sys.argv[1], 1) as pool:
    print("joined", flush=True)
    sys.stdin.readline()
    time.sleep(float(sys.argv[2]))
    try:
        pool.call(0, "clock")
    except WorkerDied as error:
        print(f"ended: {error}", flush=True)
"""
#: Ray's default gcs_rpc_server_reconnect_timeout_s: a driver whose head stays unreachable this long is ended by Ray.
RAY_DRIVER_HEAD_TIMEOUT_S = 60.0


@pytest.mark.faults
def test_a_driver_that_lost_its_head_between_levels_outlives_rays_limit_and_names_the_loss(tmp_path: Path) -> None:
    with started_cluster(1) as cluster:
        address = cluster.address
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER_WITHOUT_HEAD, address, str(RAY_DRIVER_HEAD_TIMEOUT_S + 10)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert driver.stdout is not None
            before = list(iter(driver.stdout.readline, "joined\n"))  # Ray's log lines, until the driver joined
            assert driver.poll() is None, "".join(before)
            gcs = cluster.head_node.gcs_address
            cluster.remove_node(cluster.head_node, allow_graceful=False)
            output, _ = driver.communicate("\n", timeout=RAY_DRIVER_HEAD_TIMEOUT_S + 120)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    assert driver.returncode == 0, output[-4000:]  # Ray ends a driver it gives up on with 1, before the print
    assert f"ended: --load-cluster {address}: the Ray head is gone: its GCS at {gcs} does not answer" in output, output


@pytest.mark.faults
def test_a_node_with_another_version_of_the_suite_is_refused_before_any_load_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's Python finds a blip-triton-bench 0.0.1 distribution first on its PYTHONPATH (metadata only: it
    imports this checkout's code), as on a node where another version was installed. The driver runs from tmp_path:
    Ray puts the driver's folder first on its workers' path, and the checkout's holds this version's egg-info."""
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other-install"
    metadata = other / "blip_triton_bench-0.0.1.dist-info" / "METADATA"
    metadata.parent.mkdir(parents=True)
    metadata.write_text(f"Metadata-Version: 2.1\nName: {SUITE_DISTRIBUTION}\nVersion: 0.0.1\n")
    with started_cluster(1) as cluster:
        odd_node = cluster.add_node(num_cpus=1, env_vars={"PYTHONPATH": str(other)}).node_id
        cluster.wait_for_nodes()
        with pytest.raises(WorkerDied) as refused:
            RayWorkers(cluster.address, 2).close()
        assert refused.value.usage_error  # the suite's run exits 4, as for a usage error
        message = str(refused.value)
        here = SuiteSoftware.here()
        assert f"node {odd_node[:12]} (" in message and f"runs {SUITE_DISTRIBUTION} 0.0.1, Python" in message
        assert f"this host runs {SUITE_DISTRIBUTION} {here.suite}, Python {here.python}" in message
        assert message.count(f"runs {SUITE_DISTRIBUTION} ") == 2, message  # the odd node's and this host's only
        with ray_driver(cluster):
            assert ray.util.list_named_actors() == []  # its actors were stopped with the refusal


# ------------------------------------------------------------------------------------ the rules, no cluster


@pytest.mark.unit
def test_a_loopback_server_is_refused_where_the_clusters_head_is_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for cluster, server, url, grpc_url, origin in [
        (f"{ELSEWHERE}:6379", "local", None, None, "--server local gives the server as 127.0.0.1"),
        (f"ray://{ELSEWHERE}:10001", "external", "localhost:8000", None, "--triton-url gives the server as localhost"),
        (f"{ELSEWHERE}:6379", "external", "10.0.0.9:8000", "[::1]:8001", "--triton-grpc-url gives the server as [::1]"),
    ]:
        refusal = loopback_refusal(cluster, server, url, grpc_url)
        assert refusal is not None and refusal.startswith(
            f"--load-cluster {cluster} runs the load workers on a Ray cluster headed by another host ({ELSEWHERE})"
        ), refusal
        assert origin in refusal and "--server external --triton-url HOST:PORT" in refusal
    # a server the nodes can reach; a cluster headed on this host (it may hold this host only: checked per level)
    assert loopback_refusal(f"{ELSEWHERE}:6379", "external", "10.0.0.9:8000", None) is None
    assert loopback_refusal(f"{ELSEWHERE}:6379", "container", None, None) is None  # its URL depends on its engine
    for cluster in ("127.0.0.1:6379", f"{socket.gethostname()}:6379", "local", "auto"):
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        assert loopback_refusal(cluster, "local", None, None) is None, cluster
    monkeypatch.setenv("RAY_ADDRESS", f"{ELSEWHERE}:6379")
    assert loopback_refusal("auto", "local", None, None) is not None


def place(node: str, scope: str) -> ActorPlace:
    return ActorPlace(node, f"host-{node}", "10.0.0.1", 42, scope, SuiteSoftware("0.1.0", "3.11", "2.60.0"))


@pytest.mark.unit
def test_actors_placed_where_loopback_is_another_host_refuse_a_loopback_server() -> None:
    names = ["0 (Ray actor, pid 42 on a)", "1 (Ray actor, pid 43 on b)"]
    refusal = loopback_unreachable("127.0.0.1:8001", names, [place("a", "here"), place("b", "there")], "here")
    assert refusal is not None and refusal.startswith(
        "--load-cluster: the server is at 127.0.0.1:8001, a loopback address, and load worker(s) "
        "1 (Ray actor, pid 43 on b) run on another host"
    ), refusal
    assert "--triton-url HOST:PORT" in refusal
    assert loopback_unreachable("127.0.0.1:8001", names, [place("a", "here"), place("b", "here")], "here") is None
    assert loopback_unreachable("10.0.0.9:8001", names, [place("a", "here"), place("b", "there")], "here") is None


@pytest.mark.unit
def test_the_head_is_lost_once_its_port_refuses_and_stays_lost() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        watch = HeadWatch(address)
        assert watch.lost(now=True) is None
    lost = watch.lost(now=True)
    assert lost is not None and lost.startswith(f"the Ray head is gone: its GCS at {address} does not answer"), lost
    with socket.create_server(("127.0.0.1", int(address.rsplit(":", 1)[1]))):
        assert watch.lost(now=True) == lost  # a head that answers again is not trusted with the rest of the run
