"""Devices: multi-host start-up, the 1-D data-parallel mesh, and how batches reach the devices.

One `jax.jit` over a mesh replaces pmap: parameters and optimizer state are replicated
(`P()`), each global batch is split along the "data" axis (`P("data")`), and XLA inserts the
gradient all-reduce. The same code runs on one CPU, several GPUs, or several hosts.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cvae_exp.errors import UserError


def initialize_distributed(cluster) -> None:
    """Starts JAX's multi-host runtime when asked to (or under a multi-task SLURM job); else nothing.

    Must run before any other JAX call touches the backend.
    """
    explicit = cluster.coordinator_address is not None
    under_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if not (explicit or under_slurm):
        return
    if jax.config.jax_platforms in (None, "", "cpu") and not _has_accelerator():
        # CPU collectives across processes need gloo (the default implementation has none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
        )
    else:
        jax.distributed.initialize()


def _has_accelerator() -> bool:
    # Asking jax.devices() would start the backend before distributed.initialize; look at the env.
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("SLURM_GPUS_ON_NODE"))


def make_mesh(devices: str | int) -> jax.sharding.Mesh:
    """A 1-D mesh named "data" over all devices of all processes, or the first N of them."""
    available = jax.devices()
    n = len(available) if str(devices) == "all" else int(devices)
    if n > len(available):
        raise UserError(f"trainer.devices={n} asks for more devices than the {len(available)} available.")
    # Auto axes: XLA propagates shardings (JAX 0.10's default Explicit axes reject, e.g., a reshape
    # that merges the sharded batch axis, which the importance-sampling estimator does).
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=available[:n])


def check_batch(key: str, batch_size: int, mesh) -> None:
    n = mesh.size
    if batch_size % n:
        raise UserError(f"{key}={batch_size} does not divide by the {n} devices in use; pick a multiple of {n}.")


def round_to_devices(batch_size: int, mesh) -> int:
    """An evaluation batch size rounded up to a multiple of the devices, so that every device gets a share
    (evaluation batches are padded and weighted, so any size is exact)."""
    return -(-batch_size // mesh.size) * mesh.size


def memory_bytes(mesh) -> int | None:
    """The memory one device of `mesh` may use (an accelerator's limit; on a CPU the machine's memory), or
    None where neither is known."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]  # another host's: no stats
    try:
        stats = (local[0].memory_stats() if local else None) or {}
    except Exception:  # a backend without memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh, seeds: int = 1) -> NamedSharding:
    """Batches split along "data"; K-seed batches [K, B, ...] are split along B, every seed on every device."""
    return NamedSharding(mesh, P(None, "data") if seeds > 1 else P("data"))


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding):
    """A host batch (the global batch, the same on every process) as arrays split along "data".

    With one process this is an async device_put; with several, each process contributes only
    the rows that belong to its own devices.
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    i, n = jax.process_index(), jax.process_count()
    axis = list(sharding.spec).index("data")  # 0, or 1 for K-seed batches

    def local(a):
        rows = a.shape[axis] // n
        mine = np.take(a, np.arange(i * rows, (i + 1) * rows), axis=axis)
        return jax.make_array_from_process_local_data(sharding, mine)

    return {k: local(v) for k, v in batch.items()}


def hardware(mesh_size: int) -> str:
    """The line metrics.json records as `hardware`: the devices a run used and the host's CPU cores."""
    device = jax.devices()[0]
    return f"{mesh_size} x {device.device_kind} ({device.platform}), {os.cpu_count()} CPU cores"
