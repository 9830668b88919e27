"""Multi-process runs on JAX's own machinery: `jax.distributed.initialize()` and one global mesh.

Launch the same command on every host (SLURM, Open MPI, a TPU pod slice, or by hand with
`JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=n JAX_PROCESS_ID=i`); `initialize()` joins the
processes, after which `jax.devices()` lists every device of every host and `make_mesh` /
`mesh_from_config` build the same mesh everywhere. Each host then loads only its own rows of a
global batch (`host_rows`) and assembles the global array from them (`global_batch`); loading
a checkpoint onto the mesh reads on each host only the slices its devices hold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from gptoss_jax import sharding as sharding_lib


def launched_on_several_processes(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment says this process is one of several (by the launchers' own
    variables); a single process on a multi-device host is not."""
    env = os.environ if env is None else env

    def more_than_one(name):
        try:
            return int(env.get(name, "1")) > 1
        except ValueError:
            return False

    return (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or any(more_than_one(v) for v in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    force: bool = False,
) -> bool:
    """Join the other processes of this run when there are any (or when `force`); returns whether
    `jax.distributed` is now initialized. Safe to call twice. Explicit arguments win over
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which win over the cluster's
    own auto-detection (SLURM, Open MPI, Cloud TPU, Kubernetes)."""
    if jax.distributed.is_initialized():
        return True
    explicit = coordinator_address is not None or num_processes is not None
    if not (force or explicit or launched_on_several_processes()):
        return False
    env = os.environ
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if _platform() == "cpu":
        # XLA:CPU needs a collectives backend to talk across processes.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True


def _platform() -> str:
    # Before initialize() no backend may be created (that would fix the device set), so read
    # the requested platform rather than asking jax.default_backend().
    name = (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")).split(",")[0]
    return name or "auto"


def host_rows(mesh: Mesh, global_batch_size: int, rules=sharding_lib.DEFAULT_RULES) -> np.ndarray:
    """The rows of a [global_batch_size, ...] batch that this process's devices hold, in order:
    the rows its data loader must produce. Every row belongs to exactly one process unless the
    batch is replicated over processes (then each loads it whole)."""
    sharding = NamedSharding(mesh, sharding_lib.batch_spec(mesh, global_batch_size, rules))
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(global_batch_size)[index[0]])
    return np.array(sorted(rows), dtype=np.int64)


def global_batch(local: np.ndarray, mesh: Mesh, global_batch_size: int, rules=sharding_lib.DEFAULT_RULES) -> jax.Array:
    """A global [global_batch_size, ...] array from this process's rows (`host_rows` order),
    split over the mesh's batch axes."""
    local = np.asarray(local)
    want = len(host_rows(mesh, global_batch_size, rules))
    if local.shape[0] != want:
        raise ValueError(f"this process holds {want} of the {global_batch_size} rows, got {local.shape[0]}")
    spec = sharding_lib.batch_spec(mesh, global_batch_size, rules)
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, spec), local, (global_batch_size,) + local.shape[1:]
    )


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
