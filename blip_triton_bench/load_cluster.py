"""Load workers on many hosts (--load-cluster ADDRESS): Ray actors, spread over the nodes of a running Ray cluster,
each hosting a load_workers.LoadWorker; the coordinator (this pytest process, a Ray driver) asks them for their raw
timings as it does its worker processes, and moves them onto its own clock by each actor's measured offset.

Why Ray and not Locust's distributed runners: a Ray actor runs this suite's own asyncio load loop unchanged and
hands back any Python object (the raw per-request timings the windows are cut from); Locust's workers run gevent
users (monkey-patching that the gRPC asyncio client does not survive) and ship aggregated statistics to the master,
whose percentiles could then not be cut into this suite's windows. Ray also says which actor died (RayActorError),
which a level needs to fail with the worker's name.
"""

from __future__ import annotations

import socket

from blip_triton_bench.load_workers import CATCH_UP_TIMEOUT_S, LoadWorker, WorkerDied, WorkerPool

#: Ray's namespace for the suite's actors, so they are told apart from anything else on the cluster.
RAY_NAMESPACE = "blip-triton-bench"
#: How long the actors may take to be placed and start (a cold node imports numpy, gRPC and tritonclient).
ACTOR_START_TIMEOUT_S = 120.0


class LoadWorkerActor:
    """The Ray actor: a LoadWorker and where it runs."""

    def __init__(self) -> None:
        self._worker = LoadWorker()

    def start(self, *args: object) -> None:
        self._worker.start(*args)

    def drain(self):
        return self._worker.drain()

    def stop(self, abort: bool):
        return self._worker.stop(abort)

    def clock(self) -> float:
        return LoadWorker.clock()

    def where(self) -> tuple[str, str, int]:
        """(node id, hostname and IP, pid)."""
        import os

        import ray

        context = ray.get_runtime_context()
        return context.get_node_id(), f"{socket.gethostname()} {ray.util.get_node_ip_address()}", os.getpid()


class RayWorkers(WorkerPool):
    """`count` LoadWorkerActors spread over the cluster's nodes (Ray's SPREAD strategy); every node runs the suite's
    environment (this package with the cluster extra: the actors import it there). Closing kills the actors and
    disconnects; the cluster itself is the user's and keeps running."""

    kind = "ray"

    def __init__(self, address: str, count: int) -> None:
        import ray

        try:
            ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise WorkerDied(f"--load-cluster {address}: cannot join the Ray cluster ({error})") from None
        self._ray = ray
        remote = ray.remote(num_cpus=1, max_restarts=0)(LoadWorkerActor)
        self._actors = [remote.options(scheduling_strategy="SPREAD").remote() for _ in range(count)]
        try:
            places = ray.get([actor.where.remote() for actor in self._actors], timeout=ACTOR_START_TIMEOUT_S)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as error:
            self.close()
            raise WorkerDied(
                f"--load-cluster {address}: {count} load worker actor(s) could not start within "
                f"{ACTOR_START_TIMEOUT_S:g} s; each needs 1 free CPU on some node ({type(error).__name__})"
            ) from None
        super().__init__(
            [f"{index} (Ray actor, pid {pid} on {host})" for index, (_node, host, pid) in enumerate(places)],
            [f"node {node[:12]}" for node, _host, _pid in places],
        )

    def call(self, index: int, method: str, *args: object, timeout_s: float = CATCH_UP_TIMEOUT_S) -> object:
        ray = self._ray
        try:
            return ray.get(getattr(self._actors[index], method).remote(*args), timeout=timeout_s)
        except ray.exceptions.RayActorError as error:
            cause = str(error).strip().splitlines()[0]
            raise WorkerDied(f"load worker {self.names[index]} died: {cause}") from None
        except ray.exceptions.GetTimeoutError:
            raise WorkerDied(
                f"load worker {self.names[index]} did not answer {method} within {timeout_s:g} s"
            ) from None
        except ray.exceptions.RayTaskError as error:
            raise WorkerDied(f"load worker {self.names[index]}: {error.cause}") from None

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor, no_restart=True)
        self._actors = []
        self._ray.shutdown()
