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

FSDP: the mesh is 2-D, ('data', 'fsdp'), sized by the config's `mesh` section (default
data=-1, fsdp=1: every device on 'data', i.e. plain data parallelism). The batch is split over
both axes; parameters and the optimizer state are split over 'fsdp' by `state_shardings`
(the config's `sharding.rules` first, then each large tensor's largest dimension divisible by
the fsdp size); XLA gathers a layer's weights when the step needs them and reduce-scatters its
gradient. BatchNorm statistics, the step counter and the rng stay replicated.
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)


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


def default_mesh_config() -> ml_collections.ConfigDict:
    """The `mesh` config section: the size of each mesh axis (-1: the devices left over)."""
    return ml_collections.ConfigDict(dict(
        data=-1,   # batch split only (each device holds the whole train state)
        fsdp=1,    # batch split and train state split (parameters, optimizer state)
    ))


def default_sharding_config() -> ml_collections.ConfigDict:
    """The `sharding` config section: how parameters and optimizer state are split."""
    return ml_collections.ConfigDict(dict(
        rules=(),              # ((regex over the '/'-joined param path, partition spec), ...)
        fsdp_min_size=2 ** 16,  # tensors with fewer elements stay replicated
    ))


def mesh_sizes(num_devices: int | None, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
    """(data, fsdp) sizes for `num_devices` devices, -1 resolved; ValueError naming the field.
    num_devices None: the values alone are checked (and returned unresolved)."""
    sizes = {DATA_AXIS: data, FSDP_AXIS: fsdp}
    for axis, n in sizes.items():
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or (n < 1 and n != -1):
            raise ValueError(f"mesh.{axis}={n!r}: must be a positive integer or -1 (the devices "
                             "left over by the other axes).")
    free = [a for a, n in sizes.items() if n == -1]
    fixed = math.prod(n for n in sizes.values() if n != -1)
    shown = " x ".join(f"mesh.{a}={n}" for a, n in sizes.items())
    if len(free) > 1:
        raise ValueError(f"{shown}: at most one axis can be -1; set the others to sizes that "
                         "multiply to the device count.")
    if num_devices is None:
        return sizes[DATA_AXIS], sizes[FSDP_AXIS]
    if free:
        if num_devices % fixed:
            raise ValueError(f"{shown}: {fixed} does not divide the {num_devices} devices; use "
                             f"sizes whose product divides {num_devices}.")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"{shown} = {fixed} devices, but there are {num_devices}; make the sizes "
                         f"multiply to {num_devices}, or set one of them to -1 (the rest).")
    return sizes[DATA_AXIS], sizes[FSDP_AXIS]


def make_mesh(num_devices: int | None = None, *, data: int = -1, fsdp: int = 1) -> Mesh:
    """A ('data', 'fsdp') mesh over all (or the first `num_devices`) devices, in device order
    (so on several hosts an 'fsdp' group smaller than a host's devices stays on one host).
    The default, fsdp=1, is data parallelism over every device."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"mesh: asked for {num_devices} devices, only {len(devices)} exist")
        devices = devices[:num_devices]
    shape = mesh_sizes(len(devices), data, fsdp)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def mesh_from_config(config: Any, num_devices: int | None = None) -> Mesh:
    """The mesh of a config's `mesh` section (absent: data parallelism over every device)."""
    m = _section(config, "mesh")
    return make_mesh(num_devices, data=m.get(DATA_AXIS, -1), fsdp=m.get(FSDP_AXIS, 1))


def _section(config: Any, name: str) -> Any:
    section = config.get(name) if hasattr(config, "get") else None
    return {} if section is None else section


def check_mesh_config(config: Any, num_devices: int | None = None) -> None:
    """The config's `mesh` and `sharding` sections, before anything is built: known axes,
    sizes that multiply to `num_devices` (when given), rules that compile and name known axes.
    Raises one ValueError naming the field and the fix."""
    mesh = _section(config, "mesh")
    for axis in mesh:
        if axis not in MESH_AXES:
            raise ValueError(f"mesh.{axis}: unknown mesh axis; the axes are "
                             f"{', '.join(MESH_AXES)} (set their sizes, -1 for the rest).")
    sizes = {a: mesh.get(a, d) for a, d in default_mesh_config().items()}
    mesh_sizes(num_devices, **sizes)
    check_sharding_config(_section(config, "sharding"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch is split over: 'data' and 'fsdp' (those the mesh has)."""
    return tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)


def batch_devices(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    axes = batch_axes(mesh)
    return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))


def check_batch_size(global_batch: int, mesh: Mesh, field: str = "train.batch_size") -> None:
    n = batch_devices(mesh)
    if global_batch % n:
        lo, hi = (global_batch // n) * n, (global_batch // n + 1) * n
        choices = f"{lo} or {hi}" if lo else f"{hi}"
        raise ValueError(f"{field}={global_batch} is not divisible by the {n} devices of the mesh; "
                         f"use a multiple of {n} (e.g. {choices}).")
    if global_batch % jax.process_count():
        raise ValueError(f"{field}={global_batch} is not divisible by the "
                         f"{jax.process_count()} processes.")


# --------------------------------------------------------------------------- state sharding
_RULE_FIX = ("write sharding.rules as ((regex, spec), ...), e.g. (('blocks_.*/mlp/fc1/kernel', "
             "(None, 'fsdp')),), where a spec holds one entry per tensor dimension: None "
             "(not split), an axis name or a tuple of axis names")


def _spec_entries(spec: Any) -> tuple | None:
    """A rule's spec as a tuple of entries (None, axis, or tuple of axes); None if malformed."""
    if spec is None:
        return ()
    if isinstance(spec, P):
        return tuple(spec)
    if isinstance(spec, str):
        return (spec,)
    if isinstance(spec, (tuple, list)):
        out = []
        for e in spec:
            if e is None or isinstance(e, str):
                out.append(e)
            elif isinstance(e, (tuple, list)) and e and all(isinstance(a, str) for a in e):
                out.append(tuple(e))
            else:
                return None
        return tuple(out)
    return None


def check_sharding_config(sharding: Any, axes: tuple[str, ...] = MESH_AXES) -> list[tuple[re.Pattern, P]]:
    """The compiled `sharding.rules` of a config's `sharding` section (absent: none), checked:
    ValueError naming the field and the fix for a bad regex, a malformed spec or a spec that
    names an axis the mesh does not have."""
    sharding = {} if sharding is None else sharding
    min_size = sharding.get("fsdp_min_size", 0)
    if not isinstance(min_size, (int, np.integer)) or isinstance(min_size, bool) or min_size < 0:
        raise ValueError(f"sharding.fsdp_min_size={min_size!r}: must be an integer >= 0 (the "
                         "element count below which a tensor stays replicated).")
    rules = sharding.get("rules") or ()
    if not isinstance(rules, (tuple, list)):
        raise ValueError(f"sharding.rules={rules!r}: not a sequence of rules; {_RULE_FIX}.")
    compiled = []
    for i, rule in enumerate(rules):
        field = f"sharding.rules[{i}]"
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"{field}={rule!r}: not a (regex, spec) pair; {_RULE_FIX}.")
        try:
            pattern = re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"{field}: bad regex {rule[0]!r} ({e}); give a Python regular "
                             "expression over the '/'-joined parameter path, e.g. "
                             "'blocks_.*/mlp/fc1/kernel'.") from None
        entries = _spec_entries(rule[1])
        if entries is None:
            raise ValueError(f"{field}: bad spec {rule[1]!r}; {_RULE_FIX}.")
        named = [a for e in entries if e is not None for a in ((e,) if isinstance(e, str) else e)]
        unknown = [a for a in named if a not in axes]
        if unknown:
            raise ValueError(f"{field}: spec {rule[1]!r} names the unknown mesh axis "
                             f"{unknown[0]!r}; the mesh axes are {', '.join(axes)}.")
        if len(set(named)) != len(named):
            raise ValueError(f"{field}: spec {rule[1]!r} uses a mesh axis twice; use each axis "
                             "at most once per tensor.")
        compiled.append((pattern, P(*entries)))
    return compiled


def path_name(path: tuple) -> str:
    """A pytree key path as the '/'-joined names sharding rules match, e.g. 'head/kernel'."""
    return "/".join(_key_name(k) for k in path)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh, rules: list[tuple[re.Pattern, P]],
               fsdp_min_size: int) -> P:
    """The partition spec of parameter `name` of `shape`: the first rule whose regex matches
    (re.search) the name; else, for a tensor of at least `fsdp_min_size` elements, its largest
    dimension divisible by the fsdp size (the later one on ties) split over 'fsdp'; else
    replicated."""
    for i, (pattern, spec) in enumerate(rules):
        if pattern.search(name):
            if len(spec) > len(shape):
                raise ValueError(f"sharding.rules[{i}] ({pattern.pattern!r}, {tuple(spec)}) matches "
                                 f"{name} of shape {tuple(shape)}: the spec has more entries than "
                                 "the tensor has dimensions; give one entry per dimension.")
            for dim, entry in enumerate(spec):
                axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
                n = math.prod(mesh.shape[a] for a in axes)
                if shape[dim] % n:
                    raise ValueError(
                        f"sharding.rules[{i}] ({pattern.pattern!r}, {tuple(spec)}) matches {name} "
                        f"of shape {tuple(shape)}: dimension {dim} ({shape[dim]}) is not divisible "
                        f"by the {n} devices of {entry!r}; split another dimension, or narrow the "
                        "regex.")
            return spec
    n = mesh.shape.get(FSDP_AXIS, 1)
    if n > 1 and math.prod(shape) >= max(fsdp_min_size, 1):
        dims = [d for d in range(len(shape)) if shape[d] % n == 0]
        if dims:
            d = max(dims, key=lambda d: (shape[d], d))
            return P(*([None] * d), FSDP_AXIS)
    return P()


def state_shardings(state: Any, mesh: Mesh, sharding: Any = None) -> Any:
    """NamedShardings for a TrainState (of arrays or ShapeDtypeStructs) on `mesh`, following the
    config's `sharding` section (see `param_spec`). Each optimizer-state leaf whose key path ends
    with a parameter's path and has its shape (momentum, Adam moments, ...) is split like that
    parameter; other leaves (step counts), the BatchNorm statistics, the step and the rng are
    replicated."""
    rules = check_sharding_config(sharding, tuple(mesh.axis_names))
    min_size = ({} if sharding is None else sharding).get(
        "fsdp_min_size", default_sharding_config().fsdp_min_size)
    rep = replicated(mesh)
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}

    def param(path, x):
        keys = tuple(_key_name(k) for k in path)
        s = NamedSharding(mesh, param_spec("/".join(keys), tuple(x.shape), mesh, rules, min_size))
        by_path[keys] = (tuple(x.shape), s)
        return s

    def mirror(path, x):
        keys = tuple(_key_name(k) for k in path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return rep

    params = jax.tree_util.tree_map_with_path(param, state.params)
    return state.replace(
        step=rep, rng=rep, params=params,
        batch_stats=jax.tree.map(lambda _: rep, state.batch_stats),
        opt_state=jax.tree_util.tree_map_with_path(mirror, state.opt_state))


def state_bytes_per_device(state: Any) -> int:
    """Bytes of a TrainState of ShapeDtypeStructs (with shardings) that the most loaded device
    holds."""
    per_device: dict[Any, int] = {}
    for x in jax.tree.leaves(state):
        for device, index in x.sharding.devices_indices_map(tuple(x.shape)).items():
            n = math.prod(len(range(*s.indices(dim))) for s, dim in zip(index, x.shape))
            per_device[device] = per_device.get(device, 0) + n * np.dtype(x.dtype).itemsize
    return max(per_device.values(), default=0)


def to_global(local: Any, sharding: NamedSharding) -> Any:
    """Host-local numpy batch (this process's rows) -> global jax arrays sharded on 'data'."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def place(tree: Any, shardings: Any) -> Any:
    """Places a host pytree (identical on every process) on the devices with `shardings` (one
    sharding, or a pytree of them matching `tree`); each device receives only its slice."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(
        np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]), tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree (identical on every process) replicated on every device."""
    return place(tree, replicated(mesh))


def fetch(tree: Any) -> Any:
    """Global arrays, replicated or sharded -> full numpy arrays on this host. Sharded arrays
    that span processes are gathered with a collective: every process must call this then."""
    leaves, treedef = jax.tree.flatten(tree)
    out = [None] * len(leaves)
    remote = []
    for i, x in enumerate(leaves):
        if not isinstance(x, jax.Array):
            out[i] = np.asarray(x)
        elif x.is_fully_replicated:
            out[i] = np.asarray(x.addressable_data(0))
        elif x.is_fully_addressable:
            out[i] = np.asarray(x)
        else:
            remote.append(i)
    if remote:
        gathered = multihost_utils.process_allgather([leaves[i] for i in remote], tiled=True)
        for i, x in zip(remote, gathered):
            out[i] = np.asarray(x)
    return jax.tree.unflatten(treedef, out)
