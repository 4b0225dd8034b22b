"""Memory-aware batch sizes: the train step's microbatch and the eval batch that fit a device.

Before training, the compiled steps' memory analysis (XLA's estimate of arguments + outputs +
temporaries - donated buffers, `profile.compiled_memory`) is compared with the memory one
device may use: `train.device_memory_gb` when set, else the device's own limit (GPU/TPU) or,
on the CPU backend, the host's available memory shared by its devices, less a margin for the
runtime and the input pipeline. On the CPU a step that does not fit is otherwise killed by
the kernel at its first call with no message.

When the train step at `train.grad_accum_steps` does not fit and `train.auto_accumulate` is
on, the global batch is kept and split into more microbatches: the largest per-device
microbatch whose step fits is chosen (a binary search, one compile per probe). The eval
batch, which changes no result, is halved until its step fits. Both choices are logged.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections

from scaling import parallel

log = logging.getLogger(__name__)

_MEMORY_MARGIN = 0.1   # of the memory found, kept for the runtime and the input pipeline


def host_memory_available() -> int | None:
    """The host's available memory in bytes (Linux /proc/meminfo MemAvailable), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_memory(config: Any) -> tuple[int | None, str]:
    """(bytes one device's steps may use, where the figure comes from), or (None, '') when
    nothing is known (then nothing is checked)."""
    gb = float(config.train.get("device_memory_gb", 0.0) or 0.0)
    if gb > 0:
        return int(gb * 2 ** 30), "train.device_memory_gb"
    if jax.default_backend() == "cpu":
        available = host_memory_available()
        if not available:
            return None, ""
        share = available * (1 - _MEMORY_MARGIN) / jax.local_device_count()
        return int(share), "the host's available memory" + (
            f" / {jax.local_device_count()} devices" if jax.local_device_count() > 1 else "")
    try:
        limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - a backend without memory stats
        limit = None
    if not limit:
        return None, ""
    return int(limit * (1 - _MEMORY_MARGIN)), f"{jax.local_devices()[0].device_kind}'s memory"


class DoesNotFit(ValueError):
    """No batch split of a config fits the device memory (or the given limit)."""


@dataclasses.dataclass
class MemoryPlan:
    grad_accum_steps: int
    eval_batch_size: int
    train_bytes: int | None      # per device, XLA's estimate at the plan
    eval_bytes: int | None
    limit: int | None            # per device
    source: str                  # where `limit` comes from


def _with(config: Any, **train_fields) -> Any:
    if all(config.train.get(k) == v for k, v in train_fields.items()):
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    for k, v in train_fields.items():
        config.train[k] = v
    return config


def train_step_memory(config: Any, mesh, grad_accum_steps: int) -> dict:
    """XLA's per-device memory analysis of one train step of `config` in `grad_accum_steps`
    microbatches (`profile.compiled_memory`; the compiled step is kept by `Run.compile`, so
    `fit` reuses it)."""
    from scaling.profile import compiled_memory
    from scaling.train.run import prepare

    run = prepare(_with(config, grad_accum_steps=grad_accum_steps), mesh)
    return compiled_memory(run.compile())


def train_step_bytes(config: Any, mesh, grad_accum_steps: int) -> int | None:
    """XLA's per-device estimate (peak bytes) for one train step: `train_step_memory`."""
    return train_step_memory(config, mesh, grad_accum_steps).get("peak_bytes")


def eval_step_bytes(config: Any, mesh, eval_batch_size: int) -> int | None:
    """XLA's per-device estimate for one eval step of `config` at `eval_batch_size`."""
    import jax.numpy as jnp

    from scaling.data import example_spec
    from scaling.profile import compiled_memory
    from scaling.train.run import COMPUTE_DTYPES, prepare
    from scaling.train.step import make_eval_step

    run = prepare(config, mesh)
    data = parallel.batch_sharding(mesh)
    spec = {k: jax.ShapeDtypeStruct((eval_batch_size, *shape), dtype, sharding=data)
            for k, (shape, dtype) in example_spec(config.data).items()}
    spec["mask"] = jax.ShapeDtypeStruct((eval_batch_size,), jnp.float32, sharding=data)
    step = make_eval_step(run.model, mesh, compute_dtype=COMPUTE_DTYPES[config.train.compute_dtype],
                          state_sharding=run.state_sharding)
    return compiled_memory(step.lower(run.state_spec, spec).compile()).get("peak_bytes")


def _bytes(n: float, source: str = "") -> str:
    """n bytes in the unit of the limit's `source`: decimal MB for a `..._mb` budget such as
    grid.max_memory_mb (as results.csv's peak_memory_mb), else GiB / MiB."""
    if "_mb" in source:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def _what(config: Any) -> str:
    size = config.data.get("image_size")
    return f"{config.model.name}{f' at {size} px' if size else ''}"


def plan_train(config: Any, mesh, limit: int, source: str) -> tuple[int, int | None]:
    """(grad_accum_steps, XLA's per-device estimate) of `config`'s train step under `limit`
    bytes per device: `train.grad_accum_steps` if it fits, else (`train.auto_accumulate`) the
    fewest microbatches, i.e. the largest per-device microbatch, whose step fits. Raises
    DoesNotFit naming the fields and a fix when none does or auto_accumulate is off."""
    tc, n = config.train, mesh.devices.size
    k0, batch = int(tc.get("grad_accum_steps", 1)), int(tc.batch_size)
    need = train_step_bytes(config, mesh, k0)
    if need is None or need <= limit:
        return k0, need
    # More microbatches, with the same rows on every device. Above one, a larger microbatch
    # needs more memory, so the largest that fits is found by bisection (a compile per probe).
    # (Going from 1 to 2 adds an accumulator the size of the trainable parameters: with small
    # activations 2 microbatches can need more than 1.)
    larger = [j for j in range(k0 + 1, batch // n + 1) if batch % (j * n) == 0]
    fits, lo, hi = None, 0, len(larger) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        need_mid = train_step_bytes(config, mesh, larger[mid])
        if need_mid is not None and need_mid <= limit:
            fits, hi = (larger[mid], need_mid), mid - 1
        else:
            lo = mid + 1
    head = (f"train.batch_size={batch}: a train step of {_what(config)} in {k0} "
            f"microbatch{'es' if k0 > 1 else ''} needs about {_bytes(need, source)} per device (XLA's "
            f"estimate) and {_bytes(limit, source)} is available ({source})")
    if fits is None:
        raise DoesNotFit(f"{head}; even one example per device does not fit: use a smaller "
                         "model or input (--config.data.image_size), or more devices.")
    if not tc.get("auto_accumulate", True):
        raise DoesNotFit(f"{head}; set --config.train.grad_accum_steps={fits[0]} (microbatches "
                         f"of {batch // fits[0]}; the batch is kept), or "
                         "--config.train.auto_accumulate=True.")
    log.info("memory: a train step of %s at batch %d does not fit in %s (%s); training in "
             "grad_accum_steps=%d microbatches of %d (about %s per device)", _what(config), batch,
             _bytes(limit, source), source, fits[0], batch // fits[0], _bytes(fits[1], source))
    return fits


def plan_eval(config: Any, mesh, limit: int, source: str,
              train_need: int | None = None) -> tuple[int, int | None]:
    """(eval batch, XLA's per-device estimate or None when not compiled):
    `train.eval_batch_size`, halved until its step fits `limit` bytes per device (the batch
    changes no result). Raises DoesNotFit when not even one example per device fits.

    An eval step keeps no activations for a backward pass and no optimizer state, so per
    example it needs no more than the train step: given the train step's estimate
    `train_need` (at its microbatch), an eval batch within train_need x eval / microbatch of
    the limit is not compiled here."""
    n, e0 = mesh.devices.size, int(config.train.eval_batch_size)
    tc = config.train
    micro = int(tc.batch_size) // int(tc.get("grad_accum_steps", 1))
    if train_need is not None and train_need * max(1.0, e0 / micro) <= limit:
        return e0, None
    e, need = e0, eval_step_bytes(config, mesh, e0)
    while need is not None and need > limit:
        if e <= n:
            raise DoesNotFit(f"train.eval_batch_size={e0}: an eval step of {_what(config)} needs "
                             f"about {_bytes(need)} per device even at batch {e}, and "
                             f"{_bytes(limit)} is available ({source}); use a smaller model or "
                             "input (--config.data.image_size).")
        e = max(e // 2 // n * n, n)
        need = eval_step_bytes(config, mesh, e)
    if e != e0:
        log.info("memory: evaluating %s in batches of %d instead of train.eval_batch_size=%d "
                 "(%s per device, %s; results do not depend on it)", _what(config), e, e0,
                 _bytes(limit), source)
    return e, need


def eval_limit(limit: int, source: str, config: Any, mesh) -> tuple[int, str]:
    """The memory an eval step may use after training steps ran. On the CPU backend the
    process does not give the train step's working memory back (vgg11_bn at 224 px: a train
    step estimated at 12.4 GiB and an eval step at batch 512 estimated under the 19.9 GiB
    available were killed together on a 23 GiB host), so there the eval step gets the limit
    less what the train step needs beyond its arguments (the train state, which the eval step
    reads too, and the batch); elsewhere the device's whole limit."""
    if jax.default_backend() != "cpu":
        return limit, source
    mem = train_step_memory(config, mesh, int(config.train.get("grad_accum_steps", 1)))
    kept = mem.get("peak_bytes", 0) - mem.get("argument_bytes", 0)
    if kept <= 0 or kept >= limit:
        return limit, source
    return limit - kept, f"{source}, less the train step's working {_bytes(kept)}"


def plan_memory(config: Any, mesh=None, budget: tuple[int, str] | None = None) -> MemoryPlan:
    """`plan_train` and `plan_eval` under the device's memory (`device_memory`). A `budget`
    ((bytes, where it comes from), e.g. a study's grid.max_memory_mb) caps the train step's
    memory when it is the smaller; evaluation only has to fit the device. Where neither is
    known, the config's own values."""
    mesh = mesh or parallel.mesh_from_config(config)
    device, device_source = device_memory(config)
    limit, source = device, device_source
    if budget and (device is None or budget[0] < device):
        limit, source = budget
    k, e = int(config.train.get("grad_accum_steps", 1)), int(config.train.eval_batch_size)
    train_need = eval_need = None
    if limit:
        k, train_need = plan_train(config, mesh, limit, source)
        config = _with(config, grad_accum_steps=k)
    if device:
        e, eval_need = plan_eval(config, mesh, *eval_limit(device, device_source, config, mesh),
                                 train_need)
    return MemoryPlan(k, e, train_need, eval_need, limit, source)


def fit_to_memory(config: Any, mesh=None, budget: tuple[int, str] | None = None) -> MemoryPlan:
    """Plans `config`'s batches for the device memory (and `budget`, see `plan_memory`) and
    writes the choice into it (`train.grad_accum_steps`, `train.eval_batch_size`), so that
    the run directory records the split it trained with and a resume uses the same one."""
    plan = plan_memory(config, mesh, budget)
    config.train.grad_accum_steps = plan.grad_accum_steps
    config.train.eval_batch_size = plan.eval_batch_size
    return plan
