"""Load workers on many hosts (--load-cluster ADDRESS): Ray actors, spread over the nodes of a running Ray cluster,
each hosting a load_workers.LoadWorker; the coordinator (this pytest process, a Ray driver) asks them for their raw
timings as it does its worker processes, and moves them onto its own clock by each actor's measured offset.

Why Ray and not Locust's distributed runners: a Ray actor runs this suite's own asyncio load loop unchanged and
hands back any Python object (the raw per-request timings the windows are cut from); Locust's workers run gevent
users (monkey-patching that the gRPC asyncio client does not survive) and ship aggregated statistics to the master,
whose percentiles could then not be cut into this suite's windows. Ray also says which actor died (RayActorError),
which a level needs to fail with the worker's name.

What a cluster adds to the worker processes' failures, each ending the run or the level with its cause, never with
a traceback or a silently different load:
- a loopback server URL (127.0.0.0/8, ::1, localhost) names each node itself: refused before the run where the
  cluster's head is known to be another host (`loopback_refusal`, a usage error), and before each level where an
  actor turned out to run on another host (`loopback_unreachable`);
- an actor whose node runs another version of the suite (or of Python or tritonclient) is refused before any load
  is sent (`software_mismatch`);
- a lost actor or a lost head ends the level naming it (`RayWorkers.call`); the head is watched by the suite
  (`HeadWatch`), because Ray would otherwise end this whole process 60 s after losing it, report and all.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import ipaddress
import os
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import psutil

from blip_triton_bench.load.shared_memory import is_loopback
from blip_triton_bench.load.workers import CATCH_UP_TIMEOUT_S, LoadWorker, WorkerDied, WorkerPool
from blip_triton_bench.servers.local import LOOPBACK

#: Ray's namespace for the suite's actors, so they are told apart from anything else on the cluster.
RAY_NAMESPACE = "blip-triton-bench"
#: How long the actors may take to be placed and start (a cold node imports numpy, gRPC and tritonclient).
ACTOR_START_TIMEOUT_S = 120.0
#: The distribution whose version every node must share with this host (the actors run its code there).
SUITE_DISTRIBUTION = "blip-triton-bench"
#: How often, at most, a call to an actor first checks that the Ray head still accepts connections. Actor calls go
#: straight to the actors' nodes, so they go on answering for a minute after the head is gone; this notices it.
HEAD_CHECK_INTERVAL_S = 1.0
#: A head that does not accept a TCP connection within this long is taken for gone (a refused one is at once).
HEAD_CONNECT_TIMEOUT_S = 5.0
#: Ray ends a driver whose head (its GCS) stays unreachable for gcs_rpc_server_reconnect_timeout_s, 60 s by default:
#: that would end pytest with it, before the report is written. The suite watches the head itself (HeadWatch) and
#: ends the level naming the loss, so its driver is told to wait a week instead (a value the user set is kept).
DRIVER_GCS_RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
DRIVER_GCS_RECONNECT_TIMEOUT_S = 7 * 24 * 3600
#: The fix named whenever a loopback server URL meets load workers on other hosts.
REACHABLE_SERVER_FIX = (
    "give the server's address that every Ray node reaches (--server external --triton-url HOST:PORT; the local "
    "server, and a container on a local Docker engine, listen on 127.0.0.1 only), or drop --load-cluster to run "
    "the --load-workers on this host"
)


class ClusterSoftwareMismatch(WorkerDied):
    """A node of the cluster runs other software than this host: a usage error (the fix is an install on that node,
    or keeping it out of the cluster), not a worker that failed."""

    usage_error = True


@dataclass(frozen=True)
class SuiteSoftware:
    """What decides that an actor runs the same load loop as this host: the suite's version, Python's major.minor
    (Ray's own requirement) and tritonclient's, the client that sends the requests."""

    suite: str
    python: str
    tritonclient: str

    @classmethod
    def here(cls) -> SuiteSoftware:
        return cls(
            suite=distribution_version(SUITE_DISTRIBUTION),
            python=f"{sys.version_info.major}.{sys.version_info.minor}",
            tritonclient=distribution_version("tritonclient"),
        )

    def describe(self) -> str:
        return f"{SUITE_DISTRIBUTION} {self.suite}, Python {self.python}, tritonclient {self.tritonclient}"


@dataclass(frozen=True)
class ActorPlace:
    """Where a load worker actor started, and with what software."""

    node_id: str
    hostname: str
    ip: str
    pid: int
    loopback_scope: str  # see loopback_scope(): equal here and there means 127.0.0.1 is the same host for both
    software: SuiteSoftware

    @property
    def host(self) -> str:
        return f"{self.hostname} {self.ip}"


def distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def loopback_scope() -> str:
    """What 127.0.0.1 means to this process: on Linux its kernel (boot id) and network namespace (inode), which two
    processes share exactly when their loopback is the same; elsewhere, the hostname."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot_id} net:{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return socket.gethostname()


# ------------------------------------------------------------------------------------ checks, pure but for the host


def cluster_host(address: str) -> str | None:
    """The host a --load-cluster address names (HOST:PORT or ray://HOST:PORT; auto reads RAY_ADDRESS); None where Ray
    finds the cluster itself (auto without RAY_ADDRESS: the latest one started on this host; local: a new one here)."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
    if address in ("", "auto", "local"):
        return None
    return urllib.parse.urlsplit("//" + address.split("://", 1)[-1]).hostname


def this_host_addresses() -> set[str]:
    """Every IP address of this host's interfaces."""
    return {
        address.address.split("%", 1)[0]
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family in (socket.AF_INET, socket.AF_INET6)
    }


def is_this_host(host: str) -> bool | None:
    """Whether `host` (a name or an IP) is this host; None when it does not resolve (Ray then says it cannot join)."""
    if host.lower() == "localhost" or host == socket.gethostname():
        return True
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return None
    own = this_host_addresses()
    return any(ipaddress.ip_address(address).is_loopback or address in own for address in resolved)


def known_server_urls(server: str, triton_url: str | None, triton_grpc_url: str | None) -> list[tuple[str, str]]:
    """(URL, the option that gave it) of the server the workers will load, where known before the run: an external
    server's URLs, and the local server's loopback. A container's depends on its Docker engine (checked per level)."""
    if server == "local":
        return [(LOOPBACK, "--server local")]
    if server in ("external", "auto") and triton_url:
        return [(triton_url, "--triton-url"), *([(triton_grpc_url, "--triton-grpc-url")] if triton_grpc_url else [])]
    return []


def loopback_refusal(
    cluster_address: str, server: str, triton_url: str | None, triton_grpc_url: str | None
) -> str | None:
    """The usage error of a loopback server URL with a cluster whose head is another host, or None.

    The rule: a loopback URL is refused where the load workers can run on a host other than this one, since there it
    names that host. Before the run that is known only from the cluster's address: a head elsewhere. A cluster headed
    on this host (its address one of this host's, or auto, or local) may hold only this host, as Ray's own multi-node
    harness does, and is checked once its actors are placed (loopback_unreachable)."""
    host = cluster_host(cluster_address)
    if host is None or is_this_host(host) is not False:
        return None
    for url, origin in known_server_urls(server, triton_url, triton_grpc_url):
        if is_loopback(url):
            return (
                f"--load-cluster {cluster_address} runs the load workers on a Ray cluster headed by another host "
                f"({host}), and {origin} gives the server as {url}, a loopback address: on another node it names "
                f"that node, not this server: {REACHABLE_SERVER_FIX}"
            )
    return None


def loopback_unreachable(url: str, names: Sequence[str], places: Sequence[ActorPlace], here: str) -> str | None:
    """Why the actors cannot load a server at `url`, or None: it is loopback, and some ran where loopback is not
    this host (`here`, this process's loopback_scope)."""
    if not is_loopback(url):
        return None
    elsewhere = [name for name, place in zip(names, places, strict=True) if place.loopback_scope != here]
    if not elsewhere:
        return None
    return (
        f"--load-cluster: the server is at {url}, a loopback address, and load worker(s) {', '.join(elsewhere)} run "
        f"on another host (or network namespace), where it is not this server: {REACHABLE_SERVER_FIX}"
    )


def software_mismatch(address: str, places: Sequence[ActorPlace], here: SuiteSoftware) -> str | None:
    """The error naming each node whose actor runs other software than this host, or None."""
    differing = {place.node_id: place for place in places if place.software != here}
    if not differing:
        return None
    nodes = "; ".join(
        f"node {node[:12]} ({place.host}) runs {place.software.describe()}" for node, place in differing.items()
    )
    return (
        f"--load-cluster {address}: {nodes}, and this host runs {here.describe()}. Every node runs the load loop of "
        "its own install: install this same version there (pip install -e '.[cluster]' from the same checkout), or "
        "keep those nodes out of the cluster"
    )


def ray_cause(error: BaseException) -> str:
    """What Ray said, on one line: its message without the indented detail lines (actor id, namespace, ...)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith("\t")]
    cause = " ".join(lines) or type(error).__name__
    return cause if len(cause) <= 400 else cause[:400] + " ..."


# ------------------------------------------------------------------------------------ the cluster


class HeadWatch:
    """Whether the Ray head still accepts connections on its GCS port, asked at most every HEAD_CHECK_INTERVAL_S;
    once it does not, it is lost for the rest of the run (`lost` then names how)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._checked_s = -float("inf")
        self._lost: str | None = None

    def lost(self, now: bool = False) -> str | None:
        with self._lock:
            if self._lost is None and (now or time.monotonic() - self._checked_s >= HEAD_CHECK_INTERVAL_S):
                self._checked_s = time.monotonic()
                self._lost = self._probe()
            return self._lost

    def _probe(self) -> str | None:
        host, _, port = self.address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=HEAD_CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as error:
            return f"the Ray head is gone: its GCS at {self.address} does not answer ({error})"
        return None


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

    def where(self) -> ActorPlace:
        import ray

        return ActorPlace(
            node_id=ray.get_runtime_context().get_node_id(),
            hostname=socket.gethostname(),
            ip=ray.util.get_node_ip_address(),
            pid=os.getpid(),
            loopback_scope=loopback_scope(),
            software=SuiteSoftware.here(),
        )


def actor_name(index: int, driver_pid: int) -> str:
    """Unique on the cluster while the driver (this host's process `driver_pid`) lives, since Ray frees the name with
    the actor; says whose it is."""
    return f"load-worker-{index}-{socket.gethostname()}-{driver_pid}"


@contextlib.contextmanager
def _environment_default(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` unless already set, for the duration (Ray reads its settings when the driver starts)."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def join_cluster(address: str) -> ModuleType:
    """Connect as a driver (the ray module, connected), or WorkerDied naming the address."""
    import ray

    with _environment_default(DRIVER_GCS_RECONNECT_ENV, str(DRIVER_GCS_RECONNECT_TIMEOUT_S)):
        try:
            ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise WorkerDied(f"--load-cluster {address}: cannot join the Ray cluster ({error})") from None
    return ray


class RayWorkers(WorkerPool):
    """`count` LoadWorkerActors spread over the cluster's nodes (Ray's SPREAD strategy); every node runs the suite's
    environment (this package with the cluster extra, the same version as here: the actors import it there, and say
    which they run before any load is sent). Closing kills the actors and disconnects; the cluster itself is the
    user's and keeps running."""

    kind = "ray"

    def __init__(self, address: str, count: int) -> None:
        self._ray = join_cluster(address)
        self._address = address
        context = self._ray.get_runtime_context()
        self._head = HeadWatch(address.removeprefix("ray://") if address.startswith("ray://") else context.gcs_address)
        self._here = loopback_scope()
        remote = self._ray.remote(num_cpus=1, max_restarts=0)(LoadWorkerActor)
        self._actors = [
            remote.options(name=actor_name(index, os.getpid()), scheduling_strategy="SPREAD").remote()
            for index in range(count)
        ]
        try:
            self.places = self._placed()
            if (problem := software_mismatch(address, self.places, SuiteSoftware.here())) is not None:
                raise ClusterSoftwareMismatch(problem)
        except WorkerDied:
            self.close()
            raise
        super().__init__(
            [f"{index} (Ray actor, pid {place.pid} on {place.host})" for index, place in enumerate(self.places)],
            [f"node {place.node_id[:12]}" for place in self.places],
        )

    def _placed(self) -> list[ActorPlace]:
        """Each actor's place, once all have started (WorkerDied if they cannot, or answer as another version)."""
        ray = self._ray
        try:
            places = ray.get([actor.where.remote() for actor in self._actors], timeout=ACTOR_START_TIMEOUT_S)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as error:
            raise WorkerDied(
                f"--load-cluster {self._address}: {len(self._actors)} load worker actor(s) could not start within "
                f"{ACTOR_START_TIMEOUT_S:g} s; each needs 1 free CPU on some node ({type(error).__name__})"
            ) from None
        except ray.exceptions.RayError as error:
            raise WorkerDied(
                f"--load-cluster {self._address}: a load worker actor failed to start ({ray_cause(error)}); every "
                f"node needs this host's {SUITE_DISTRIBUTION} {SuiteSoftware.here().suite}"
            ) from None
        for place in places:
            if not isinstance(place, ActorPlace):
                raise WorkerDied(
                    f"--load-cluster {self._address}: a node runs another version of {SUITE_DISTRIBUTION} (its load "
                    f"worker said where it runs as {place!r}); install {SuiteSoftware.here().suite} on every node"
                )
        return places

    def check_server_url(self, url: str) -> None:
        if (problem := loopback_unreachable(url, self.names, self.places, self._here)) is not None:
            raise WorkerDied(problem)

    def _head_lost(self, now: bool = False) -> str | None:
        lost = self._head.lost(now)
        return f"--load-cluster {self._address}: {lost}; the suite's load workers there are lost" if lost else None

    def call(self, index: int, method: str, *args: object, timeout_s: float = CATCH_UP_TIMEOUT_S) -> object:
        if (lost := self._head_lost()) is not None:
            raise WorkerDied(lost)
        ray, name = self._ray, self.names[index]
        try:
            return ray.get(getattr(self._actors[index], method).remote(*args), timeout=timeout_s)
        except ray.exceptions.RayActorError as error:  # ActorDiedError, ActorUnavailableError
            raise WorkerDied(self._head_lost(now=True) or f"load worker {name} died: {ray_cause(error)}") from None
        except ray.exceptions.GetTimeoutError:
            raise WorkerDied(
                self._head_lost(now=True) or f"load worker {name} did not answer {method} within {timeout_s:g} s"
            ) from None
        except ray.exceptions.RayTaskError as error:  # the worker's own method raised
            raise WorkerDied(f"load worker {name}: {error.cause}") from None
        except (ray.exceptions.RayError, ConnectionError) as error:  # RaySystemError, a node or the connection lost
            cause = self._head_lost(now=True) or f"Ray lost it: {type(error).__name__}: {ray_cause(error)}"
            raise WorkerDied(f"load worker {name}: {cause}") from None

    def close(self) -> None:
        for actor in self._actors:
            with contextlib.suppress(Exception):  # an actor already gone, or a head that is: nothing left to stop
                self._ray.kill(actor, no_restart=True)
        self._actors = []
        self._ray.shutdown()
