"""Size and cost of a model: parameter counts, multiply-accumulates, compiled memory and FLOPs.

MACs are counted from the jaxpr, on shapes only, with the convention of torchvision and the
EfficientNet/MobileNet papers: only convolutions and matrix products (linear layers,
attention) count, one multiply-add = 1 MAC; norms, activations and pooling are free.

    stats = model_stats(create_model("resnet50"), 224)   # {'params': 25557032, ..., 'gmacs': 4.09}

`compiled_memory` / `compiled_flops` ask XLA about a compiled function (e.g. a train step):
these include the backward pass, optimizer update and everything else XLA emits.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from scaling.models.layers import DEPTHWISE_JIT_NAME


def _conv_macs(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, *spatial dims)
    # The kernel's input-feature dim is already in_channels / feature_group_count.
    per_output = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
    return math.prod(out) * per_output


def _dot_macs(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    # output = batch dims x lhs free dims x rhs free dims; each sums over the contracting dims.
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _depthwise_macs(eqn) -> int:
    # The slice form of a depthwise conv (`layers.depthwise_conv`): output x kh x kw.
    kernel = eqn.invars[1].aval.shape  # (kh, kw, 1, C)
    return math.prod(eqn.outvars[0].aval.shape) * kernel[0] * kernel[1]


def _sub_jaxprs(value) -> list:
    if isinstance(value, jcore.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jcore.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "dot_general":
            total += _dot_macs(eqn)
        elif name in ("jit", "pjit") and eqn.params.get("name") == DEPTHWISE_JIT_NAME:
            total += _depthwise_macs(eqn)
        elif name == "cond":  # one branch runs: count the most expensive
            total += max((_jaxpr_macs(j) for j in _sub_jaxprs(eqn.params["branches"])), default=0)
        else:
            # pjit, closed_call, remat, custom_jvp/vjp_call, while (body counted once), scan...
            inner = sum(_jaxpr_macs(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
            total += inner * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


def _abstract(tree):
    """Arrays -> ShapeDtypeStruct, so tracing never touches data."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x
    return jax.tree.map(leaf, tree)


def count_macs(apply_fn: Callable, *args, **kwargs) -> int:
    """Multiply-accumulates of `apply_fn(*args, **kwargs)`, from its jaxpr (shapes only).

    `args` are pytrees of arrays or `jax.ShapeDtypeStruct`s; `kwargs` are passed through
    unchanged (static values such as `train=False`). Convolutions count
    output elements x kernel spatial size x in_channels / feature_group_count; dot_generals
    count batch x contracting x free dims; the slice form of a depthwise conv (a jit named
    `layers.DEPTHWISE_JIT_NAME`) counts as that conv. Sub-jaxprs (jit, remat, custom derivatives, scan
    x length, while once, cond's largest branch) are walked. The count is for the batch in
    `args`: pass batch 1 for per-image MACs.
    """
    fn = functools.partial(apply_fn, **kwargs)
    closed = jax.make_jaxpr(fn)(*_abstract(args))
    return _jaxpr_macs(closed.jaxpr)


def _count(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def model_stats(model, resolution: int, batch: int = 1, in_chans: int = 3) -> dict[str, Any]:
    """{'params', 'batch_stats', 'gmacs'} of a Linen model at `resolution`, without computing.

    params counts the trainable 'params' collection, batch_stats the BatchNorm running
    statistics; gmacs is per image (batch 1), in units of 1e9 MACs. `batch` only sets the
    batch used to initialise the variables.
    """
    x = jax.ShapeDtypeStruct((batch, resolution, resolution, in_chans), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = jax.eval_shape(lambda x: model.init(rngs, x, train=False), x)
    one = jax.ShapeDtypeStruct((1, resolution, resolution, in_chans), jnp.float32)
    macs = count_macs(lambda v, x: model.apply(v, x, train=False), variables, one)
    return dict(params=_count(variables.get("params", {})),
                batch_stats=_count(variables.get("batch_stats", {})),
                gmacs=macs / 1e9)


def _compile(fn, args):
    """`fn` may be a function (jitted and compiled for `args`) or an already compiled object."""
    if hasattr(fn, "memory_analysis") and hasattr(fn, "cost_analysis"):
        return fn
    return jax.jit(fn).lower(*args).compile()


def compiled_memory(fn: Callable, *args) -> dict[str, int]:
    """XLA's memory estimate of `jax.jit(fn)` for `args` (arrays or ShapeDtypeStructs), bytes.

    `peak_bytes` = arguments + outputs + temporaries - aliased (donated) buffers: a
    per-device upper estimate of what one call needs. Pass a `Compiled` object instead of
    `fn` to reuse a compilation. Returns an empty dict when the backend has no estimate.
    """
    stats = _compile(fn, args).memory_analysis()
    if stats is None:
        return {}
    get = lambda k: int(getattr(stats, f"{k}_size_in_bytes", 0) or 0)  # noqa: E731
    out = {f"{k}_bytes": get(k) for k in ("argument", "output", "temp", "alias", "generated_code")}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def compiled_flops(fn: Callable, *args) -> float | None:
    """FLOPs of `jax.jit(fn)` for `args` per XLA's cost analysis (a multiply-add is 2 FLOPs
    there, and elementwise ops count too), or None when the backend gives no estimate."""
    cost = _compile(fn, args).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
