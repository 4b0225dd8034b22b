"""Devices, mesh and shardings: one code path for 1 CPU, 8 GPUs or a TPU pod.

What `pmap` used to do is done the current way: a `jax.make_mesh` over every device with a
'data' axis, the batch sharded along it, the train state replicated, and `jax.jit` with
in/out shardings and a donated state. XLA inserts the gradient all-reduce. BatchNorm
statistics are therefore computed over the *global* batch (synchronised BatchNorm), which
differs from per-device statistics under `pmap`.

Multi-host: every host runs the same program; `initialize_distributed` joins them
(SLURM / TPU / Kubernetes are detected by `jax.distributed.initialize()`; an explicit
coordinator can be given), each host loads only its own rows of the global batch and
`to_global` assembles them into one global array.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_count: int | None = None,
                           cpu_collectives: str = "gloo") -> bool:
    """Joins a multi-host job. Returns True when more than one process takes part.

    With no arguments it relies on JAX's cluster auto-detection (SLURM, TPU pods, ...), and
    does nothing on a single machine with no cluster environment.
    """
    explicit = coordinator_address is not None
    if not explicit and not _cluster_detected():
        return False
    # Only the CPU client reads this (GPUs/TPUs have their own collectives).
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if local_device_count:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def _cluster_detected() -> bool:
    keys = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
            "JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    return any(k in os.environ for k in keys)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over all (or the first `num_devices`) devices with the 'data' axis."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"mesh: asked for {num_devices} devices, only {len(devices)} exist")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, field: str = "train.batch_size") -> None:
    n = mesh.devices.size
    if global_batch % n:
        lo, hi = (global_batch // n) * n, (global_batch // n + 1) * n
        choices = f"{lo} or {hi}" if lo else f"{hi}"
        raise ValueError(f"{field}={global_batch} is not divisible by the {n} devices of the mesh; "
                         f"use a multiple of {n} (e.g. {choices}).")
    if global_batch % jax.process_count():
        raise ValueError(f"{field}={global_batch} is not divisible by the "
                         f"{jax.process_count()} processes.")


def to_global(local: Any, sharding: NamedSharding) -> Any:
    """Host-local numpy batch (this process's rows) -> global jax arrays sharded on 'data'."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree (identical on every process) replicated on every device."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(
        np.shape(x), sharding, lambda idx, x=x: np.asarray(x)[idx]), tree)


def fetch(tree: Any) -> Any:
    """Fully replicated global arrays -> numpy on this host (works across processes)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                        else np.asarray(x), tree)
