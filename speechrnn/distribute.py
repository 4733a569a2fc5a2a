"""Where training runs: one device, several local devices, or several workers (processes or machines).

Three tf.distribute strategies, by name:

``default``      TensorFlow's default strategy: one device.
``mirrored``     ``tf.distribute.MirroredStrategy`` over this machine's GPUs (or, without one, its
                 logical CPU devices): one process, one replica per device.
``multiworker``  ``tf.distribute.MultiWorkerMirroredStrategy``: one process per worker, each told
                 the cluster and its own place in it by the ``TF_CONFIG`` environment variable, the
                 standard way: ``{"cluster": {"worker": ["host1:port", "host2:port"]},
                 "task": {"type": "worker", "index": 0}}``. Worker 0 (or the one ``"chief"`` task, if
                 the cluster names one) is the chief.

Every replica holds the whole model; each step, each replica computes the gradient of its slice of
the global batch, and the gradients are summed across replicas (all-reduce). ``Distribution`` adds
the few collective operations the trainer needs besides: a sum across workers, a broadcast from
the chief, and an agreement on whether every worker is ready (so that a worker that cannot start
stops the others with a clear message instead of leaving them waiting).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
from dataclasses import dataclass, field

import numpy as np

from data_prep.errors import SpeechRNNError
from speechrnn.tfutil import import_tf

log = logging.getLogger(__name__)
STRATEGIES = ("default", "mirrored", "multiworker")
TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')


def _bad(reason: str) -> SpeechRNNError:
    return SpeechRNNError(f"TF_CONFIG {reason}; set it on each worker like {TF_CONFIG_EXAMPLE} "
                          "(the same cluster everywhere, each worker its own index)")


@dataclass(frozen=True)
class Cluster:
    """This process's place in a multi-worker cluster, from TF_CONFIG.

    ``workers`` lists every task's address in the order tf.distribute numbers them (the chief
    first, if there is one); ``index`` is this process's position in it (worker index 0 is the
    chief)."""

    workers: tuple[str, ...]
    index: int
    task: str  # "chief" or "worker", with its TF_CONFIG index: "worker 1"

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    @property
    def address(self) -> str:
        return self.workers[self.index]


def parse_tf_config(text: str | None) -> Cluster:
    """Check TF_CONFIG and return this worker's place in the cluster.

    Raises SpeechRNNError (one line, naming what is wrong and how it should look) for a missing or
    malformed TF_CONFIG: not JSON, no cluster or task, an address that is not host:port, an index
    out of range, task types other than chief/worker (parameter servers and evaluators are not
    used here)."""
    if not text or not text.strip():
        raise _bad("is not set: --strategy multiworker needs it")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise _bad(f"is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict) \
            or not isinstance(config.get("task"), dict):
        raise _bad('needs a "cluster" object and a "task" object')
    cluster, task = config["cluster"], config["task"]
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown:
        raise _bad(f"names task types {', '.join(unknown)}: only chief and worker are used")
    for kind in ("chief", "worker"):
        addresses = cluster.get(kind, [])
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise _bad(f'"{kind}" must be a list of "host:port" strings')
        for address in addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise _bad(f"address {address!r} is not host:port")
    if len(cluster.get("chief", [])) > 1:
        raise _bad('lists more than one "chief"')
    workers = tuple(cluster.get("chief", [])) + tuple(cluster.get("worker", []))
    if not workers:
        raise _bad('lists no workers under "cluster": {"worker": [...]}')
    if len(set(workers)) != len(workers):
        raise _bad("lists the same address twice")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in ("chief", "worker"):
        raise _bad(f'has task type {kind!r}: it must be "worker" (or "chief")')
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster.get(kind, [])):
        raise _bad(f'has task index {index!r}, but the cluster lists {len(cluster.get(kind, []))} "{kind}" task(s)')
    position = index if kind == "chief" else len(cluster.get("chief", [])) + index
    return Cluster(workers, position, f"{kind} {index}")


def check_port_free(address: str) -> None:
    """Raise SpeechRNNError if this worker's port is already taken on this machine.

    TensorFlow's server would otherwise share it silently (gRPC sets SO_REUSEPORT) or fail deep
    inside the strategy with a stack trace."""
    port = int(address.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            raise SpeechRNNError(f"port {port} of this worker's address {address} is in use: stop what holds it "
                                 "or give this worker another port in every worker's TF_CONFIG") from None


def cluster_from_env(strategy: str) -> Cluster | None:
    """This process's Cluster for ``--strategy multiworker`` (from TF_CONFIG), else None."""
    if strategy not in STRATEGIES:
        raise SpeechRNNError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return parse_tf_config(os.environ.get("TF_CONFIG")) if strategy == "multiworker" else None


@dataclass
class Distribution:
    """A tf.distribute strategy plus what the trainer needs to know about this process's part.

    ``num_replicas`` counts every replica in the cluster; this process's are the contiguous ids
    ``local_replicas``. ``num_workers``/``worker_index`` count processes (one per machine, or
    several on one machine)."""

    name: str
    strategy: object
    num_workers: int = 1
    worker_index: int = 0
    local_replicas: range = field(default_factory=lambda: range(1))
    num_replicas: int = 1
    cluster: Cluster | None = None

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0

    @property
    def describe(self) -> str:
        if self.cluster is None:
            return f"{self.name} strategy, {self.num_replicas} replica(s)"
        return (f"{self.name} strategy: {self.cluster.task} ({self.cluster.address}) of {self.num_workers} workers, "
                f"{self.num_replicas} replica(s)")

    # --- collectives across workers (no-ops with one worker) ---------------------------------
    def _all_reduce_sum(self, value: np.ndarray) -> np.ndarray:
        tf = import_tf()
        strategy, first = self.strategy, self.local_replicas.start
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(value) if ctx.replica_id_in_sync_group == first else tf.zeros_like(value))
        out = strategy.run(lambda v: tf.distribute.get_replica_context().all_reduce("sum", v), args=(values,))
        return strategy.experimental_local_results(out)[0].numpy()

    def sum(self, values) -> np.ndarray:
        """float64 ``values`` summed over the workers (each worker's own numbers counted once)."""
        values = np.asarray(values, np.float64)
        return values if self.num_workers == 1 else self._all_reduce_sum(values)

    def broadcast(self, payload: bytes | None) -> bytes:
        """The chief's ``payload`` on every worker (others pass None)."""
        if self.num_workers == 1:
            return payload or b""
        data = payload if self.is_chief else b""
        size = int(self._all_reduce_sum(np.array([len(data)], np.int64))[0])
        padded = np.zeros((size + 3) // 4, np.int32)
        if self.is_chief:
            padded.view(np.uint8)[:size] = np.frombuffer(data, np.uint8)
        return self._all_reduce_sum(padded).view(np.uint8)[:size].tobytes()

    def agree(self, error: SpeechRNNError | None, doing: str) -> None:
        """Raise ``error`` here, and on every other worker an error naming the workers that failed ``doing``."""
        if self.num_workers == 1:
            if error is not None:
                raise error
            return
        flags = np.zeros(self.num_workers, np.int64)
        flags[self.worker_index] = error is not None
        failed = np.flatnonzero(self._all_reduce_sum(flags))
        if error is not None:
            raise error
        if len(failed):
            names = ", ".join(f"worker {i}" for i in failed)
            raise SpeechRNNError(f"{names} could not {doing} (its own output says why); fix that and start "
                                 "every worker again")

    def finish(self) -> None:
        """A last barrier, so no worker exits while another still reads from it; failures here are
        harmless (every result is already written) and only logged."""
        if self.num_workers == 1:
            return
        tf = import_tf()
        try:
            self._all_reduce_sum(np.zeros(1, np.int64))
        except tf.errors.OpError as exc:  # a worker that already left
            log.debug("final barrier: %s", exc)


def make_distribution(name: str, cluster: Cluster | None = None) -> Distribution:
    """Create the strategy ``name`` (one of STRATEGIES). Must run before any other TensorFlow work
    in the process (tf.distribute's rule for multi-worker training). Raises SpeechRNNError for a
    bad TF_CONFIG or a taken port."""
    if name not in STRATEGIES:
        raise SpeechRNNError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    tf = import_tf()
    if name == "default":
        if os.environ.get("TF_CONFIG"):
            log.warning("TF_CONFIG is set but --strategy is default (one device): ignoring it")
        return Distribution(name, tf.distribute.get_strategy())
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
                  [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
        return Distribution(name, strategy, local_replicas=range(strategy.num_replicas_in_sync),
                            num_replicas=strategy.num_replicas_in_sync)
    cluster = cluster or parse_tf_config(os.environ.get("TF_CONFIG"))
    check_port_free(cluster.address)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    # A worker blocked in a collective (waiting for a peer) never returns to Python, so Python's
    # SIGINT handler and TensorFlow's own SIGTERM handler would leave Ctrl-C and `kill` without
    # effect. The default actions end the process at once; checkpoints are atomic, so nothing is lost.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ids = strategy.experimental_local_results(
        strategy.experimental_distribute_values_from_function(lambda ctx: ctx.replica_id_in_sync_group))
    ids = [int(i) for i in ids]
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise RuntimeError(f"tf.distribute gave this worker replicas {ids}, not a contiguous range")
    if strategy.num_replicas_in_sync % len(ids) or ids[0] // len(ids) != cluster.index:
        raise SpeechRNNError("every worker must have the same number of devices (GPUs) for --strategy multiworker")
    return Distribution(name, strategy, len(cluster.workers), cluster.index, range(ids[0], ids[0] + len(ids)),
                        strategy.num_replicas_in_sync, cluster)


def pack(header: dict, blob: bytes = b"") -> bytes:
    """A JSON header and a binary blob as one byte string (for Distribution.broadcast)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + blob


def unpack(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]
