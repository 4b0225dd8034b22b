"""Pieces shared by the model families: normalization factory, activations, conv helpers,
squeeze-and-excitation, stochastic depth.

Normalization is chosen by name (`norm='batch'|'layer'|'instance'|'group'`). BatchNorm is
the default and the exact one of the reference models. Under `jax.jit` with a batch sharded
over a device mesh, BatchNorm statistics are computed over the *global* batch (synchronised
BN) without any extra code, unlike per-device statistics under `pmap`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NORMS = ("batch", "layer", "instance", "group")

# torchvision initialisers: kaiming-normal fan_out for convs; Linear default for heads.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class GroupNorm(nn.Module):
    """Group normalization over (H, W, C/groups); `num_groups=1` is LayerNorm over (H, W, C),
    `group_size=1` is InstanceNorm. With `num_groups` not dividing C, the largest common
    divisor is used. Parameters are `scale` and `bias`, as in BatchNorm."""
    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        groups = c // self.group_size if self.group_size else math.gcd(self.num_groups, c)
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, c // groups))
        axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
        mean = xf.mean(axis=axes, keepdims=True)
        var = jnp.square(xf - mean).mean(axis=axes, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return (y * scale + bias).astype(dtype)


def make_norm(kind: str = "batch", *, train: bool = False, momentum: float = 0.9,
              epsilon: float = 1e-5, dtype: Dtype | None = None, groups: int = 32,
              axis_name: str | None = None) -> Callable[..., nn.Module]:
    """Returns a constructor `norm(name=None, scale_init=...)` for the chosen normalization.

    `momentum` is flax's (= 1 - torch momentum: torch 0.1 -> 0.9; Keras/TF 0.99 -> 0.99).
    """
    if kind == "batch":
        return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=momentum,
                                 epsilon=epsilon, dtype=dtype, axis_name=axis_name)
    if kind == "layer":
        return functools.partial(GroupNorm, num_groups=1, epsilon=epsilon, dtype=dtype)
    if kind == "instance":
        return functools.partial(GroupNorm, num_groups=None, group_size=1, epsilon=epsilon,
                                 dtype=dtype)
    if kind == "group":
        return functools.partial(GroupNorm, num_groups=groups, epsilon=epsilon, dtype=dtype)
    raise ValueError(f"model.norm: unknown normalization {kind!r}; use one of {', '.join(NORMS)}.")


def hard_sigmoid(x):
    return jax.nn.relu6(x + 3.0) / 6.0


def hard_swish(x):
    return x * hard_sigmoid(x)


ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "relu6": jax.nn.relu6,
    "swish": nn.swish,
    "silu": nn.swish,
    "hard_swish": hard_swish,
    "hard_sigmoid": hard_sigmoid,
    "sigmoid": nn.sigmoid,
    "gelu": functools.partial(nn.gelu, approximate=False),  # exact (erf) GELU, as torch/timm
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def activation(name: str | Callable) -> Callable:
    if callable(name):
        return name
    if name not in ACTIVATIONS:
        raise ValueError(f"model.act: unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def sym_padding(kernel: int | Sequence[int], dilation: int = 1) -> Sequence[tuple[int, int]]:
    """torch-style symmetric padding that keeps 'same' size for odd kernels at stride 1."""
    ks = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    return tuple(((k - 1) * dilation // 2, (k - 1) * dilation // 2) for k in ks)


class ConvNormAct(nn.Module):
    """conv -> norm -> activation, the stem and building unit of most conv families.

    `padding='SAME'` is TensorFlow's (asymmetric at stride 2); `padding=None` is torch's
    symmetric (k-1)//2.
    """
    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int = 1
    groups: int = 1
    padding: Any = None
    act: str | Callable | None = "relu"
    norm: Callable[..., nn.Module] | None = None
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    conv_name: str = "conv"
    norm_name: str = "bn"

    @nn.compact
    def __call__(self, x):
        ks = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        pad = sym_padding(ks) if self.padding is None else self.padding
        x = nn.Conv(self.features, ks, strides=self.strides, padding=pad,
                    feature_group_count=self.groups, use_bias=self.use_bias, dtype=self.dtype,
                    kernel_init=conv_init, name=self.conv_name)(x)
        if self.norm is not None:
            x = self.norm(name=self.norm_name)(x)
        if self.act is not None:
            x = activation(self.act)(x)
        return x


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool -> reduce (1x1 conv) -> act -> expand -> gate."""
    reduced: int
    act: str | Callable = "relu"
    gate: str | Callable = "sigmoid"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.Conv(self.reduced, (1, 1), dtype=self.dtype, name="reduce")(s)
        s = activation(self.act)(s)
        s = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="expand")(s)
        return x * activation(self.gate)(s)


class DropPath(nn.Module):
    """Stochastic depth / drop-connect: drops the whole residual branch per example.

    Uses the 'dropout' RNG stream; inactive when `deterministic` or `rate == 0`.
    """
    rate: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if deterministic or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def global_avg_pool(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


class Head(nn.Module):
    """Optional dropout then the final linear classifier (named `fc` unless told)."""
    num_classes: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_init)(x)


class LocalResponseNorm(nn.Module):
    """`torch.nn.LocalResponseNorm` across channels (the last axis), no parameters:

        b_c = a_c / (k + alpha / size * sum_{c'} a_{c'}^2) ** beta,
        c' in [c - size // 2, c + (size - 1) // 2], zero-padded at both ends.

    As in torch, `alpha` is divided by `size`. Krizhevsky et al. 2012 write the sum without
    that division (n=5, alpha=1e-4, beta=0.75, k=2): in these semantics that is
    `LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)`. Computed in float32.
    """
    size: int
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0

    @nn.compact
    def __call__(self, x):
        xf = x.astype(jnp.float32)
        lead = (1,) * (x.ndim - 1)
        pad = ((0, 0),) * (x.ndim - 1) + ((self.size // 2, (self.size - 1) // 2),)
        sums = jax.lax.reduce_window(jnp.square(xf), 0.0, jax.lax.add, lead + (self.size,),
                                     lead + (1,), pad)
        return (xf / (self.k + (self.alpha / self.size) * sums) ** self.beta).astype(x.dtype)
